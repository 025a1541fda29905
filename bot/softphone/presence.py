"""How many Mini App talk sockets are open for a call, across replicas.

Closing the Mini App (or losing its connection) hangs the call up after a grace, unless the
operator is back by then: the socket may come back on another replica behind the balancer, so
the count lives in Redis with REDIS_URL (one counter per call, expiring a day after its last
change so a replica killed mid-call leaves nothing forever), in memory otherwise.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol

from bot.shared.redis import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

KEY_TTL_SECONDS = 24 * 3600


class Presence(Protocol):
    async def joined(self, call_id: str) -> None: ...

    async def left(self, call_id: str) -> None: ...

    async def present(self, call_id: str) -> int: ...


class LocalPresence:
    def __init__(self) -> None:
        self._open: Counter[str] = Counter()

    async def joined(self, call_id: str) -> None:
        self._open[call_id] += 1

    async def left(self, call_id: str) -> None:
        self._open[call_id] -= 1
        if self._open[call_id] <= 0:
            del self._open[call_id]

    async def present(self, call_id: str) -> int:
        return self._open[call_id]


class RedisPresence:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def joined(self, call_id: str) -> None:
        key = self._keys("talk", call_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.incr(key).expire(key, KEY_TTL_SECONDS).execute()

    async def left(self, call_id: str) -> None:
        key = self._keys("talk", call_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.decr(key).expire(key, KEY_TTL_SECONDS).execute()

    async def present(self, call_id: str) -> int:
        value = await self._redis.get(self._keys("talk", call_id))
        return max(0, int(value or 0))


def presence(redis: Redis | None, keys: Keys) -> Presence:
    return RedisPresence(redis, keys) if redis is not None else LocalPresence()
