"""The real `python -m bot`, run as an admin would (its .env in a folder of its own), with its
log read as it runs."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BotProcess:
    """One `python -m bot` process; its log (stderr) is read as it runs."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.port: int | None = None
        self._listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace")
            self.log.append(text)
            if found := re.search(r"web app listening on port (\d+)", text):
                self.port = int(found.group(1))
                self._listening.set()

    @property
    def text(self) -> str:
        return "".join(self.log)

    async def listening(self) -> int:
        await asyncio.wait_for(self._listening.wait(), 20)
        assert self.port is not None
        return self.port

    async def started(self, timeout: float = 20) -> None:  # noqa: ASYNC109
        """Until the bot logs that it started; fails at once if the process ended instead."""
        for _ in range(int(timeout / 0.05)):
            if "callbot started as" in self.text:
                return
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError("the bot did not start:\n" + self.text)

    async def signal(self, sig: signal.Signals, timeout: float = 20) -> int:  # noqa: ASYNC109
        self.process.send_signal(sig)
        return await self.exited(timeout)

    async def exited(self, timeout: float = 20) -> int:  # noqa: ASYNC109
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await self._reader
        return code


async def run_bot_process(folder: Path, env_file: str, *args: str) -> BotProcess:
    """`python -m bot [args]` in `folder`, configured by `env_file` written as its .env."""
    (folder / ".env").write_text(env_file)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return BotProcess(process)
