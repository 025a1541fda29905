"""`python -m bot` stopped mid-call: SIGTERM lets the POST (and what records it) finish; after
kill -9 the next start reconciles. For `/call` and for an escalation's ring, each asserts the
POSTs the fake Pilot Status received and what the chat shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bot.oncall.engine import POST_LEASE
from tests.conftest import API_KEY, OPERATOR, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram, SentMessage
from tests.processes import BotProcess, run_bot_process
from tests.test_oncall import ALICE, BOB, HOOK, INFRA_CHAT, INFRA_TOKEN, ONCALL_FILE, generic
from tests.test_oncall_ring import created_by_pilot, posted, posts_to, slow_post

PHONE = "+5511999999999"


@pytest.fixture
async def run_bot(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> AsyncIterator[object]:
    """Start `python -m bot` in tmp_path (the same data each time), on-call file and all."""
    (tmp_path / "oncall.toml").write_text(ONCALL_FILE)
    started: list[BotProcess] = []

    async def start() -> BotProcess:
        env_file = (
            f"BOT_TOKEN={TOKEN}\n"
            f"TELEGRAM_API_URL={telegram.url}\n"
            f"PILOT_STATUS_API_KEY={API_KEY}\n"
            f"PILOT_STATUS_BASE_URL={pilot.url}\n"
            "PILOT_STATUS_NUMBER_TYPE=web\n"
            "PILOT_STATUS_RETRY_BACKOFF=0.01\n"
            f"OPERATOR_IDS={OPERATOR}\n"
            f"PILOT_STATUS_WEBHOOK_TOKEN={HOOK}\n"
            "WEB_PORT=0\n"
            f"ONCALL_FILE={tmp_path / 'oncall.toml'}\n"
            "ONCALL_TICK_SECONDS=0.1\n"
            "ONCALL_LEASE_SECONDS=1\n"
            "SHUTDOWN_GRACE_SECONDS=15\n"
            # Silent rings: a ring the bot spoke on is hung up after a restart (it lost its
            # audio), which test_oncall_ring.py covers; here the ring itself must survive.
            "SPEECH_ENGINE=no-such-tts\n"
        )
        bot = await run_bot_process(tmp_path, env_file)
        started.append(bot)
        await bot.listening()
        await bot.started()
        return bot

    yield start
    for bot in started:
        if bot.process.returncode is None:
            bot.process.kill()
            with contextlib.suppress(TimeoutError):
                await bot.exited(10)


async def page(bot: BotProcess) -> None:
    url = f"http://127.0.0.1:{bot.port}/alerts/generic/infra"
    headers = {"Authorization": f"Bearer {INFRA_TOKEN}"}
    async with httpx.AsyncClient() as client:
        response = await client.post(url, json=generic(), headers=headers)
    assert response.json()["result"] == "created"


def messages(telegram: FakeTelegram, chat_id: int) -> list[SentMessage]:
    return telegram.bot_messages(chat_id)


async def test_sigterm_mid_call_finishes_the_post_and_sends_its_reply_before_exit(
    run_bot: object, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    first = await run_bot()  # type: ignore[operator]
    slow_post(pilot, "call_term", delay=1.5)
    telegram.send_command(f"/call {PHONE} db down", user_id=OPERATOR)
    post = await posted(pilot, PHONE)
    created_by_pilot(pilot, "call_term", post)
    assert await first.signal(signal.SIGTERM) == 0
    # Before the process ended: the POST was answered, and the chat got its one reply.
    assert post.status == 201
    [reply] = messages(telegram, OPERATOR)
    assert "Call to" in reply.plain and "call_term" in reply.plain
    assert "letting calls and steps in flight finish" in first.text
    assert "up to 15 s)" in first.text and "Traceback" not in first.text  # SHUTDOWN_GRACE_SECONDS

    second = await run_bot()  # type: ignore[operator]
    await asyncio.sleep(1.5)  # recovery ran: nothing was half done
    assert len(messages(telegram, OPERATOR)) == 1
    assert posts_to(pilot, PHONE) == [post]
    assert await second.signal(signal.SIGTERM) == 0


async def test_kill_mid_call_is_settled_at_the_next_start_with_one_message_and_one_post(
    run_bot: object, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    first = await run_bot()  # type: ignore[operator]
    slow_post(pilot, "call_kill", delay=30)
    telegram.send_command(f"/call {PHONE} db down", user_id=OPERATOR)
    post = await posted(pilot, PHONE)
    created_by_pilot(pilot, "call_kill", post)  # the API placed it; its answer never arrives
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL
    assert messages(telegram, OPERATOR) == []

    second = await run_bot()  # type: ignore[operator]
    told = await telegram.wait_for_message(
        lambda m: "call_kill" in m.plain, chat_id=OPERATOR, timeout=15
    )
    assert ": ringing" in told.plain
    await asyncio.sleep(1.0)
    assert len(messages(telegram, OPERATOR)) == 1
    assert posts_to(pilot, PHONE) == [post]
    assert await second.signal(signal.SIGTERM) == 0


async def test_sigterm_mid_ring_records_the_ring_and_the_next_start_rings_nobody_again(
    run_bot: object, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    first = await run_bot()  # type: ignore[operator]
    slow_post(pilot, "call_ring", delay=2.0)  # longer than the 1 s lease
    await page(first)
    post = await posted(pilot, ALICE)
    created_by_pilot(pilot, "call_ring", post)
    assert await first.signal(signal.SIGTERM) == 0
    assert post.status == 201  # answered before the exit, not cut off

    second = await run_bot()  # type: ignore[operator]
    await asyncio.sleep(3.0)  # three leases: a step left unrecorded would be taken again
    assert posts_to(pilot, ALICE) == [post] and posts_to(pilot, BOB) == []
    [incident_post] = [m for m in messages(telegram, INFRA_CHAT) if m.plain.startswith("🚨")]
    assert "calling alice" in incident_post.plain and "calling bob" not in incident_post.plain
    assert await second.signal(signal.SIGTERM) == 0


async def test_kill_after_the_ring_was_sent_is_reconciled_and_nobody_is_rung_twice(
    run_bot: object, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    first = await run_bot()  # type: ignore[operator]
    slow_post(pilot, "call_lost_answer", delay=30)
    await page(first)
    post = await posted(pilot, ALICE)
    created_by_pilot(pilot, "call_lost_answer", post)  # placed; the 201 never reaches us
    assert await first.signal(signal.SIGKILL) == -signal.SIGKILL

    second = await run_bot()  # type: ignore[operator]
    await asyncio.sleep(3.0)  # recovery, then three leases: the step is taken again
    assert posts_to(pilot, ALICE) == [post] and posts_to(pilot, BOB) == []
    # The kill may have cut off a refresh of the post too: its lease runs out first.
    await telegram.wait_for_message(
        lambda m: "call to alice was placed before a restart" in m.plain,
        chat_id=INFRA_CHAT,
        timeout=2 * POST_LEASE.total_seconds(),
    )
    [incident_post] = [m for m in messages(telegram, INFRA_CHAT) if m.plain.startswith("🚨")]
    assert "call to alice was placed before a restart" in incident_post.plain
    assert await second.signal(signal.SIGTERM) == 0
