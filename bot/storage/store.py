"""The one place that reads and writes the database (services get plain records back)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from importlib import import_module
from typing import Any

from sqlalchemy import Row, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from bot import states
from bot.storage.tables import (
    AuditRow,
    CallRow,
    DeliveryRow,
    PermissionRequestRow,
    StatusRow,
    fit,
)

log = logging.getLogger(__name__)
# The /call path's statements run on SQLAlchemy Core (no ORM session, identity map or flush):
# that machinery was most of a /call's CPU (bench/README.md).
CALLS: Table = CallRow.__table__  # type: ignore[assignment]
STATUSES: Table = StatusRow.__table__  # type: ignore[assignment]
AUDIT: Table = AuditRow.__table__  # type: ignore[assignment]
# what call_started changes
DELIVERIES: Table = DeliveryRow.__table__  # type: ignore[assignment]
DELIVERY_KEY_WIDTH = 256  # DeliveryRow.key
# what a status update changes
APPLIED_COLUMNS = (
    "status",
    "updated_at",
    "connected_at",
    "ended_at",
    "duration_seconds",
    "error_code",
)
STARTED_COLUMNS = (
    "pilot_call_id",
    "external_call_id",
    "status",
    "updated_at",
    "connected_at",
    "ended_at",
)
# The /call path's statements, built once: a statement object keeps its cache key, so a /call
# neither builds its expressions nor hashes them again (bench/README.md, stop 17).
INSERT_CALL = insert(CALLS)
INSERT_STATUS = insert(STATUSES)
INSERT_AUDIT = insert(AUDIT)
CALL_FOR_UPDATE = select(CALLS).where(CALLS.c.id == bindparam("call_id")).with_for_update()
UPDATE_CALL = update(CALLS).where(CALLS.c.id == bindparam("call_id"))
SET_MESSAGE = (
    update(CALLS)
    .where(CALLS.c.id == bindparam("call_id"))
    .values(message_id=bindparam("new_message_id"))
    .returning(*CALLS.c)
)
CALL_BY_REQUEST = select(CALLS).where(CALLS.c.request_key == bindparam("request_key"))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Unstorable(ValueError):
    """The database refused a delivery's values (out of a column's range, say): storing it again
    cannot succeed. `str(err)` is a short reason without the values."""


def _transient(err: Exception) -> bool:
    """A failure of the database itself (connection, lock, timeout), not of these values."""
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, OperationalError | InterfaceError | ConnectionError | TimeoutError)


@dataclass(frozen=True)
class StatusChange:
    status: str
    at: datetime
    source: str


@dataclass(frozen=True)
class Audit:
    """An audit entry written in the same transaction as the change it records."""

    action: str
    actor_id: int | None = None
    detail: dict[str, object] | None = None

    def values(self, chat_id: int, call_id: str, at: datetime) -> dict[str, Any]:
        """Its audit row's columns, for the call it records."""
        return {
            "at": at,
            "actor_id": self.actor_id,
            "chat_id": chat_id,
            "action": self.action,
            "subject": call_id,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class StatusUpdate:
    pilot_ref: str  # Pilot's call id or the external (wacid) id
    status: str
    at: datetime
    source: str
    duration_seconds: int | None = None
    error_code: str | None = None


@dataclass(frozen=True)
class NewCall:
    id: str
    operator_id: int
    operator_name: str | None
    chat_id: int
    number_type: str
    phone: str
    phone_display: str
    masked: bool
    locale: str
    note: str | None = None
    message_id: int | None = None
    spoken: bool = False
    request_key: str | None = None  # the Telegram message of a direct /call


@dataclass(frozen=True)
class CallRecord:
    id: str
    pilot_call_id: str | None
    external_call_id: str | None
    operator_id: int
    operator_name: str | None
    chat_id: int
    message_id: int | None
    number_type: str
    phone: str
    phone_display: str
    masked: bool
    locale: str
    note: str | None
    status: str
    error_code: str | None
    duration_seconds: int | None
    created_at: datetime
    updated_at: datetime
    connected_at: datetime | None
    ended_at: datetime | None
    history: tuple[StatusChange, ...] = ()
    spoken: bool = False

    @property
    def terminal(self) -> bool:
        return states.is_terminal(self.status)


Applied = list[tuple[CallRecord | None, bool]] | None  # None: a delivery applied before


@dataclass(frozen=True)
class PermissionRequestRecord:
    id: int
    phone: str
    phone_display: str
    masked: bool
    operator_id: int
    chat_id: int
    locale: str
    status: str
    requested_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    actor_id: int | None
    chat_id: int | None
    action: str
    subject: str | None
    detail: dict[str, object] | None


def _record(row: CallRow | Row[Any], history: bool = False) -> CallRecord:
    """From an ORM row, or a Core row of the calls table (attributes by column name)."""
    return CallRecord(
        id=row.id,
        pilot_call_id=row.pilot_call_id,
        external_call_id=row.external_call_id,
        operator_id=row.operator_id,
        operator_name=row.operator_name,
        chat_id=row.chat_id,
        message_id=row.message_id,
        number_type=row.number_type,
        phone=row.phone,
        phone_display=row.phone_display,
        masked=row.masked,
        locale=row.locale,
        note=row.note,
        spoken=row.spoken,
        status=row.status,
        error_code=row.error_code,
        duration_seconds=row.duration_seconds,
        created_at=row.created_at,
        updated_at=row.updated_at,
        connected_at=row.connected_at,
        ended_at=row.ended_at,
        history=tuple(StatusChange(h.status, h.at, h.source) for h in row.history)
        if history
        else (),
    )


class Store:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine = sessions.kw["bind"]

    # calls

    async def create_call(
        self, new: NewCall, *, at: datetime | None = None, audit: Audit | None = None
    ) -> CallRecord:
        """Write ahead: the attempt exists before the API is asked (one transaction, with its
        first status and its audit entry)."""
        now = at or utcnow()
        given = {f.name: getattr(new, f.name) for f in fields(NewCall) if f.name != "request_key"}
        record = CallRecord(
            **given,
            pilot_call_id=None,
            external_call_id=None,
            status=states.PENDING,
            error_code=None,
            duration_seconds=None,
            created_at=now,
            updated_at=now,
            connected_at=None,
            ended_at=None,
            history=(StatusChange(states.PENDING, now, "bot"),),
        )
        values = {column.key: getattr(record, column.key, None) for column in CALLS.c}
        async with self._engine.begin() as connection:
            await connection.execute(INSERT_CALL, {**values, "request_key": new.request_key})
            await connection.execute(
                INSERT_STATUS,
                {"call_id": new.id, "status": states.PENDING, "at": now, "source": "bot"},
            )
            await self._audit_core(connection, audit, new.chat_id, new.id, now)
        return record

    async def call_started(
        self,
        call_id: str,
        *,
        pilot_call_id: str,
        external_call_id: str | None,
        status: str,
        source: str = "api",
        at: datetime | None = None,
        audit: Audit | None = None,
    ) -> CallRecord:
        now = at or utcnow()
        async with self._engine.begin() as connection:
            found = (await connection.execute(CALL_FOR_UPDATE, {"call_id": call_id})).first()
            if found is None:
                raise KeyError(call_id)
            row = CallRow(**found._mapping)  # transient: changed here, written by one UPDATE
            row.pilot_call_id = pilot_call_id
            row.external_call_id = external_call_id
            changes = [self._step(row, status, now, source)]
            if row.status in (states.PENDING, states.UNKNOWN_OUTCOME):
                changes.append(self._step(row, "INITIATED", now, source))
            written = {name: getattr(row, name) for name in STARTED_COLUMNS}
            await connection.execute(UPDATE_CALL, {"call_id": call_id, **written})
            history = [c for c in changes if c is not None]
            if history:
                await connection.execute(INSERT_STATUS, history)
            await self._audit_core(connection, audit, row.chat_id, row.id, now)
            return _record(row)

    @staticmethod
    async def _audit_core(
        connection: AsyncConnection,
        audit: Audit | None,
        chat_id: int,
        call_id: str,
        at: datetime,
    ) -> None:
        if audit is not None:
            await connection.execute(INSERT_AUDIT, audit.values(chat_id, call_id, at))

    async def call_failed(
        self,
        call_id: str,
        *,
        error_code: str,
        status: str = states.NOT_STARTED,
        at: datetime | None = None,
        audit: Audit | None = None,
    ) -> CallRecord:
        now = at or utcnow()
        async with self._sessions.begin() as session:
            row = await self._lock(session, CallRow.id == call_id)
            if row is None:
                raise KeyError(call_id)
            if self._advance(session, row, status, now, "api"):
                row.error_code = error_code
            self._audit_row(session, audit, row, now)
            return _record(row)

    @staticmethod
    def _audit_row(session: AsyncSession, audit: Audit | None, row: CallRow, at: datetime) -> None:
        if audit is not None:
            session.add(AuditRow(**audit.values(row.chat_id, row.id, at)))

    async def set_message(self, call_id: str, message_id: int) -> CallRecord | None:
        """The message that follows the call; returns the call as it is now.

        Locked (the UPDATE takes the row): a webhook stored meanwhile either sees this message
        id (and edits it) or is seen here (and the caller shows it) — read unlocked, both could
        miss each other."""
        async with self._engine.begin() as connection:
            values = {"call_id": call_id, "new_message_id": message_id}
            row = (await connection.execute(SET_MESSAGE, values)).first()
            return _record(row) if row is not None else None

    async def apply_delivery(
        self, key: str, updates: list[StatusUpdate], *, at: datetime | None = None
    ) -> list[tuple[CallRecord | None, bool]] | None:
        """A webhook delivery in one transaction: None when its key was applied before;
        otherwise (record, changed) per update, as apply_status gives."""
        [result] = await self.apply_deliveries([(key, updates)], at=at)
        if isinstance(result, Unstorable):
            raise result
        return result

    async def apply_deliveries(
        self, batch: list[tuple[str, list[StatusUpdate]]], *, at: datetime | None = None
    ) -> list[Applied | Unstorable]:
        """Several deliveries in one transaction (group commit), each applied at most once.

        When the transaction fails for anything but the database itself, the deliveries are
        applied one per transaction: a delivery the database refuses comes back as `Unstorable`
        and does not fail the others. A failure of the database itself is raised for all.
        """
        when = at or utcnow()
        if len(batch) > 1:
            try:
                return list(await self._apply_deliveries(batch, when))
            except Exception as err:
                if _transient(err):
                    raise
        return [await self._apply_alone(item, when) for item in batch]

    async def _apply_alone(
        self, item: tuple[str, list[StatusUpdate]], at: datetime
    ) -> Applied | Unstorable:
        try:
            [result] = await self._apply_deliveries([item], at)
        except IntegrityError:
            return None  # the same delivery, applied concurrently elsewhere
        except Exception as err:
            if _transient(err):
                raise
            log.warning("delivery %s cannot be stored: %s", item[0], type(err).__name__)
            return Unstorable("the database refused a value of this delivery")
        return result

    async def _apply_deliveries(
        self, batch: list[tuple[str, list[StatusUpdate]]], at: datetime
    ) -> list[Applied]:
        """On Core, a fixed number of statements whatever the batch's size (on SQLite each is
        several hops to aiosqlite's thread): the keys recorded (a key recorded before is a
        replay), the calls locked, their changes written, their history added."""
        async with self._engine.begin() as connection:
            fresh = await self._record_keys(connection, [key for key, _ in batch], at)
            new = []
            for key, _ in batch:
                stored = fit(key, DELIVERY_KEY_WIDTH, key=True)
                new.append(stored in fresh)
                fresh.discard(stored)  # the same key twice in one batch: applied once
            updates = [u for (_, items), n in zip(batch, new, strict=True) if n for u in items]
            changes = iter(await self._apply_updates(connection, updates))
            return [
                [next(changes) for _ in items] if n else None
                for (_, items), n in zip(batch, new, strict=True)
            ]

    @staticmethod
    async def _record_keys(connection: AsyncConnection, keys: list[str], at: datetime) -> set[str]:
        """Record delivery keys; the ones not recorded before (as stored: long keys are cut).
        One INSERT … ON CONFLICT DO NOTHING RETURNING: a key another transaction is recording
        waits for it, then counts as recorded before if that one committed."""
        if not keys:
            return set()
        dialect = connection.dialect.name
        module = import_module(f"sqlalchemy.dialects.{dialect}")  # sqlite or postgresql
        rows = [{"key": key, "received_at": at} for key in sorted(set(keys))]  # one lock order
        query = module.insert(DELIVERIES).values(rows).on_conflict_do_nothing()
        return set((await connection.execute(query.returning(DELIVERIES.c.key))).scalars())

    async def _apply_updates(
        self, connection: AsyncConnection, updates: list[StatusUpdate]
    ) -> list[tuple[CallRecord | None, bool]]:
        """Status updates in order, each (record, changed) as apply_status gives; the calls they
        name are locked in one query and written back by one UPDATE per batch."""
        refs = {item.pilot_ref for item in updates}
        if not refs:
            return []
        query = (
            select(CALLS)
            .where(or_(CALLS.c.pilot_call_id.in_(refs), CALLS.c.external_call_id.in_(refs)))
            .with_for_update()
        )
        rows: dict[str, CallRow] = {}
        for found in await connection.execute(query):
            locked = CallRow(**found._mapping)  # transient: changed here, written by one UPDATE
            for ref in (locked.pilot_call_id, locked.external_call_id):
                if ref in refs:
                    rows[ref] = locked
        results: list[tuple[CallRecord | None, bool]] = []
        history: list[dict[str, Any]] = []
        changed_rows: dict[str, CallRow] = {}
        for item in updates:
            row = rows.get(item.pilot_ref)
            record, changed = self._change(row, item, history)
            if row is not None and changed:
                changed_rows[row.id] = row
            results.append((record, changed))
        if changed_rows:
            written = [
                {"_id": row.id, **{name: getattr(row, name) for name in APPLIED_COLUMNS}}
                for row in changed_rows.values()
            ]
            values: dict[str, Any] = {name: bindparam(name) for name in APPLIED_COLUMNS}
            write = update(CALLS).where(CALLS.c.id == bindparam("_id")).values(values)
            await connection.execute(write, written)
        if history:
            await connection.execute(insert(STATUSES), history)
        return results

    async def apply_status(
        self,
        pilot_ref: str,
        status: str,
        *,
        at: datetime,
        source: str,
        duration_seconds: int | None = None,
        error_code: str | None = None,
    ) -> tuple[CallRecord | None, bool]:
        """Apply an event for a Pilot call id (or external id). Returns (record, changed).

        Out-of-order events are harmless: a status never moves backwards, and a terminal status
        is final, though a late duration still fills in.
        """
        update = StatusUpdate(pilot_ref, status, at, source, duration_seconds, error_code)
        async with self._engine.begin() as connection:
            [result] = await self._apply_updates(connection, [update])
            return result

    def _change(
        self, row: CallRow | None, update: StatusUpdate, history: list[dict[str, Any]]
    ) -> tuple[CallRecord | None, bool]:
        """Move a (transient) row by one update; its history entry, if any, goes to `history`."""
        if row is None:
            return None, False
        step = self._step(row, update.status, update.at, update.source)
        if step is not None:
            history.append(step)
        changed = step is not None
        duration = update.duration_seconds
        if duration is not None and row.duration_seconds != duration:
            row.duration_seconds = duration
            changed = True
        if update.error_code and changed and row.error_code is None:
            row.error_code = update.error_code
        if changed:
            row.updated_at = max(row.updated_at, update.at)
        return _record(row), changed

    @classmethod
    def _advance(
        cls, session: AsyncSession, row: CallRow, status: str, at: datetime, source: str
    ) -> bool:
        step = cls._step(row, status, at, source)
        if step is None:
            return False
        session.add(StatusRow(**step))
        return True

    @staticmethod
    def _step(row: CallRow, status: str, at: datetime, source: str) -> dict[str, Any] | None:
        """Move the row to `status` if that advances it; the history entry to add, if so."""
        if not states.advances(row.status, status):
            return None
        row.status = status
        row.updated_at = max(row.updated_at, at)
        if status == "ACCEPTED" and row.connected_at is None:
            row.connected_at = at
        if states.is_terminal(status):
            row.ended_at = at
        return {"call_id": row.id, "status": status, "at": at, "source": source}

    async def _lock(self, session: AsyncSession, where: object) -> CallRow | None:
        # FOR UPDATE on PostgreSQL serializes concurrent events for one call; SQLite ignores it
        # (it serializes writers anyway).
        query = select(CallRow).where(where).with_for_update()  # type: ignore[arg-type]
        return (await session.execute(query)).scalars().first()

    async def get_call(self, ref: str) -> CallRecord | None:
        """By our id, Pilot's id or the external (wacid) id."""
        async with self._sessions() as session:
            match = or_(
                CallRow.id == ref, CallRow.pilot_call_id == ref, CallRow.external_call_id == ref
            )
            query = select(CallRow).where(match).options(selectinload(CallRow.history))
            row = (await session.execute(query)).scalars().first()
            return _record(row, history=True) if row else None

    async def call_by_request(self, request_key: str) -> CallRecord | None:
        """The attempt a /call message already made (NewCall.request_key), if any."""
        async with self._engine.connect() as connection:
            found = await connection.execute(CALL_BY_REQUEST, {"request_key": request_key})
            row = found.first()
            return _record(row) if row is not None else None

    async def call_by_message(self, chat_id: int, message_id: int) -> CallRecord | None:
        async with self._sessions() as session:
            query = select(CallRow).where(
                CallRow.chat_id == chat_id, CallRow.message_id == message_id
            )
            row = (await session.execute(query)).scalars().first()
            return _record(row) if row else None

    async def recent_calls(self, chat_id: int, *, limit: int, offset: int = 0) -> list[CallRecord]:
        async with self._sessions() as session:
            query = (
                select(CallRow)
                .where(CallRow.chat_id == chat_id)
                .order_by(CallRow.created_at.desc(), CallRow.id.desc())
                .limit(limit)
                .offset(offset)
            )
            return [_record(r) for r in (await session.execute(query)).scalars()]

    async def count_calls(self, chat_id: int) -> int:
        async with self._sessions() as session:
            query = select(func.count()).select_from(CallRow).where(CallRow.chat_id == chat_id)
            return int((await session.execute(query)).scalar_one())

    async def calls_in(self, *statuses: str) -> list[CallRecord]:
        async with self._sessions() as session:
            query = select(CallRow).where(CallRow.status.in_(statuses)).order_by(CallRow.created_at)
            return [_record(r) for r in (await session.execute(query)).scalars()]

    async def live_calls(self) -> list[CallRecord]:
        """Started, not ended: to be followed again after a restart."""
        live = ("INITIATED", "RINGING", "ACCEPTED")
        return await self.calls_in(*live)

    # permission requests

    async def add_permission_request(
        self,
        *,
        phone: str,
        phone_display: str,
        masked: bool,
        operator_id: int,
        chat_id: int,
        locale: str,
        message_id: str | None,
        at: datetime | None = None,
    ) -> None:
        async with self._sessions.begin() as session:
            session.add(
                PermissionRequestRow(
                    phone=phone,
                    phone_display=phone_display,
                    masked=masked,
                    operator_id=operator_id,
                    chat_id=chat_id,
                    locale=locale,
                    message_id=message_id,
                    status="requested",
                    requested_at=at or utcnow(),
                )
            )

    async def answer_permission_requests(
        self, phone: str, status: str, *, at: datetime | None = None
    ) -> list[PermissionRequestRecord]:
        """Close the open requests for a number; returns them so each chat can be told."""
        async with self._sessions.begin() as session:
            query = (
                select(PermissionRequestRow)
                .where(
                    PermissionRequestRow.phone == phone, PermissionRequestRow.status == "requested"
                )
                .with_for_update()
            )
            rows = list((await session.execute(query)).scalars())
            for row in rows:
                row.status = status
                row.answered_at = at or utcnow()
            return [
                PermissionRequestRecord(
                    id=r.id,
                    phone=r.phone,
                    phone_display=r.phone_display,
                    masked=r.masked,
                    operator_id=r.operator_id,
                    chat_id=r.chat_id,
                    locale=r.locale,
                    status=r.status,
                    requested_at=r.requested_at,
                )
                for r in rows
            ]

    # audit

    async def audit(
        self,
        action: str,
        *,
        actor_id: int | None = None,
        chat_id: int | None = None,
        subject: str | None = None,
        detail: dict[str, object] | None = None,
        at: datetime | None = None,
    ) -> None:
        async with self._sessions.begin() as session:
            session.add(
                AuditRow(
                    at=at or utcnow(),
                    actor_id=actor_id,
                    chat_id=chat_id,
                    action=action,
                    subject=subject,
                    detail=detail,
                )
            )

    async def audit_since(self, since: datetime) -> list[AuditRecord]:
        async with self._sessions() as session:
            query = select(AuditRow).where(AuditRow.at >= since).order_by(AuditRow.id)
            return [
                AuditRecord(r.at, r.actor_id, r.chat_id, r.action, r.subject, r.detail)
                for r in (await session.execute(query)).scalars()
            ]
