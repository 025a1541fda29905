"""The voice parts on their own: SDP rules, speech, the signed audio shelf, the lazy import."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from bot.voice.sdp import SDPError, check_answer, check_offer, offer_for_meta
from bot.voice.shelf import AudioShelf
from bot.voice.speech import Audio, Speaker, Speech, SpeechError, spoken_note
from tests.speech import espeak

__all__ = ["espeak"]

AIORTC_OFFER = """v=0\r
o=- 1 1 IN IP4 0.0.0.0\r
s=-\r
t=0 0\r
a=group:BUNDLE 0\r
m=audio 5000 UDP/TLS/RTP/SAVPF 111\r
c=IN IP4 127.0.0.1\r
a=sendrecv\r
a=mid:0\r
a=rtcp-mux\r
a=rtpmap:111 opus/48000/2\r
a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r
a=end-of-candidates\r
a=ice-ufrag:abcd\r
a=ice-pwd:0123456789abcdef012345\r
a=fingerprint:sha-256 AA:BB\r
a=fingerprint:sha-384 CC:DD\r
a=fingerprint:sha-512 EE:FF\r
a=setup:actpass\r
"""


def test_the_offer_is_rewritten_as_meta_requires() -> None:
    offer = offer_for_meta(AIORTC_OFFER)
    lines = offer.splitlines()
    assert "a=setup:active" in lines and "a=setup:actpass" not in lines
    assert [line for line in lines if line.startswith("a=fingerprint")] == [
        "a=fingerprint:sha-256 AA:BB"
    ]
    assert offer.endswith("\r\n") and "a=candidate:1 1 udp" in offer


def test_an_offer_without_candidates_is_refused_before_the_post() -> None:
    no_candidates = "\r\n".join(
        line for line in AIORTC_OFFER.splitlines() if not line.startswith("a=candidate")
    )
    with pytest.raises(SDPError, match="candidates"):
        offer_for_meta(no_candidates)
    with pytest.raises(SDPError, match="setup:active"):
        check_offer(AIORTC_OFFER)


def test_answers_are_checked_before_they_reach_aiortc() -> None:
    answer = AIORTC_OFFER.replace("a=setup:actpass", "a=setup:passive")
    check_answer(answer)
    with pytest.raises(SDPError, match="not SDP"):
        check_answer("this is not sdp")
    with pytest.raises(SDPError, match="audio"):
        check_answer("v=0\r\na=setup:passive\r\n")
    with pytest.raises(SDPError, match="passive or a=setup:active"):
        check_answer(AIORTC_OFFER)  # actpass is an offerer's word, never an answer's


@pytest.mark.parametrize(
    ("note", "locale", "shown", "voice"),
    [
        ("say: server down", "en", "server down", "en-us"),
        ("SAY:   disk   full ", "pt_BR", "disk full", "pt-br"),
        ("say pt: servidor caiu", "en", "servidor caiu", "pt-br"),
        ("say en: db is down", "pt_BR", "db is down", "en-us"),
        ("diga: banco fora do ar", "pt_BR", "banco fora do ar", "pt-br"),
    ],
)
def test_say_prefix_makes_the_note_spoken(note: str, locale: str, shown: str, voice: str) -> None:
    text, speech = spoken_note(note, locale)
    assert text == shown
    assert speech == Speech(shown, voice)


@pytest.mark.parametrize("note", [None, "server down", "sayonara: bye", "please say: it", "say:"])
def test_other_notes_are_not_spoken(note: str | None) -> None:
    assert spoken_note(note, "en") == (note, None)


async def test_espeak_speaks_both_languages_and_caches(espeak: str) -> None:
    speaker = Speaker(espeak)
    english = await speaker.speak(Speech("the database is down", "en-us"))
    portuguese = await speaker.speak(Speech("o banco de dados caiu", "pt-br"))
    assert english.rate == 22050 and 1.0 < english.seconds < 5.0
    assert 1.0 < portuguese.seconds < 5.0 and portuguese.pcm != english.pcm
    again = await speaker.speak(Speech("the   database is down", "en-us"))
    assert again is english and speaker.syntheses == 2


async def test_one_synthesis_serves_every_call_waiting_for_the_same_text(espeak: str) -> None:
    speaker = Speaker(espeak)
    results = await asyncio.gather(*(speaker.speak(Speech("alert", "en-us")) for _ in range(5)))
    assert speaker.syntheses == 1 and all(r is results[0] for r in results)


async def test_text_that_looks_like_an_option_is_spoken_not_obeyed(espeak: str) -> None:
    audio = await Speaker(espeak).speak(Speech("--help -w /tmp/x.wav", "en-us"))
    assert audio.seconds > 0.5  # read aloud on stdin, not parsed as espeak-ng options


async def test_a_missing_engine_is_reported_not_crashed_on() -> None:
    speaker = Speaker("no-such-tts-engine")
    assert not speaker.available
    with pytest.raises(SpeechError, match="not installed"):
        await speaker.speak(Speech("hello", "en-us"))


def test_audio_resamples_and_writes_wav() -> None:
    second = Audio(b"\x10\x00" * 22050, 22050)
    resampled = second.resampled(16000)
    assert resampled.rate == 16000 and abs(resampled.seconds - 1.0) < 0.01
    with wave.open(io.BytesIO(second.wav())) as file:
        assert (file.getframerate(), file.getnchannels(), file.getnframes()) == (22050, 1, 22050)
    twice = second.repeated(2, gap=0.5)
    assert twice.seconds == 2.5 and twice.pcm[22050 * 2 : 22050 * 3] == b"\x00" * 22050
    frames = Audio(b"\x10\x00" * 16010, 16000).frames(16000)  # 1.00063 s
    assert [len(f) for f in frames] == [640] * 51 and frames[-1][20:] == b"\x00" * 620


def test_the_shelf_serves_a_file_once_and_refuses_forged_or_stale_urls() -> None:
    now = [1000.0]
    shelf = AudioShelf("https://bot.example/", ttl=60, clock=lambda: now[0])
    url = shelf.put(b"RIFF-one")
    assert url.startswith("https://bot.example/audio/") and url.endswith(".wav")
    ref = url.rsplit("/", 1)[1].removesuffix(".wav")
    name, expires, signature = ref.split(".")
    assert shelf.take(f"{name}.{int(expires) + 600}.{signature}") is None  # forged expiry
    assert shelf.take(ref) == b"RIFF-one"
    assert shelf.take(ref) is None  # once
    stale = shelf.put(b"RIFF-two").rsplit("/", 1)[1].removesuffix(".wav")
    now[0] += 61
    assert shelf.take(stale) is None and len(shelf) == 0
    unfetched = shelf.put(b"RIFF-three")
    shelf.discard(unfetched)  # its call ended first
    assert len(shelf) == 0


def test_a_bot_that_places_no_meta_call_never_imports_aiortc(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from bot.app import CallbotApp\n"
        "from bot.config import load_settings\n"
        "s = load_settings(_env_file=None, bot_token='1:' + 'a' * 30, "
        f"pilot_status_api_key='k', operator_ids='1', data_dir={str(tmp_path)!r})\n"
        "CallbotApp(s)\n"
        "print(sorted(m for m in ('aiortc', 'av', 'aioice') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
