"""What retention removes from the database: old deliveries, rings and permission requests, and
the personal data (number, note) of old calls and of their audit entries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from bot.storage.tables import AuditRow, CallRow, DeliveryRow, PermissionRequestRow, RingRow

# Audit entries that name who was called: in `detail` (these keys) or as the subject (actions).
WHO_KEYS = frozenset({"to"})
WHO_SUBJECT = frozenset({"permission.requested"})


@dataclass(frozen=True)
class Pruned:
    deliveries: int = 0
    rings: int = 0
    permission_requests: int = 0
    calls: int = 0
    audit: int = 0

    @property
    def total(self) -> int:
        return self.deliveries + self.rings + self.permission_requests + self.calls + self.audit


class RetentionStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def prune(self, before: datetime, *, batch: int) -> Pruned:
        """One bounded batch of each kind, older than `before`, in one transaction."""
        async with self._sessions.begin() as session:
            return Pruned(
                deliveries=await self._delete(
                    session, DeliveryRow.key, DeliveryRow.received_at < before, batch
                ),
                rings=await self._delete(session, RingRow.id, RingRow.at < before, batch),
                permission_requests=await self._delete(
                    session,
                    PermissionRequestRow.id,
                    PermissionRequestRow.requested_at < before,
                    batch,
                ),
                calls=await self._redact_calls(session, before, batch),
                audit=await self._redact_audit(session, before, batch),
            )

    @staticmethod
    async def _delete(
        session: AsyncSession,
        key: InstrumentedAttribute[Any],
        where: ColumnElement[bool],
        batch: int,
    ) -> int:
        """Rows matching `where`, at most `batch`, found by their primary key `key`."""
        ids = list((await session.execute(select(key).where(where).limit(batch))).scalars())
        if ids:
            await session.execute(delete(key.class_).where(key.in_(ids)))
        return len(ids)

    @staticmethod
    async def _redact_calls(session: AsyncSession, before: datetime, batch: int) -> int:
        """Number and note of old calls; redacted calls keep an empty number (their mark)."""
        query = select(CallRow.id).where(CallRow.created_at < before, CallRow.phone != "")
        ids = list((await session.execute(query.limit(batch))).scalars())
        if ids:
            await session.execute(
                update(CallRow)
                .where(CallRow.id.in_(ids))
                .values(phone="", phone_display="", note=None)
            )
        return len(ids)

    @staticmethod
    async def _redact_audit(session: AsyncSession, before: datetime, batch: int) -> int:
        """What happened stays; who was called goes."""
        query = (
            select(AuditRow)
            .where(AuditRow.at < before, AuditRow.redacted.is_(False))
            .order_by(AuditRow.id)
            .limit(batch)
        )
        rows = list((await session.execute(query)).scalars())
        for row in rows:
            if row.detail and WHO_KEYS & row.detail.keys():
                row.detail = {k: v for k, v in row.detail.items() if k not in WHO_KEYS}
            if row.action in WHO_SUBJECT:
                row.subject = None
            row.redacted = True
        return len(rows)
