"""Work a shutdown lets finish: a `POST /v1/calls` that may already ring a phone, and what
records it. `close()` waits for it (bounded by SHUTDOWN_GRACE_SECONDS) before anything is
cancelled, so a SIGTERM never leaves a ring placed but unrecorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class InFlight:
    """A count of work in progress, and a wait until there is none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    @asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once nothing is in flight; False when `timeout` seconds passed first."""
        if self._count == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
