"""The update ledger: each update_id is handled once, by one holder at a time, in memory or in
Redis (shared by replicas)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bot.shared.redis import Keys
from bot.telegram.ledger import Claim, MemoryLedger, RedisLedger, holding


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_client(shared_state: dict[str, str]) -> AsyncIterator[Redis]:
    client = Redis.from_url(shared_state["redis_url"])
    yield client
    await client.aclose()


def redis_ledger(client: Redis, shared_state: dict[str, str], **kwargs: float) -> RedisLedger:
    return RedisLedger(client, Keys(shared_state["redis_key_prefix"]), **kwargs)


async def test_memory_claim_done_busy_and_a_dead_holders_lease() -> None:
    clock = Clock()
    ledger = MemoryLedger(lease=30, done_ttl=86400, clock=clock)
    assert await ledger.claim(1) is Claim.NEW
    assert await ledger.claim(1) is Claim.BUSY
    clock.now += 31  # the holder died: its lease ran out
    assert await ledger.claim(1) is Claim.NEW
    await ledger.done(1)
    clock.now += 86000
    assert await ledger.claim(1) is Claim.DONE
    clock.now += 1000  # Telegram gave up redelivering long ago
    assert await ledger.claim(1) is Claim.NEW


async def test_memory_renew_keeps_the_lease_and_release_frees_it() -> None:
    clock = Clock()
    ledger = MemoryLedger(lease=30, clock=clock)
    assert await ledger.claim(2) is Claim.NEW
    clock.now += 20
    assert await ledger.renew(2)
    clock.now += 20
    assert await ledger.claim(2) is Claim.BUSY
    await ledger.release(2)
    assert await ledger.claim(2) is Claim.NEW


async def test_redis_replicas_share_the_ledger(
    redis_client: Redis, shared_state: dict[str, str]
) -> None:
    first = redis_ledger(redis_client, shared_state)
    second = redis_ledger(redis_client, shared_state)
    assert await first.claim(10) is Claim.NEW
    assert await second.claim(10) is Claim.BUSY
    # only the holder renews, releases or settles it
    assert not await second.renew(10)
    await second.release(10)
    assert await second.claim(10) is Claim.BUSY
    assert await first.renew(10)
    await first.done(10)
    assert await second.claim(10) is Claim.DONE
    ttl = await redis_client.pttl(shared_state["redis_key_prefix"] + "update:10")
    assert ttl > 24 * 3600 * 1000
    await first.release(10)  # done stays done
    assert await second.claim(10) is Claim.DONE


async def test_redis_a_dead_holders_update_is_taken_once_its_lease_expired(
    redis_client: Redis, shared_state: dict[str, str]
) -> None:
    dead = redis_ledger(redis_client, shared_state, lease=30)
    alive = redis_ledger(redis_client, shared_state)
    assert await dead.claim(11) is Claim.NEW
    assert await alive.claim(11) is Claim.BUSY
    key = shared_state["redis_key_prefix"] + "update:11"
    assert 0 < await redis_client.pttl(key) <= 30_000  # the lease is a key's expiry
    await redis_client.delete(key)  # ... which ran out: the holder died and renewed nothing
    assert await alive.claim(11) is Claim.NEW
    await dead.done(11)  # late: another holder has it now, and marks it itself
    assert await redis_client.get(key) != b"done"
    await alive.done(11)
    assert await dead.claim(11) is Claim.DONE


async def test_holding_marks_done_on_success_and_error_and_releases_when_cancelled() -> None:
    ledger = MemoryLedger()
    assert await ledger.claim(1) is Claim.NEW
    async with holding(ledger, 1):
        pass
    assert await ledger.claim(1) is Claim.DONE

    assert await ledger.claim(2) is Claim.NEW
    with pytest.raises(RuntimeError):
        async with holding(ledger, 2):
            raise RuntimeError("a handler bug, reported by the error router")
    assert await ledger.claim(2) is Claim.DONE  # not handled again: it would fail again

    assert await ledger.claim(3) is Claim.NEW
    entered = asyncio.Event()

    async def handle() -> None:
        async with holding(ledger, 3):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(handle())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await ledger.claim(3) is Claim.NEW  # cut off: whoever gets it next handles it


async def test_holding_renews_the_lease_while_the_update_is_handled() -> None:
    ledger = MemoryLedger(lease=0.06)
    assert await ledger.claim(4) is Claim.NEW
    renewed = asyncio.Event()
    renew = ledger.renew

    async def counting(update_id: int) -> bool:
        kept = await renew(update_id)
        renewed.set()
        return kept

    ledger.renew = counting  # type: ignore[method-assign]
    async with holding(ledger, 4, lease=0.06):
        await renewed.wait()
        assert await ledger.claim(4) is Claim.BUSY
    assert await ledger.claim(4) is Claim.DONE
