"""No ring without a post: the incident's post to the team's chat is a stored, retried step.

Telegram fails in the ways it does (5xx, a dropped connection, the bot removed from the group, the
post deleted), and the team must still end up with a post it can acknowledge, or the admins with
one in private.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN, OPERATOR, StartBot
from tests.test_oncall import (
    ALICE,
    BOB,
    INFRA_CHAT,
    Clock,
    alert,
    call_event,
    calls_to,
    generic,
    oncall_bot,
    post_in,
)

KICKED = "Forbidden: bot was kicked from the supergroup chat"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sends_to(bot: Any, chat: int) -> int:
    """How many times the bot tried to send a message to `chat` (failed ones too)."""
    return sum(
        1
        for method, params in bot.telegram.requests
        if method.lower() == "sendmessage" and str(params.get("chat_id")) == str(chat)
    )


@pytest.mark.parametrize("failure", [{"error_code": 502}, {"drop": True}], ids=["5xx", "drop"])
async def test_a_failed_post_does_not_hold_the_ring_and_is_retried_with_backoff(
    start_bot: StartBot, tmp_path: Path, clock: Clock, failure: dict[str, Any]
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next("sendMessage", chat_id=INFRA_CHAT, times=None, **failure)
    response = await alert(bot, generic())
    assert response.status_code == 200 and response.json()["result"] == "created"
    assert await bot.app.oncall.run_due() == 1  # the page does not wait for Telegram
    assert len(calls_to(bot, ALICE)) == 1
    assert bot.telegram.bot_messages(INFRA_CHAT) == []
    tried = sends_to(bot, INFRA_CHAT)
    clock.advance(2)
    await bot.app.oncall.run_due()
    assert sends_to(bot, INFRA_CHAT) == tried  # backoff: not retried at once
    bot.telegram.clear_failures()
    clock.advance(5)
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "calling alice")  # it shows the state of now
    assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1
    assert len(calls_to(bot, ALICE)) == 1


async def test_the_monitorings_retry_after_an_error_ends_with_a_post(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next("sendMessage", chat_id=INFRA_CHAT, error_code=500, times=1)
    first = await alert(bot, generic())
    assert first.status_code == 200  # stored: no 5xx, so no redelivery storm
    again = await alert(bot, generic())
    assert again.json() == {"result": "updated", "incident": first.json()["incident"]}
    post = await post_in(bot, INFRA_CHAT, "fired 2 times")
    assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1


async def test_a_pending_post_survives_a_restart(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    first = await oncall_bot(start_bot, tmp_path, clock)
    first.telegram.fail_next("sendMessage", chat_id=INFRA_CHAT, error_code=503, times=None)
    assert (await alert(first, generic())).status_code == 200
    await first.stop()
    first.telegram.clear_failures()
    clock.advance(10)
    second = await oncall_bot(start_bot, tmp_path, clock)
    await second.app.oncall.run_due()
    post = await post_in(second, INFRA_CHAT, "calling alice")  # posted, then the ring shown
    assert "disk full on db-1" in post.plain and post.buttons()
    assert len(second.telegram.bot_messages(INFRA_CHAT)) == 1


async def test_a_deleted_post_is_replaced_by_a_new_one(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    old = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    await bot.app.bot.delete_message(INFRA_CHAT, old.message_id)  # someone in the group did
    again = await alert(bot, generic())
    assert again.json()["result"] == "updated"
    new = await post_in(bot, INFRA_CHAT, "fired 2 times")
    assert new.message_id != old.message_id and new.method == "sendMessage"
    [(_, data)] = new.buttons()
    _, query = bot.telegram.press_button(
        user_id=OPERATOR,
        chat_id=INFRA_CHAT,
        message_id=new.message_id,
        data=data,
        chat_type="supergroup",
    )
    assert (await bot.telegram.wait_for_callback_answer(query))["text"] == "Done."
    await bot.telegram.wait_for_message(
        lambda m: m.message_id == new.message_id and "acknowledged by Op" in m.plain,
        chat_id=INFRA_CHAT,
    )


async def test_an_unreachable_team_chat_is_told_to_the_admins_who_acknowledge_in_private(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next(
        "sendMessage", chat_id=INFRA_CHAT, error_code=403, description=KICKED, times=None
    )
    incident = (await alert(bot, generic())).json()["incident"]
    told = await post_in(bot, ADMIN, "cannot post to the chat of team infra")
    assert KICKED in told.plain and f"/ack {incident}" in told.plain
    assert "disk full on db-1" in told.plain
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    clock.advance(10)
    await bot.app.oncall.run_due()  # the post is retried and fails again …
    assert sends_to(bot, INFRA_CHAT) >= 2
    assert len(bot.telegram.bot_messages(ADMIN)) == 1  # … and the admins are told once

    [(_, data)] = told.buttons()
    _, forged = bot.telegram.press_button(  # an operator (not an admin) in their private chat
        user_id=OPERATOR, chat_id=OPERATOR, message_id=1, data=data
    )
    refused = await bot.telegram.wait_for_callback_answer(forged)
    assert "another team's chat" in refused["text"] and refused.get("show_alert")

    _, query = bot.telegram.press_button(
        user_id=ADMIN, chat_id=ADMIN, message_id=told.message_id, data=data
    )
    assert (await bot.telegram.wait_for_callback_answer(query))["text"] == "Done."
    terminated = [r for r in bot.pilot.requests if r.operation == "terminate"]
    assert len(terminated) == 1  # the ring in progress ends
    await bot.telegram.wait_for_message(
        lambda m: m.message_id == told.message_id and m.buttons() == [], chat_id=ADMIN
    )
    clock.advance(3600)
    await bot.app.oncall.run_due()
    assert len(bot.pilot.calls_started()) == 1

    bot.telegram.clear_failures()  # the bot is added back: the post follows, acknowledged
    clock.advance(600)
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    assert "acknowledged by Op" in post.plain and post.buttons() == []


async def test_the_admins_are_told_when_telegram_keeps_failing(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next("sendMessage", chat_id=INFRA_CHAT, drop=True, times=None)
    await alert(bot, generic())
    clock.advance(60)
    await bot.app.oncall.run_due()
    assert bot.telegram.bot_messages(ADMIN) == []  # two failures may be a blip
    clock.advance(60)
    await bot.app.oncall.run_due()
    told = await post_in(bot, ADMIN, "cannot post to the chat of team infra")
    assert told.buttons()
    clock.advance(600)
    await bot.app.oncall.run_due()
    assert len(bot.telegram.bot_messages(ADMIN)) == 1


async def test_the_outbox_and_the_admins_message_on_both_backends(
    start_bot: StartBot, tmp_path: Path, clock: Clock, db_url: str
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, database_url=db_url)
    bot.telegram.fail_next(
        "sendMessage", chat_id=INFRA_CHAT, error_code=403, description=KICKED, times=None
    )
    await alert(bot, generic())
    await post_in(bot, ADMIN, "cannot post to the chat of team infra")
    assert await bot.app.oncall.run_due() == 1
    # the timer wakes for the post's retry (5 s), before the ring's wait (300 s) runs out
    assert await bot.app.oncall_store.next_due_at() == clock.now + timedelta(seconds=5)
    bot.telegram.clear_failures()
    clock.advance(6)
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "calling alice")


async def test_a_chat_that_is_gone_is_told_to_the_admins_at_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next(
        "sendMessage",
        chat_id=INFRA_CHAT,
        error_code=400,
        description="Bad Request: chat not found",
        times=None,
    )
    assert (await alert(bot, generic())).status_code == 200
    told = await post_in(bot, ADMIN, "chat not found")
    assert "cannot post to the chat of team infra" in told.plain and told.buttons()


async def test_the_admins_message_is_retried_until_it_reaches_them(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next(
        "sendMessage", chat_id=INFRA_CHAT, error_code=403, description=KICKED, times=None
    )
    bot.telegram.fail_next("sendMessage", chat_id=ADMIN, error_code=502, times=1)
    await alert(bot, generic())
    assert sends_to(bot, ADMIN) == 1 and bot.telegram.bot_messages(ADMIN) == []
    for _ in range(3):
        clock.advance(60)
        await bot.app.oncall.run_due()
    await post_in(bot, ADMIN, "cannot post to the chat of team infra")
    assert sends_to(bot, ADMIN) == 2 and len(bot.telegram.bot_messages(ADMIN)) == 1


async def test_a_post_deleted_mid_escalation_comes_back_with_the_next_step(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    old = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    await bot.app.bot.delete_message(INFRA_CHAT, old.message_id)
    assert await bot.app.oncall.run_due() == 1
    new = await post_in(bot, INFRA_CHAT, "calling alice")
    assert new.message_id != old.message_id and new.method == "sendMessage"
    assert [label for label, _ in new.buttons()] == ["✋ Acknowledge"]
    assert [m.message_id for m in bot.telegram.bot_messages(INFRA_CHAT)] == [new.message_id]


async def test_without_a_post_answering_the_ring_acknowledges(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    bot.telegram.fail_next(
        "sendMessage", chat_id=INFRA_CHAT, error_code=403, description=KICKED, times=None
    )
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    await call_event(bot, ALICE, "call.connected", "ACCEPTED")  # nothing to press: answered
    clock.advance(3600)
    assert await bot.app.oncall.run_due() == 0
    assert calls_to(bot, BOB) == []
    bot.telegram.clear_failures()
    clock.advance(600)
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "acknowledged by +55 11 9****-0001 (answered)")
    assert post.buttons() == []
