"""A stand-in for Meta's WhatsApp media edge: the far end of a business-initiated call.

`MetaEdge` wraps one aiortc `RTCPeerConnection` (no STUN/TURN: loopback only) for one call.
It answers the business's SDP offer the way Meta does (facts from
/work/shared/pilot-status/meta-webrtc.md §1.2 and the measured experiment of §2.2):

- DTLS: the answer says `a=setup:passive` (Meta is the DTLS server, the business the client).
  aiortc, answering an `a=setup:active` offer, already answers passive. An `actpass` offer is
  applied to aiortc as if it said `active` (Meta is reported to tolerate actpass and still answer
  passive); a `passive` offer cannot be answered (`ValueError`).
- ICE: a session-level `a=ice-lite` line is inserted before the first `m=` line (Meta's edge is
  ICE-lite; aiortc itself stays a full, controlled agent, which interoperates, see §2.2 B).
- Fingerprints: only `a=fingerprint:sha-256` is kept in the answer (Meta uses sha-256 only).

Audio sent to the business: a quiet 880 Hz tone by default (peak 0.01 of full scale, RMS ~232,
i.e. below the default `seconds_of_sound` threshold of 300, so the edge itself counts as
"silence" but a pitch detector can still find it); `tone_hz=None` sends digital silence;
`sends=False` sends no RTP at all (the answer still says sendrecv).

Audio received from the business is decoded frame by frame to mono s16 at 48 kHz and reduced
to one RMS value per 20 ms window (`rms`), so tests can ask how much sound arrived.

`offer_problems` lists what Meta would dislike in the offer (computed, never enforced).
"""

from __future__ import annotations

import asyncio
import fractions
import math
import re
from array import array
from collections.abc import Callable
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

__all__ = [
    "RATE",
    "WINDOW",
    "MetaEdge",
    "MuteTrack",
    "ToneTrack",
    "add_ice_lite",
    "collect_rms",
    "offer_problems",
]

RATE = 48000
WINDOW = 960  # samples per 20 ms at 48 kHz
_WINDOW_SECONDS = WINDOW / RATE


class ToneTrack(MediaStreamTrack):
    """Real-time paced mono s16 48 kHz sine (`freq=None`: silence), one 20 ms frame per recv().

    One second of samples is computed once and cycled (an integer `freq` loops seamlessly).
    """

    kind = "audio"

    def __init__(self, freq: float | None, amplitude: float = 0.3) -> None:
        super().__init__()
        peak = 32767 * amplitude
        if freq is None or amplitude <= 0:
            self._pcm = array("h", bytes(RATE * 2))
        else:
            step = 2 * math.pi * freq / RATE
            self._pcm = array("h", (int(peak * math.sin(step * n)) for n in range(RATE)))
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            wait = self._start + self._pts / RATE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        offset = self._pts % RATE
        frame = av.AudioFrame(format="s16", layout="mono", samples=WINDOW)
        frame.planes[0].update(self._pcm[offset : offset + WINDOW].tobytes())
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += WINDOW
        return frame


class MuteTrack(MediaStreamTrack):
    """An audio track that never yields a frame: its sender sends no RTP."""

    kind = "audio"

    async def recv(self) -> av.AudioFrame:
        await asyncio.Future()  # until the sender is stopped (cancelled)
        raise MediaStreamError


def add_ice_lite(sdp: str) -> str:
    """Insert a session-level `a=ice-lite` before the first `m=` line (once)."""
    lines = sdp.splitlines()
    if "a=ice-lite" in lines:
        return sdp
    index = next(i for i, line in enumerate(lines) if line.startswith("m="))
    lines.insert(index, "a=ice-lite")
    return "\r\n".join(lines) + "\r\n"


def _setups(sdp: str) -> set[str]:
    lines = sdp.splitlines()
    return {line.split(":", 1)[1].strip() for line in lines if line.startswith("a=setup:")}


def offer_problems(sdp: str) -> list[str]:
    """What Meta would refuse or Pilot documents otherwise in a business's offer (§1.2)."""
    lines = sdp.splitlines()
    problems: list[str] = []
    if not any(line.startswith("m=audio ") for line in lines):
        problems.append("no m=audio line")
    setups = _setups(sdp)
    if setups != {"active"}:
        shown = ", ".join(sorted(setups)) or "none"
        problems.append(f"a=setup is {shown}; Pilot documents a=setup:active for the business")
    algorithms = [
        line.split(":", 1)[1].split()[0].lower()
        for line in lines
        if line.startswith("a=fingerprint:")
    ]
    for algorithm in algorithms:
        if algorithm != "sha-256":
            problems.append(f"a=fingerprint:{algorithm}: Meta refuses non-SHA256 fingerprints")
    if "sha-256" not in algorithms:
        problems.append("no a=fingerprint:sha-256")
    if not any(line.startswith("a=candidate:") for line in lines):
        problems.append("no a=candidate (the API has no trickle ICE)")
    if not any(re.match(r"a=rtpmap:\d+ opus/48000", line, re.IGNORECASE) for line in lines):
        problems.append("no opus/48000 codec")
    return problems


def _sha256_only(sdp: str) -> str:
    lines = [
        line
        for line in sdp.splitlines()
        if not line.startswith("a=fingerprint:") or line.lower().startswith("a=fingerprint:sha-256")
    ]
    return "\r\n".join(lines) + "\r\n"


class MetaEdge:
    """Meta's media edge for one call; see the module docstring.

    Attributes for assertions: `offer_sdp`, `answer_sdp` (as returned by `answer()`),
    `offer_problems`, `rms` (one value per 20 ms window received), `frames_received`,
    `connected` / `closed` (asyncio events), `error` (set by the fake when answering failed).
    """

    def __init__(
        self,
        offer_sdp: str | None = None,
        *,
        tone_hz: float | None = 880.0,
        amplitude: float = 0.01,
        sends: bool = True,
    ) -> None:
        self.offer_sdp = offer_sdp
        self.answer_sdp: str | None = None
        self.offer_problems: list[str] = offer_problems(offer_sdp) if offer_sdp else []
        self.rms: list[float] = []
        self.frames_received = 0
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._tone: MediaStreamTrack = ToneTrack(tone_hz, amplitude) if sends else MuteTrack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._answering = False
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("track", self._on_track)

    @property
    def connection_state(self) -> str:
        return str(self.pc.connectionState)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the business's offer and return Meta's answer (setup:passive, ice-lite)."""
        if self._closing:
            raise RuntimeError("the edge is closed")
        if self._answering:
            raise RuntimeError("an edge answers one offer only")
        self._answering = True
        self.offer_sdp = offer_sdp
        self.offer_problems = offer_problems(offer_sdp)
        setups = _setups(offer_sdp)
        if "passive" in setups:
            raise ValueError("offer has a=setup:passive; Meta's edge is always the DTLS server")
        # Meta answers passive even to actpass: make aiortc take the server role likewise.
        applied = offer_sdp.replace("a=setup:actpass", "a=setup:active")
        await self.pc.setRemoteDescription(RTCSessionDescription(applied, "offer"))
        self.pc.addTrack(self._tone)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        sdp = self.pc.localDescription.sdp
        if _setups(sdp) != {"passive"}:  # cannot happen for an active offer; guard anyway
            raise RuntimeError(f"aiortc answered a=setup:{_setups(sdp)}, expected passive")
        self.answer_sdp = add_ice_lite(_sha256_only(sdp))
        return self.answer_sdp

    def seconds_of_sound(self, threshold: float = 300.0) -> float:
        """Seconds (20 ms windows) of received audio whose RMS is above `threshold`."""
        return sum(1 for value in self.rms if value > threshold) * _WINDOW_SECONDS

    async def close(self) -> None:
        """Close the peer connection and end every task of the edge; idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        try:
            await self.pc.close()
        finally:
            self._tone.stop()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.closed.set()

    # -- internals ------------------------------------------------------------------------

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._closing:
            return
        task = asyncio.create_task(self._collect(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _collect(self, track: MediaStreamTrack) -> None:
        def window(rms: float) -> None:
            self.rms.append(rms)

        def frame() -> None:
            self.frames_received += 1

        await collect_rms(track, window, on_frame=frame)


async def collect_rms(
    track: MediaStreamTrack,
    on_window: Callable[[float], None],
    *,
    on_frame: Callable[[], None] | None = None,
) -> None:
    """Decode `track` to mono s16 at 48 kHz and hand `on_window` the RMS of every 20 ms, until
    the track ends."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    pending = array("h")
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, av.AudioFrame):
            continue
        if on_frame is not None:
            on_frame()
        for out in resampler.resample(frame):
            pending.frombytes(bytes(out.planes[0])[: out.samples * 2])
        while len(pending) >= WINDOW:
            window = pending[:WINDOW]
            del pending[:WINDOW]
            on_window(math.sqrt(sum(s * s for s in window) / WINDOW))
