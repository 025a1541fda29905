"""An aiortc peer standing in for the operator's browser on a Meta call (the softphone's other
leg): it sends a 440 Hz tone while `speaking` (silence otherwise), offers with every candidate
gathered (as bot/softphone/static/webrtc.js does), and keeps one RMS value per 20 ms of what it
hears, with the loop time each window arrived."""

from __future__ import annotations

import asyncio
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from tests.fakes.meta_edge import WINDOW, ToneTrack, collect_rms

LOUD = 2000.0  # RMS of a 20 ms window that counts as sound (a 0.3 tone is ~6950)


class Microphone(ToneTrack):
    """Real-time paced 440 Hz at 0.3 of full scale while `on`, silence otherwise."""

    def __init__(self) -> None:
        super().__init__(440.0, 0.3)
        self.on = False
        self.turned_on_at: float | None = None
        self.sent_loud = 0  # 20 ms frames sent while on

    def speak(self, on: bool = True) -> None:
        self.on = on
        if on:
            self.turned_on_at = asyncio.get_running_loop().time()

    async def recv(self) -> av.AudioFrame:
        frame = await super().recv()
        if self.on:
            self.sent_loud += 1
        else:
            frame.planes[0].update(bytes(WINDOW * 2))
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
        loop = asyncio.get_running_loop()

        def window(rms: float) -> None:
            self.heard.append((loop.time(), rms))

        await collect_rms(track, window)
        self.ended.set()
