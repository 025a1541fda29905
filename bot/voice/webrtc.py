"""The bot as the business-side WebRTC endpoint of a Meta call, on aiortc.

Imported only when a Meta call needs it (`bot.voice.endpoint` loads it lazily): the bot without
voice in use pays neither the import time nor the memory of aiortc and PyAV.

One `AiortcSession` per call: one peer connection with one Opus track that sends silence until
the message plays. All ICE candidates are gathered before the offer leaves (the API has no
trickle); the offer is rewritten as Meta requires (`bot.voice.sdp`).
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Literal

import av
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc import codecs as aiortc_codecs
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import RTCCertificate, SRTPProtectionProfile
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from OpenSSL import SSL

from bot.voice.sdp import OPUS_PAYLOAD_TYPE, SDPError, check_answer, offer_for_meta
from bot.voice.speech import Audio

log = logging.getLogger(__name__)

RATE = 48_000
FRAME = RATE // 50  # 20 ms
SILENCE = b"\x00\x00" * FRAME


def _opus_as_meta_uses() -> None:
    """Offer Opus as payload type 111 with WebRTC's usual fmtp, as Meta's SDPs do. aiortc has no
    public API for the payload type; its codec table is set before any peer connection exists
    (measured to work in aiortc_offer_experiment.py)."""
    aiortc_codecs.CODECS["audio"][0] = RTCRtpCodecParameters(
        mimeType="audio/opus",
        clockRate=RATE,
        channels=2,
        payloadType=OPUS_PAYLOAD_TYPE,
        parameters={"minptime": 10, "useinbandfec": 1},
    )


_opus_as_meta_uses()

# The cipher suites our DTLS client offers: aiortc's four ECDHE-ECDSA ones first (RFC 8827's
# mandatory TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 leads), then the same four with ECDHE-RSA,
# as browsers offer them. With aiortc's list alone, a peer whose certificate is RSA (GStreamer's
# webrtcbin, ZLMediaKit, ...) ends the handshake with "no shared cipher"; nothing says which key
# type Meta's edge uses.
DTLS_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"
)


def _offer_rsa_ciphers_too() -> None:
    """Make every DTLS context aiortc creates offer `DTLS_CIPHERS`.

    aiortc has no API for its cipher list (aiortc issues #956, #1335; PRs #1392, #1421 open): it
    is set in `RTCCertificate._create_ssl_context`, the one place each DTLS transport gets its
    pyOpenSSL context. That method is wrapped here, and nowhere else; if aiortc renames it or
    changes its signature, importing this module fails (and so does every Meta call, with
    `media_unavailable`) rather than silently going back to ECDSA only.
    """
    make = getattr(RTCCertificate, "_create_ssl_context", None)
    if make is None or list(inspect.signature(make).parameters) != ["self", "srtp_profiles"]:
        raise RuntimeError(
            "aiortc's RTCCertificate._create_ssl_context changed: review the DTLS cipher "
            "override in bot/voice/webrtc.py"
        )
    if getattr(make, "offers_rsa_ciphers", False):
        return

    @functools.wraps(make)
    def with_rsa_ciphers(
        self: RTCCertificate, srtp_profiles: list[SRTPProtectionProfile]
    ) -> SSL.Context:
        context = make(self, srtp_profiles)
        if not isinstance(context, SSL.Context):
            raise RuntimeError("aiortc's DTLS context is no longer a pyOpenSSL context")
        context.set_cipher_list(DTLS_CIPHERS)
        return context

    with_rsa_ciphers.offers_rsa_ciphers = True  # type: ignore[attr-defined]
    RTCCertificate._create_ssl_context = with_rsa_ciphers  # type: ignore[method-assign]


_offer_rsa_ciphers_too()


LIVE_FRAMES = 6  # 120 ms: live audio queued beyond this is late, its oldest frames dropped


CLOSE_WAIT = 2.0  # seconds a cancelled close still gives the peer connection to finish


async def close_peer(pc: RTCPeerConnection) -> None:
    """`pc.close()`, finished even when the caller is cancelled meanwhile (a shutdown cancels
    the call's voice task): cut short, aiortc leaves its ICE transports' sockets open. The
    cancellation then goes on, after at most CLOSE_WAIT."""
    closing = asyncio.ensure_future(pc.close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        await asyncio.wait({closing}, timeout=CLOSE_WAIT)
        raise


class Rechunker:
    """Decoded frames of any layout and rate → mono s16 48 kHz, in 20 ms pieces."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self._pending = b""

    def __call__(self, frame: av.AudioFrame) -> list[bytes]:
        for out in self._resampler.resample(frame):
            self._pending += bytes(out.planes[0])[: out.samples * 2]
        size = len(SILENCE)
        count = len(self._pending) // size
        pieces = [self._pending[i * size : (i + 1) * size] for i in range(count)]
        self._pending = self._pending[count * size :]
        return pieces


class MessageTrack(MediaStreamTrack):
    """Real-time paced 20 ms frames: the message while one is playing, else live audio fed by
    `feed` (an operator's voice, a callee's), else silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._chunks: deque[bytes] = deque()
        self._live: deque[bytes] = deque(maxlen=LIVE_FRAMES)
        self._drained = asyncio.Event()
        self._drained.set()
        self._pts = 0
        self._start: float | None = None
        self.frames_of_sound = 0

    def queue(self, audio: Audio) -> None:
        self._chunks.extend(audio.frames(RATE))
        self._drained.clear()

    async def drained(self) -> None:
        await self._drained.wait()

    def silence(self) -> None:
        self._chunks.clear()
        self._drained.set()

    def feed(self, pcm: bytes) -> None:
        """20 ms of live mono s16 48 kHz audio, sent after what is queued before it."""
        self._live.append(pcm)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        if self._chunks:
            pcm = self._chunks.popleft()
            self.frames_of_sound += 1
            if not self._chunks:
                self._drained.set()
        elif self._live:
            pcm = self._live.popleft()
        else:
            pcm = SILENCE
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(pcm)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame


class AiortcSession:
    def __init__(self, pc: RTCPeerConnection, track: MessageTrack) -> None:
        self._pc = pc
        self._track = track
        self._listening: set[asyncio.Task[None]] = set()  # the callee's audio: heard, dropped
        self._heard = asyncio.Event()
        self._connected = asyncio.Event()
        self._failed = asyncio.Event()
        self._closed = False
        self._sink: Callable[[bytes], None] | None = None
        self.offer_sdp = ""
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._listen(track))
        self._listening.add(task)
        task.add_done_callback(self._listening.discard)

    async def _listen(self, track: MediaStreamTrack) -> None:
        rechunk = Rechunker()
        with suppress(MediaStreamError):
            frame = await track.recv()  # the first frame decoded from the far end's RTP
            self._heard.set()
            while True:
                sink = self._sink
                if sink is not None and isinstance(frame, av.AudioFrame):
                    for pcm in rechunk(frame):
                        sink(pcm)
                frame = await track.recv()

    def listen(self, sink: Callable[[bytes], None] | None) -> None:
        """Hand the far end's audio, 20 ms of mono s16 48 kHz at a time, to `sink` (None:
        drop it again)."""
        self._sink = sink

    def speak(self, pcm: bytes) -> None:
        """Send 20 ms of live audio to the far end (after the message, if one is playing)."""
        self._track.feed(pcm)

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self._failed.set()

    async def make_offer(self) -> None:
        await self._pc.setLocalDescription(await self._pc.createOffer())  # gathers all candidates
        self.offer_sdp = offer_for_meta(self._pc.localDescription.sdp)

    async def apply_answer(self, sdp: str) -> None:
        check_answer(sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise SDPError(f"answer refused by the WebRTC stack: {err}"[:200]) from None

    async def wait_connected(self, within: float) -> Literal["ice", "dtls"] | None:
        """None once ICE and DTLS are up within `within` seconds; else the one that was not:
        "ice" (no candidate pair worked) or "dtls" (ICE worked, the handshake failed or
        never finished: a refused certificate or fingerprint, no shared cipher)."""
        connected = asyncio.ensure_future(self._connected.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({connected, failed}, timeout=within, return_when="FIRST_COMPLETED")
        finally:
            connected.cancel()
            failed.cancel()
        if self._connected.is_set() and not self._failed.is_set():
            return None
        ice = self._pc.iceConnectionState
        dtls = [t.sender.transport.state for t in self._pc.getTransceivers()]
        # aiortc logs the handshake's own error (e.g. "no shared cipher", "fingerprint
        # mismatch") at DEBUG, under aiortc.rtcdtlstransport
        log.warning("media did not come up: ICE %s, DTLS %s", ice, ", ".join(dtls) or "none")
        return "dtls" if ice in ("completed", "connected") else "ice"

    async def wait_heard(self, within: float) -> bool:
        """Whether the far end's audio (RTP) arrived, now or within `within` seconds."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._heard.wait(), within)
        return self._heard.is_set()

    async def play(self, audio: Audio) -> None:
        """Play `audio`; returns when it has been sent."""
        try:
            self._track.queue(audio)
            await self._track.drained()
        finally:
            self._track.silence()

    @property
    def frames_of_sound(self) -> int:
        return self._track.frames_of_sound

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._track.stop()
        try:
            await close_peer(self._pc)
        finally:
            for task in self._listening:
                task.cancel()
            await asyncio.gather(*self._listening, return_exceptions=True)


class AiortcEndpoint:
    """Makes peer connections; `stun_servers` are `stun:host:port` URLs (none on loopback)."""

    def __init__(self, stun_servers: tuple[str, ...] = ()) -> None:
        servers = [RTCIceServer(urls=url) for url in stun_servers]
        self._config = RTCConfiguration(iceServers=servers)

    async def open_session(self) -> AiortcSession:
        pc = RTCPeerConnection(self._config)
        track = MessageTrack()
        session = AiortcSession(pc, track)
        try:
            transceiver = pc.addTransceiver(track, direction="sendrecv")
            opus = [
                codec
                for codec in RTCRtpSender.getCapabilities("audio").codecs
                if codec.mimeType.lower() == "audio/opus"
            ]
            transceiver.setCodecPreferences(opus)
            await session.make_offer()
        except BaseException:
            await session.close()
            raise
        return session
