"""The outbound heartbeat (the healthchecks.io pattern): with HEARTBEAT_URL set, the bot requests
it every minute while its escalation engine is healthy, so that someone learns when the pager
itself is down. Healthy: the database answers, and no escalation step is overdue by more than
MAX_LAG (a step due and not taken means pages are not going out). When it is not, the request
is left out and the service at the URL raises its own alarm after its own grace period.

Every replica requests the URL: any one healthy replica is a working pager. The URL gets only
a plain GET, through a client of its own: it is a third party, and never sees the Pilot Status
API key of the one shared client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

import httpx

log = logging.getLogger(__name__)
INTERVAL = 60.0  # seconds between requests
MAX_LAG = 120.0  # seconds a step may be overdue (the metrics' alert rule uses two minutes too)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)

# open incidents by state and the seconds the oldest overdue step is late (OnCallStore)
Summary = Callable[[datetime], Awaitable[tuple[dict[str, int], float]]]


def build_pulse_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=TIMEOUT,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        follow_redirects=True,  # healthchecks-style services may redirect once
        headers={"User-Agent": "callbot-heartbeat"},
    )


class Pulse:
    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        summary: Summary,
        clock: Callable[[], datetime],
        *,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._url = url
        self._client = client
        self._summary = summary
        self._clock = clock
        self._stopping = stopping
        self.last_problem: str | None = None

    async def problem(self) -> str | None:
        """Why the engine is not healthy now; None when it is."""
        if self._stopping():
            return "shutting down"
        try:
            _, lag = await asyncio.wait_for(self._summary(self._clock()), TIMEOUT.read)
        except Exception as err:  # the database does not answer, whatever the reason
            return f"database unavailable ({type(err).__name__})"
        if lag > MAX_LAG:
            return f"escalation steps overdue by {lag:.0f} s"
        return None

    async def beat(self) -> bool:
        """Request the URL if the engine is healthy; whether it was requested and answered 2xx."""
        problem = await self.problem()
        if problem != self.last_problem:
            if problem is None:
                log.info("outbound heartbeat: healthy again")
            else:
                log.warning("outbound heartbeat held back: %s", problem)
            self.last_problem = problem
        if problem is not None:
            return False
        try:
            response = await self._client.get(self._url)
        except httpx.HTTPError as err:
            log.warning("outbound heartbeat failed: %s", type(err).__name__)
            return False
        if not response.is_success:
            log.warning("outbound heartbeat answered %s", response.status_code)
        return response.is_success

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run_forever(self, interval: float = INTERVAL) -> None:
        while not self._stopping():
            try:
                await self.beat()
            except Exception:
                log.exception("outbound heartbeat failed; retrying")
            await asyncio.sleep(interval)
