"""Offline text-to-speech with espeak-ng (meta-webrtc.md §4), cached per text and voice.

espeak-ng runs as a child process, so synthesis never blocks the event loop; the text goes in on
stdin (never as an argument, so it cannot be read as an option) and 16-bit mono WAV comes back on
stdout. A missing engine disables speaking only: `Speaker.available` says so at start.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import signal
import struct
import wave
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass

log = logging.getLogger(__name__)

VOICES = {"pt_BR": "pt-br", "en": "en-us"}  # our locales → espeak-ng voices
MAX_CHARS = 500


class SpeechError(RuntimeError):
    """The engine is missing or failed; the message is safe to log."""


@dataclass(frozen=True)
class Speech:
    """What a call says, in which espeak-ng voice."""

    text: str
    voice: str

    @classmethod
    def for_locale(cls, text: str, locale: str) -> Speech:
        return cls(text, VOICES.get(locale, VOICES["en"]))


@dataclass(frozen=True)
class Audio:
    """Signed 16-bit little-endian mono PCM."""

    pcm: bytes
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.rate

    def wav(self) -> bytes:
        out = io.BytesIO()
        with wave.open(out, "wb") as file:
            file.setnchannels(1)
            file.setsampwidth(2)
            file.setframerate(self.rate)
            file.writeframes(self.pcm)
        return out.getvalue()

    def repeated(self, times: int, gap: float) -> Audio:
        """The sound said `times` times, with `gap` seconds of silence between two sayings."""
        silence = b"\x00\x00" * int(self.rate * gap)
        return Audio(silence.join([self.pcm] * times), self.rate)

    def frames(self, rate: int, seconds: float = 0.02) -> list[bytes]:
        """The sound at `rate`, cut into frames of `seconds`; the last one padded with silence."""
        pcm = self.resampled(rate).pcm
        size = int(rate * seconds) * 2
        pcm += b"\x00" * (-len(pcm) % size)
        return [pcm[i : i + size] for i in range(0, len(pcm), size)]

    def resampled(self, rate: int) -> Audio:
        """The same sound at another rate (PyAV, imported only when speaking needs it)."""
        if rate == self.rate:
            return self
        import av

        frame = av.AudioFrame(format="s16", layout="mono", samples=len(self.pcm) // 2)
        frame.planes[0].update(self.pcm)
        frame.sample_rate = self.rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        chunks = [bytes(f.planes[0])[: f.samples * 2] for f in resampler.resample(frame)]
        chunks += [bytes(f.planes[0])[: f.samples * 2] for f in resampler.resample(None)]
        return Audio(b"".join(chunks), rate)


def tone(seconds: float = 0.4, hz: float = 660.0, rate: int = 16000, beeps: int = 3) -> Audio:
    """A few beeps: what a call plays when there is no speech engine."""
    import math

    on = int(seconds * rate)
    beep = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(on)
    )
    gap = b"\x00\x00" * on
    return Audio((beep + gap) * beeps, rate)


def _pcm_from_wav(data: bytes) -> Audio:
    """espeak-ng writes a streaming WAV (sizes 0x7fffffff): read the format, take what follows
    the `data` header."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechError("the engine did not produce WAV")
    position, rate, channels, width = 12, 0, 0, 0
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], struct.unpack_from("<I", data, position + 4)[0]
        if chunk == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, position + 8)
            width = bits // 8
        elif chunk == b"data":
            if (channels, width) != (1, 2) or not rate:
                raise SpeechError("the engine's WAV is not 16-bit mono")
            pcm = data[position + 8 :]
            return Audio(pcm[: len(pcm) // 2 * 2], rate)
        position += 8 + size
    raise SpeechError("the engine's WAV has no data")


class Speaker:
    def __init__(
        self,
        engine: str = "espeak-ng",
        *,
        words_per_minute: int = 150,
        cache_bytes: int = 32 * 1024 * 1024,
        timeout: float = 15.0,
    ) -> None:
        self._engine = shutil.which(engine)
        self.engine_name = engine
        self._wpm = words_per_minute
        self._timeout = timeout
        self._cache: OrderedDict[Speech, Audio] = OrderedDict()
        self._cache_limit = cache_bytes
        self._cached = 0
        self._running: dict[Speech, asyncio.Future[Audio]] = {}
        self.syntheses = 0  # engine runs, for tests and the benchmark

    @property
    def available(self) -> bool:
        return self._engine is not None

    async def speak(self, speech: Speech) -> Audio:
        """The audio of `speech`: from the cache, from a synthesis already running, or new."""
        speech = Speech(" ".join(speech.text.split())[:MAX_CHARS], speech.voice)
        if not speech.text:
            raise SpeechError("nothing to say")
        if (audio := self._cache.get(speech)) is not None:
            self._cache.move_to_end(speech)
            return audio
        if (running := self._running.get(speech)) is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Audio] = asyncio.get_running_loop().create_future()
        self._running[speech] = future
        try:
            audio = await self._synthesize(speech)
        except BaseException as err:
            future.set_exception(err if isinstance(err, Exception) else SpeechError("cancelled"))
            future.exception()  # retrieved: waiters get it, nobody is warned
            raise
        finally:
            del self._running[speech]
        future.set_result(audio)
        self._remember(speech, audio)
        return audio

    async def _synthesize(self, speech: Speech) -> Audio:
        if self._engine is None:
            raise SpeechError(f"{self.engine_name} is not installed")
        self.syntheses += 1
        process = await asyncio.create_subprocess_exec(
            self._engine,
            "-v",
            speech.voice,
            "-s",
            str(self._wpm),
            "--stdin",
            "--stdout",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a wrapper's children end with it
        )
        try:
            out, err = await asyncio.wait_for(
                process.communicate(speech.text.encode()), self._timeout
            )
        except BaseException:
            await _end(process)
            raise
        if process.returncode != 0 or not out:
            reason = err.decode(errors="replace").strip()[:200]
            raise SpeechError(f"{self.engine_name} failed ({process.returncode}): {reason}")
        return _pcm_from_wav(out)

    def _remember(self, speech: Speech, audio: Audio) -> None:
        if len(audio.pcm) > self._cache_limit:
            return
        self._cache[speech] = audio
        self._cached += len(audio.pcm)
        while self._cached > self._cache_limit:
            _, dropped = self._cache.popitem(last=False)
            self._cached -= len(dropped.pcm)


_SAY = re.compile(r"(?:say|diga|fale|falar)(?:\s+(en|pt|pt-br))?\s*:\s*(.+)", re.I | re.S)


def spoken_note(note: str | None, locale: str) -> tuple[str | None, Speech | None]:
    """`/call <phone> say: <text>` speaks the text; `say en:` / `say pt:` choose the voice,
    otherwise it is the operator's language. Returns the note to show and what to say."""
    match = _SAY.fullmatch((note or "").strip())
    if match is None:
        return note, None
    language, text = (match.group(1) or "").lower(), " ".join(match.group(2).split())
    if language.startswith("pt"):
        locale = "pt_BR"
    elif language == "en":
        locale = "en"
    return text, Speech.for_locale(text, locale)


async def _end(process: asyncio.subprocess.Process, grace: float = 2.0) -> None:
    """End a synthesis cut short (cancelled, timed out): kill the engine with its process group,
    then read what is left of its pipes until they close, for a bounded time. asyncio's wait()
    returns only once every pipe has closed, and a pipe whose reading paused when the reader was
    cancelled never does: that held a shutdown forever."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    try:
        async with asyncio.timeout(grace):
            await process.communicate()
    except TimeoutError:
        log.warning(
            "speech engine (pid %s) did not end within %.0f s of its kill", process.pid, grace
        )
