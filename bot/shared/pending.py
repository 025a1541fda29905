"""Short-lived state between a prompt and the button that answers it.

In memory for one process; the scale-out issue swaps in Redis behind the same methods.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Taken(StrEnum):
    OK = "ok"
    EXPIRED = "expired"
    GONE = "gone"  # handled already, or never existed


@dataclass
class _Entry(Generic[T]):
    item: T
    expires_at: float


class PendingStore(Generic[T]):
    """Items addressed by a random token; `take` hands each out at most once."""

    def __init__(
        self, ttl: float, *, max_items: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_items
        self._clock = clock
        self._items: OrderedDict[str, _Entry[T]] = OrderedDict()

    def put(self, item: T) -> str:
        token = secrets.token_urlsafe(9)
        self._items[token] = _Entry(item, self._clock() + self._ttl)
        self._prune()
        return token

    def peek(self, token: str) -> T | None:
        entry = self._items.get(token)
        return entry.item if entry else None

    def take(self, token: str) -> tuple[Taken, T | None]:
        entry = self._items.pop(token, None)
        if entry is None:
            return Taken.GONE, None
        if entry.expires_at < self._clock():
            return Taken.EXPIRED, entry.item
        return Taken.OK, entry.item

    def _prune(self) -> None:
        # Expired entries are kept a while longer so a late press can say "expired".
        horizon = self._clock() - 10 * self._ttl
        while self._items:
            token, entry = next(iter(self._items.items()))
            if len(self._items) <= self._max and entry.expires_at >= horizon:
                break
            del self._items[token]
