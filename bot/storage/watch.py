"""Storage of heartbeats (dead man's switches) and silences (maintenance windows).

Replicas share these rows as they share incidents (bot/storage/oncall.py): the check of missed
heartbeats claims one row at a time with `FOR UPDATE SKIP LOCKED`, moves its timer on by a
lease and takes a new attempt (its fence), so two replicas never open two incidents for one
missed heartbeat, and a check cut off by a crash is taken again after the lease. A ping locks
its row and waits (it must apply), and it takes a new attempt too: a check that claimed the row
before the ping learns, when it commits, that the heartbeat came back meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.storage.tables import HeartbeatRow, IncidentRow, SilenceRow


@dataclass(frozen=True)
class Heartbeat:
    id: int
    team_id: int
    name: str
    interval_seconds: int
    grace_seconds: int
    state: str  # waiting (never pinged), ok, missed
    last_ping_at: datetime | None
    due_at: datetime
    missed_since: datetime | None
    attempt: int
    source: str
    created_at: datetime

    @property
    def expected_at(self) -> datetime:
        """When the ping that did not come was expected (before the grace)."""
        return self.due_at - timedelta(seconds=self.grace_seconds)


@dataclass(frozen=True)
class Ping:
    """What a ping found: the heartbeat after it, and whether it had been missed before."""

    heartbeat: Heartbeat
    recovered: bool
    missed_since: datetime | None


@dataclass(frozen=True)
class Silence:
    id: int
    team_id: int
    starts_at: datetime
    ends_at: datetime
    matchers: dict[str, str] = field(hash=False)
    reason: str
    created_by: str
    source: str
    file_name: str | None = None

    def holds(self, labels: Mapping[str, str], now: datetime) -> bool:
        """Whether it silences an alert with these labels now."""
        in_window = self.starts_at <= now < self.ends_at
        return in_window and all(labels.get(k) == v for k, v in self.matchers.items())


@dataclass(frozen=True)
class Window:
    """A maintenance window of ONCALL_FILE (in UTC), by its name there."""

    name: str
    starts_at: datetime
    ends_at: datetime
    matchers: dict[str, str]
    reason: str


def _heartbeat(row: HeartbeatRow) -> Heartbeat:
    return Heartbeat(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        interval_seconds=row.interval_seconds,
        grace_seconds=row.grace_seconds,
        state=row.state,
        last_ping_at=row.last_ping_at,
        due_at=row.due_at,
        missed_since=row.missed_since,
        attempt=row.attempt,
        source=row.source,
        created_at=row.created_at,
    )


def _silence(row: SilenceRow) -> Silence:
    return Silence(
        id=row.id,
        team_id=row.team_id,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        matchers=dict(row.matchers or {}),
        reason=row.reason,
        created_by=row.created_by,
        source=row.source,
        file_name=row.file_name,
    )


class WatchStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # heartbeats

    async def save_heartbeat(
        self, team_id: int, name: str, *, interval: int, grace: int, source: str, at: datetime
    ) -> Heartbeat:
        """Declare a heartbeat, or change its interval and grace. A new one is counted from now:
        never pinged by now + interval + grace, it is missed."""
        async with self._sessions.begin() as session:
            row = await _heartbeat_row(session, team_id, name, lock=True)
            if row is None:
                row = HeartbeatRow(
                    team_id=team_id,
                    name=name,
                    state="waiting",
                    attempt=0,
                    created_at=at,
                    due_at=at + timedelta(seconds=interval + grace),
                )
                session.add(row)
            elif row.state != "missed":
                since = row.last_ping_at or row.created_at
                row.due_at = since + timedelta(seconds=interval + grace)
            row.interval_seconds, row.grace_seconds, row.source = interval, grace, source
            await session.flush()
            return _heartbeat(row)

    async def remove_heartbeat(self, team_id: int, name: str) -> Heartbeat | None:
        async with self._sessions.begin() as session:
            row = await _heartbeat_row(session, team_id, name, lock=True)
            if row is None:
                return None
            gone = _heartbeat(row)
            await session.delete(row)
            return gone

    async def heartbeat(self, team_id: int, name: str) -> Heartbeat | None:
        async with self._sessions() as session:
            row = await _heartbeat_row(session, team_id, name)
            return _heartbeat(row) if row else None

    async def heartbeats(self, team_id: int | None = None) -> list[Heartbeat]:
        query = select(HeartbeatRow).order_by(HeartbeatRow.team_id, HeartbeatRow.name)
        if team_id is not None:
            query = query.where(HeartbeatRow.team_id == team_id)
        async with self._sessions() as session:
            return [_heartbeat(r) for r in (await session.execute(query)).scalars()]

    async def ping(self, heartbeat_id: int, at: datetime) -> Ping | None:
        """A ping came: the timer starts again from now. Locks and waits (it must apply)."""
        async with self._sessions.begin() as session:
            query = select(HeartbeatRow).where(HeartbeatRow.id == heartbeat_id).with_for_update()
            row = (await session.execute(query)).scalars().first()
            if row is None:
                return None
            recovered, since = row.state == "missed", row.missed_since
            row.state, row.last_ping_at, row.missed_since = "ok", at, None
            row.due_at = at + timedelta(seconds=row.interval_seconds + row.grace_seconds)
            row.attempt += 1  # a check that claimed it before this ping commits nothing
            return Ping(_heartbeat(row), recovered, since)

    async def claim_missed(self, now: datetime, lease: timedelta) -> Heartbeat | None:
        """Take one heartbeat whose ping is overdue and that nobody else holds: its timer moves
        to now + lease meanwhile, and it gets a new attempt (the fence of `mark_missed`)."""
        query = (
            select(HeartbeatRow)
            .where(HeartbeatRow.state != "missed", HeartbeatRow.due_at <= now)
            .order_by(HeartbeatRow.due_at, HeartbeatRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        async with self._sessions.begin() as session:
            row = (await session.execute(query)).scalars().first()
            if row is None:
                return None
            row.attempt += 1
            claimed = _heartbeat(row)  # carries the time it was due
            row.due_at = now + lease
            return claimed

    async def mark_missed(self, heartbeat_id: int, *, fence: int, since: datetime) -> bool:
        """The claimed check opened its incident: the heartbeat is missed (until a ping). False
        when the claim is not `fence`'s any more (a ping came meanwhile, or it was removed)."""
        async with self._sessions.begin() as session:
            query = select(HeartbeatRow).where(HeartbeatRow.id == heartbeat_id).with_for_update()
            row = (await session.execute(query)).scalars().first()
            if row is None or row.attempt != fence:
                return False
            row.state, row.missed_since, row.attempt = "missed", since, row.attempt + 1
            return True

    # silences

    async def add_silence(
        self,
        team_id: int,
        *,
        starts_at: datetime,
        ends_at: datetime,
        matchers: Mapping[str, str],
        reason: str,
        created_by: str,
        at: datetime,
    ) -> Silence:
        async with self._sessions.begin() as session:
            row = SilenceRow(
                team_id=team_id,
                starts_at=starts_at,
                ends_at=ends_at,
                matchers=dict(matchers),
                reason=reason,
                created_by=created_by,
                source="chat",
                created_at=at,
            )
            session.add(row)
            await session.flush()
            return _silence(row)

    async def save_windows(self, team_id: int, windows: list[Window], *, at: datetime) -> None:
        """The team's windows of ONCALL_FILE, as the file says now: each is kept (by name) or
        made, and the file's windows that are no longer in it are gone."""
        async with self._sessions.begin() as session:
            query = select(SilenceRow).where(
                SilenceRow.team_id == team_id, SilenceRow.source == "file"
            )
            rows = {r.file_name: r for r in (await session.execute(query)).scalars()}
            for window in windows:
                row = rows.pop(window.name, None)
                if row is None:
                    row = SilenceRow(
                        team_id=team_id,
                        source="file",
                        file_name=window.name,
                        created_by=f"window {window.name}",
                        created_at=at,
                    )
                    session.add(row)
                row.starts_at, row.ends_at = window.starts_at, window.ends_at
                row.matchers, row.reason = dict(window.matchers), window.reason
            for stale in rows.values():
                await session.delete(stale)

    async def silence(self, silence_id: int) -> Silence | None:
        async with self._sessions() as session:
            row = await session.get(SilenceRow, silence_id)
            return _silence(row) if row else None

    async def silences(self, now: datetime, team_id: int | None = None) -> list[Silence]:
        """Silences holding now or to come, soonest first."""
        query = select(SilenceRow).where(SilenceRow.ends_at > now)
        if team_id is not None:
            query = query.where(SilenceRow.team_id == team_id)
        async with self._sessions() as session:
            rows = await session.execute(query.order_by(SilenceRow.starts_at, SilenceRow.id))
            return [_silence(r) for r in rows.scalars()]

    async def end_silence(self, silence_id: int, at: datetime) -> list[int]:
        """End a silence now. The firing incidents it held back are due at once; returns them."""
        async with self._sessions.begin() as session:
            row = await session.get(SilenceRow, silence_id, with_for_update=True)
            if row is None or row.ends_at <= at:
                return []
            row.ends_at = max(row.starts_at, at)
            query = (
                select(IncidentRow)
                .where(IncidentRow.silence_id == silence_id, IncidentRow.status == "firing")
                .with_for_update()
            )
            held = list((await session.execute(query)).scalars())
            for incident in held:
                if incident.next_action_at is None or incident.next_action_at > at:
                    incident.next_action_at = at
            return [incident.id for incident in held]


async def _heartbeat_row(
    session: AsyncSession, team_id: int, name: str, *, lock: bool = False
) -> HeartbeatRow | None:
    query = select(HeartbeatRow).where(HeartbeatRow.team_id == team_id, HeartbeatRow.name == name)
    if lock:
        query = query.with_for_update()
    return (await session.execute(query)).scalars().first()
