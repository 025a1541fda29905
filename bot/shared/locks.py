"""One holder at a time per name: the per-number guard that keeps two attempts to call the
same number from running together.

`LocalLocks` is this process's set of held names; `RedisLocks` holds a redis-py asyncio Lock
per name, across replicas: a lease (`lease` seconds) renewed while held, so a replica that dies
frees the name within a lease, and a release that deletes the key only if it still holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from bot.shared.redis import Keys, redis_error

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.lock import Lock

log = logging.getLogger(__name__)
WAIT_POLL = 0.02  # seconds between two tries at a name another holder has, when waiting


class Held(Exception):
    """Someone (this process or another replica) holds the name already."""


class Locks(Protocol):
    def hold(self, name: str) -> AbstractAsyncContextManager[None]:
        """Held for the block; raises Held at once when taken."""
        ...


class LocalLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        if name in self._held:
            raise Held(name)
        self._held.add(name)
        try:
            yield
        finally:
            self._held.discard(name)


class RedisLocks:
    """Keys `<prefix>lock:<space>:<name>`; names are never logged (they may be phone numbers).

    Failing to reach Redis when taking raises RedisError (nothing is done then). A renewal or
    release that fails is logged: the block is not cut short (the POST it guards may be on its
    way), and the lease ends by itself."""

    def __init__(
        self, redis: Redis, keys: Keys, space: str, *, lease: float = 30.0, wait: bool = False
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._space = space
        self._lease = lease
        self._wait = wait  # wait for a holder to finish instead of raising Held

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        from redis.exceptions import LockError  # with a client, redis-py is loaded already

        lock = self._redis.lock(
            self._keys("lock", self._space, name),
            timeout=self._lease,
            blocking=self._wait,
            sleep=WAIT_POLL,  # no event to wait for: the holder may be another host
            thread_local=False,  # renewed from another task
        )
        if not await lock.acquire():
            raise Held(name)
        renewal = asyncio.create_task(self._renew(lock), name=f"renew lock {self._space}")
        try:
            yield
        finally:
            # not awaited: waiting could swallow a cancellation of ours, and a renewal that
            # lands after the release finds the token gone and does nothing
            renewal.cancel()
            try:
                await lock.release()
            except LockError:
                log.warning("a %s lock had expired before its release", self._space)
            except redis_error() as err:
                log.warning("a %s lock: release failed (%s)", self._space, type(err).__name__)

    async def _renew(self, lock: Lock) -> None:
        from redis.exceptions import LockError

        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await lock.reacquire()
            except LockError:  # expired (Redis was unreachable too long): nothing to renew
                log.warning("a %s lock expired while held", self._space)
                return
            except redis_error() as err:
                log.warning("a %s lock: renewal failed (%s)", self._space, type(err).__name__)


def locks(redis: Redis | None, keys: Keys, space: str, *, lease: float = 30.0) -> Locks:
    """Across replicas when there is Redis, else in this process."""
    return LocalLocks() if redis is None else RedisLocks(redis, keys, space, lease=lease)
