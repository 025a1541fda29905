"""Redis fixtures: the real server of this machine, each test under its own key prefix.

- `redis_url`: `TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`); skipped without a server,
  unless `CALLBOT_REQUIRE_REDIS=1` (CI), which turns the skip into a failure.
- `shared_state`: the settings that put an app on that server under a prefix of this test's
  own (`REDIS_URL`, `REDIS_KEY_PREFIX`); every key under it is deleted after the test.
- `own_redis`: a private `redis-server` on a free port, for tests that stop it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _unavailable(reason: str) -> None:
    if os.environ.get("CALLBOT_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (CALLBOT_REQUIRE_REDIS=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        _unavailable(f"no Redis at {url} ({err})")
    finally:
        client.close()
    return url


@pytest.fixture
def shared_state(redis_url: str) -> Iterator[dict[str, str]]:
    prefix = f"callbot-test-{uuid.uuid4().hex[:10]}:"
    yield {"redis_url": redis_url, "redis_key_prefix": prefix}
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@dataclass
class OwnRedis:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not installed")
    port = _free_port()
    args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen([*args, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    server = OwnRedis(f"redis://127.0.0.1:{port}/0", process)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        client.close()
        server.stop()
