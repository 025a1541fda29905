"""The on-call hot path and alert storms: a ring goes out before its post and before its speech
is synthesized; a team past its share of posts in a minute gets one digest post, with a button
per alert, within Telegram's limits (the fake enforces them: 429 past them, recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from pathlib import Path
from typing import Any

import httpx
from limits import RateLimitItemPerSecond

from bot.telegram.pacing import SendLimits
from tests.conftest import OPERATOR, RunningBot, StartBot
from tests.fakes.telegram import FakeTelegram, SentMessage, Window
from tests.speech import espeak
from tests.test_oncall import ALICE, INFRA_CHAT, Clock, alert, calls_to, clock, generic, oncall_bot
from tests.test_oncall import INFRA_TOKEN as TOKEN
from tests.test_oncall_ring import ring_bot

__all__ = ["clock", "espeak"]  # fixtures, used by name

SHARE = 5  # ONCALL_POSTS_PER_MINUTE's default
STORM = 15  # alerts for one team within its minute


async def press(bot: RunningBot, message_id: int, data: str) -> str:
    _, query = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=INFRA_CHAT, message_id=message_id, data=data, chat_type="group"
    )
    return str(await bot.telegram.wait_for_callback_answer(query))


async def until(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def patient_alert(bot: RunningBot) -> httpx.Response:
    """The alert of tests/test_oncall.py, by a client that waits for a slow Telegram."""
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/infra"
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, json=generic(), headers={"Authorization": f"Bearer {TOKEN}"})


def slow_engine(tmp_path: Path, espeak_path: str, seconds: float) -> str:
    """A speech engine that takes `seconds` before espeak-ng speaks."""
    script = tmp_path / "slow-espeak"
    script.write_text(f'#!/bin/sh\nsleep {seconds}\nexec "{espeak_path}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


async def test_a_ring_goes_out_before_its_speech_is_synthesized_and_before_its_post(
    start_bot: StartBot, tmp_path: Path, clock: Clock, espeak: str
) -> None:
    """espeak-ng takes 6 s here and Telegram answers the post after 4 s: the POST that rings
    alice comes at once all the same; the callee's audio is synthesized while it rings."""
    bot = await ring_bot(
        start_bot,
        tmp_path,
        clock,
        oncall_tick_seconds=60,  # the timer runs (and so intake takes first steps) but idles
        speech_engine=slow_engine(tmp_path, espeak, 6.0),
    )
    bot.telegram.delay_next("sendMessage", 4.0, chat_id=INFRA_CHAT)
    started = time.monotonic()
    sending = asyncio.create_task(patient_alert(bot))
    await until(lambda: calls_to(bot, ALICE), seconds=3.5)  # bounds for a loaded machine
    assert time.monotonic() - started < 3.5
    assert bot.telegram.bot_messages(INFRA_CHAT) == []  # the post is still on its way
    response = await sending
    assert response.status_code == 200 and response.json()["result"] == "created"
    [post] = bot.telegram.bot_messages(INFRA_CHAT)
    assert "calling alice" in post.plain and "disk full on db-1" in post.plain
    assert len(calls_to(bot, ALICE)) == 1
    await until(lambda: bot.app.speaker.syntheses == 1)  # while it rings


def storm_limits(telegram: FakeTelegram, bot: RunningBot) -> None:
    """Telegram's limits, enforced by the fake and kept by the bot; the group window scaled to
    20 messages per 2 s on both sides, so the test takes seconds."""
    telegram.enforce_limits(overall=Window(30, 1.0), group=Window(20, 2.0), private=Window(1, 1.0))
    bot.app.pacer.limits = SendLimits(
        overall=RateLimitItemPerSecond(30),
        group=RateLimitItemPerSecond(20, 2),
        chat=RateLimitItemPerSecond(1),
    )


async def group_posts(bot: RunningBot, count: int) -> list[SentMessage]:
    with contextlib.suppress(AssertionError):
        await until(lambda: len(bot.telegram.bot_messages(INFRA_CHAT)) >= count)
    await bot.app.live.wait_idle()
    return bot.telegram.bot_messages(INFRA_CHAT)


async def test_a_storm_past_the_teams_share_gets_one_digest_whose_buttons_acknowledge(
    start_bot: StartBot, tmp_path: Path, clock: Clock, telegram: FakeTelegram
) -> None:
    bot = await oncall_bot(
        start_bot,
        tmp_path,
        clock,
        oncall_throttle="",  # every alert rings alice: no throttle in the way
        speech_engine="no-such-tts",
        telegram_sends_per_second=30,
        telegram_group_sends_per_minute=20,
    )
    storm_limits(telegram, bot)
    answers = await asyncio.gather(
        *(alert(bot, generic(f"disk {n} full", f"disk-{n}")) for n in range(STORM))
    )
    assert {a.json()["result"] for a in answers} == {"created"}
    incidents = sorted(a.json()["incident"] for a in answers)
    while await bot.app.oncall.run_due():  # every alert rings, digested or not
        pass
    assert len(calls_to(bot, ALICE)) == STORM
    clock.advance(3)  # the digest gathers its lines for 3 s, then is posted
    await bot.app.oncall.run_due()
    posts = await group_posts(bot, SHARE + 1)
    assert len(posts) == SHARE + 1, [p.plain.splitlines()[0] for p in posts]
    own = [p for p in posts if p.plain.startswith("🚨")]
    [digest] = [p for p in posts if not p.plain.startswith("🚨")]
    assert len(own) == SHARE
    assert digest.plain.startswith(f"🗂 {STORM - SHARE} more alerts for team infra:")
    listed = incidents[SHARE:]
    for incident_id in listed:
        assert f"🔴 #{incident_id} [CRITICAL] disk" in digest.plain
    buttons = dict(digest.buttons())
    assert list(buttons) == [f"✋ #{i}" for i in listed]
    # one alert of the digest acknowledged by its own button: its line says so, its button goes
    first = listed[0]
    assert "Done" in await press(bot, digest.message_id, buttons[f"✋ #{first}"])
    acknowledged = await bot.app.oncall_store.incident(first)
    assert acknowledged is not None and acknowledged.status == "acknowledged"
    await bot.app.oncall.run_due()
    await bot.app.live.wait_idle()
    await until(lambda: "✅" in telegram.message(INFRA_CHAT, digest.message_id).plain)
    shown = telegram.message(INFRA_CHAT, digest.message_id)
    assert f"✅ #{first} [CRITICAL] disk" in shown.plain
    assert [label for label, _ in shown.buttons()] == [f"✋ #{i}" for i in listed[1:]]
    # /ack works for a digested alert as for any
    others = await bot.app.oncall_store.digest_lines(first)
    assert [i.id for i in others] == listed
    assert telegram.flood_refusals == []
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == SHARE + 1


async def test_a_new_minute_gives_the_team_its_own_posts_again(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, oncall_throttle="")
    for n in range(SHARE + 1):
        await alert(bot, generic(f"disk {n} full", f"disk-{n}"))
    clock.advance(61)
    late = await alert(bot, generic("disk late full", "disk-late"))
    incident = await bot.app.oncall_store.incident(late.json()["incident"])
    assert incident is not None and incident.digest_id is None
    await bot.app.oncall.run_due()  # the digest of the sixth, gathered since
    posts = [p.plain.splitlines()[0] for p in await group_posts(bot, SHARE + 2)]
    assert len(posts) == SHARE + 2 and "🗂 1 more alert for team infra:" in posts
    assert "🚨 [CRITICAL] disk late full" in posts
