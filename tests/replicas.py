"""The multi-replica test bed: real `python -m bot` processes behind a real HAProxy.

`start_testbed(...)` runs, for one test:
- N replicas, each `python -m bot` in a folder of its own (tests/processes.py) with its own
  WEB_PORT and INSTANCE_NAME, all on the same PostgreSQL database and the same Redis prefix, in
  Telegram webhook mode with TELEGRAM_WEBHOOK_URL pointing at HAProxy's frontend;
- HAProxy with the config users deploy, deploy/haproxy.cfg, its servers and frontend from the
  environment as the README says, and its runtime API on a Unix socket (`show stat`) so the
  test can wait until a replica is in or out of the pool;
- the caller's fake Telegram and fake Pilot Status, in the test process: the fake Telegram
  delivers updates by POSTs to the webhook URL (so through HAProxy), as Telegram does.

The replicas can be killed (`kill -9`), stopped (SIGTERM: they drain) and started again on the
same port. HAProxy is /usr/sbin/haproxy (Debian package `haproxy`, scripts/install-test-peers.sh);
without it the tests skip, unless CALLBOT_REQUIRE_HAPROXY=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ADMIN, API_KEY, OPERATOR, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram
from tests.processes import ROOT, BotProcess, run_bot_process

CONFIG = ROOT / "deploy" / "haproxy.cfg"
WEBHOOK_PATH = "/telegram/updates"
WEBHOOK_SECRET = "testbed_webhook_secret-0123456789"
PILOT_HOOK_TOKEN = "testbed-pilot-hook-" + "p" * 24
# Patient bounds: this machine has 2 cores shared with other work; nothing here is a timing check.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def find_haproxy() -> str | None:
    return shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")


def haproxy_binary() -> str:
    """HAProxy's path, or the test is skipped (failed under CALLBOT_REQUIRE_HAPROXY=1)."""
    found = find_haproxy()
    if found is None:
        reason = "haproxy is not installed (Debian package haproxy; scripts/install-test-peers.sh)"
        if os.environ.get("CALLBOT_REQUIRE_HAPROXY") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_HAPROXY=1)", pytrace=False)
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _get_status(url: str) -> int | None:
    """The status of GET `url`, or None when nothing answers."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def until(
    condition: Callable[[], bool],
    what: Callable[[], str],
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Until `condition()` holds; past `timeout` seconds, fails with `what()`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(what())
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Command:
    """A `/call` sent by an operator in their private chat."""

    update_id: int
    chat_id: int
    message_id: int
    phone: str


def phone_number(n: int) -> str:
    """A valid Brazilian mobile number of its own for each n < 10,000,000 (+55 11 98xxx-xxxx)."""
    return f"+551198{n:07d}"


def push_calls(
    telegram: FakeTelegram, count: int, chats: Sequence[int], first: int = 0
) -> list[Command]:
    """`count` `/call` updates at once, round robin over the private `chats` (user = chat), each
    to a number of its own; the fake Telegram delivers them by webhook as Telegram would."""
    commands = []
    for n in range(first, first + count):
        chat, phone = chats[n % len(chats)], phone_number(n)
        update_id, message_id = telegram.send_command(f"/call {phone}", user_id=chat)
        commands.append(Command(update_id, chat, message_id, phone))
    return commands


@dataclass
class Replica:
    """One `python -m bot` process of the bed; survives being killed and started again."""

    name: str
    port: int
    folder: Path
    env_file: str
    process: BotProcess | None = None
    logs: list[str] = field(default_factory=list)  # of the earlier runs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.process.returncode is None

    @property
    def log(self) -> str:
        """Everything this replica logged, over all its runs."""
        current = self.process.text if self.process is not None else ""
        return "".join(self.logs) + current

    async def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self._keep_log()
        self.process = await run_bot_process(self.folder, self.env_file)

    async def ready(self, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109
        """Until its own /readyz answers 200 (database, Redis, migrations, webhook set)."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await _get_status(self.url + "/readyz") != 200:
            if self.process.process.returncode is not None or loop.time() > deadline:
                raise AssertionError(f"{self.name} did not become ready:\n{self.process.text}")
            await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """`kill -9`: nothing is finished, nothing answered."""
        assert self.process is not None and self.running
        self.process.process.kill()
        await self.process.exited(STOP_TIMEOUT)

    def sigterm(self) -> None:
        """SIGTERM, as a rolling restart sends it: the replica drains, then exits."""
        assert self.process is not None and self.running
        self.process.process.send_signal(signal.SIGTERM)

    async def exited(self) -> int:
        assert self.process is not None
        return await self.process.exited(STOP_TIMEOUT)

    async def terminate(self) -> int:
        """SIGTERM, then its exit code once drained."""
        self.sigterm()
        return await self.exited()

    def _keep_log(self) -> None:
        if self.process is not None:
            self.logs.append(self.process.text)
            self.process = None


class HAProxy:
    """`haproxy -f deploy/haproxy.cfg`, configured by the environment as the README shows."""

    def __init__(self, binary: str, port: int, replicas: list[Replica], socket_path: Path) -> None:
        self.binary = binary
        self.port = port
        self.replicas = replicas
        self.socket_path = socket_path
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CALLBOT_FRONTEND": f"127.0.0.1:{self.port}",
            "CALLBOT_STATS": str(self.socket_path),
        }
        for number, replica in enumerate(self.replicas, start=1):
            env[f"CALLBOT_REPLICA{number}"] = f"127.0.0.1:{replica.port}"
        return env

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "-db",  # foreground
            "-f",
            str(CONFIG),
            env=self.environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                await self.servers()
                return
            if self.process.returncode is not None or loop.time() > deadline:
                raise AssertionError("haproxy did not start:\n" + self.text)
            await asyncio.sleep(0.05)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output.append(line.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.output)

    async def command(self, line: str) -> str:
        """One command of HAProxy's runtime API (its stats socket)."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def servers(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it: "UP", "DOWN", "UP 1/2", ..."""
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        proxy, server, status = (header.index(k) for k in ("pxname", "svname", "status"))
        rows = [line.split(",") for line in lines[1:] if line]
        return {
            row[server]: row[status]
            for row in rows
            if row[proxy] == "replicas" and row[server] not in ("BACKEND", "FRONTEND")
        }

    async def wait_for(
        self,
        states: Mapping[str, str],
        timeout: float = START_TIMEOUT,  # noqa: ASYNC109
    ) -> None:
        """Until each named server is in the given state ("UP" or "DOWN")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = await self.servers()
            if all(seen.get(name) == state for name, state in states.items()):
                return
            if loop.time() > deadline:
                raise AssertionError(f"HAProxy sees {seen}, not {dict(states)}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        if self._reader is not None:
            await self._reader


@dataclass
class TestBed:
    telegram: FakeTelegram
    pilot: FakePilotStatus
    replicas: list[Replica]
    haproxy: HAProxy
    database_url: str  # asyncpg's plain postgresql:// form, for checks
    pushed: int = 0  # /call commands pushed so far: the next one's number

    __test__ = False  # not a test class, for pytest

    def push_calls(self, count: int, chats: Sequence[int]) -> list[Command]:
        """`count` /call at once (see `push_calls`), to numbers not called before on this bed."""
        commands = push_calls(self.telegram, count, chats, first=self.pushed)
        self.pushed += count
        return commands

    @property
    def webhook_url(self) -> str:
        return self.haproxy.url + WEBHOOK_PATH

    async def ready(self) -> None:
        """Every replica running (started again if it is not), ready, and in HAProxy's pool."""
        await asyncio.gather(*(r.start() for r in self.replicas if not r.running))
        await asyncio.gather(*(r.ready() for r in self.replicas))
        await self.haproxy.wait_for({r.name: "UP" for r in self.replicas})

    async def kill(self, replica: Replica) -> None:
        await replica.kill()
        await self.haproxy.wait_for({replica.name: "DOWN"})

    async def restart(self, replica: Replica) -> None:
        """Start a stopped replica again on its port and wait until it is back in the pool."""
        await replica.start()
        await replica.ready()
        await self.haproxy.wait_for({replica.name: "UP"})

    def answered(self) -> set[int]:
        """The update ids some delivery got a 2xx for."""
        return {d.update_id for d in self.telegram.deliveries if d.ok}

    async def all_answered(self, commands: Sequence[Command], timeout: float = 240) -> None:  # noqa: ASYNC109
        """Until every command's update was answered 2xx (the bot answers once it is handled)."""
        wanted = {c.update_id for c in commands}

        def missing() -> str:
            left = wanted - self.answered()
            return (
                f"{len(left)} of {len(wanted)} updates never answered 2xx\n{self.logs()[-20000:]}"
            )

        await until(lambda: wanted <= self.answered(), missing, timeout)

    def logs(self) -> str:
        parts = [f"----- {r.name}\n{r.log}" for r in self.replicas]
        return "\n".join([*parts, f"----- haproxy\n{self.haproxy.text}"])


def replica_env(
    name: str,
    port: int,
    *,
    telegram: FakeTelegram,
    pilot: FakePilotStatus,
    database_url: str,
    webhook_url: str,
    settings: Mapping[str, str],
) -> str:
    """The .env an admin writes for one replica: only WEB_PORT and INSTANCE_NAME differ."""
    values = {
        "BOT_TOKEN": TOKEN,
        "TELEGRAM_API_URL": telegram.url,
        "TELEGRAM_WEBHOOK_URL": webhook_url,
        "TELEGRAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PILOT_STATUS_API_KEY": API_KEY,
        "PILOT_STATUS_BASE_URL": pilot.url,
        "PILOT_STATUS_NUMBER_TYPE": "web",
        "OPERATOR_IDS": str(OPERATOR),
        "ADMIN_IDS": str(ADMIN),
        # calls are followed by Pilot's webhooks, not polled: 1,000 calls would poll 1,000 GETs
        "PILOT_STATUS_WEBHOOK_TOKEN": PILOT_HOOK_TOKEN,
        "PILOT_STATUS_RETRY_BACKOFF": "0.05",
        "DATABASE_URL": database_url,
        "WEB_HOST": "127.0.0.1",
        "WEB_PORT": str(port),
        "INSTANCE_NAME": name,
        "STUN_SERVERS": "none",
        "RETENTION_INTERVAL_SECONDS": "0",
        **settings,
    }
    return "".join(f"{key}={value}\n" for key, value in values.items())


@contextlib.asynccontextmanager
async def start_testbed(
    folder: Path,
    *,
    telegram: FakeTelegram,
    pilot: FakePilotStatus,
    database_url: str,
    shared_state: Mapping[str, str] | None,
    replicas: int = 3,
    settings: Mapping[str, str] | None = None,
    haproxy: str | None = None,
) -> AsyncIterator[TestBed]:
    """`replicas` bots on `database_url` (SQLAlchemy asyncpg URL) and `shared_state` (the
    redis_fixtures fixture: REDIS_URL and REDIS_KEY_PREFIX) behind HAProxy, all ready and in the
    pool; everything stopped after. `settings` are more .env lines for every replica. Without
    `shared_state` (no Redis) only one replica makes sense. `haproxy`: its binary (default: found,
    or the test skipped)."""
    assert 1 <= replicas <= 3, "deploy/haproxy.cfg names one to three replicas"
    assert shared_state is not None or replicas == 1, "replicas share their state in Redis"
    binary = haproxy or haproxy_binary()  # skip early, before anything starts
    frontend = free_port()
    webhook_url = f"http://127.0.0.1:{frontend}{WEBHOOK_PATH}"
    extra = dict(settings or {})
    if shared_state is not None:
        extra["REDIS_URL"] = shared_state["redis_url"]
        extra["REDIS_KEY_PREFIX"] = shared_state["redis_key_prefix"]
    bed_replicas = []
    for number in range(1, replicas + 1):
        name, port = f"replica{number}", free_port()
        (folder / name).mkdir()
        env = replica_env(
            name,
            port,
            telegram=telegram,
            pilot=pilot,
            database_url=database_url,
            webhook_url=webhook_url,
            settings=extra,
        )
        bed_replicas.append(Replica(name, port, folder / name, env))
    # a Unix socket path must stay short (108 bytes): not under pytest's deep tmp_path
    sockets = Path(tempfile.mkdtemp(prefix="callbot-haproxy-"))
    balancer = HAProxy(binary, frontend, bed_replicas, sockets / "stats.sock")
    plain_url = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    bed = TestBed(telegram, pilot, bed_replicas, balancer, plain_url)
    try:
        await balancer.start()
        await bed.ready()
        yield bed
    finally:
        for replica in bed_replicas:
            if replica.running:
                with contextlib.suppress(Exception):
                    await replica.terminate()
                if replica.running:
                    await replica.kill()
        await balancer.stop()
        shutil.rmtree(sockets, ignore_errors=True)
