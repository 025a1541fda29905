"""End to end: `python -m bot` started as the README says, driven through getUpdates."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN, API_KEY, GROUP, OPERATOR, STRANGER, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent
PHONE = "+5511999999999"


class BotProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log = ""

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 20)
        self.log = stderr.decode()
        return self.process.returncode or 0


async def launch(workdir: Path, telegram: FakeTelegram, pilot: FakePilotStatus) -> BotProcess:
    """Write the .env an admin would write, then run the README's command in that folder."""
    (workdir / ".env").write_text(
        f"BOT_TOKEN={TOKEN}\n"
        f"TELEGRAM_API_URL={telegram.url}\n"
        f"PILOT_STATUS_API_KEY={API_KEY}\n"
        f"PILOT_STATUS_BASE_URL={pilot.url}\n"
        f"OPERATOR_IDS={OPERATOR}\n"
        f"ADMIN_IDS={ADMIN}\n"
        "PILOT_STATUS_RETRY_BACKOFF=0.01\n"
        "WEB_PORT=0\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return BotProcess(process)


async def ask(telegram: FakeTelegram, text: str, **kwargs: object) -> str:
    mark = telegram.mark()
    kwargs.setdefault("user_id", OPERATOR)
    telegram.send_command(text, **kwargs)  # type: ignore[arg-type]
    chat = kwargs.get("chat_id") or kwargs["user_id"]
    reply = await telegram.wait_for_message(chat_id=chat, after=mark, timeout=15)  # type: ignore[arg-type]
    return reply.plain


@pytest.fixture
async def web_bot(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> AsyncIterator[BotProcess]:
    process = await launch(tmp_path, telegram, pilot)
    yield process
    if process.process.returncode is None:
        await process.stop()


async def test_the_bot_process_places_calls_and_explains_refusals(
    web_bot: BotProcess, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    reply = await ask(telegram, f"/call {PHONE} disk full")
    assert "Call to" in reply and next(iter(pilot.calls)) in reply

    assert "is not a valid phone number" in await ask(telegram, "/call +55 11 123")
    requests_before = len(pilot.requests)
    assert "not allowed to place calls" in await ask(telegram, f"/call {PHONE}", user_id=STRANGER)
    assert len(pilot.requests) == requests_before

    pilot.error("start_call", "WHATSAPP_INSTANCE_NOT_CONNECTED", status=409, times=1)
    assert "not connected" in await ask(telegram, f"/call {PHONE}")
    pilot.error("start_call", None, status=429)
    assert "too many requests" in (await ask(telegram, f"/call {PHONE}")).lower()
    pilot.script("start_call", status=201, body={"id": "call_x", "status": "INITIATED"})

    # a group asks first; one press starts one call
    calls_before = len(pilot.calls_started())
    mark = telegram.mark()
    telegram.send_command(f"/call {PHONE}", user_id=OPERATOR, chat_id=GROUP, chat_type="group")
    prompt = await telegram.wait_for_message(chat_id=GROUP, after=mark, timeout=15)
    [confirm] = [data for label, data in prompt.buttons() if "Confirm" in label]
    for _ in range(2):
        telegram.press_button(
            user_id=OPERATOR,
            chat_id=GROUP,
            message_id=prompt.message_id,
            data=confirm,
            chat_type="group",
        )
    await telegram.wait_for_message(lambda m: "Call to" in m.plain, chat_id=GROUP, timeout=15)

    # Telegram delivers the same /call twice: one call
    mark = telegram.mark()
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=ADMIN)
    await telegram.wait_for_message(chat_id=ADMIN, after=mark, timeout=15)
    telegram.push_raw_duplicate(update_id)
    await ask(telegram, "/whoami", user_id=ADMIN)
    assert len(pilot.calls_started()) == calls_before + 2

    assert await web_bot.stop() == 0
    assert "business number type: web (detected)" in web_bot.log
    assert API_KEY not in web_bot.log and TOKEN not in web_bot.log
    assert "99999-9999" not in web_bot.log and "5511999999999" not in web_bot.log


async def test_the_bot_process_asks_permission_on_a_meta_number(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    pilot.number_type = "meta"
    process = await launch(tmp_path, telegram, pilot)
    try:
        mark = telegram.mark()
        telegram.send_command(f"/call {PHONE} can we talk?", user_id=OPERATOR)
        reply = await telegram.wait_for_message(chat_id=OPERATOR, after=mark, timeout=15)
        assert "has not allowed WhatsApp calls" in reply.plain
        [(_, data)] = reply.buttons()
        telegram.press_button(
            user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
        )
        await telegram.wait_for_message(
            lambda m: "Permission request sent" in m.plain, chat_id=OPERATOR, timeout=15
        )
    finally:
        assert await process.stop() == 0
    requests = [r for r in pilot.requests if r.operation == "request_permission"]
    assert [r.json for r in requests] == [{"to": PHONE, "text": "can we talk?"}]
    assert pilot.calls_started() == []
    assert "business number type: meta (detected)" in process.log


async def test_a_token_telegram_rejects_stops_the_start_with_a_clear_line(
    tmp_path: Path, pilot: FakePilotStatus
) -> None:
    other = FakeTelegram("999:" + "B" * 35)  # knows another token: ours gets 401
    await other.start()
    try:
        process = await launch(tmp_path, other, pilot)
        _, stderr = await asyncio.wait_for(process.process.communicate(), 30)
    finally:
        await other.close()
    assert process.process.returncode == 1
    assert "Telegram rejected BOT_TOKEN" in stderr.decode()
    assert "Traceback" not in stderr.decode() and TOKEN not in stderr.decode()
