"""Redis: the short-lived state replicas share, when REDIS_URL is set.

One redis-py asyncio client per process, made here at start. Every key the bot writes starts
with REDIS_KEY_PREFIX, so several bots (or test runs) can share one server; `Keys` makes them.
Without REDIS_URL each piece of shared state keeps its in-memory form: one process, no setup,
and redis-py is never imported (`connect` imports it; code that catches its errors asks
`redis_error()`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

CONNECT_TIMEOUT = 3.0  # seconds to reach the server
COMMAND_TIMEOUT = 5.0  # seconds for one reply: a stuck server fails the step, it does not hang it


def connect(url: str, *, instance: str) -> Redis:
    """A client for `url` (redis:// or rediss://); connections are made on first use. redis-py
    is imported here, not before: without REDIS_URL it stays out of the process (~4 MiB)."""
    from redis.asyncio import Redis

    return Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        health_check_interval=30,
        client_name=f"callbot-{instance}"[:60],
    )


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix: `keys("seen", 42)` → `callbot:seen:42`."""

    prefix: str = "callbot:"

    def __call__(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)


class _NoRedis(Exception):
    """Never raised: what `redis_error()` gives while redis-py is not loaded."""


def redis_error() -> type[Exception]:
    """redis-py's RedisError to catch, without importing redis-py: until `connect` (or anything
    else) has loaded it no RedisError can exist, and this is a class nothing raises."""
    exceptions = sys.modules.get("redis.exceptions")
    return exceptions.RedisError if exceptions is not None else _NoRedis
