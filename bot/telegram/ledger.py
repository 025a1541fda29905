"""Which Telegram updates were handled: each `update_id` is handled once, across replicas.

Telegram redelivers an update until it is answered 2xx (webhook) or confirmed (polling), for up
to a day. Before handling one, a replica `claim`s it:

- NEW: nobody has it; this replica now holds a lease on it (renewed while it is handled, see
  `holding`), then marks it `done` (kept DONE_TTL) or, when it was cut off, `release`s it;
- DONE: handled already: answer it and do nothing;
- BUSY: another replica (or task) holds its lease: webhook mode answers 503, so Telegram
  redelivers it later; whoever gets it then sees DONE, or NEW once a dead holder's lease expired.

In memory for one process; in Redis (SET NX PX with an owner token, compare-and-set by Lua
script) when REDIS_URL is set.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from bot.shared.redis import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)
LEASE_SECONDS = 30.0  # a dead holder's update is taken again after this
DONE_TTL_SECONDS = 26 * 3600  # Telegram redelivers for 24 h
DONE = "done"


class Claim(StrEnum):
    NEW = "new"
    DONE = "done"
    BUSY = "busy"


class UpdateLedger(Protocol):
    async def claim(self, update_id: int) -> Claim: ...

    async def renew(self, update_id: int) -> bool: ...

    async def done(self, update_id: int) -> None: ...

    async def release(self, update_id: int) -> None: ...


@asynccontextmanager
async def holding(
    ledger: UpdateLedger, update_id: int, *, lease: float = LEASE_SECONDS
) -> AsyncIterator[None]:
    """Inside: the claimed update is being handled; its lease is renewed meanwhile.

    Leaving normally, or with an error (aiogram's error handlers have reported it; handling it
    again would fail again), marks it done. Cancelled (a shutdown cut it off), it is released so
    that the redelivery is handled at once by whoever gets it. The renewer is cancelled, not
    awaited: waiting could swallow a cancellation of ours, and a late renewal finds the lease
    gone.
    """
    renewer = asyncio.create_task(_renew(ledger, update_id, lease / 3), name="update lease")
    try:
        yield
    except Exception:
        renewer.cancel()
        await _done(ledger, update_id)
        raise
    except BaseException:
        renewer.cancel()
        with suppress(Exception):
            await asyncio.shield(ledger.release(update_id))
        raise
    renewer.cancel()
    await _done(ledger, update_id)


async def _done(ledger: UpdateLedger, update_id: int) -> None:
    """Handled: a ledger that fails now only risks a second handling of a redelivery."""
    try:
        await ledger.done(update_id)
    except Exception as err:
        log.warning("update %s handled but not marked done (%s)", update_id, type(err).__name__)


async def _renew(ledger: UpdateLedger, update_id: int, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            kept = await ledger.renew(update_id)
        except Exception as err:
            log.warning("update %s: lease not renewed (%s)", update_id, type(err).__name__)
            continue
        if not kept:
            log.warning("update %s: lease lost while handling it", update_id)
            return


class MemoryLedger:
    """One process's ledger (bounded: the oldest entries go first)."""

    def __init__(
        self,
        *,
        lease: float = LEASE_SECONDS,
        done_ttl: float = DONE_TTL_SECONDS,
        max_items: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lease = lease
        self._done_ttl = done_ttl
        self._max = max_items
        self._clock = clock
        self._entries: OrderedDict[int, tuple[str, float]] = OrderedDict()  # state, expires

    def _get(self, update_id: int) -> str | None:
        entry = self._entries.get(update_id)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def _set(self, update_id: int, state: str, ttl: float) -> None:
        self._entries.pop(update_id, None)
        self._entries[update_id] = (state, self._clock() + ttl)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def claim(self, update_id: int) -> Claim:
        state = self._get(update_id)
        if state == DONE:
            return Claim.DONE
        if state is not None:
            return Claim.BUSY
        self._set(update_id, "busy", self._lease)
        return Claim.NEW

    async def renew(self, update_id: int) -> bool:
        if self._get(update_id) != "busy":
            return False
        self._set(update_id, "busy", self._lease)
        return True

    async def done(self, update_id: int) -> None:
        self._set(update_id, DONE, self._done_ttl)

    async def release(self, update_id: int) -> None:
        if self._get(update_id) == "busy":
            del self._entries[update_id]


# KEYS[1]: the update's key; ARGV[1]: this holder's token
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# done unless another holder took it over (then that one marks it)
_DONE = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or not value then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLedger:
    """The ledger every replica shares: `<prefix>update:<id>` = this holder's token or "done"."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        lease: float = LEASE_SECONDS,
        done_ttl: float = DONE_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._lease_ms = int(lease * 1000)
        self._done_ms = int(done_ttl * 1000)
        self._token = "busy:" + secrets.token_hex(8)  # this process, as a holder
        self._renew: Any = redis.register_script(_RENEW)
        self._done: Any = redis.register_script(_DONE)
        self._release: Any = redis.register_script(_RELEASE)

    def _key(self, update_id: int) -> str:
        return self._keys("update", update_id)

    async def claim(self, update_id: int) -> Claim:
        key = self._key(update_id)
        if await self._redis.set(key, self._token, nx=True, px=self._lease_ms):
            return Claim.NEW
        value = await self._redis.get(key)
        return Claim.DONE if value == DONE.encode() else Claim.BUSY

    async def renew(self, update_id: int) -> bool:
        kept = await self._renew(keys=[self._key(update_id)], args=[self._token, self._lease_ms])
        return bool(kept)

    async def done(self, update_id: int) -> None:
        await self._done(keys=[self._key(update_id)], args=[self._token, self._done_ms])

    async def release(self, update_id: int) -> None:
        await self._release(keys=[self._key(update_id)], args=[self._token])
