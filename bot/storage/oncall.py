"""Storage of contacts, teams, incidents and rings (the on-call side).

Several replicas share one PostgreSQL database. The timer's claims (a due step, a due post,
an acknowledgement running out) lock their row with `FOR UPDATE SKIP LOCKED`: a row another
replica is claiming or changing is passed over, never waited for, and whoever holds it moves
its timer on. Every other change locks and waits (it must apply). A ring is checked against
the throttles and recorded under one lock per number (a transaction-scoped advisory lock), so
two replicas ringing one person for two incidents at once cannot both pass. SQLite has one
process and one connection (bot/storage/db.py): its transactions run one at a time anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Row, Table, bindparam, delete, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from bot.oncall.schedules import Override, active
from bot.storage.db import retry_conflicts
from bot.storage.tables import ContactRow, IncidentRow, RingRow, TeamRow

TEAMS: Table = TeamRow.__table__  # type: ignore[assignment]
# Asked on every /call: on Core, built once (no ORM session, no statement rebuilt and hashed;
# bench/README.md, stop 17: call2). Read each time, not cached: another replica may change teams.
TEAM_OF_CHAT = (
    select(TEAMS).where(TEAMS.c.chat_id == bindparam("chat_id")).order_by(TEAMS.c.id).limit(1)
)
# Open: a repeat of its alert updates it. An exhausted escalation stays open (its alert is still
# firing, nobody acknowledged): a repeat says so rather than opening a new incident.
OPEN = ("firing", "acknowledged", "exhausted")
# The first key of the per-number advisory locks of rings ("call" in ASCII); the second is
# derived from the number. Two-key locks never meet the migrations' one-key lock.
RING_LOCKS = 0x63616C6C
# The reads in front of an alert's ring (and after each post), the same way: an ORM session
# costs about twice the statement (bench/README.md, stop 19).
INCIDENTS: Table = IncidentRow.__table__  # type: ignore[assignment]
CONTACTS: Table = ContactRow.__table__  # type: ignore[assignment]
RINGS: Table = RingRow.__table__  # type: ignore[assignment]
TEAM_NAMED = select(TEAMS).where(TEAMS.c.name == bindparam("name"))
TEAM_BY_ID = select(TEAMS).where(TEAMS.c.id == bindparam("id"))
CONTACT_NAMED = select(CONTACTS).where(CONTACTS.c.alias == bindparam("alias")).limit(1)
INCIDENT_BY_ID = select(INCIDENTS).where(INCIDENTS.c.id == bindparam("id"))
INCIDENT_FOR_UPDATE = (
    select(INCIDENTS).where(INCIDENTS.c.id == bindparam("incident_id")).with_for_update()
)
# the columns a change sets are its parameters' keys (compiled once per set of keys)
UPDATE_INCIDENT = INCIDENTS.update().where(INCIDENTS.c.id == bindparam("incident_id"))
INSERT_INCIDENT = INCIDENTS.insert().returning(INCIDENTS.c.id)
POSTED = UPDATE_INCIDENT.returning(*INCIDENTS.c)
INSERT_RING = RINGS.insert()
RINGS_SINCE = (
    select(RINGS.c.at)
    .where(RINGS.c.phone == bindparam("phone"), RINGS.c.at > bindparam("since"))
    .order_by(RINGS.c.at)
)
LOCK_TEAM = select(TEAMS.c.id).where(TEAMS.c.id == bindparam("team_id")).with_for_update()
RECENT = INCIDENTS.c.team_id == bindparam("team_id"), INCIDENTS.c.created_at > bindparam("since")
OWN_POSTS = select(func.count()).where(*RECENT, INCIDENTS.c.digest_id.is_(None))
DIGEST_HEAD = (
    select(INCIDENTS.c.id, INCIDENTS.c.post_next_at)
    .where(*RECENT, INCIDENTS.c.digest_id == INCIDENTS.c.id)
    .order_by(INCIDENTS.c.id.desc())
    .limit(1)
)
DIGEST_LINES = select(func.count()).where(INCIDENTS.c.digest_id == bindparam("head_id"))
# the newest: an exhausted one may be older than a firing one of the same key
OPEN_INCIDENT = (
    select(INCIDENTS)
    .where(
        INCIDENTS.c.team_id == bindparam("team_id"),
        INCIDENTS.c.dedup_key == bindparam("dedup_key"),
        INCIDENTS.c.status.in_(OPEN),
    )
    .order_by(INCIDENTS.c.id.desc())
    .limit(1)
)


@dataclass(frozen=True)
class Contact:
    alias: str
    phone: str
    phone_display: str
    telegram_id: int | None = None  # who this person is in Telegram (`/oncall take`)


@dataclass(frozen=True)
class Team:
    id: int
    name: str
    chat_id: int
    token_hash: str
    members: tuple[str, ...]
    on_call: str | None
    rotation: str
    rotation_start: datetime
    attempts_per_person: int
    wait_seconds: int
    max_rounds: int
    answer_is_ack: bool
    ack_timeout: int = 4 * 3600  # seconds; 0: an acknowledgement holds for ever
    repage_after: int = 0  # seconds after exhaustion a repeat pages again; 0: never
    layers: tuple[dict[str, object], ...] = ()  # rotation "layers": see bot/oncall/schedules.py
    overrides: tuple[Override, ...] = ()  # who covers when, oldest first
    locale: str | None = None  # what its rings speak and its post says; None: DEFAULT_LOCALE


@dataclass(frozen=True)
class Incident:
    id: int
    team_id: int
    dedup_key: str
    source: str
    title: str
    text: str
    severity: str | None
    labels: dict[str, str]
    links: tuple[str, ...]
    status: str
    fired: int
    step: int
    call_id: str | None
    next_action_at: datetime | None
    post_message_id: int | None
    acked_by: str | None
    acked_at: datetime | None
    notes: tuple[str, ...]
    created_at: datetime
    items: tuple[str, ...] = ()  # a group's first alerts, one line each
    alert_count: int = 1
    attempt: int = 0  # the fence of its step (see IncidentRow.attempt)
    ring_call_id: str | None = None  # the step's call, written ahead of its POST
    post_status: str = "posted"  # pending: the post (or its refresh) is still to be made
    post_attempts: int = 0
    post_next_at: datetime | None = None
    admins_told_at: datetime | None = None
    exhausted_at: datetime | None = None
    silence_id: int | None = None  # the silence holding its escalation back
    digest_id: int | None = None  # the digest post it is a line of (its own id: it holds it)
    digest_shown: str | None = None  # a digest's head: what its post shows (see post_done)

    @property
    def digest_head(self) -> bool:
        """Its post is a digest of the alerts past its team's share (see post_share)."""
        return self.digest_id == self.id

    @property
    def in_digest(self) -> bool:
        """It has no post of its own: its line and button are in another incident's digest."""
        return self.digest_id is not None and self.digest_id != self.id

    def shown(self) -> tuple[object, ...]:
        """What the post shows (to tell whether it changed while being posted)."""
        return (
            self.status,
            self.fired,
            self.notes,
            self.acked_by,
            self.acked_at,
            self.step,
            self.next_action_at,
        )


@dataclass(frozen=True)
class Held:
    """A ring the throttles hold back until then."""

    until: datetime


@dataclass(frozen=True)
class Claimed:
    """Steps claimed together (see claim_due), with their teams."""

    incidents: tuple[Incident, ...] = ()
    teams: dict[int, Team] = field(default_factory=dict)


@dataclass(frozen=True)
class NewIncident:
    team_id: int
    dedup_key: str
    source: str
    title: str
    text: str = ""
    severity: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    links: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    alert_count: int = 1
    notes: tuple[str, ...] = ()
    # a silence holds it: its first step waits until then
    silence_id: int | None = None
    held_until: datetime | None = None


def _contact(row: ContactRow | Row[Any]) -> Contact:
    return Contact(row.alias, row.phone, row.phone_display, row.telegram_id)


def _team(row: TeamRow | Row[Any]) -> Team:
    return Team(
        id=row.id,
        name=row.name,
        chat_id=row.chat_id,
        token_hash=row.token_hash,
        members=tuple(a for a in row.members.split() if a),
        on_call=row.on_call,
        rotation=row.rotation,
        rotation_start=row.rotation_start,
        attempts_per_person=row.attempts_per_person,
        wait_seconds=row.wait_seconds,
        max_rounds=row.max_rounds,
        answer_is_ack=row.answer_is_ack,
        ack_timeout=row.ack_timeout,
        repage_after=row.repage_after,
        layers=tuple(row.layers or ()),
        overrides=tuple(Override.from_json(o) for o in row.overrides or ()),
        locale=row.locale,
    )


def _incident(row: IncidentRow | Row[Any] | SimpleNamespace) -> Incident:
    return Incident(
        id=row.id,
        team_id=row.team_id,
        dedup_key=row.dedup_key,
        source=row.source,
        title=row.title,
        text=row.text,
        severity=row.severity,
        labels=dict(row.labels or {}),
        links=tuple(row.links or ()),
        status=row.status,
        fired=row.fired,
        step=row.step,
        call_id=row.call_id,
        next_action_at=row.next_action_at,
        post_message_id=row.post_message_id,
        acked_by=row.acked_by,
        acked_at=row.acked_at,
        notes=tuple(row.notes or ()),
        created_at=row.created_at,
        items=tuple(row.alert_items or ()),
        alert_count=row.alert_count,
        attempt=row.attempt or 0,
        ring_call_id=row.ring_call_id,
        post_status=row.post_status,
        post_attempts=row.post_attempts,
        post_next_at=row.post_next_at,
        admins_told_at=row.admins_told_at,
        exhausted_at=row.exhausted_at,
        silence_id=row.silence_id,
        digest_id=row.digest_id,
        digest_shown=row.digest_shown,
    )


class OnCallStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine = sessions.kw["bind"]

    # contacts

    async def save_contact(self, contact: Contact, *, at: datetime) -> None:
        async with self._sessions.begin() as session:
            query = select(ContactRow).where(ContactRow.alias == contact.alias)
            row = (await session.execute(query)).scalars().first()
            if row is None:
                row = ContactRow(alias=contact.alias, created_at=at)
                session.add(row)
            row.phone, row.phone_display = contact.phone, contact.phone_display
            if contact.telegram_id is not None:
                row.telegram_id = contact.telegram_id

    async def remove_contact(self, alias: str) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(delete(ContactRow).where(ContactRow.alias == alias))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def contact(self, alias: str) -> Contact | None:
        row = await self._first(CONTACT_NAMED, alias=alias)
        return _contact(row) if row is not None else None

    async def contact_of_user(self, telegram_id: int) -> Contact | None:
        """The contact who is this Telegram user, if one says so."""
        async with self._sessions() as session:
            query = select(ContactRow).where(ContactRow.telegram_id == telegram_id)
            row = (await session.execute(query.order_by(ContactRow.id))).scalars().first()
            return _contact(row) if row else None

    async def contacts_named(self, aliases: Collection[str]) -> dict[str, Contact]:
        """The contacts of these aliases (one query for a batch of steps)."""
        async with self._sessions() as session:
            query = select(ContactRow).where(ContactRow.alias.in_(list(aliases)))
            return {row.alias: _contact(row) for row in (await session.execute(query)).scalars()}

    async def contacts(self) -> list[Contact]:
        async with self._sessions() as session:
            rows = (await session.execute(select(ContactRow).order_by(ContactRow.alias))).scalars()
            return [_contact(r) for r in rows]

    # teams

    async def save_team(
        self, name: str, *, chat_id: int, token_hash: str | None, at: datetime, **fields: object
    ) -> Team:
        """Create or change a team; `fields` are TeamRow columns (members as a list)."""
        async with self._sessions.begin() as session:
            row = (
                (await session.execute(select(TeamRow).where(TeamRow.name == name)))
                .scalars()
                .first()
            )
            if row is None:
                row = TeamRow(
                    name=name,
                    chat_id=chat_id,
                    token_hash=token_hash or "",
                    rotation="none",
                    rotation_start=at,
                    attempts_per_person=2,
                    wait_seconds=300,
                    max_rounds=2,
                    answer_is_ack=False,
                    members="",
                    ack_timeout=4 * 3600,
                    repage_after=0,
                    layers=[],
                    overrides=[],
                )
                session.add(row)
            row.chat_id = chat_id
            if token_hash is not None:
                row.token_hash = token_hash
            for key, value in fields.items():
                if key == "members":
                    value = " ".join(value)  # type: ignore[arg-type]
                setattr(row, key, value)
            await session.flush()
            return _team(row)

    async def add_override(self, team_id: int, override: Override, *, at: datetime) -> Team:
        """Put `override` on top of the team's schedule; overrides already over are dropped."""
        async with self._sessions.begin() as session:
            query = select(TeamRow).where(TeamRow.id == team_id).with_for_update()
            row = (await session.execute(query)).scalars().one()
            kept = active((Override.from_json(o) for o in row.overrides or ()), at)
            row.overrides = [o.as_json() for o in (*kept, override)]
            await session.flush()
            return _team(row)

    async def team(self, name: str) -> Team | None:
        row = await self._first(TEAM_NAMED, name=name)
        return _team(row) if row is not None else None

    async def team_by_id(self, team_id: int) -> Team | None:
        row = await self._first(TEAM_BY_ID, id=team_id)
        return _team(row) if row is not None else None

    async def team_of_chat(self, chat_id: int) -> Team | None:
        row = await self._first(TEAM_OF_CHAT, chat_id=chat_id)
        return _team(row) if row is not None else None

    async def _first(self, statement: Any, **params: Any) -> Row[Any] | None:
        """The first row of a read built once at import (on Core: no ORM session)."""
        async with self._engine.connect() as connection:
            return (await connection.execute(statement, params)).first()

    async def teams(self) -> list[Team]:
        async with self._sessions() as session:
            return [
                _team(r)
                for r in (await session.execute(select(TeamRow).order_by(TeamRow.name))).scalars()
            ]

    # incidents

    async def open_incident(self, team_id: int, dedup_key: str) -> Incident | None:
        row = await self._first(OPEN_INCIDENT, team_id=team_id, dedup_key=dedup_key)
        return _incident(row) if row is not None else None

    @retry_conflicts  # replicas taking a storm: a digest head held by a post (see the test)
    async def create_incident(
        self,
        new: NewIncident,
        *,
        at: datetime,
        claim: timedelta | None = None,
        share: PostShare | None = None,
    ) -> Incident:
        """A new firing incident, its first step due now. With `claim` (a lease), the caller
        takes that step at once, as `claim_due` would have: the timer passes over it until the
        lease runs out (a crash before the ring retakes it then). With `share`, an incident
        past its team's share of posts in a minute goes into the team's digest post."""
        due = new.held_until or at
        values: dict[str, Any] = {
            "team_id": new.team_id,
            "dedup_key": new.dedup_key,
            "source": new.source,
            "title": new.title,
            "text": new.text,
            "severity": new.severity,
            "labels": new.labels,
            "links": list(new.links),
            "status": "firing",
            "fired": 1,
            "step": 0,
            # inserted claimed (the lease), so no second statement stores it
            "next_action_at": at + claim if claim else due,
            "notes": list(new.notes),
            "created_at": at,
            "updated_at": at,
            "alert_items": list(new.items),
            "alert_count": new.alert_count,
            "post_status": "pending",
            "post_attempts": 0,
            "post_next_at": at,
            "silence_id": new.silence_id,
            "attempt": 1 if claim else 0,
        }
        # On Core, in front of the alert's ring (as begin_ring)
        async with self._engine.begin() as connection:
            head = False
            if share is not None:  # before the insert, whose key lock on the team would deadlock
                await connection.execute(LOCK_TEAM, {"team_id": new.team_id})
                digest, head = await _digest_of_new(connection, new.team_id, share, at)
                values |= digest
            incident_id = (await connection.execute(INSERT_INCIDENT, values)).scalar_one()
            if head:  # its post is the new digest (its own id)
                values["digest_id"] = incident_id
                digest_id = {"incident_id": incident_id, "digest_id": incident_id}
                await connection.execute(UPDATE_INCIDENT, digest_id)
        row = SimpleNamespace(**(dict.fromkeys(INCIDENTS.c.keys()) | values | {"id": incident_id}))
        return replace(_incident(row), next_action_at=due)  # when its first step was due

    async def incident(self, incident_id: int) -> Incident | None:
        row = await self._first(INCIDENT_BY_ID, id=incident_id)
        return _incident(row) if row is not None else None

    async def incident_of_call(self, call_id: str) -> Incident | None:
        async with self._sessions() as session:
            match = or_(IncidentRow.call_id == call_id, IncidentRow.ring_call_id == call_id)
            query = select(IncidentRow).where(match)
            row = (await session.execute(query)).scalars().first()
            return _incident(row) if row else None

    async def due(self, now: datetime, limit: int = 100) -> list[int]:
        async with self._sessions() as session:
            query = (
                select(IncidentRow.id)
                .where(IncidentRow.status == "firing", IncidentRow.next_action_at <= now)
                .order_by(IncidentRow.next_action_at)
                .limit(limit)
            )
            return list((await session.execute(query)).scalars())

    async def open_summary(self, now: datetime) -> tuple[dict[str, int], float]:
        """Open incidents by state, and the seconds the oldest overdue step is late (0: none):
        two indexed aggregates, cheap enough for every metrics scrape."""
        async with self._sessions() as session:
            counts = await session.execute(
                select(IncidentRow.status, func.count())
                .where(IncidentRow.status.in_(OPEN))
                .group_by(IncidentRow.status)
            )
            oldest = await session.scalar(
                select(func.min(IncidentRow.next_action_at)).where(
                    IncidentRow.status == "firing", IncidentRow.next_action_at <= now
                )
            )
        by_state = {status: int(count) for status, count in counts.all()}
        lag = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        return by_state, lag

    async def next_due_at(self) -> datetime | None:
        """The earliest timer: a step, an acknowledgement running out, or a post to retry."""
        async with self._sessions() as session:
            query = (
                select(IncidentRow.next_action_at)
                .where(
                    IncidentRow.status.in_(("firing", "acknowledged")),
                    IncidentRow.next_action_at.is_not(None),
                )
                .order_by(IncidentRow.next_action_at)
                .limit(1)
            )
            step = (await session.execute(query)).scalars().first()
            query = (
                select(IncidentRow.post_next_at)
                .where(IncidentRow.post_status == "pending", IncidentRow.post_next_at.is_not(None))
                .order_by(IncidentRow.post_next_at)
                .limit(1)
            )
            post = (await session.execute(query)).scalars().first()
            return min((t for t in (step, post) if t is not None), default=None)

    async def acks_expired(self, now: datetime, limit: int = 100) -> list[int]:
        """Acknowledged incidents whose acknowledgement ran out (their timer is due)."""
        async with self._sessions() as session:
            query = (
                select(IncidentRow.id)
                .where(IncidentRow.status == "acknowledged", IncidentRow.next_action_at <= now)
                .order_by(IncidentRow.next_action_at)
                .limit(limit)
            )
            return list((await session.execute(query)).scalars())

    async def restart_escalation(
        self,
        incident_id: int,
        *,
        at: datetime,
        expected: str,
        note: str,
        skip_locked: bool = False,
        **fields: object,
    ) -> Incident | None:
        """Fire again from the first step: only if the incident is still `expected` (and, when
        acknowledged, its acknowledgement ran out). The post is to be refreshed. With
        skip_locked (the timer), an incident another transaction holds is left to it."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id, skip_locked=skip_locked)
            if row is None or row.status != expected:
                return None
            if expected == "acknowledged" and (
                row.next_action_at is None or row.next_action_at > at
            ):
                return None
            row.status, row.step, row.call_id, row.next_action_at = "firing", 0, None, at
            row.acked_by = row.acked_at = row.exhausted_at = None
            # a ring left from before the acknowledgement is not this escalation's: a new one
            # starts, with a new fence
            row.ring_call_id = None
            row.attempt = (row.attempt or 0) + 1
            row.post_status, row.post_next_at = "pending", at
            for key, value in fields.items():
                setattr(row, key, value)
            row.notes = [*(row.notes or []), note][-12:]
            row.updated_at = at
            return _incident(row)

    # the post (an outbox step of its own)

    async def posts_due(self, now: datetime, limit: int = 100) -> list[int]:
        async with self._sessions() as session:
            query = (
                select(IncidentRow.id)
                .where(IncidentRow.post_status == "pending", IncidentRow.post_next_at <= now)
                .order_by(IncidentRow.post_next_at)
                .limit(limit)
            )
            return list((await session.execute(query)).scalars())

    async def claim_post(
        self, incident_id: int, now: datetime, lease: timedelta, *, skip_locked: bool = False
    ) -> Incident | None:
        """Take a due post: its retry moves to now + lease meanwhile (a crash retries it). With
        skip_locked (the timer), a post another transaction holds is left to it. An incident in
        a digest has no post: when the status its line shows changed, the digest is due, and
        taken instead."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id, skip_locked=skip_locked)
            if row is not None and row.digest_id not in (None, row.id):
                row = await _digest_due(session, row, now, skip_locked=skip_locked)
            if row is None or row.post_status != "pending" or row.post_next_at is None:
                return None
            if row.post_next_at > now:
                return None
            claimed = _incident(row)
            row.post_next_at = now + lease
            return claimed

    async def post_done(
        self, incident_id: int, message_id: int, *, shown: str | None = None
    ) -> Incident | None:
        """The post was made; `shown`: a digest's fingerprint of the lines it shows. One
        `UPDATE … RETURNING` on Core (the update takes the row's lock itself)."""
        values = {
            "incident_id": incident_id,
            "post_message_id": message_id,
            "post_status": "posted",
            "post_attempts": 0,
            "post_next_at": None,
        }
        if shown is not None:
            values["digest_shown"] = shown
        async with self._engine.begin() as connection:
            row = (await connection.execute(POSTED, values)).first()
            return _incident(row) if row is not None else None

    async def digest_lines(self, head_id: int) -> list[Incident]:
        """The incidents a digest post lists, oldest first (its head among them)."""
        async with self._sessions() as session:
            query = select(IncidentRow).where(IncidentRow.digest_id == head_id)
            rows = (await session.execute(query.order_by(IncidentRow.id))).scalars()
            return [_incident(row) for row in rows]

    async def post_failed(
        self, incident_id: int, *, attempts: int, retry_at: datetime | None
    ) -> None:
        """Count a failed post; `retry_at` None: given up (it stays pending, never due)."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is not None and row.post_status == "pending":
                row.post_attempts, row.post_next_at = attempts, retry_at

    async def mark_admins_told(self, incident_id: int, at: datetime) -> None:
        """The admins were told that the incident's chat is unreachable (once per incident)."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is not None and row.admins_told_at is None:
                row.admins_told_at = at

    async def claim_due(
        self, now: datetime, lease: timedelta, *, limit: int, skip: Collection[int] = ()
    ) -> Claimed:
        """Take up to `limit` due steps (firing, due, not in `skip`, most overdue first) that
        nobody else holds, in one transaction. Each one's timer moves to now + lease, so nobody
        else takes it meanwhile (and a crash mid-step retries it after the lease), and it gets
        a new attempt: the fence its result is committed with. Their teams are read in the same
        transaction (a step needs its team before it rings)."""
        query = select(IncidentRow).where(
            IncidentRow.status == "firing", IncidentRow.next_action_at <= now
        )
        if skip:
            query = query.where(IncidentRow.id.not_in(list(skip)))
        query = query.order_by(IncidentRow.next_action_at, IncidentRow.id).limit(limit)
        async with self._sessions.begin() as session:
            rows = (await session.execute(query.with_for_update(skip_locked=True))).scalars()
            claimed = []
            for row in rows.all():
                row.attempt = (row.attempt or 0) + 1
                claimed.append(_incident(row))  # carries the time the step was due
                row.next_action_at = now + lease
            if not claimed:
                return Claimed()
            team_ids = {incident.team_id for incident in claimed}
            found = await session.execute(select(TeamRow).where(TeamRow.id.in_(team_ids)))
            return Claimed(tuple(claimed), {row.id: _team(row) for row in found.scalars()})

    async def renew(self, incident_id: int, attempt: int, until: datetime) -> bool:
        """Extend the lease of a step still held by `attempt` (False: it is not any more)."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is None or row.status != "firing" or row.attempt != attempt:
                return False
            row.next_action_at = until
            return True

    async def update_incident(
        self,
        incident_id: int,
        *,
        at: datetime,
        note: str | None = None,
        only_if_firing: bool = False,
        fence: int | None = None,
        repost: bool = False,
        **fields: object,
    ) -> tuple[Incident | None, bool]:
        """Change an incident (and add a note). With only_if_firing, an incident that was
        acknowledged or resolved meanwhile is left alone: a stopped escalation stays stopped.
        With a fence, only the attempt that claimed the step may commit its result, and the
        commit ends that claim. With repost, its post is to be refreshed (due now, unless a
        retry is already due)."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is None:
                return None, False
            if only_if_firing and row.status != "firing":
                return _incident(row), False
            if fence is not None:
                if row.attempt != fence:
                    return _incident(row), False
                row.attempt += 1
            for key, value in fields.items():
                setattr(row, key, value)
            if note:
                row.notes = [*(row.notes or []), note][-12:]
            if repost:
                _repost(row, at)
            row.updated_at = at
            return _incident(row), True

    # a step's ring, written ahead of its POST

    async def begin_ring(
        self,
        incident_id: int,
        *,
        fence: int,
        call_id: str,
        phone: str,
        at: datetime,
        note: str,
        held: Callable[[list[datetime]], datetime | None] = lambda _rings: None,
        window: timedelta = timedelta(0),
    ) -> Incident | Held | None:
        """Before the POST: the step's call is stored on the incident and counted as a ring
        (its outcome unknown until the POST answers). None when the step is not this
        attempt's any more (taken again, acknowledged, resolved): then nothing may be rung.

        The throttles are checked again here, under the number's lock, with the number's rings
        of the last `window`: `held(rings)` says until when the ring is held back (Held, and
        nothing is recorded), or None. Whoever records a ring of the number first wins."""
        # On Core, right before the POST: an ORM flush of the same three statements costs
        # about twice their time (bench/README.md, stop 19).
        async with self._engine.begin() as connection:
            locked = await connection.execute(INCIDENT_FOR_UPDATE, {"incident_id": incident_id})
            row = locked.first()
            if row is None or row.status != "firing" or row.attempt != fence:
                return None
            await _lock_number(connection, phone)
            # no throttles, no window: nothing can hold the ring
            rings = await _rings_since(connection, phone, at - window) if window else []
            if (until := held(rings)) is not None:
                return Held(until)
            values = {
                "ring_call_id": call_id,
                "notes": [*(row.notes or []), note][-12:],
                **_reposted(row, at),
                "updated_at": at,
            }
            await connection.execute(UPDATE_INCIDENT, {"incident_id": incident_id, **values})
            await connection.execute(INSERT_RING, {"phone": phone, "at": at, "call_id": call_id})
            return _incident(SimpleNamespace(**(row._asdict() | values)))

    async def end_ring(
        self, incident_id: int, ring: str, *, at: datetime, note: str | None, **fields: object
    ) -> tuple[Incident | None, bool]:
        """The written-ahead ring (its call id) is settled (placed, refused, or its outcome
        unknown): `fields` are applied once, only while it is still the incident's ring in
        flight and the incident still fires. Ends the claim of its step."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is None:
                return None, False
            if row.status != "firing" or row.ring_call_id != ring:
                return _incident(row), False
            self._settle(row, at, note, fields)
            return _incident(row), True

    async def forget_ring(self, incident_id: int, call_id: str, *, fence: int) -> Incident | None:
        """The written-ahead ring `call_id` was never placed: the step (still claimed by
        `fence`) is to be rung after all. None when the step is not that attempt's."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is None or row.status != "firing" or row.attempt != fence:
                return None
            if row.ring_call_id == call_id:
                row.ring_call_id = None
            await session.execute(delete(RingRow).where(RingRow.call_id == call_id))
            return _incident(row)

    async def ring_ended(
        self, incident_id: int, call_id: str, *, at: datetime, note: str
    ) -> tuple[Incident | None, bool]:
        """Call `call_id` ended unanswered: the next step is due at once, whether the step
        that rang was settled already or its ring is still in flight (an end event can
        outrun the answer to the POST)."""
        async with self._sessions.begin() as session:
            row = await self._locked(session, incident_id)
            if row is None:
                return None, False
            if row.status != "firing":
                return _incident(row), False
            if row.ring_call_id == call_id:
                fields = {"step": row.step + 1, "call_id": call_id, "next_action_at": at}
                self._settle(row, at, note, fields)
            elif row.call_id == call_id:
                # Its step was settled and waits its wait_seconds: the next one is due now. A
                # step already running meanwhile keeps its fence and its ring in flight (it
                # renews its lease over this timer).
                row.next_action_at = at
                row.notes = [*(row.notes or []), note][-12:]
                _repost(row, at)
                row.updated_at = at
            else:
                return _incident(row), False  # a call of an earlier step
            return _incident(row), True

    @staticmethod
    def _settle(
        row: IncidentRow, at: datetime, note: str | None, fields: dict[str, object]
    ) -> None:
        for key, value in fields.items():
            setattr(row, key, value)
        row.ring_call_id = None
        row.attempt = (row.attempt or 0) + 1  # whoever held the step holds it no longer
        if note:
            row.notes = [*(row.notes or []), note][-12:]
        _repost(row, at)
        row.updated_at = at

    @staticmethod
    async def _locked(
        session: AsyncSession, incident_id: int, *, skip_locked: bool = False
    ) -> IncidentRow | None:
        """The incident, locked until the transaction ends; with skip_locked, None when another
        transaction holds it (PostgreSQL; SQLite has no row locks and one connection)."""
        query = select(IncidentRow).where(IncidentRow.id == incident_id)
        query = query.with_for_update(skip_locked=skip_locked)
        return (await session.execute(query)).scalars().first()

    # rings (throttles)

    async def add_ring(self, phone: str, at: datetime) -> None:
        async with self._sessions.begin() as session:
            session.add(RingRow(phone=phone, at=at))

    async def drop_ring(self, call_id: str) -> None:
        """A ring that was never placed does not count against the throttles."""
        async with self._sessions.begin() as session:
            await session.execute(delete(RingRow).where(RingRow.call_id == call_id))

    async def rings_since(self, phone: str, since: datetime) -> list[datetime]:
        async with self._sessions() as session:
            return await _rings_since(session, phone, since)

    async def has_open_incidents(self, team_id: int) -> bool:
        async with self._sessions() as session:
            query = select(IncidentRow.id).where(
                IncidentRow.team_id == team_id, IncidentRow.status.in_(OPEN)
            )
            return (await session.execute(query.limit(1))).first() is not None


@dataclass(frozen=True)
class PostShare:
    """Posts a team's chat gets in a minute: `posts` incidents get their own, the rest of the
    minute's are lines of a digest post, at most `lines` per digest (a new one past that)."""

    posts: int
    lines: int = 30
    window: timedelta = timedelta(minutes=1)
    gather: timedelta = timedelta(seconds=3)  # a digest is posted or edited at most this often


async def _digest_of_new(
    connection: AsyncConnection, team_id: int, share: PostShare, at: datetime
) -> tuple[dict[str, Any], bool]:
    """Before a new incident's insert: past its team's share of posts in the last minute, it
    becomes a line of the team's open digest (started within the minute, not full), or starts
    one (its post is the digest, made once its first lines gathered). Returns the fields that
    say so (none: it has a post of its own) and whether it starts a digest. Counted under the
    team's row lock (taken by the caller), so replicas taking a storm together keep to one
    share."""
    recent = {"team_id": team_id, "since": at - share.window}
    if (await connection.scalar(OWN_POSTS, recent) or 0) < share.posts:
        return {}, False
    head = (await connection.execute(DIGEST_HEAD, recent)).first()
    if (
        head is not None
        and (await connection.scalar(DIGEST_LINES, {"head_id": head.id}) or 0) < share.lines
    ):
        # lines joining within `gather` of each other cost one edit together
        due = head.post_next_at or at + share.gather
        refresh = {"incident_id": head.id, "post_status": "pending", "post_next_at": due}
        await connection.execute(UPDATE_INCIDENT, refresh)
        line = {
            "digest_id": head.id,
            "digest_shown": "firing",
            "post_status": "digest",
            "post_next_at": None,
        }
        return line, False
    return {"post_next_at": at + share.gather}, True


async def _digest_due(
    session: AsyncSession, row: IncidentRow, now: datetime, *, skip_locked: bool
) -> IncidentRow | None:
    """A line of a digest changed: its own post stays unmade; when its status is not the one
    its line shows, the digest's post is due. Returns the digest's head, locked."""
    row.post_status, row.post_next_at = "digest", None
    if row.digest_shown == row.status:
        return None
    head = await OnCallStore._locked(session, row.digest_id or 0, skip_locked=skip_locked)
    if head is not None:  # else whoever holds it sees the change (see OnCall._publish)
        row.digest_shown = row.status
        _repost(head, now)
    return head


async def _rings_since(
    session: AsyncSession | AsyncConnection, phone: str, since: datetime
) -> list[datetime]:
    return list((await session.execute(RINGS_SINCE, {"phone": phone, "since": since})).scalars())


async def _lock_number(session: AsyncSession | AsyncConnection, phone: str) -> None:
    """Hold the number's ring lock until the transaction ends (PostgreSQL; on SQLite the one
    connection already runs one transaction at a time)."""
    bind = session if isinstance(session, AsyncConnection) else session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(phone.encode()).digest()[:4], "big", signed=True)
    statement = text("SELECT pg_advisory_xact_lock(:space, :key)")
    await session.execute(statement, {"space": RING_LOCKS, "key": key})


def _reposted(row: IncidentRow | Row[Any], at: datetime) -> dict[str, Any]:
    """The incident changed: its post is to be refreshed (due now, unless a retry is due)."""
    return {"post_status": "pending", "post_next_at": row.post_next_at or at}


def _repost(row: IncidentRow, at: datetime) -> None:
    for key, value in _reposted(row, at).items():
        setattr(row, key, value)
