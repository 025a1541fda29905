"""Meta media against standard peers, and the true reason when media fails (issue 9, items 19-20).

The real bot places a `/call` on a Meta number; the fake Pilot Status answers it with a media
edge: aiortc's (`MetaEdge`) or GStreamer's webrtcbin in a subprocess (`GstEdge`: an RSA
certificate and OpenSSL's DTLS server, as independent of aiortc as a peer on this machine gets).
"""

from __future__ import annotations

import asyncio
import functools
import os

import pytest
from aiortc.rtcdtlstransport import SRTP_AES128_CM_SHA1_80, RTCCertificate
from OpenSSL import SSL

from bot.voice import webrtc
from tests.conftest import StartBot
from tests.fakes.gst_edge import GstEdge, gstreamer_missing
from tests.fakes.pilot_status import MediaScenario
from tests.speech import espeak
from tests.test_lifecycle import PHONE, command, shown
from tests.test_voice import MESSAGE, fails_with, hung_up, loud, meta_bot, pilot_id_of, settled

__all__ = ["espeak"]

# What aiortc 1.16 offers by itself (rtcdtlstransport.py): ECDHE-ECDSA only.
AIORTC_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"
)
ICE_FAILED = "never came up (ICE failed), so I hung up. The bot's host needs outbound UDP"
DTLS_FAILED = "(DTLS) handshake failed: the peer's certificate or fingerprint was refused"
NO_MEDIA = "came up, but no audio came through it, so I hung up"
REASONS = (ICE_FAILED, DTLS_FAILED, NO_MEDIA)


@functools.cache
def _gstreamer_missing() -> str | None:
    return gstreamer_missing()


@pytest.fixture
def gstreamer() -> None:
    """GStreamer tests skip where webrtcbin is missing, except with CALLBOT_REQUIRE_GSTREAMER=1
    (CI), where that is a failure."""
    missing = _gstreamer_missing()
    if missing is not None:
        reason = f"{missing} (sh scripts/install-test-peers.sh)"
        if os.environ.get("CALLBOT_REQUIRE_GSTREAMER") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_GSTREAMER=1)", pytrace=False)
        pytest.skip(reason)


# Item 19: the DTLS client offers the ECDHE-RSA suites too, ECDSA first


def offered_ciphers() -> list[str]:
    context = RTCCertificate.generateCertificate()._create_ssl_context([SRTP_AES128_CM_SHA1_80])
    # without OpenSSL's TLS 1.3 suites, which DTLS 1.2 never uses
    return [c for c in SSL.Connection(context).get_cipher_list() if not c.startswith("TLS_")]


def test_the_dtls_client_offers_ecdsa_then_rsa_suites() -> None:
    assert offered_ciphers() == [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-RSA-AES256-SHA",
    ]


def test_the_cipher_override_refuses_an_aiortc_it_does_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def changed(self: RTCCertificate, profiles: object, dtls_version: int) -> SSL.Context:
        raise AssertionError("never called")

    monkeypatch.setattr(RTCCertificate, "_create_ssl_context", changed)
    with pytest.raises(RuntimeError, match="review the DTLS cipher override"):
        webrtc._offer_rsa_ciphers_too()
    monkeypatch.delattr(RTCCertificate, "_create_ssl_context")
    with pytest.raises(RuntimeError, match="review the DTLS cipher override"):
        webrtc._offer_rsa_ciphers_too()


async def test_a_meta_call_is_heard_end_to_end_through_gstreamer(
    start_bot: StartBot, espeak: str, gstreamer: None
) -> None:
    bot = await meta_bot(start_bot, MediaScenario(edge="gstreamer"))
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    assert ": started" in reply.plain
    pilot_id = pilot_id_of(bot)
    final = await shown(bot, reply, "Duration:")
    assert ": ended" in final.plain and f"🔊 Says: {MESSAGE}" in final.plain
    edge = bot.pilot.edges[pilot_id]
    assert isinstance(edge, GstEdge)
    await asyncio.wait_for(edge.closed.wait(), 10)  # its last windows are reported on close
    heard, said = edge.seconds_of_sound(), await loud(MESSAGE)
    assert 0.7 * said <= heard <= 1.2 * said, (heard, said, edge.error, edge.log[-5:])
    assert edge.error is None and edge.offer_problems == []
    assert "a=setup:passive" in (edge.answer_sdp or "").splitlines()
    assert await hung_up(bot, pilot_id)
    await settled(bot)


async def test_with_aiortcs_own_cipher_list_gstreamer_refuses_the_handshake(
    start_bot: StartBot, espeak: str, gstreamer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webrtc, "DTLS_CIPHERS", AIORTC_CIPHERS)
    bot = await meta_bot(start_bot, MediaScenario(edge="gstreamer"), media_connect_timeout=5)
    await fails_with(bot, DTLS_FAILED)
    edge = bot.pilot.edges[pilot_id_of(bot)]
    assert isinstance(edge, GstEdge)
    await asyncio.wait_for(edge.closed.wait(), 10)
    assert any("no shared cipher" in line for line in edge.log), edge.log[-5:]
    assert edge.seconds_of_sound() == 0


# Item 20: each way media fails has its own reason


@pytest.mark.parametrize(
    ("scenario", "reason", "code"),
    [
        (MediaScenario(answer="blackhole"), ICE_FAILED, "media_no_connection"),
        (MediaScenario(answer="wrong_fingerprint"), DTLS_FAILED, "media_dtls_failed"),
        (MediaScenario(edge_sends=False), NO_MEDIA, "media_no_rtp"),
    ],
    ids=["ice", "dtls-fingerprint", "no-rtp"],
)
async def test_a_media_failure_says_which_part_failed(
    start_bot: StartBot, espeak: str, scenario: MediaScenario, reason: str, code: str
) -> None:
    bot = await meta_bot(start_bot, scenario, media_connect_timeout=1)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}")
    final = await shown(bot, reply, reason)
    assert ": failed" in final.plain
    assert [other for other in REASONS if other in final.plain] == [reason]
    pilot_id = pilot_id_of(bot)
    assert await hung_up(bot, pilot_id)
    await settled(bot)
    assert bot.pilot.edges[pilot_id].seconds_of_sound() == 0  # nothing was played
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.error_code == code


async def test_a_media_failure_reason_is_in_portuguese_for_a_portuguese_operator(
    start_bot: StartBot, espeak: str
) -> None:
    bot = await meta_bot(start_bot, MediaScenario(answer="wrong_fingerprint"))
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}", language_code="pt-br")
    final = await shown(bot, reply, "o handshake de criptografia (DTLS) falhou")
    assert ": falhou" in final.plain
    await settled(bot)
