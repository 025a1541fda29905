"""Several replicas of `python -m bot` behind a real HAProxy (deploy/haproxy.cfg), on one
PostgreSQL database and one Redis prefix: the test bed of tests/replicas.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy.engine import URL, make_url

from tests.db_fixtures import DEFAULT_POSTGRES_URL, _execute
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram
from tests.replicas import TestBed, start_testbed

pytestmark = pytest.mark.postgresql


@pytest.fixture
async def bed_database(postgres_database: URL) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the replicas (SQLAlchemy asyncpg URL), dropped after."""
    server = make_url(os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    name = f"callbot_replicas_{uuid.uuid4().hex}"
    await _execute(server, f'CREATE DATABASE "{name}"')
    try:
        url = server.set(database=name, drivername="postgresql+asyncpg")
        yield url.render_as_string(hide_password=False)
    finally:
        await _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def bed(
    tmp_path: Path,
    telegram: FakeTelegram,
    pilot: FakePilotStatus,
    bed_database: str,
    shared_state: dict[str, str],
) -> AsyncIterator[TestBed]:
    async with start_testbed(
        tmp_path,
        telegram=telegram,
        pilot=pilot,
        database_url=bed_database,
        shared_state=shared_state,
        replicas=3,
    ) as running:
        yield running


async def through_balancer(bed: TestBed, path: str, count: int) -> list[int]:
    """`count` concurrent GETs of `path` through HAProxy: their statuses."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> int:
            async with session.get(bed.haproxy.url + path) as response:
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_the_pool_follows_readiness_and_nothing_reaches_a_dead_replica(
    bed: TestBed,
) -> None:
    first, second, third = bed.replicas
    assert await bed.haproxy.servers() == {r.name: "UP" for r in bed.replicas}

    # killed: before the health check notices, requests that meet it go to another replica
    await first.kill()
    assert await through_balancer(bed, "/healthz", 60) == [200] * 60
    await bed.haproxy.wait_for({first.name: "DOWN"})

    # SIGTERM: /readyz turns 503 while it drains, and the balancer takes it out of the pool
    assert await second.terminate() == 0
    await bed.haproxy.wait_for({second.name: "DOWN"})
    assert await through_balancer(bed, "/readyz", 20) == [200] * 20

    await bed.restart(first)
    await bed.restart(second)
    assert await bed.haproxy.servers() == {r.name: "UP" for r in (first, second, third)}
