"""The seam for the bot's own WebRTC endpoint, which Meta numbers need to place a call.

A Meta call needs an SDP offer whose business side is `a=setup:active` (meta-webrtc.md).
The voice issue plugs an aiortc endpoint in here; until then `media=None` and Meta calls stop
after the permission checks.
"""

from __future__ import annotations

from typing import Protocol


class MediaSession(Protocol):
    """One call's media leg: the offer to send, then the answer to apply."""

    @property
    def offer_sdp(self) -> str: ...

    async def apply_answer(self, sdp: str) -> None: ...

    async def close(self) -> None: ...


class MediaEndpoint(Protocol):
    async def open_session(self, correlation_id: str) -> MediaSession: ...
