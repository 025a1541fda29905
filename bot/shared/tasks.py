"""Stopping background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def stop_all(tasks: Iterable[asyncio.Task[Any]], *, again_after: float = 1.0) -> None:
    """Cancel the tasks and wait for them to end; one still running `again_after` seconds later
    is cancelled again. A cancellation can be lost under a library's own handling (one reaching
    an httpx request as the app closed was, and its loop then ran on): this bounds a shutdown."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after)
