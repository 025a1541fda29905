"""Speaking on a web number through `/realtime-session`: raw PCM16 little-endian frames over a
plain WebSocket (API.md §2.6). The sample rate is undocumented (API.md open question 13), so it is
a setting; frames are 20 ms, sent in real time."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bot.voice.speech import Audio

FRAME_SECONDS = 0.02


async def stream_pcm(url: str, audio: Audio, *, rate: int, connect_timeout: float = 10.0) -> int:
    """Send `audio` over the WebSocket at `url`, one frame per 20 ms; the number of frames."""
    frames = audio.frames(rate, FRAME_SECONDS)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.ws_connect(url, autoping=True, heartbeat=None) as ws,
    ):
        start = time.monotonic()
        for sent, frame in enumerate(frames):
            wait = start + sent * FRAME_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await ws.send_bytes(frame)
    return len(frames)
