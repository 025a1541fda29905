"""The Mini App softphone on a web number, in a real browser (tests/browser.py): the operator's
fake microphone reaches the callee over Pilot's realtime WebSocket, the callee's audio is
played by the page (measured there with a WebAudio AnalyserNode), Mute, Hang up from the page
and from the callee; and refusals of bad initData, over HTTP and the talk socket."""

from __future__ import annotations

import array
import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot.storage.store import CallRecord
from tests.browser import DARK, chromium, chromium_path, open_miniapp, tone_wav
from tests.conftest import ADMIN, GROUP, OPERATOR, STRANGER, TOKEN, RunningBot, StartBot
from tests.fakes.pilot_status import RealtimeRecord
from tests.fakes.telegram import SentMessage
from tests.miniapp import init_data
from tests.test_call_pipeline import press
from tests.test_lifecycle import PHONE, command, shown

DOCS = Path(__file__).resolve().parent.parent / "docs"
OTHER_OPERATOR = 444
PUBLIC = "https://bot.example.com"
RATE = 16_000
FRAME = RATE // 50  # samples in 20 ms
LOUD = 400  # RMS of a frame with sound (Chromium's echo cancelling and gain control stay on)


def rms(frame: bytes) -> float:
    samples = array.array("h", frame)
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


def frequency(pcm: bytes) -> float:
    """The pitch of a steady tone, from its zero crossings."""
    samples = array.array("h", pcm)
    crossings = sum((a < 0) != (b < 0) for a, b in itertools.pairwise(samples))
    return crossings / 2 / (len(samples) / RATE)


def tone(frequency: float, n: int) -> bytes:
    """`n` 20 ms PCM16 frames of a tone at RATE."""
    return array.array(
        "h",
        (int(8000 * math.sin(2 * math.pi * frequency * k / RATE)) for k in range(n * FRAME)),
    ).tobytes()


async def until(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


async def talk_bot(start_bot: StartBot, **overrides: Any) -> RunningBot:
    overrides.setdefault("public_base_url", PUBLIC)
    return await start_bot(
        pilot_status_number_type="web", operator_ids=f"{OPERATOR},{OTHER_OPERATOR}", **overrides
    )


async def place(bot: RunningBot) -> tuple[CallRecord, SentMessage]:
    reply = await command(bot, f"/call {PHONE} talk")
    pilot_id = next(reversed(bot.pilot.calls.values()))["id"]
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None
    return record, reply


def app_url(bot: RunningBot, record: CallRecord) -> str:
    return f"http://127.0.0.1:{bot.app.web_port}/app/?call={record.id}"


async def speak_into(session: RealtimeRecord, pcm: bytes) -> None:
    """The callee talks: 20 ms frames, in real time."""
    start = time.monotonic()
    for k in range(len(pcm) // (2 * FRAME)):
        await asyncio.sleep(max(0.0, start + k * 0.02 - time.monotonic()))
        await session.send_bytes(pcm[k * 2 * FRAME : (k + 1) * 2 * FRAME])


@dataclass
class Talking:
    bot: RunningBot
    record: CallRecord
    reply: SentMessage  # the call's message in the chat
    page: Any  # the Mini App, in Chromium
    session: RealtimeRecord  # the callee's side of Pilot's realtime socket


@asynccontextmanager
async def answered_in_the_browser(
    start_bot: StartBot, tmp_path: Path, *, language_code: str = "en", **page: Any
) -> AsyncIterator[Talking]:
    """A `/call … talk` on a web number, its Mini App open in Chromium with a 440 Hz
    microphone, and the callee answering: the page's talk socket is open."""
    chromium_path()
    bot = await talk_bot(start_bot)
    record, reply = await place(bot)
    pilot_id = record.pilot_call_id
    assert pilot_id is not None
    async with chromium(tone_wav(tmp_path / "mic.wav")) as browser:
        init = init_data(TOKEN, OPERATOR, language_code=language_code)
        tab = await open_miniapp(browser, app_url(bot, record), init_data=init, **page)
        await tab.wait_for_function("document.getElementById('callee').textContent !== '…'")
        assert await tab.text_content("#callee") == "+55 11 99999-9999"
        bot.pilot.emit_status(pilot_id, "ACCEPTED")
        session = await until(lambda: bot.pilot.realtime.get(pilot_id), what="talk socket")
        yield Talking(bot, record, reply, tab, session)


async def test_a_web_number_talks_both_ways_in_the_browser(
    start_bot: StartBot, tmp_path: Path
) -> None:
    async with answered_in_the_browser(start_bot, tmp_path) as call:
        bot, reply, page, session = call.bot, call.reply, call.page, call.session
        assert session.mode == "talk"
        # the operator's 440 Hz tone reaches the callee, as 20 ms frames of PCM16 at 16 kHz
        await until(lambda: sum(rms(f) > LOUD for f in session.frames) >= 25, what="tone")
        first_loud = next(i for i, f in enumerate(session.frames) if rms(f) > LOUD)
        assert session.arrived[first_loud] - session.arrived[0] < 1.0  # from its first frame
        assert {len(f) for f in session.frames} == {2 * FRAME}
        # resampled from the page's rate to the session's: still 440 Hz
        heard = b"".join(session.frames[first_loud + 5 : first_loud + 25])
        assert abs(frequency(heard) - 440) < 15, frequency(heard)
        # the callee's audio is played by the page
        await page.evaluate(
            "() => { window.heardAt = null; const t = setInterval(() => {"
            " if (callbot.remoteLevel() > 0.05) { window.heardAt = Date.now(); clearInterval(t); }"
            " }, 2); }"
        )
        assert await page.evaluate("callbot.remoteLevel()") < 0.01  # silence so far
        sent_at = time.time()
        await speak_into(session, tone(880, 50))
        heard_at = await page.evaluate("window.heardAt")
        assert heard_at is not None, "the page played nothing"
        ear = heard_at / 1000 - sent_at
        await page.screenshot(path=str(DOCS / "softphone-light.png"))
        # Mute: the far end gets silence; Unmute: the tone again
        await page.click("#mute")
        muted_from = len(session.frames)
        await asyncio.sleep(0.6)
        after_mute = session.frames[muted_from + 10 :]  # 200 ms for frames in flight
        assert len(after_mute) >= 10 and max(rms(f) for f in after_mute) < 50
        unmuted_at = await page.evaluate(
            "() => { const t = Date.now(); document.getElementById('mute').click(); return t; }"
        )
        back = len(session.frames)
        await until(lambda: any(rms(f) > LOUD for f in session.frames[back:]), what="unmute")
        mouth = (
            next(
                t
                for f, t in zip(session.frames[back:], session.arrived[back:], strict=True)
                if rms(f) > LOUD
            )
            - unmuted_at / 1000
        )
        print(
            f"\nloopback delay: mouth-to-far-end {mouth * 1000:.0f} ms, "
            f"far-end-to-ear {ear * 1000:.0f} ms"
        )
        # Hang up from the page: both legs end, and the chat's message follows
        await page.click("#hangup")
        await until(lambda: any(r.operation == "terminate" for r in bot.pilot.requests))
        await asyncio.wait_for(session.closed.wait(), 5)
        await page.wait_for_function("document.getElementById('status').textContent === 'Ended'")
    assert ": ended" in (await shown(bot, reply, "Duration:")).plain


async def test_the_callee_hanging_up_ends_the_page_s_call_too(
    start_bot: StartBot, tmp_path: Path
) -> None:
    in_call = answered_in_the_browser(
        start_bot, tmp_path, language_code="pt-br", theme=DARK, platform="ios"
    )
    async with in_call as call:
        bot, reply, page, session = call.bot, call.reply, call.page, call.session
        pilot_id = call.record.pilot_call_id
        assert pilot_id is not None
        await until(lambda: sum(rms(f) > LOUD for f in session.frames) >= 10, what="tone")
        await page.wait_for_function("document.getElementById('status').textContent === 'Atendida'")
        assert await page.text_content("#hangup") == "Desligar"
        await page.screenshot(path=str(DOCS / "softphone-dark.png"))
        bot.pilot.emit_status(pilot_id, "COMPLETED")  # the callee hangs up
        await page.wait_for_function(
            "document.getElementById('status').textContent === 'Encerrada'", timeout=5000
        )
        assert await page.evaluate("callbot.state.socket") is None
        assert await page.is_disabled("#hangup")
    await shown(bot, reply, ": ended")
    assert not any(r.operation == "terminate" for r in bot.pilot.requests)


# --- refusals and the talk socket, without a browser


async def get_session(bot: RunningBot, record: CallRecord, init: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"tma {init}"} if init is not None else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(bot)}/app/api/calls/{record.id}", headers=headers) as response,
    ):
        return response.status, await response.json()


def base(bot: RunningBot) -> str:
    return f"http://127.0.0.1:{bot.app.web_port}"


async def talk_socket(
    http: aiohttp.ClientSession, bot: RunningBot, record: CallRecord, init: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{base(bot)}/app/api/calls/{record.id}/talk")
    await ws.send_json({"initData": init})
    return ws


def realtime_sessions_asked(bot: RunningBot) -> int:
    return sum(r.operation == "realtime_session" for r in bot.pilot.requests)


async def test_forged_expired_or_another_operator_s_init_data_is_refused_and_starts_nothing(
    start_bot: StartBot,
) -> None:
    bot = await talk_bot(start_bot)
    record, reply = await place(bot)
    assert record.pilot_call_id is not None
    bot.pilot.emit_status(record.pilot_call_id, "ACCEPTED")
    await shown(bot, reply, ": answered")
    refused = {
        "forged": (init_data(TOKEN, OPERATOR, forge=True), 401),
        "expired": (init_data(TOKEN, OPERATOR, auth_date=time.time() - 3601), 401),
        "none": (None, 401),
        "another operator": (init_data(TOKEN, OTHER_OPERATOR), 403),
        "not an operator": (init_data(TOKEN, STRANGER), 403),
    }
    for name, (init, status) in refused.items():
        got, body = await get_session(bot, record, init)
        assert got == status, name
        assert "callee_masked" not in body, name
    async with aiohttp.ClientSession() as http:
        for name, (init, status) in refused.items():
            if init is None:
                continue
            hangup = await http.post(
                f"{base(bot)}/app/api/calls/{record.id}/hangup",
                headers={"Authorization": f"tma {init}"},
            )
            assert hangup.status == status, name
            ws = await talk_socket(http, bot, record, init)
            message = await ws.receive_json(timeout=5)
            assert message == {"type": "error", "error": message["error"], "status": status}
            await ws.receive(timeout=5)
            assert ws.close_code == 4000 + status, name
    # nothing was started: no realtime session, no hang-up, and the call goes on
    assert realtime_sessions_asked(bot) == 0
    assert not any(r.operation == "terminate" for r in bot.pilot.requests)
    assert bot.pilot.realtime == {}
    # the caller and an admin are let in
    status, body = await get_session(bot, record, init_data(TOKEN, OPERATOR))
    assert status == 200
    assert (body["callee_masked"], body["kind"], body["status"]) == (
        "+55 11 99999-9999",
        "realtime",
        "ACCEPTED",
    )
    assert body["ice_servers"] == [] and body["sample_rate"] == RATE
    assert (await get_session(bot, record, init_data(TOKEN, ADMIN)))[0] == 200


async def test_closing_the_mini_app_hangs_up_after_the_grace_unless_it_is_back(
    start_bot: StartBot,
) -> None:
    bot = await talk_bot(start_bot)
    bot.app.softphone.close_grace = 0.5
    record, reply = await place(bot)
    assert record.pilot_call_id is not None
    bot.pilot.emit_status(record.pilot_call_id, "ACCEPTED")
    init = init_data(TOKEN, OPERATOR)
    async with aiohttp.ClientSession() as http:
        ws = await talk_socket(http, bot, record, init)
        assert (await ws.receive_json(timeout=5))["type"] == "ready"
        await ws.close()  # the page is reloaded: back at once
        ws = await talk_socket(http, bot, record, init)
        assert (await ws.receive_json(timeout=5)) == {"type": "ready", "rate": RATE}
        await asyncio.sleep(1.0)
        assert not any(r.operation == "terminate" for r in bot.pilot.requests)
        closed_at = time.monotonic()
        await ws.close()  # closed for good
        await until(lambda: any(r.operation == "terminate" for r in bot.pilot.requests))
        assert 0.4 < time.monotonic() - closed_at < 2.0
    assert realtime_sessions_asked(bot) == 2
    await shown(bot, reply, ": ended")


# --- where the Talk button is


def talk_button(message: SentMessage) -> dict[str, Any]:
    rows = (message.reply_markup or {}).get("inline_keyboard") or []
    return next(b for row in rows for b in row if b["text"] == "🎧 Talk")


async def test_call_talk_in_a_private_chat_has_a_web_app_button_to_the_mini_app(
    start_bot: StartBot,
) -> None:
    bot = await talk_bot(start_bot)
    record, reply = await place(bot)
    assert "Note" not in reply.plain  # "talk" is no note, and nothing is spoken
    assert talk_button(reply)["web_app"] == {"url": f"{PUBLIC}/app/?call={record.id}"}
    assert [text for text, _ in reply.buttons()] == ["🎧 Talk", "📴 Hang up"]


async def test_in_a_group_the_talk_button_is_the_bot_s_mini_app_link(
    start_bot: StartBot,
) -> None:
    bot = await talk_bot(start_bot, miniapp_short_name="softphone")
    prompt = await command(bot, f"/call {PHONE} talk", chat_id=GROUP, chat_type="supergroup")
    await press(bot, prompt, "Confirm")
    started = await bot.telegram.wait_for_message(lambda m: "Call to" in m.plain, chat_id=GROUP)
    record = await bot.app.store.call_by_message(GROUP, started.message_id)
    assert record is not None
    link = f"https://t.me/{bot.telegram.bot_username}/softphone?startapp={record.id}"
    assert talk_button(started) == {"text": "🎧 Talk", "url": link}
    # the Mini App shows the callee masked, as the group's message does
    init = init_data(TOKEN, OPERATOR, start_param=record.id)
    status, body = await get_session(bot, record, init)
    assert (status, body["callee_masked"]) == (200, "+55 11 9****-9999")


async def test_call_talk_says_why_it_cannot_where_the_mini_app_cannot_open(
    start_bot: StartBot,
) -> None:
    bot = await talk_bot(start_bot)  # no MINIAPP_SHORT_NAME
    reply = await command(bot, f"/call {PHONE} talk", chat_id=GROUP, chat_type="supergroup")
    assert "MINIAPP_SHORT_NAME" in reply.plain
    assert bot.pilot.calls_started() == []
    await bot.stop()
    bot = await talk_bot(start_bot, public_base_url=None)
    reply = await command(bot, f"/call {PHONE} talk")
    assert "PUBLIC_BASE_URL" in reply.plain
    assert bot.pilot.calls_started() == []


async def test_a_denied_microphone_is_explained_for_the_operator_s_client(
    start_bot: StartBot,
) -> None:
    chromium_path()
    bot = await talk_bot(start_bot)
    record, _reply = await place(bot)
    async with chromium(allow_microphone=False) as browser:
        page = await open_miniapp(
            browser, app_url(bot, record), init_data=init_data(TOKEN, OPERATOR), platform="tdesktop"
        )
        await page.wait_for_selector("#notice:not([hidden])", timeout=5000)
        assert "remembers a first" in (await page.text_content("#notice") or "")
        assert await page.is_disabled("#mute")
        assert not await page.is_disabled("#hangup")  # the call can still be ended from here
