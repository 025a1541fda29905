"""The operator's browser as the voice of a Meta call: browser ↔ the bot's aiortc peers ↔ Meta.

The bot keeps the Meta leg it placed the call with (its own offer, `a=setup:active`,
bot.voice.webrtc); a `BrowserLeg` is a second peer connection, one per talking operator, that
answers the browser's offer. Audio crosses between the two legs as decoded frames (aiortc
decodes every track it receives and encodes every track it sends; it cannot pass Opus packets
from one connection to another): the callee's audio goes to the browser, the browser's
microphone goes to Meta in place of the bot's message. Muted, nothing of the browser's is
forwarded, so Meta's leg sends silence.

Imported only where a Meta call's media already is (aiortc is loaded then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bot.errors import TalkRefused
from bot.softphone.ice import IceServer
from bot.voice.service import TalkLine
from bot.voice.webrtc import MessageTrack, Rechunker, close_peer

log = logging.getLogger(__name__)


def _configuration(servers: Sequence[IceServer]) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in servers
        ]
    )


class BrowserLeg:
    """One operator's browser on one call. `lost` is set when its connection fails or closes,
    or its microphone track ends."""

    def __init__(self, line: TalkLine, operator_id: int, ice: Sequence[IceServer]) -> None:
        self.line = line
        self.operator_id = operator_id
        self.muted = False
        self.lost = asyncio.Event()
        self._pc = RTCPeerConnection(_configuration(ice))
        self._to_browser = MessageTrack()  # the callee's voice, paced to the browser
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the browser's offer; our answer, with every candidate (no trickle)."""
        lines = offer_sdp.splitlines()
        audio = any(line.startswith("m=audio ") for line in lines)
        if not lines or lines[0].strip() != "v=0" or not audio:
            raise TalkRefused(400, "the offer is not an SDP offer with audio")
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise TalkRefused(400, f"offer refused by the WebRTC stack: {err}"[:200]) from None
        self._pc.addTrack(self._to_browser)
        await self._pc.setLocalDescription(await self._pc.createAnswer())  # gathers candidates
        return str(self._pc.localDescription.sdp)

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected" and not self._closed:
            self.line.session.listen(self._to_browser.feed)
            self.line.joined.set()  # the message (if any) stops: the operator speaks now
        elif state in ("failed", "closed"):
            self.lost.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._closed:
            return
        task = asyncio.create_task(self._forward(track), name=f"softphone mic {self.line.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, track: MediaStreamTrack) -> None:
        """The browser's microphone to Meta, 20 ms at a time, unless muted."""
        rechunk = Rechunker()
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                pieces = rechunk(frame)
                if self.muted:
                    continue
                for pcm in pieces:
                    self.line.session.speak(pcm)
        except MediaStreamError:
            self.lost.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lost.set()
        self.line.session.listen(None)
        self._to_browser.stop()
        try:
            await close_peer(self._pc)
        finally:
            for task in self._tasks:
                task.cancel()
            with suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
