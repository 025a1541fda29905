"""Speaking on a web number through `/realtime-session`: raw PCM16 little-endian frames over a
plain WebSocket (API.md §2.6). The sample rate is undocumented (API.md open question 13), so it is
a setting; frames are 20 ms, sent in real time."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bot.voice.speech import Audio

FRAME_SECONDS = 0.02


async def stream_pcm(
    url: str,
    audio: Audio,
    *,
    rate: int,
    repeat: int = 1,
    gap: float = 1.0,
    connect_timeout: float = 10.0,
) -> int:
    """Send `audio` `repeat` times over the WebSocket at `url`; the number of frames sent."""
    pcm = audio.resampled(rate).pcm
    size = int(rate * FRAME_SECONDS) * 2
    silence = b"\x00" * size
    pcm += b"\x00" * (-len(pcm) % size)
    frames = [pcm[i : i + size] for i in range(0, len(pcm), size)]
    gap_frames = [silence] * round(gap / FRAME_SECONDS)
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
    sent = 0
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.ws_connect(url, autoping=True, heartbeat=None) as ws,
    ):
        start = time.monotonic()
        for turn in range(repeat):
            for frame in (gap_frames if turn else []) + frames:
                wait = start + sent * FRAME_SECONDS - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await ws.send_bytes(frame)
                sent += 1
    return sent
