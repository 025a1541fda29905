"""Two replicas (one PostgreSQL database, one Redis) follow the same call and edit its message.

The Pilot Status webhooks of one call land on different replicas; each replica edits the call's
message. Telegram (the fake) is slow or failing on the first replica's edit, so without turns the
replicas' edits overlap and the older state lands last.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import RunningBot, StartBot
from tests.fakes.telegram import FakeTelegram, SentMessage
from tests.redis_fixtures import OwnRedis
from tests.test_lifecycle import deliver, event, start_call, webhook_bot

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]


async def replicas(
    start_bot: StartBot, db_url: str, shared_state: dict[str, str]
) -> tuple[RunningBot, RunningBot, SentMessage, str]:
    """Two replicas; a call started through the first, its message sent and settled."""
    settings: dict[str, Any] = {"database_url": db_url, **shared_state}
    first = await webhook_bot(start_bot, **settings)
    reply, pilot_id = await start_call(first)  # before the second polls: one replica gets it
    await first.app.live.wait_idle()
    second = await webhook_bot(start_bot, **settings)
    return first, second, reply, pilot_id


def edits(telegram: FakeTelegram) -> int:
    return sum(1 for method, _ in telegram.requests if method == "editMessageText")


async def test_a_slow_edit_on_one_replica_is_not_overtaken_by_the_other(
    start_bot: StartBot, db_url: str, shared_state: dict[str, str]
) -> None:
    first, second, reply, pilot_id = await replicas(start_bot, db_url, shared_state)
    telegram = first.telegram
    telegram.delay_next("editMessageText", 1.0, chat_id=reply.chat_id)
    before = edits(telegram)
    ringing = event("call.ringing", pilot_id, status="RINGING")
    assert (await deliver(first, ringing, key="ringing")).status_code == 200
    await telegram.wait_for_request("editMessageText", before + 1)  # and Telegram is slow
    answered = event("call.connected", pilot_id, status="ACCEPTED")
    assert (await deliver(second, answered, key="answered")).status_code == 200
    await first.app.live.wait_idle()
    await second.app.live.wait_idle()
    assert telegram.overlapping_edits == []
    shown = telegram.message(reply.chat_id, reply.message_id)
    assert "answered" in shown.plain, shown.plain


async def test_an_older_state_retried_after_a_failure_does_not_replace_a_newer_one(
    start_bot: StartBot, db_url: str, shared_state: dict[str, str]
) -> None:
    first, second, reply, pilot_id = await replicas(start_bot, db_url, shared_state)
    telegram = first.telegram
    # the first replica's edit fails slowly (a 5xx after a while): it is tried again later
    telegram.fail_next("editMessageText", chat_id=reply.chat_id, delay=0.5)
    before = edits(telegram)
    ringing = event("call.ringing", pilot_id, status="RINGING")
    assert (await deliver(first, ringing, key="ringing")).status_code == 200
    await telegram.wait_for_request("editMessageText", before + 1)
    answered = event("call.connected", pilot_id, status="ACCEPTED")
    assert (await deliver(second, answered, key="answered")).status_code == 200
    await second.app.live.wait_idle()
    await first.app.live.wait_idle()
    assert telegram.overlapping_edits == []
    shown = telegram.message(reply.chat_id, reply.message_id)
    assert "answered" in shown.plain, shown.plain


async def test_edits_go_on_while_redis_is_down(
    start_bot: StartBot, db_url: str, own_redis: OwnRedis
) -> None:
    bot = await webhook_bot(start_bot, database_url=db_url, redis_url=own_redis.url)
    reply, pilot_id = await start_call(bot)
    await bot.app.live.wait_idle()
    own_redis.stop()
    ringing = event("call.ringing", pilot_id, status="RINGING")
    assert (await deliver(bot, ringing, key="ringing")).status_code == 200
    await bot.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id and "ringing" in m.plain, chat_id=reply.chat_id
    )
