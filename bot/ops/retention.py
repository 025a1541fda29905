"""Retention: stored webhook deliveries, rings and permission requests are deleted after
RETENTION_DAYS, and old calls lose their number and note; the audit keeps what happened, not
who was called. Runs as a periodic job, in short bounded batches."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from bot.storage.retention import Pruned, RetentionStore
from bot.storage.store import utcnow

log = logging.getLogger(__name__)
MAX_BATCHES = 100  # per run: a backlog is worked off over several runs, never in one long go


class Retention:
    def __init__(
        self,
        store: RetentionStore,
        *,
        days: int,
        batch: int = 500,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.days = days
        self._batch = batch
        self.clock = clock

    async def run_once(self) -> Pruned:
        """Everything older than the retention, one short transaction per batch."""
        before = self.clock() - timedelta(days=self.days)
        total = Pruned()
        for _ in range(MAX_BATCHES):
            pruned = await self._store.prune(before, batch=self._batch)
            total = Pruned(*(a + b for a, b in zip(_counts(total), _counts(pruned), strict=True)))
            if max(_counts(pruned)) < self._batch:
                break
            await asyncio.sleep(0)  # between batches, the rest of the bot goes first
        if total.total:
            log.info(
                "retention (%d days): %s",
                self.days,
                ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(total).items() if v),
            )
        return total

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("retention run failed; it runs again in %.0f s", interval)
            await asyncio.sleep(interval)


def _counts(pruned: Pruned) -> tuple[int, ...]:
    return dataclasses.astuple(pruned)
