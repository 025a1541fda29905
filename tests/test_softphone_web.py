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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.storage.store import CallRecord
from tests.browser import chromium, chromium_path, open_miniapp, tone_wav
from tests.conftest import OPERATOR, TOKEN, RunningBot, StartBot
from tests.fakes.pilot_status import RealtimeRecord
from tests.fakes.telegram import SentMessage
from tests.miniapp import init_data
from tests.test_lifecycle import PHONE, command, shown

DOCS = Path(__file__).resolve().parent.parent / "docs"
OTHER_OPERATOR = 444
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


async def talk_bot(start_bot: StartBot) -> RunningBot:
    return await start_bot(
        pilot_status_number_type="web", operator_ids=f"{OPERATOR},{OTHER_OPERATOR}"
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


async def test_a_web_number_talks_both_ways_in_the_browser(
    start_bot: StartBot, tmp_path: Path
) -> None:
    chromium_path()
    bot = await talk_bot(start_bot)
    record, reply = await place(bot)
    pilot_id = record.pilot_call_id
    assert pilot_id is not None
    async with chromium(tone_wav(tmp_path / "mic.wav")) as browser:
        page = await open_miniapp(
            browser, app_url(bot, record), init_data=init_data(TOKEN, OPERATOR)
        )
        await page.wait_for_function("document.getElementById('callee').textContent !== '…'")
        assert await page.text_content("#callee") == "+55 11 99999-9999"
        bot.pilot.emit_status(pilot_id, "ACCEPTED")
        session = await until(lambda: bot.pilot.realtime.get(pilot_id), what="talk socket")
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
