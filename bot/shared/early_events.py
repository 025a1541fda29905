"""Webhook events for a call not known yet: Pilot's event can outrun the reply to our own
`POST /v1/calls`, so it is kept until that reply names the call (then replayed), or for a short
while (`ttl`), at most `MAX_PER_CALL` events per call.

`LocalEarlyEvents` keeps them in this process; `RedisEarlyEvents` in a Redis list per call id
(`<prefix>early:<ref>`), so the replica whose POST is pending replays an event another replica
received. Events are stored as their JSON, never pickled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from bot.pilot_status.webhooks import CallEvent
from bot.shared.redis import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

MAX_PER_CALL = 20  # a call has a handful of status changes; more is noise, the newest are kept
MAX_CALLS = 10_000  # in memory: refs kept at most


class EarlyEvents(Protocol):
    async def keep(self, ref: str, event: CallEvent) -> None: ...

    async def take(self, ref: str) -> list[CallEvent]:
        """The events kept for `ref`, oldest first, handed out once."""
        ...


class LocalEarlyEvents:
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._events: dict[str, tuple[float, list[CallEvent]]] = {}

    async def keep(self, ref: str, event: CallEvent) -> None:
        now = self._clock()
        for key, (since, _) in list(self._events.items()):
            if now - since > self._ttl:
                del self._events[key]
        if len(self._events) < MAX_CALLS or ref in self._events:
            kept = self._events.setdefault(ref, (now, []))[1]
            kept.append(event)
            del kept[:-MAX_PER_CALL]

    async def take(self, ref: str) -> list[CallEvent]:
        return self._events.pop(ref, (0.0, []))[1]


class RedisEarlyEvents:
    def __init__(self, redis: Redis, keys: Keys, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl

    async def keep(self, ref: str, event: CallEvent) -> None:
        key = self._keys("early", ref)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, event.model_dump_json())
            pipe.ltrim(key, -MAX_PER_CALL, -1)
            pipe.pexpire(key, int(self._ttl * 1000))
            await pipe.execute()

    async def take(self, ref: str) -> list[CallEvent]:
        key = self._keys("early", ref)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            raw, _ = await pipe.execute()
        return [CallEvent.model_validate(json.loads(item)) for item in raw]


def early_events(redis: Redis | None, keys: Keys, ttl: float) -> EarlyEvents:
    return LocalEarlyEvents(ttl) if redis is None else RedisEarlyEvents(redis, keys, ttl)
