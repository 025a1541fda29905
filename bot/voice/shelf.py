"""Audio the bot serves to Pilot Status for `/play` (web numbers): a short-lived signed URL that
serves its file once.

The URL carries an id, an expiry and an HMAC of both, so a forged or stale URL is refused before
any lookup; a good one is taken off the shelf when served.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from aiohttp import web


class AudioShelf:
    def __init__(
        self,
        base_url: str,
        *,
        ttl: float = 120.0,
        key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._ttl = ttl
        self._key = key or secrets.token_bytes(32)
        self._clock = clock
        self._files: dict[str, tuple[float, bytes]] = {}

    def put(self, wav: bytes) -> str:
        """Shelve a WAV file; the public URL that serves it once, until it expires."""
        now = self._clock()
        for name, (expires, _) in list(self._files.items()):
            if expires <= now:
                del self._files[name]
        name = secrets.token_urlsafe(16)
        expires = int(now + self._ttl)
        self._files[name] = (expires, wav)
        return f"{self._base}/audio/{name}.{expires}.{self._sign(name, expires)}.wav"

    def take(self, ref: str) -> bytes | None:
        """The file of a URL's last segment (without `.wav`), once; None if forged or stale."""
        name, _, rest = ref.partition(".")
        expires_text, _, signature = rest.partition(".")
        if not expires_text.isdigit():
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(self._sign(name, expires), signature):
            return None
        if expires <= self._clock():
            self._files.pop(name, None)
            return None
        entry = self._files.pop(name, None)
        return entry[1] if entry else None

    @property
    def ttl(self) -> float:
        return self._ttl

    def discard(self, url: str) -> None:
        """Forget a file whose call ended before it was fetched."""
        name = url.rsplit("/", 1)[-1].partition(".")[0]
        self._files.pop(name, None)

    def __len__(self) -> int:
        return len(self._files)

    def _sign(self, name: str, expires: int) -> str:
        message = f"{name}.{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    async def serve(self, request: web.Request) -> web.Response:
        wav = self.take(request.match_info["ref"])
        if wav is None:
            return web.Response(status=404, text="no such audio (expired or already served)")
        return web.Response(body=wav, content_type="audio/wav")
