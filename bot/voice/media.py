"""The seam between placing a call and its media: what the call service asks of the voice side.

A Meta call needs an SDP offer from a WebRTC endpoint of ours whose business side is
`a=setup:active` (meta-webrtc.md); any call may speak a message. `bot.voice` implements both with
aiortc and espeak-ng; the call service knows only these protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from bot.pilot_status.models import NumberType
from bot.storage.store import CallRecord
from bot.voice.speech import Audio, Speech


class MediaSession(Protocol):
    """One call's media leg on our side: the offer to send, then the answer to apply."""

    @property
    def offer_sdp(self) -> str: ...

    async def apply_answer(self, sdp: str) -> None: ...

    async def wait_connected(self, within: float) -> Literal["ice", "dtls"] | None:
        """None once ICE and DTLS are up (within `within` seconds); else which did not."""
        ...

    async def wait_heard(self, within: float) -> bool:
        """Whether the far end's audio (RTP) arrived, now or within `within` seconds."""
        ...

    async def play(self, audio: Audio) -> None: ...

    def listen(self, sink: Callable[[bytes], None] | None) -> None:
        """Hand the far end's audio (20 ms of mono s16 48 kHz at a time) to `sink`."""
        ...

    def speak(self, pcm: bytes) -> None:
        """Send 20 ms of live audio (mono s16 48 kHz) to the far end."""
        ...

    async def close(self) -> None: ...


class MediaEndpoint(Protocol):
    async def open_session(self) -> MediaSession: ...


class Leg(Protocol):
    """What the voice side prepared for one call before it is placed."""

    @property
    def offer_sdp(self) -> str | None: ...

    async def close(self) -> None: ...


class VoiceSide(Protocol):
    async def prepare(
        self, number_type: NumberType, speech: Speech | None, locale: str, *, talk: bool = False
    ) -> Leg | None:
        """Before the POST: the media leg (Meta) or the audio (a spoken message), or None when
        the call needs neither. `talk`: an operator will speak on it, nothing is played.
        Raises CallbotError when it cannot (busy, no speech engine)."""
        ...

    def begin(self, leg: Leg, record: CallRecord) -> None:
        """After the API accepted the call: drive the leg until the call ends."""
        ...
