"""Tables. Change them only together with a new Alembic revision in migrations/versions."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class CallRow(Base):
    """One call attempt, stored before `POST /v1/calls` and updated after (write ahead)."""

    __tablename__ = "calls"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # our correlation id
    pilot_call_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    external_call_id: Mapped[str | None] = mapped_column(String(256), index=True)
    operator_id: Mapped[int] = mapped_column(BigInteger)
    operator_name: Mapped[str | None] = mapped_column(String(128))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    number_type: Mapped[str] = mapped_column(String(8))
    phone: Mapped[str] = mapped_column(String(20))  # E.164
    phone_display: Mapped[str] = mapped_column(String(32))
    masked: Mapped[bool]
    locale: Mapped[str] = mapped_column(String(8))
    note: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    duration_seconds: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # Loaded only where asked for (Store.get_call): the hot path just appends rows.
    history: Mapped[list[StatusRow]] = relationship(
        back_populates="call", order_by="StatusRow.id", lazy="raise"
    )

    __table_args__ = (
        Index("ix_calls_chat_created", "chat_id", "created_at"),
        Index("ix_calls_status", "status"),
    )


class StatusRow(Base):
    """Status history of a call: what changed, when, and who told us."""

    __tablename__ = "call_status"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(16))  # bot, api, webhook, poll, recovery

    call: Mapped[CallRow] = relationship(back_populates="history")


class PermissionRequestRow(Base):
    __tablename__ = "permission_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(String(20), index=True)
    phone_display: Mapped[str] = mapped_column(String(32))
    masked: Mapped[bool]
    operator_id: Mapped[int] = mapped_column(BigInteger)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    locale: Mapped[str] = mapped_column(String(8))
    message_id: Mapped[str | None] = mapped_column(String(256))  # wamid of the request
    status: Mapped[str] = mapped_column(String(16))  # requested, granted, denied, failed
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditRow(Base):
    """Append-only: who did what, when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor_id: Mapped[int | None] = mapped_column(BigInteger)
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, object] | None] = mapped_column(JSON)


class DeliveryRow(Base):
    """Webhook deliveries already applied, by Idempotency-Key."""

    __tablename__ = "webhook_deliveries"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
