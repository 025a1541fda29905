"""A synthesis cut short (the call ended, the app shuts down) ends at once, even when the speech
engine is a wrapper whose child keeps its output pipe open: asyncio waits for every pipe to
close, so killing only the wrapper held `Speaker.speak`, and with it a shutdown, forever (seen
as a stalled `bench_oncall --burst 10`)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from bot.voice.speech import Speaker, Speech


def wrapper_engine(tmp_path: Path) -> Path:
    """An engine that starts a child holding stdout, writes part of its answer, and hangs."""
    script = tmp_path / "wrapped-espeak"
    script.write_text(
        "#!/bin/sh\n"
        "sleep 60 &\n"
        'echo $! > "$0.child"\n'
        'exec python3 -c "import sys, time; sys.stdout.buffer.write(bytes(300000));'
        ' sys.stdout.flush(); time.sleep(60)"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()


async def test_a_cancelled_synthesis_ends_and_takes_the_engine_s_children_with_it(
    tmp_path: Path,
) -> None:
    engine = wrapper_engine(tmp_path)
    speaker = Speaker(str(engine), timeout=30)
    speaking = asyncio.create_task(speaker.speak(Speech("the database is down", "en")))
    child = Path(f"{engine}.child")
    for _ in range(200):
        if read(child):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # it is writing its answer
    speaking.cancel()
    done, _ = await asyncio.wait([speaking], timeout=10)
    assert done, "speak() never ended after its cancellation"
    assert speaking.cancelled()
    pid = int(read(child))
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not alive(pid), "the engine's child outlived the synthesis"
    # the next synthesis of the same text starts afresh (nothing is left running for it)
    again = asyncio.create_task(speaker.speak(Speech("the database is down", "en")))
    await asyncio.sleep(0.3)
    again.cancel()
    done, _ = await asyncio.wait([again], timeout=10)
    assert done
