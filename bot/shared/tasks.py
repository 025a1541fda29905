"""Stopping a helper task (a lease's renewal) from the task it helps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end. The CancelledError that ends it is not ours to
    pass on, but one aimed at the caller while it waits is: `with suppress(CancelledError)`
    swallowed that one too, and a background loop cancelled at that moment went on forever
    (bench/README.md, stop 17)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def stop_all(tasks: Iterable[asyncio.Task[Any]], *, again_after: float = 1.0) -> None:
    """Cancel the tasks and wait for them to end; one still running `again_after` seconds later
    is cancelled again. A cancellation can be lost under a library's own handling (one reaching
    an httpx request as the app closed was, and its loop then ran on): this bounds a shutdown."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after)
