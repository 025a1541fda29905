"""Telegram failing while calls and incidents are followed: edits, button presses, long replies.

Every test drives the real bot against the loopback fakes, breaks Telegram (or Pilot Status,
or the database) the way production does, and asserts what the chat ends up showing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from bot.texts import fit
from tests.conftest import ADMIN, GROUP, OPERATOR, RunningBot, StartBot
from tests.fakes.telegram import SentMessage, parse_html

PHONE, OTHER_PHONE = "+5511999999999", "+5511988887777"
HOOK = "w" * 32
NOT_FOUND = "Bad Request: message to edit not found"


async def webhook_bot(start_bot: StartBot, **overrides: Any) -> RunningBot:
    overrides.setdefault("pilot_status_number_type", "web")
    return await start_bot(pilot_status_webhook_token=HOOK, web_port=0, **overrides)


async def command(bot: RunningBot, line: str, **kwargs: Any) -> SentMessage:
    """Send a command; the bot's first new message (not an edit) in that chat."""
    mark = bot.telegram.mark()
    kwargs.setdefault("user_id", OPERATOR)
    chat_id = kwargs.get("chat_id") or kwargs["user_id"]
    bot.telegram.send_command(line, **kwargs)
    return await bot.telegram.wait_for_message(
        lambda m: not m.method.startswith("edit"), chat_id=chat_id, after=mark
    )


async def start_call(
    bot: RunningBot, phone: str = PHONE, user: int = OPERATOR
) -> tuple[SentMessage, str]:
    reply = await command(bot, f"/call {phone} db down", user_id=user)
    tag = bot.pilot.calls_started()[-1].json["bizOpaqueCallbackData"]
    pilot_id = next(c["id"] for c in bot.pilot.calls.values() if c["bizOpaqueCallbackData"] == tag)
    return reply, pilot_id


async def deliver(bot: RunningBot, pilot_id: str, name: str, status: str, **fields: Any) -> None:
    body = {
        "event": name,
        "callId": pilot_id,
        "status": status,
        "direction": "OUTBOUND",
        "from": "5511888888888",
        "to": PHONE[1:],
        "timestamp": "2026-11-27T10:00:00.000Z",
    } | fields
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}"
    async with httpx.AsyncClient() as client:
        assert (await client.post(url, json=body)).status_code == 200


async def shown(
    bot: RunningBot, message: SentMessage, fragment: str, within: float = 10
) -> SentMessage:
    return await bot.telegram.wait_for_message(
        lambda m: m.message_id == message.message_id and fragment in m.plain,
        chat_id=message.chat_id,
        timeout=within,
    )


def edit_requests(bot: RunningBot, message: SentMessage) -> int:
    return sum(
        1
        for method, params in bot.telegram.requests
        if method.lower() == "editmessagetext"
        and params.get("chat_id") == message.chat_id
        and params.get("message_id") == message.message_id
    )


# item 6: message edits survive Telegram errors


@pytest.mark.parametrize(
    "failure",
    [
        {"error_code": 502, "description": "Bad Gateway", "times": 3},
        {"drop": True, "times": 2},
        # three flood waits: the session middleware gives up after its third try
        {
            "error_code": 429,
            "description": "Too Many Requests: retry after 1",
            "retry_after": 1,
            "times": 3,
        },
    ],
    ids=["server_error", "network_drop", "flood_wait"],
)
async def test_a_call_that_ends_while_telegram_fails_is_shown_ended(
    start_bot: StartBot, failure: dict[str, Any]
) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    assert [label for label, _ in reply.buttons()] == ["📴 Hang up"]
    bot.telegram.fail_next("editMessageText", **failure)
    await deliver(bot, pilot_id, "call.ended", "COMPLETED", duration=7)
    final = await shown(bot, reply, ": ended", within=15)
    assert "Duration: 0:07" in final.plain and final.buttons() == []
    assert bot.telegram.message(reply.chat_id, reply.message_id).buttons() == []


async def test_one_failing_message_holds_back_no_other_and_ends_with_the_newest_state(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot)
    stuck, stuck_id = await start_call(bot, PHONE, user=OPERATOR)
    other, other_id = await start_call(bot, OTHER_PHONE, user=ADMIN)
    bot.telegram.fail_next("editMessageText", error_code=500, times=None, chat_id=OPERATOR)
    for name, status in (
        ("call.ringing", "RINGING"),
        ("call.connected", "ACCEPTED"),
        ("call.ended", "COMPLETED"),
    ):
        await deliver(bot, stuck_id, name, status)
    await deliver(bot, other_id, "call.ended", "COMPLETED")
    await shown(bot, other, ": ended", within=3)  # not held back by the failing one
    await asyncio.sleep(0.5)
    assert edit_requests(bot, stuck) >= 2  # it kept trying
    shown_before = len(
        [
            e
            for e in bot.telegram.edits
            if e.message_id == stuck.message_id and e.chat_id == stuck.chat_id
        ]
    )
    assert shown_before == 0
    bot.telegram.clear_failures()
    final = await shown(bot, stuck, ": ended")
    assert final.buttons() == []
    await bot.app.live.wait_idle()
    stuck_edits = [
        e
        for e in bot.telegram.edits
        if (e.chat_id, e.message_id) == (stuck.chat_id, stuck.message_id)
    ]
    assert [": ended" in e.plain for e in stuck_edits] == [True]  # only the newest state


async def test_an_edit_that_keeps_failing_is_given_up_with_a_log_line(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await webhook_bot(start_bot, telegram_edit_give_up_after=1.0)
    reply, pilot_id = await start_call(bot)
    bot.telegram.fail_next("editMessageText", error_code=500, times=None)
    with caplog.at_level(logging.WARNING, logger="bot.calls.live"):
        await deliver(bot, pilot_id, "call.ended", "COMPLETED")
        await eventually(lambda: "gave up editing message" in caplog.text, 10)
        await asyncio.wait_for(bot.app.live.wait_idle(), 2)
    tries = edit_requests(bot, reply)
    assert tries >= 3
    await asyncio.sleep(0.5)
    assert edit_requests(bot, reply) == tries  # it stopped


async def eventually(condition: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


async def test_shutdown_is_bounded_while_an_edit_keeps_failing(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)  # the default budget: 15 minutes of retries
    reply, pilot_id = await start_call(bot)
    bot.telegram.fail_next("editMessageText", drop=True, times=None)
    await deliver(bot, pilot_id, "call.ended", "COMPLETED")
    await eventually(lambda: edit_requests(bot, reply) >= 2, 5)  # it is retrying
    began = time.monotonic()
    await bot.stop()
    assert time.monotonic() - began < 8


async def test_a_message_that_is_gone_is_not_edited_again(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    bot.telegram.fail_next("editMessageText", error_code=400, description=NOT_FOUND, times=None)
    await deliver(bot, pilot_id, "call.ended", "COMPLETED")
    await asyncio.wait_for(bot.app.live.wait_idle(), 3)
    await asyncio.sleep(0.3)
    assert edit_requests(bot, reply) == 1


# item 7: a button's error never destroys its message


async def test_pilot_failure_on_hang_up_answers_an_alert_and_keeps_the_message(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot, pilot_status_max_retries=0)
    reply, _ = await start_call(bot)
    [(label, data)] = reply.buttons()
    bot.pilot.error("terminate", None, status=503)
    _, query = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    answer = await bot.telegram.wait_for_callback_answer(query)
    assert answer["show_alert"] and "Pilot Status had a problem" in answer["text"]
    assert "<" not in answer["text"]  # an alert is plain text
    await asyncio.sleep(0.3)
    now = bot.telegram.message(reply.chat_id, reply.message_id)
    assert now.plain == reply.plain and now.buttons() == [(label, data)]
    assert [r for r in bot.pilot.requests if r.operation == "terminate"]


async def test_database_failure_on_acknowledge_answers_an_alert_and_keeps_the_post(
    start_bot: StartBot, tmp_path: Path
) -> None:
    team_chat, token = -100777, "tok-" + "z" * 30
    config = tmp_path / "oncall.toml"
    config.write_text(
        f'[contacts]\nalice = "{PHONE}"\n\n[teams.infra]\nchat_id = {team_chat}\n'
        f'token = "{token}"\nmembers = ["alice"]\n'
    )
    bot = await webhook_bot(start_bot, oncall_file=str(config), oncall_tick_seconds=0)
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/infra"
    async with httpx.AsyncClient() as client:
        body = {"title": "disk full", "dedupKey": "disk", "severity": "critical"}
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    post = await bot.telegram.wait_for_message(lambda m: "disk full" in m.plain, chat_id=team_chat)
    [(label, data)] = post.buttons()
    async with bot.app.engine.begin() as connection:  # the database breaks for real
        await connection.execute(text("ALTER TABLE incidents RENAME TO incidents_gone"))
    _, query = bot.telegram.press_button(
        user_id=ADMIN,
        chat_id=team_chat,
        message_id=post.message_id,
        data=data,
        chat_type="supergroup",
    )
    answer = await bot.telegram.wait_for_callback_answer(query)
    assert answer["show_alert"] and "Something went wrong on my side" in answer["text"]
    await asyncio.sleep(0.3)
    now = bot.telegram.message(team_chat, post.message_id)
    assert now.plain == post.plain and now.buttons() == [(label, data)]
    async with bot.app.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE incidents_gone RENAME TO incidents"))


# item 8: replies that would be too long


def test_fit_cuts_to_the_limit_without_breaking_tags_or_entities() -> None:
    long = "<b>Call</b>\nNote: " + "R&amp;D &lt;x&gt; 😀 " * 800 + "<code>id</code>"
    cut = fit(long)
    shown, _ = parse_html(cut)  # still valid HTML for Telegram
    assert len(shown.encode("utf-16-le")) // 2 <= 4096 and shown.endswith("…")
    assert shown.startswith("Call\nNote: R&D <x> 😀")
    assert fit("<b>short</b> &amp; fine") == "<b>short</b> &amp; fine"
    inside = fit("<i>" + "a" * 5000 + "</i>")
    assert inside.endswith("…</i>") and len(parse_html(inside)[0]) == 4096


async def test_a_5000_character_note_gives_one_readable_reply_and_one_call(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot)
    note = "disk " * 1000
    mark = bot.telegram.mark()
    reply = await command(bot, f"/call {PHONE} {note}")
    assert ": started" in reply.plain and "Note: disk disk" in reply.plain
    assert reply.plain.endswith("…") and len(reply.plain) <= 4096
    assert [label for label, _ in reply.buttons()] == ["📴 Hang up"]
    await asyncio.sleep(0.3)
    assert [m.message_id for m in bot.telegram.sent[mark:] if m.chat_id == OPERATOR] == [
        reply.message_id
    ]
    assert not any("went wrong" in e.plain for e in bot.telegram.sent)
    assert len(bot.pilot.calls_started()) == 1


async def test_a_5000_character_note_in_a_group_is_confirmed_and_dialled_once(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot, allowed_chat_ids=str(GROUP))
    note = "é&<" * 1700
    confirm = await command(bot, f"/call {PHONE} {note}", chat_id=GROUP, chat_type="supergroup")
    assert "Call +55 11 9****-9999?" in confirm.plain and "…" in confirm.plain
    [(_, ok), _] = confirm.buttons()
    bot.telegram.press_button(
        user_id=OPERATOR,
        chat_id=GROUP,
        message_id=confirm.message_id,
        data=ok,
        chat_type="supergroup",
    )
    final = await shown(bot, confirm, ": started")
    assert "Note: é&<é&<" in final.plain and len(final.plain) <= 4096
    assert not any("went wrong" in e.plain for e in [*bot.telegram.sent, *bot.telegram.edits])
    assert len(bot.pilot.calls_started()) == 1


async def test_a_started_call_is_announced_even_when_telegram_fails_its_reply(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot)
    bot.telegram.fail_next("sendMessage", error_code=500, times=1, chat_id=OPERATOR)
    bot.telegram.send_command(f"/call {PHONE} db down", user_id=OPERATOR)
    reply = await bot.telegram.wait_for_message(lambda m: ": started" in m.plain, chat_id=OPERATOR)
    assert [label for label, _ in reply.buttons()] == ["📴 Hang up"]
    await asyncio.sleep(0.3)
    assert [m.plain for m in bot.telegram.sent if m.chat_id == OPERATOR] == [reply.plain]
    assert len(bot.pilot.calls_started()) == 1
    # and the reply follows the call
    pilot_id = next(iter(bot.pilot.calls.values()))["id"]
    await deliver(bot, pilot_id, "call.ended", "COMPLETED")
    await shown(bot, reply, ": ended")
