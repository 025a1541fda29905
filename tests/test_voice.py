"""Voice end to end over loopback: the real bot, an aiortc peer standing in for Meta's media edge
inside the fake Pilot Status, espeak-ng, the realtime WebSocket and /play."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot.errors import CallbotError
from bot.pilot_status.models import NumberType
from bot.voice.speech import Speaker, Speech
from tests.conftest import RunningBot, StartBot
from tests.fakes.pilot_status import MediaScenario
from tests.speech import espeak, loud_seconds
from tests.test_lifecycle import PHONE, SECRET, TOKEN, command, shown
from tests.test_oncall import ALICE, HOOK, INFRA_CHAT, Clock, alert, generic, oncall_bot, post_in

__all__ = ["espeak"]
OTHER = "+5511988887777"
MESSAGE = "the database is down"


async def meta_bot(start_bot: StartBot, scenario: MediaScenario, **overrides: Any) -> RunningBot:
    overrides.setdefault("speech_repeat", 1)
    bot = await start_bot(pilot_status_number_type="meta", **overrides)
    bot.pilot.number_type = "meta"
    bot.pilot.media = scenario
    bot.pilot.set_permission(PHONE, "temporary")
    bot.pilot.set_permission(OTHER, "temporary")
    return bot


async def webhook_meta_bot(start_bot: StartBot, scenario: MediaScenario) -> RunningBot:
    bot = await meta_bot(
        start_bot,
        scenario,
        pilot_status_webhook_token=TOKEN,
        pilot_status_webhook_secret=SECRET,
        web_port=0,
    )
    bot.pilot.webhooks_to(f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{TOKEN}", SECRET)
    return bot


def pilot_id_of(bot: RunningBot, phone: str = PHONE) -> str:
    return next(
        c["id"] for c in reversed(bot.pilot.calls.values()) if "+" + c["peerNumber"] == phone
    )


async def spoken_seconds(text: str, voice: str = "en-us") -> float:
    return (await Speaker().speak(Speech(text, voice))).seconds


async def loud(text: str, voice: str = "en-us") -> float:
    """Seconds of the message that are sound, not pauses."""
    audio = await Speaker().speak(Speech(text, voice))
    return loud_seconds(audio.pcm, audio.rate)


async def settled(bot: RunningBot) -> None:
    """Every voice task done and every peer connection closed."""
    for _ in range(200):
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("voice ")]
        if not tasks and bot.app.voice.open_sessions == 0:
            return
        await asyncio.sleep(0.02)
    for task in tasks:
        task.print_stack()
    raise AssertionError(f"voice left behind: {tasks}, {bot.app.voice.open_sessions} sessions")


def terminated(bot: RunningBot, pilot_id: str) -> bool:
    return any(
        r.operation == "terminate" and r.path.endswith(f"/{pilot_id}/terminate")
        for r in bot.pilot.requests
    )


async def hung_up(bot: RunningBot, pilot_id: str) -> bool:
    """Whether the bot sends `terminate` for the call within a few seconds."""
    for _ in range(250):
        if terminated(bot, pilot_id):
            return True
        await asyncio.sleep(0.02)
    return False


# Meta numbers: the bot is the WebRTC endpoint


async def test_a_meta_call_speaks_the_note_then_hangs_up_answer_by_polling(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await meta_bot(start_bot, MediaScenario(answer_via="poll"))
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    assert ": started" in reply.plain and f"🔊 Says: {MESSAGE}" in reply.plain
    pilot_id = pilot_id_of(bot)
    final = await shown(bot, reply, "Duration:")
    assert ": ended" in final.plain and f"🔊 Says: {MESSAGE}" in final.plain
    edge = bot.pilot.edges[pilot_id]
    heard, said = edge.seconds_of_sound(), await loud(MESSAGE)
    assert 0.7 * said <= heard <= 1.2 * said, (heard, said)  # the speech, once, not silence
    # the offer as the fake received it follows Meta's rules
    lines = edge.offer_sdp.splitlines()
    assert "a=setup:active" in lines
    assert [x.split()[0] for x in lines if x.startswith("a=fingerprint:")] == [
        "a=fingerprint:sha-256"
    ]
    assert [x for x in lines if x.startswith("a=rtpmap:")] == ["a=rtpmap:111 opus/48000/2"]
    assert any(
        r.operation == "get_call" and r.query.get("includeSdp") == "1" for r in bot.pilot.requests
    )
    assert await hung_up(bot, pilot_id)
    await settled(bot)


async def test_a_meta_call_takes_the_answer_from_the_calls_webhook(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await webhook_meta_bot(start_bot, MediaScenario(answer_via="webhook", answer_delay=0.3))
    # Polling would find the answer only after a minute: the webhook must be what brings it.
    bot.app.voice.policy = replace(bot.app.voice.policy, answer_poll_interval=60)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(bot)
    await shown(bot, reply, ": ended")
    assert bot.pilot.edges[pilot_id].seconds_of_sound() >= 0.7 * await loud(MESSAGE)
    polls = [r for r in bot.pilot.requests if r.query.get("includeSdp") == "1"]
    assert len(polls) == 1  # the one poll made at once, before the answer existed
    assert await hung_up(bot, pilot_id)
    await settled(bot)


async def test_the_message_is_repeated_as_configured(start_bot: StartBot, espeak: str) -> None:
    bot = await meta_bot(start_bot, MediaScenario(), speech_repeat=2)
    reply = await command(bot, f"/call {PHONE} say: disk full")
    await shown(bot, reply, ": ended")
    rms = bot.pilot.edges[pilot_id_of(bot)].rms
    timeline = "".join("#" if r > 300 else "." for r in rms).strip(".")
    bursts = [b for b in re.split(r"\.{25,}", timeline) if b]  # apart by >= 0.5 s of silence
    assert len(bursts) == 2, timeline


async def test_without_say_a_meta_call_says_the_default_message_in_portuguese(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await meta_bot(start_bot, MediaScenario())
    reply = await command(bot, f"/call {PHONE}", language_code="pt-br")
    final = await bot.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id and ": encerrada" in m.plain, timeout=20
    )
    assert "🔊" not in final.plain
    default = "Olá. Esta é uma chamada automática. Por favor, verifique suas mensagens."
    heard = bot.pilot.edges[pilot_id_of(bot)].seconds_of_sound()
    assert heard >= 0.7 * await loud(default, "pt-br")


async def test_without_a_speech_engine_a_meta_call_beeps_and_say_is_refused_clearly(
    start_bot: StartBot,
) -> None:
    bot = await meta_bot(start_bot, MediaScenario(), speech_engine="no-such-tts")
    refused = await command(bot, f"/call {PHONE} say: hello")
    assert "Speaking is not available" in refused.plain
    assert bot.pilot.calls_started() == []
    reply = await command(bot, f"/call {PHONE}")
    await shown(bot, reply, ": ended")
    assert bot.pilot.edges[pilot_id_of(bot)].seconds_of_sound() >= 0.8  # three 0.4 s beeps


# Meta faults


async def fails_with(bot: RunningBot, text: str) -> None:
    """A spoken /call ends as failed with `text` as the reason; the bot hung up."""
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    final = await shown(bot, reply, text)
    assert ": failed" in final.plain
    assert await hung_up(bot, pilot_id_of(bot))
    await settled(bot)


async def test_no_answer_sdp_hangs_up_with_138007(start_bot: StartBot, espeak: str) -> None:
    bot = await meta_bot(start_bot, MediaScenario(answer="none"), media_answer_timeout=0.5)
    await fails_with(bot, "no media answer in time (Meta error 138007)")


async def test_an_answer_that_does_not_parse_hangs_up(start_bot: StartBot, espeak: str) -> None:
    bot = await webhook_meta_bot(start_bot, MediaScenario(answer="garbage", answer_via="webhook"))
    await fails_with(bot, "media answer could not be used")


async def test_ice_that_never_connects_hangs_up(start_bot: StartBot, espeak: str) -> None:
    bot = await meta_bot(start_bot, MediaScenario(answer="blackhole"), media_connect_timeout=1)
    await fails_with(bot, "never came up (ICE failed)")


async def test_a_rejected_call_ends_cleanly_unspoken(start_bot: StartBot, espeak: str) -> None:
    bot = await meta_bot(start_bot, MediaScenario(callee="reject", ring_delay=0.2))
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    final = await shown(bot, reply, ": rejected")
    assert "hung up" not in final.plain
    await settled(bot)
    assert bot.pilot.edges[pilot_id_of(bot)].seconds_of_sound() == 0


async def test_the_cap_refuses_the_next_meta_call_clearly(start_bot: StartBot, espeak: str) -> None:
    bot = await meta_bot(start_bot, MediaScenario(callee="ignore"), media_max_calls=1)
    first = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    assert ": started" in first.plain
    second = await command(bot, f"/call {OTHER} say: {MESSAGE}")
    assert "already on 1 calls with media" in second.plain
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [PHONE]
    await command(bot, f"/hangup {pilot_id_of(bot)}")
    await shown(bot, first, ": ended")
    await settled(bot)
    third = await command(bot, f"/call {OTHER} say: {MESSAGE}")
    assert ": started" in third.plain


# Web numbers


async def web_bot(start_bot: StartBot, **overrides: Any) -> RunningBot:
    overrides.setdefault("speech_repeat", 1)
    return await start_bot(pilot_status_number_type="web", **overrides)


async def test_a_web_call_streams_pcm16_over_the_realtime_socket(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await web_bot(start_bot)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(bot)
    bot.pilot.emit_status(pilot_id, "ACCEPTED")
    await shown(bot, reply, ": ended")
    session = bot.pilot.realtime[pilot_id]
    assert session.mode == "talk"
    assert {len(frame) for frame in session.frames} == {640}  # 20 ms of 16 kHz PCM16
    seconds = len(session.frames) * 0.02
    expected = await spoken_seconds(MESSAGE)
    assert abs(seconds - expected) < 0.1, (seconds, expected)
    loud = [f for f in session.frames if max(abs(b - 128) for b in f[1::2]) > 8]
    assert len(loud) * 0.02 >= 0.5 * expected  # speech, not zeros
    assert session.closed_at is not None and session.closed_at - session.opened_at >= 0.9 * expected
    assert await hung_up(bot, pilot_id)
    await settled(bot)


async def test_a_web_call_that_is_not_answered_is_not_spoken_to(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await web_bot(start_bot)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    bot.pilot.emit_status(pilot_id_of(bot), "MISSED")
    await shown(bot, reply, ": missed")
    await settled(bot)
    assert bot.pilot.realtime == {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def play_bot(start_bot: StartBot) -> RunningBot:
    port = free_port()
    return await web_bot(
        start_bot, web_host="127.0.0.1", web_port=port, public_base_url=f"http://127.0.0.1:{port}"
    )


async def test_with_a_public_url_a_web_call_plays_a_once_only_signed_url(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await play_bot(start_bot)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(bot)
    played = await bot.pilot.wait_played(pilot_id)
    assert played.json["hangupAfterPlay"] is True and set(played.json) == {
        "mediaUrl",
        "hangupAfterPlay",
    }
    assert played.status == 200 and played.content_type == "audio/wav"
    with wave.open(io.BytesIO(played.body)) as file:
        seconds = file.getnframes() / file.getframerate()
    assert abs(seconds - await spoken_seconds(MESSAGE)) < 0.05
    await shown(bot, reply, ": ended")  # Pilot hung up after playing
    import httpx

    async with httpx.AsyncClient() as client:
        assert (await client.get(played.url or "")).status_code == 404  # served once


async def test_play_is_resent_with_every_field_name_when_the_spec_name_is_refused(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await play_bot(start_bot)
    bot.pilot.play_field = "url"
    await command(bot, f"/call {PHONE} say: {MESSAGE}")
    played = await bot.pilot.wait_played(pilot_id_of(bot))
    assert played.status == 200 and played.body.startswith(b"RIFF")
    bodies = [r.json for r in bot.pilot.requests if r.operation == "play"]
    assert [sorted(b) for b in bodies] == [
        ["hangupAfterPlay", "mediaUrl"],
        ["audioUrl", "hangupAfterPlay", "mediaUrl", "url"],
    ]


@pytest.mark.parametrize("language", ["en", "pt-br"])
async def test_group_confirmation_shows_what_will_be_said(
    start_bot: StartBot, espeak: str, language: str
) -> None:
    bot = await web_bot(start_bot)
    reply = await command(
        bot,
        f"/call {PHONE} say: {MESSAGE}",
        chat_id=-100500,
        chat_type="supergroup",
        language_code=language,
    )
    assert ("🔊 Says:" if language == "en" else "🔊 Diz:") in reply.plain


# on-call: a ring says the alert


async def test_an_on_call_ring_on_a_meta_number_speaks_the_alert(
    start_bot: StartBot, tmp_path: Path, espeak: str
) -> None:
    bot = await oncall_bot(
        start_bot, tmp_path, Clock(), pilot_status_number_type="meta", speech_repeat=1
    )
    bot.pilot.number_type = "meta"
    bot.pilot.media = MediaScenario()
    bot.pilot.set_permission(ALICE, "temporary")
    bot.pilot.webhooks_to(f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}")
    await alert(bot, generic(title="disk full on db-1"))
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "calling alice")
    pilot_id = pilot_id_of(bot, ALICE)
    await bot.pilot.wait_status(pilot_id, "COMPLETED", timeout=20)
    heard = bot.pilot.edges[pilot_id].seconds_of_sound()
    assert heard >= 0.7 * await loud("Alert for team infra: disk full on db-1")
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.spoken and record.note == "disk full on db-1"
    await settled(bot)


async def test_two_meta_calls_at_once_cannot_both_take_the_last_slot(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await meta_bot(start_bot, MediaScenario(), media_max_calls=1)
    voice = bot.app.voice
    results = await asyncio.gather(
        voice.prepare(NumberType.META, Speech("one", "en-us"), "en"),
        voice.prepare(NumberType.META, Speech("two", "en-us"), "en"),
        return_exceptions=True,
    )
    legs = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, CallbotError)]
    assert len(legs) == 1 and [e.code for e in refused] == ["media_busy"]
    assert voice.open_sessions == 1
    for leg in legs:
        assert leg is not None
        await leg.close()
    assert voice.open_sessions == 0


async def test_a_meta_call_whose_media_died_in_a_restart_is_hung_up_with_the_reason(
    start_bot: StartBot, tmp_path: Path, espeak: str
) -> None:
    scenario = MediaScenario(callee="ignore")
    first = await meta_bot(start_bot, scenario, data_dir=str(tmp_path))
    reply = await command(first, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(first)
    await first.pilot.wait_status(pilot_id, "RINGING")
    for _ in range(100):  # the reply is stored as the call's message before the crash
        record = await first.app.store.get_call(pilot_id)
        if record is not None and record.message_id == reply.message_id:
            break
        await asyncio.sleep(0.02)
    await first.crash()
    assert not terminated(first, pilot_id)
    await meta_bot(start_bot, scenario, data_dir=str(tmp_path))
    final = await shown(first, reply, "restarted during this call")
    assert ": failed" in final.plain
    assert await hung_up(first, pilot_id)


async def test_a_refused_meta_post_closes_its_peer_connection(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await meta_bot(start_bot, MediaScenario())
    bot.pilot.error("start_call", "META_CALL_PERMISSION_REQUIRED", status=400, times=1)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    assert "permission" in reply.plain.lower()
    assert bot.app.voice.open_sessions == 0 and bot.pilot.edges == {}
    await settled(bot)
