"""The Mini App softphone on a Meta number, in a real browser (tests/browser.py): the page's
WebRTC leg (webrtc.js) bridged by the bot to the fake Pilot Status's media edge. The edge hears
the fake microphone's tone from when the page joins, the page plays the callee's audio (measured
there with its WebAudio analyser), Mute silences the far end, Hang up from the page ends both
legs and the chat's message follows."""

from __future__ import annotations

import asyncio
import time
from array import array
from pathlib import Path

from bot.calls.service import CallRequest, Started
from bot.phones import Phone
from tests.browser import chromium, chromium_path, open_miniapp, tone_wav
from tests.conftest import OPERATOR, TOKEN, StartBot
from tests.fakes.meta_edge import RATE, MetaEdge
from tests.fakes.pilot_status import MediaScenario
from tests.miniapp import init_data
from tests.test_lifecycle import PHONE
from tests.test_softphone_bridge import silent_from_now, until
from tests.test_voice import meta_bot, pilot_id_of, settled

SCENARIO = MediaScenario(edge_tone_hz=660.0, edge_amplitude=0.3)
# RMS of a 20 ms window with the microphone's tone in it: Chromium's noise suppression and gain
# control stay on, and turn a steady tone down after a while
LOUD = 400.0
HEARD = 0.05  # the page's analyser level (RMS of -1..1 samples) that counts as sound


async def test_a_meta_number_talks_both_ways_in_the_browser(
    start_bot: StartBot, tmp_path: Path
) -> None:
    chromium_path()
    bot = await meta_bot(start_bot, SCENARIO, web_port=0)
    outcome = await bot.app.calls.start(
        CallRequest(operator_id=OPERATOR, chat_id=OPERATOR, phone=Phone(PHONE, PHONE), talk=True)
    )
    assert isinstance(outcome, Started)
    pilot_id = pilot_id_of(bot)
    await until(lambda: pilot_id in bot.pilot.edges)
    edge = bot.pilot.edges[pilot_id]
    assert isinstance(edge, MetaEdge)
    tone = edge._tone._pcm  # type: ignore[attr-defined]  # the callee is silent until told
    edge._tone._pcm = array("h", bytes(RATE * 2))  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{bot.app.web_port}/app/?call={outcome.record.id}"
    async with chromium(tone_wav(tmp_path / "mic.wav")) as browser:
        before = len(edge.rms)
        page = await open_miniapp(browser, url, init_data=init_data(TOKEN, OPERATOR))
        # the page joins once the call is answered; the edge hears the fake microphone then
        await until(lambda: any(r > LOUD for r in edge.rms[before:]), within=15)
        joined = next(i for i, r in enumerate(edge.rms) if r > LOUD)
        assert joined >= before and not any(r > LOUD for r in edge.rms[:before])
        assert bot.app.meta_talk.talking == 1
        # the callee speaks: the page plays it
        await page.wait_for_function("callbot.state.analyser !== null")
        assert await page.evaluate("callbot.remoteLevel()") < 0.01
        await page.evaluate(
            "() => { window.heardAt = null; const t = setInterval(() => {"
            f" if (callbot.remoteLevel() > {HEARD}) {{ window.heardAt = Date.now();"
            " clearInterval(t); } }, 2); }"
        )
        spoke_at = time.time()
        edge._tone._pcm = tone  # type: ignore[attr-defined]
        await page.wait_for_function("window.heardAt !== null", timeout=5000)
        ear = await page.evaluate("window.heardAt") / 1000 - spoke_at
        print(f"\nMeta number, loopback, callee to the page's speaker: {ear * 1000:.0f} ms")
        # Mute: the far end gets silence, the call goes on
        await page.click("#mute")
        muted = await silent_from_now(edge, LOUD)
        await asyncio.sleep(0.6)
        assert len(edge.rms) - muted >= 15
        assert not any(r > LOUD for r in edge.rms[muted:])
        await page.click("#mute")
        unmuted = len(edge.rms)
        await asyncio.sleep(1.0)
        assert max(edge.rms[unmuted:]) > LOUD, (max(edge.rms[unmuted:]), edge.rms[-50::5])
        # Hang up from the page: the call ends, and with it the bridge
        await page.click("#hangup")
        await until(lambda: any(r.operation == "terminate" for r in bot.pilot.requests))
        await page.wait_for_function("document.getElementById('status').textContent === 'Ended'")
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.terminal
    await settled(bot)
    await until(lambda: bot.app.meta_talk.talking == 0)
