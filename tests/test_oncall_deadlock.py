"""PostgreSQL breaks a deadlock by aborting one of its transactions. An alert's intake caught in
one (seen with three replicas taking a storm while another transaction held the team's digest
post) is run again and taken, instead of answering the alert's sender 500.

The deadlock here is a real one, made in the order the storm made it: another transaction holds
the digest's head row; the intake, holding its team's row, waits for the head; the other
transaction then asks for the team's row."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import sessionmaker
from bot.storage.oncall import NewIncident, OnCallStore, PostShare

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SHARE = PostShare(posts=1)  # the first incident of a minute gets a post; the rest, a digest


def new(team_id: int, key: str) -> NewIncident:
    return NewIncident(team_id=team_id, dedup_key=key, source="generic", title=f"alert {key}")


async def wait_until_blocked(engine: AsyncEngine, seconds: float = 10.0) -> None:
    """Until some other backend of this database waits for a lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + seconds
    async with engine.connect() as connection:
        while not await connection.scalar(query):
            assert time.monotonic() < deadline, "the intake never waited for the head's row"
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_intake_aborted_by_a_deadlock_is_run_again_and_joins_the_digest(
    engine: AsyncEngine,
) -> None:
    oncall = OnCallStore(sessionmaker(engine))
    team = await oncall.save_team("infra", chat_id=-100, token_hash=None, at=AT)
    first = await oncall.create_incident(new(team.id, "a"), at=AT, share=SHARE)
    head = await oncall.create_incident(new(team.id, "b"), at=AT, share=SHARE)
    assert (first.digest_id, head.digest_id) == (None, head.id)  # b started the digest
    await oncall.post_done(head.id, 7, shown="x")  # posted: a new line makes it due again

    async with engine.connect() as other:
        await other.execute(
            text("SELECT id FROM incidents WHERE id = :id FOR UPDATE"), {"id": head.id}
        )
        intake = asyncio.create_task(
            oncall.create_incident(new(team.id, "c"), at=AT + timedelta(seconds=1), share=SHARE)
        )
        await wait_until_blocked(engine)
        # the cycle: PostgreSQL aborts the intake (it has waited longest) after deadlock_timeout
        await other.execute(text("SELECT id FROM teams WHERE id = :id FOR UPDATE"), {"id": team.id})
        await other.rollback()
    joined = await asyncio.wait_for(intake, 30)
    assert joined.digest_id == head.id
    lines = await oncall.digest_lines(head.id)
    assert [line.dedup_key for line in lines] == ["b", "c"]
