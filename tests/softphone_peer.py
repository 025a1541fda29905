"""An aiortc peer standing in for the operator's browser on a Meta call (the softphone's other
leg): it sends a 440 Hz tone while `speaking` (silence otherwise), offers with every candidate
gathered (as bot/softphone/static/webrtc.js does), and keeps one RMS value per 20 ms of what it
hears, with the loop time each window arrived."""

from __future__ import annotations

import asyncio
import fractions
import math
from array import array
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from tests.fakes.meta_edge import RATE, WINDOW

LOUD = 2000.0  # RMS of a 20 ms window that counts as sound (a 0.3 tone is ~6950)


class Microphone(MediaStreamTrack):
    """Real-time paced 440 Hz at 0.3 of full scale while `on`, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        step = 2 * math.pi * 440 / RATE
        self._pcm = array("h", (int(9830 * math.sin(step * n)) for n in range(RATE)))
        self._silence = bytes(WINDOW * 2)
        self.on = False
        self.turned_on_at: float | None = None
        self._pts = 0
        self._start: float | None = None

    def speak(self, on: bool = True) -> None:
        self.on = on
        if on:
            self.turned_on_at = asyncio.get_running_loop().time()

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
        pcm = self._pcm[offset : offset + WINDOW].tobytes() if self.on else self._silence
        frame = av.AudioFrame(format="s16", layout="mono", samples=WINDOW)
        frame.planes[0].update(pcm)
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += WINDOW
        return frame


class BrowserPeer:
    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Microphone()
        self.heard: list[tuple[float, float]] = []  # (loop time, RMS) per 20 ms window
        self.ended = asyncio.Event()  # the bot's leg closed (or failed)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    def loud_seconds(self, since: float = 0.0) -> float:
        return sum(0.02 for at, rms in self.heard if at >= since and rms > LOUD)

    async def close(self) -> None:
        await self.pc.close()
        self.mic.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.ended.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        task = asyncio.create_task(self._collect(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _collect(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        pending = array("h")
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.ended.set()
                return
            for out in resampler.resample(frame):
                pending.frombytes(bytes(out.planes[0])[: out.samples * 2])
            while len(pending) >= WINDOW:
                window = pending[:WINDOW]
                del pending[:WINDOW]
                rms = math.sqrt(sum(s * s for s in window) / WINDOW)
                self.heard.append((loop.time(), rms))
