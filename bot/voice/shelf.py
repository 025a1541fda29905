"""Audio the bot serves to Pilot Status for `/play` (web numbers): a short-lived signed URL that
serves its file once.

The URL carries an id, an expiry and an HMAC of both, so a forged or stale URL is refused before
any lookup; a good one is taken off the shelf when served. `AudioShelf` keeps the files in this
process; `RedisAudioShelf` in Redis (with one signing key all replicas share), so a URL one
replica made is served by any replica behind the load balancer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from bot.shared.redis import Keys, redis_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)
MAX_SHARED_BYTES = 16 * 1024 * 1024  # one file in Redis; a longer one is streamed instead
_GONE = "no such audio (expired or already served)"


class Shelf(Protocol):
    @property
    def ttl(self) -> float: ...

    async def shelve(self, wav: bytes) -> str | None:
        """The public URL that serves `wav` once, until it expires; None if it cannot be kept."""
        ...

    async def forget(self, url: str) -> None:
        """Drop a file whose call ended before it was fetched."""
        ...

    async def serve(self, request: web.Request) -> web.Response: ...


def _sign(key: bytes, name: str, expires: int) -> str:
    return hmac.new(key, f"{name}.{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def _verified(key: bytes, ref: str) -> tuple[str, int] | None:
    """(file name, expiry) of a URL's last segment (without `.wav`) if signed by `key`."""
    name, _, rest = ref.partition(".")
    expires_text, _, signature = rest.partition(".")
    if not expires_text.isdigit():
        return None
    expires = int(expires_text)
    if not hmac.compare_digest(_sign(key, name, expires), signature):
        return None
    return name, expires


def _name_of(url: str) -> str:
    return url.rsplit("/", 1)[-1].partition(".")[0]


class AudioShelf:
    """The files in this process's memory."""

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
        return f"{self._base}/audio/{name}.{expires}.{_sign(self._key, name, expires)}.wav"

    def take(self, ref: str) -> bytes | None:
        """The file of a URL's last segment (without `.wav`), once; None if forged or stale."""
        verified = _verified(self._key, ref)
        if verified is None:
            return None
        name, expires = verified
        entry = self._files.pop(name, None)
        return entry[1] if entry and expires > self._clock() else None

    @property
    def ttl(self) -> float:
        return self._ttl

    def discard(self, url: str) -> None:
        """Forget a file whose call ended before it was fetched."""
        self._files.pop(_name_of(url), None)

    def __len__(self) -> int:
        return len(self._files)

    async def shelve(self, wav: bytes) -> str | None:
        return self.put(wav)

    async def forget(self, url: str) -> None:
        self.discard(url)

    async def serve(self, request: web.Request) -> web.Response:
        wav = self.take(request.match_info["ref"])
        if wav is None:
            return web.Response(status=404, text=_GONE)
        return web.Response(body=wav, content_type="audio/wav")


class RedisAudioShelf:
    """The files in Redis (`<prefix>audio:<name>`, deleted by Redis at the URL's expiry), at
    most MAX_SHARED_BYTES each; served once (GETDEL). The signing key is made by the first
    replica that needs it (`<prefix>audio-key`, SET NX) and read by the others."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        base_url: str,
        *,
        ttl: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._base = base_url.rstrip("/")
        self._ttl = ttl
        self._clock = clock
        self._key: bytes | None = None

    @property
    def ttl(self) -> float:
        return self._ttl

    async def _signing_key(self) -> bytes:
        if self._key is None:
            name = self._keys("audio-key")
            await self._redis.set(name, secrets.token_bytes(32), nx=True)
            key: bytes | None = await self._redis.get(name)
            if key is None:
                from redis.exceptions import RedisError  # loaded with the client

                raise RedisError("the shelf's signing key vanished")
            self._key = key
        return self._key

    async def shelve(self, wav: bytes) -> str | None:
        if len(wav) > MAX_SHARED_BYTES:
            log.info("audio of %d bytes is too big to shelve in Redis; streamed instead", len(wav))
            return None
        now = self._clock()
        name = secrets.token_urlsafe(16)
        expires = int(now + self._ttl)
        try:
            key = await self._signing_key()
            await self._redis.set(self._keys("audio", name), wav, pxat=expires * 1000)
        except redis_error() as err:
            log.warning("cannot shelve audio in Redis (%s); streamed instead", type(err).__name__)
            return None
        return f"{self._base}/audio/{name}.{expires}.{_sign(key, name, expires)}.wav"

    async def forget(self, url: str) -> None:
        try:
            await self._redis.delete(self._keys("audio", _name_of(url)))
        except redis_error() as err:  # it expires by itself
            log.info("cannot drop shelved audio (%s)", type(err).__name__)

    async def serve(self, request: web.Request) -> web.Response:
        try:
            verified = _verified(await self._signing_key(), request.match_info["ref"])
            wav = None
            if verified is not None and verified[1] > self._clock():
                wav = await self._redis.getdel(self._keys("audio", verified[0]))
        except redis_error() as err:
            log.warning("cannot serve shelved audio: Redis (%s)", type(err).__name__)
            return web.Response(status=503, text="audio store unavailable")
        if wav is None:
            return web.Response(status=404, text=_GONE)
        return web.Response(body=wav, content_type="audio/wav")


def audio_shelf(redis: Redis | None, keys: Keys, base_url: str, *, ttl: float) -> Shelf:
    """Shared by the replicas through Redis when there is one, else in this process."""
    if redis is None:
        return AudioShelf(base_url, ttl=ttl)
    return RedisAudioShelf(redis, keys, base_url, ttl=ttl)
