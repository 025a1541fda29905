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
import logging
import time
from collections import deque
from contextlib import suppress

import av
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc import codecs as aiortc_codecs
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

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


class MessageTrack(MediaStreamTrack):
    """Real-time paced 20 ms frames: silence, or the message while one is playing."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._chunks: deque[bytes] = deque()
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
        self._sink = MediaBlackhole()  # the callee's audio is received and dropped
        self._connected = asyncio.Event()
        self._failed = asyncio.Event()
        self._closed = False
        self.offer_sdp = ""
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._sink.addTrack(track)

    async def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected":
            self._connected.set()
            await self._sink.start()
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

    async def wait_connected(self, within: float) -> bool:
        """Whether ICE and DTLS came up within `within` seconds."""
        connected = asyncio.ensure_future(self._connected.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({connected, failed}, timeout=within, return_when="FIRST_COMPLETED")
        finally:
            connected.cancel()
            failed.cancel()
        return self._connected.is_set() and not self._failed.is_set()

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
        with suppress(Exception):
            await self._sink.stop()
        await self._pc.close()


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
