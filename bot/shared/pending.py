"""Short-lived state between a prompt and the button that answers it.

`Pending` is the interface; `PendingStore` keeps the items in this process's memory (one
process, no setup), `RedisPending` in Redis, where every replica sees them and `take` is one
GETDEL, so a token is handed out once across replicas. Items are stored as JSON through a
pydantic TypeAdapter of their dataclass, never pickled.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import TypeAdapter

from bot.shared.redis import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")


class Taken(StrEnum):
    OK = "ok"
    EXPIRED = "expired"
    GONE = "gone"  # handled already, or never existed


def kept_for(ttl: float) -> float:
    """Seconds an item is kept: its ttl, then a while longer so a late press says "expired"."""
    return ttl + min(9 * ttl, 24 * 3600)


class Pending(Protocol[T]):
    """Items addressed by a random token; `take` hands each out at most once."""

    async def put(self, item: T) -> str: ...

    async def peek(self, token: str) -> T | None: ...

    async def take(self, token: str) -> tuple[Taken, T | None]: ...


@dataclass
class _Entry(Generic[T]):
    item: T
    expires_at: float


class PendingStore(Generic[T]):
    """`Pending` in this process's memory, bounded to `max_items`."""

    def __init__(
        self, ttl: float, *, max_items: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_items
        self._clock = clock
        self._items: OrderedDict[str, _Entry[T]] = OrderedDict()

    async def put(self, item: T) -> str:
        token = secrets.token_urlsafe(9)
        self._items[token] = _Entry(item, self._clock() + self._ttl)
        self._prune()
        return token

    async def peek(self, token: str) -> T | None:
        entry = self._items.get(token)
        return entry.item if entry else None

    async def take(self, token: str) -> tuple[Taken, T | None]:
        entry = self._items.pop(token, None)
        if entry is None:
            return Taken.GONE, None
        if entry.expires_at < self._clock():
            return Taken.EXPIRED, entry.item
        return Taken.OK, entry.item

    def _prune(self) -> None:
        horizon = self._clock() - (kept_for(self._ttl) - self._ttl)
        while self._items:
            token, entry = next(iter(self._items.items()))
            if len(self._items) <= self._max and entry.expires_at >= horizon:
                break
            del self._items[token]


class RedisPending(Generic[T]):
    """`Pending` in Redis: one key per token (`<prefix>pending:<name>:<token>`) holding
    `{"expires_at": unix seconds, "item": ...}`, deleted by Redis `kept_for(ttl)` after the put.
    Redis errors are raised as they are (bot.errors describes them to the user)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        name: str,
        item_type: type[T],
        ttl: float,
        *,
        clock: Callable[[], float] = time.time,  # shared by replicas: the wall clock
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._name = name
        self._adapter: TypeAdapter[T] = TypeAdapter(item_type)
        self._ttl = ttl
        self._clock = clock

    async def put(self, item: T) -> str:
        token = secrets.token_urlsafe(9)
        entry = {
            "expires_at": self._clock() + self._ttl,
            "item": self._adapter.dump_python(item, mode="json"),
        }
        await self._redis.set(
            self._key(token), json.dumps(entry), px=int(kept_for(self._ttl) * 1000)
        )
        return token

    async def peek(self, token: str) -> T | None:
        entry = self._load(await self._redis.get(self._key(token)))
        return entry.item if entry else None

    async def take(self, token: str) -> tuple[Taken, T | None]:
        entry = self._load(await self._redis.getdel(self._key(token)))
        if entry is None:
            return Taken.GONE, None
        if entry.expires_at < self._clock():
            return Taken.EXPIRED, entry.item
        return Taken.OK, entry.item

    def _key(self, token: str) -> str:
        return self._keys("pending", self._name, token)

    def _load(self, raw: bytes | None) -> _Entry[T] | None:
        if raw is None:
            return None
        data: dict[str, Any] = json.loads(raw)
        return _Entry(self._adapter.validate_python(data["item"]), float(data["expires_at"]))


def pending_store(
    redis: Redis | None, keys: Keys, name: str, item_type: type[T], ttl: float
) -> Pending[T]:
    """Shared through Redis when there is one, else in this process's memory."""
    if redis is None:
        return PendingStore(ttl)
    return RedisPending(redis, keys, name, item_type, ttl)
