"""Acknowledge ends the ringing, only from the team's own chat; acknowledged is not forever;
exhausted is not new."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import tests.test_oncall as base
from tests.conftest import ADMIN, OPERATOR, STRANGER, RunningBot, StartBot
from tests.test_oncall import (
    ALICE,
    BOB,
    INFRA_CHAT,
    WEB_CHAT,
    Clock,
    alert,
    calls_to,
    generic,
    oncall_bot,
    post_in,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def terminated(bot: RunningBot) -> list[str]:
    """Pilot call ids the bot asked Pilot Status to terminate."""
    return [r.path.split("/")[3] for r in bot.pilot.requests if r.operation == "terminate"]


def pilot_id_of_last_call_to(bot: RunningBot, phone: str) -> str:
    tag = calls_to(bot, phone)[-1].json["bizOpaqueCallbackData"]
    return next(c["id"] for c in bot.pilot.calls.values() if c["bizOpaqueCallbackData"] == tag)


async def press(
    bot: RunningBot, chat: int, message_id: int, data: str, user: int = OPERATOR
) -> Any:
    kind = "private" if chat > 0 else "supergroup"
    _, query = bot.telegram.press_button(
        user_id=user, chat_id=chat, message_id=message_id, data=data, chat_type=kind
    )
    return await bot.telegram.wait_for_callback_answer(query)


async def say(bot: RunningBot, text: str, *, user: int, chat: int) -> str:
    mark = bot.telegram.mark()
    kind = "private" if chat > 0 else "supergroup"
    bot.telegram.send_command(text, user_id=user, chat_id=chat, chat_type=kind)
    reply = await bot.telegram.wait_for_message(
        lambda m: m.method == "sendMessage", chat_id=chat, after=mark
    )
    return reply.plain


async def rung(bot: RunningBot) -> tuple[int, str]:
    """An alert, its first ring (alice); returns the post's message id and its button data."""
    await alert(bot, generic())
    assert await bot.app.oncall.run_due() == 1
    post = await post_in(bot, INFRA_CHAT, "calling alice")
    [(_, data)] = post.buttons()
    return post.message_id, data


# 9. acknowledge ends the ringing


async def test_acknowledge_hangs_up_the_ring_in_progress(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    message_id, data = await rung(bot)
    ringing = pilot_id_of_last_call_to(bot, ALICE)
    assert (await press(bot, INFRA_CHAT, message_id, data))["text"] == "Done."
    assert terminated(bot) == [ringing]
    assert bot.pilot.calls[ringing]["status"] == "COMPLETED"
    await post_in(bot, INFRA_CHAT, "acknowledged by Op")
    for _ in range(5):
        clock.advance(600)
        assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 1


async def test_a_button_forged_in_another_chat_does_not_acknowledge(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    message_id, data = await rung(bot)
    web_post = await say(bot, "/oncall", user=OPERATOR, chat=WEB_CHAT)  # a message in web's chat
    assert "carol" in web_post
    [web_message] = [m for m in bot.telegram.bot_messages(WEB_CHAT) if "carol" in m.plain]
    for chat, where in ((WEB_CHAT, web_message.message_id), (OPERATOR, 1)):
        answer = await press(bot, chat, where, data)  # infra's incident, from another chat
        assert "another team's chat" in answer["text"] and answer.get("show_alert")
    assert terminated(bot) == []
    assert "firing" in bot.telegram.message(INFRA_CHAT, message_id).plain
    clock.advance(301)
    assert await bot.app.oncall.run_due() == 1  # the escalation goes on
    assert len(calls_to(bot, BOB)) == 1
    assert (await press(bot, INFRA_CHAT, message_id, data))["text"] == "Done."


async def test_an_acknowledge_racing_the_ring_hangs_that_ring_up(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    slow = bot.pilot.add_call(ALICE, direction="OUTBOUND", status="INITIATED")
    created = {k: slow[k] for k in ("id", "externalCallId", "status")}
    bot.pilot.script("start_call", status=201, body=created, delay=1.0, times=1)
    await alert(bot, generic())
    post = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    [(_, data)] = post.buttons()
    step = asyncio.create_task(bot.app.oncall.run_due())
    for _ in range(200):  # until the ring's POST is at Pilot Status, not yet answered
        if bot.pilot.calls_started():
            break
        await asyncio.sleep(0.01)
    assert (await press(bot, INFRA_CHAT, post.message_id, data))["text"] == "Done."
    assert not step.done()
    await step
    assert terminated(bot) == [slow["id"]]  # the ring placed in the same moment is ended
    final = await post_in(bot, INFRA_CHAT, "acknowledged by Op")
    assert final.buttons() == []  # the ring written ahead shows, and it was hung up
    clock.advance(3600)
    assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 1


async def test_an_acknowledgement_that_raced_a_ring_times_out_from_the_person_on_call(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    """The ring hung up by an acknowledge that raced it is not the next escalation's step: when
    the acknowledgement runs out, the person on call is rung first again, not skipped."""
    bot = await oncall_bot(start_bot, tmp_path, clock)
    slow = bot.pilot.add_call(ALICE, direction="OUTBOUND", status="INITIATED")
    created = {k: slow[k] for k in ("id", "externalCallId", "status")}
    bot.pilot.script("start_call", status=201, body=created, delay=1.0, times=1)
    await alert(bot, generic())
    post = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    [(_, data)] = post.buttons()
    step = asyncio.create_task(bot.app.oncall.run_due())
    for _ in range(200):
        if bot.pilot.calls_started():
            break
        await asyncio.sleep(0.01)
    assert (await press(bot, INFRA_CHAT, post.message_id, data))["text"] == "Done."
    await step
    assert terminated(bot) == [slow["id"]]
    clock.advance(4 * 3600 + 1)
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 2 and calls_to(bot, BOB) == []
    await post_in(bot, INFRA_CHAT, "and not resolved: firing again")


async def test_ack_command_works_in_the_teams_chat_and_for_an_admin_in_private(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    incident = (await alert(bot, generic())).json()["incident"]
    await bot.app.oncall.run_due()
    assert "another team's chat" in await say(bot, f"/ack {incident}", user=OPERATOR, chat=WEB_CHAT)
    assert "another team's chat" in await say(bot, f"/ack {incident}", user=OPERATOR, chat=OPERATOR)
    assert "Usage" in await say(bot, "/ack", user=OPERATOR, chat=INFRA_CHAT)
    assert "not allowed" in await say(bot, f"/ack {incident}", user=STRANGER, chat=INFRA_CHAT)
    assert "no incident" in await say(bot, "/ack 999", user=OPERATOR, chat=INFRA_CHAT)
    assert terminated(bot) == []
    assert "Done" in await say(bot, f"/ack #{incident}", user=OPERATOR, chat=INFRA_CHAT)
    assert len(terminated(bot)) == 1
    await post_in(bot, INFRA_CHAT, "acknowledged by Op")
    assert "already handled" in await say(bot, f"/ack {incident}", user=ADMIN, chat=ADMIN)
    other = (await alert(bot, generic(key="two", title="second"))).json()["incident"]
    assert "Done" in await say(bot, f"/ack {other}", user=ADMIN, chat=ADMIN)


# 12. acknowledged is not forever


async def test_an_acknowledgement_times_out_and_the_incident_fires_again(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    message_id, data = await rung(bot)
    clock.advance(60)
    assert (await press(bot, INFRA_CHAT, message_id, data))["text"] == "Done."
    clock.advance(4 * 3600 - 1)
    assert await bot.app.oncall.run_due() == 0
    clock.advance(2)
    assert await bot.app.oncall.run_due() == 1  # from the person on call again
    assert len(calls_to(bot, ALICE)) == 2 and calls_to(bot, BOB) == []
    post = await post_in(bot, INFRA_CHAT, "acknowledged by Op 4 h ago and not resolved")
    post = await post_in(bot, INFRA_CHAT, "16:01 calling alice")
    assert "🔴 firing" in post.plain and post.message_id == message_id
    assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]


async def test_ack_timeout_and_repage_after_are_set_per_team(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    assert "Done" in await say(
        bot, "/team policy infra ack_timeout=30m repage_after=2h", user=ADMIN, chat=ADMIN
    )
    assert "Usage" in await say(bot, "/team policy infra ack_timeout=soon", user=ADMIN, chat=ADMIN)
    listed = await say(bot, "/team list", user=ADMIN, chat=ADMIN)
    assert "acknowledgement holds 30 m; pages again after exhaustion: 2 h" in listed
    message_id, data = await rung(bot)
    await press(bot, INFRA_CHAT, message_id, data)
    clock.advance(30 * 60 + 1)
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 2
    assert "Done" in await say(bot, "/team policy infra ack_timeout=off", user=ADMIN, chat=ADMIN)
    await press(bot, INFRA_CHAT, message_id, data)
    clock.advance(30 * 24 * 3600)
    assert await bot.app.oncall.run_due() == 0


async def test_the_oncall_file_sets_ack_timeout_and_repage_after(
    start_bot: StartBot, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = base.ONCALL_FILE.replace(
        "max_rounds = 1\n", 'max_rounds = 1\nack_timeout = "1h"\nrepage_after = 900\n'
    )
    monkeypatch.setattr(base, "ONCALL_FILE", file)
    bot = await oncall_bot(start_bot, tmp_path, clock)
    team = await bot.app.oncall_store.team("infra")
    assert team is not None and (team.ack_timeout, team.repage_after) == (3600, 900)
    web = await bot.app.oncall_store.team("web")
    assert web is not None and (web.ack_timeout, web.repage_after) == (4 * 3600, 0)


# 12. exhausted is not new


async def exhaust(bot: RunningBot, clock: Clock) -> int:
    incident = (await alert(bot, generic())).json()["incident"]
    for _ in range(3):
        await bot.app.oncall.run_due()
        clock.advance(301)
    await post_in(bot, INFRA_CHAT, "12:10 nobody acknowledged: escalation ended")
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [ALICE, BOB]
    return int(incident)


async def test_a_repeat_after_the_escalation_ran_out_updates_that_incident(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    incident = await exhaust(bot, clock)
    clock.advance(600)
    again = await alert(bot, generic())
    assert again.json() == {"result": "updated", "incident": incident}
    post = await post_in(bot, INFRA_CHAT, "still firing, escalation exhausted at 12:10")
    assert "fired 2 times" in post.plain and post.buttons() == []
    clock.advance(600)
    assert (await alert(bot, generic())).json()["result"] == "updated"
    post = await post_in(bot, INFRA_CHAT, "fired 3 times")
    assert post.plain.count("still firing, escalation exhausted") == 1
    for _ in range(3):
        clock.advance(3600)
        assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 2
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1
    resolved = await alert(bot, generic(status="resolved"))
    assert resolved.json() == {"result": "resolved", "incident": incident}
    await post_in(bot, INFRA_CHAT, "✔️ resolved")


async def test_repage_after_pages_an_exhausted_incident_again(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    assert "Done" in await say(bot, "/team policy infra repage_after=1h", user=ADMIN, chat=ADMIN)
    incident = await exhaust(bot, clock)  # exhausted at 12:10
    clock.advance(30 * 60)
    assert (await alert(bot, generic())).json()["result"] == "updated"
    assert await bot.app.oncall.run_due() == 0
    clock.advance(30 * 60)
    again = await alert(bot, generic())
    assert again.json() == {"result": "repaged", "incident": incident}
    assert await bot.app.oncall.run_due() == 1
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [ALICE, BOB, ALICE]
    post = await post_in(bot, INFRA_CHAT, "escalation ended: paging again")
    assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]


async def test_ack_timeout_and_exhaustion_on_both_backends(
    start_bot: StartBot, tmp_path: Path, clock: Clock, db_url: str
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, database_url=db_url)
    message_id, data = await rung(bot)
    assert (await press(bot, INFRA_CHAT, message_id, data))["text"] == "Done."
    assert len(terminated(bot)) == 1
    await post_in(bot, INFRA_CHAT, "acknowledged by Op")
    clock.advance(4 * 3600 - 1)
    assert await bot.app.oncall.run_due() == 0
    clock.advance(1)
    assert await bot.app.oncall.run_due() == 1
    for _ in range(3):
        clock.advance(301)
        await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "nobody acknowledged: escalation ended")
    assert (await alert(bot, generic())).json()["result"] == "updated"
    await post_in(bot, INFRA_CHAT, "still firing, escalation exhausted at 16:")
