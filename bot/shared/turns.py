"""Turns at editing one message: one replica at a time, and never an older state after a newer.

In one process LiveMessages already has one worker per message that edits in the newest state,
so `LocalTurns` lets every edit through. With REDIS_URL, `SharedTurns` makes each edit a turn:
a short lock per message (a lease, renewed while the edit runs, released only by its holder)
and the order of the last state shown. A state carries an order (a call's: its status rank,
then the time of its last change); a turn whose state is older than the one shown is skipped,
so a replica that learnt of a state late cannot put it back over a newer one. A state without
an order is always shown. When Redis fails the edit goes ahead without a turn: a message that
updates matters more than the lock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from bot.shared.locks import RedisLocks
from bot.shared.redis import Keys, redis_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)
LEASE = 10.0  # seconds a turn is held unless renewed; a replica that dies frees it after this
SHOWN_TTL = 24 * 3600  # seconds the order of the last state shown is remembered

# Lua: raise the order shown, never lower it
_SHOWN = (
    "local current = tonumber(redis.call('get', KEYS[1])) "
    "if current == nil or current < tonumber(ARGV[1]) then "
    "redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2]) end return 1"
)


class Turn(Protocol):
    async def stale(self, order: int | None) -> bool:
        """Whether a newer state than `order` is shown already."""

    async def shown(self, order: int | None) -> None:
        """The state of `order` is what the message shows now."""


class EditTurns(Protocol):
    def turn(self, chat_id: int, message_id: int) -> AbstractAsyncContextManager[Turn]: ...


class _FreeTurn:
    async def stale(self, order: int | None) -> bool:
        return False

    async def shown(self, order: int | None) -> None:
        return None


class LocalTurns:
    """One process: the per-message worker is the turn."""

    @asynccontextmanager
    async def turn(self, chat_id: int, message_id: int) -> AsyncIterator[Turn]:
        yield _FreeTurn()


class _SharedTurn:
    def __init__(self, redis: Redis, shown_key: str) -> None:
        self._redis = redis
        self._key = shown_key

    async def stale(self, order: int | None) -> bool:
        if order is None:
            return False
        try:
            shown = await self._redis.get(self._key)
        except redis_error() as err:
            log.warning("cannot read the state shown of a message (%s); editing", err)
            return False
        return shown is not None and int(shown) > order

    async def shown(self, order: int | None) -> None:
        if order is None:
            return
        try:
            await self._redis.eval(_SHOWN, 1, self._key, order, SHOWN_TTL)
        except redis_error() as err:
            log.warning("cannot record the state shown of a message (%s)", err)


class SharedTurns:
    """Several replicas: a turn is a Redis lock per message (waited for), and the order shown
    is kept."""

    def __init__(self, redis: Redis, keys: Keys, *, lease: float = LEASE) -> None:
        self._redis = redis
        self._keys = keys
        self._locks = RedisLocks(redis, keys, "edit", lease=lease, wait=True)

    @asynccontextmanager
    async def turn(self, chat_id: int, message_id: int) -> AsyncIterator[Turn]:
        shown = self._keys("edit", chat_id, message_id, "shown")
        async with AsyncExitStack() as held:
            turn: Turn = _SharedTurn(self._redis, shown)
            try:
                await held.enter_async_context(self._locks.hold(f"{chat_id}:{message_id}"))
            except redis_error() as err:
                log.warning(
                    "no edit lock for message %s in chat %s (%s); editing", message_id, chat_id, err
                )
                turn = _FreeTurn()
            yield turn
