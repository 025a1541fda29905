"""Tables. Change them only together with a new Alembic revision in migrations/versions."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import partial

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    false,
)
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


class Cut(TypeDecorator[str]):
    """VARCHAR(n) that always fits, so input is bounded by the table definition itself.

    PostgreSQL refuses a value longer than its column (SQLite keeps it whole): text is cut to the
    width, ending in "…". An identifier (`key=True`) keeps its start and ends in a digest of the
    whole, so different long ids stay different, and the same id is stored and looked up alike.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int, *, key: bool = False) -> None:
        super().__init__(length)
        self.length = length
        self.key = key

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return fit(value, self.length, key=self.key)


def fit(value: str | None, width: int, *, key: bool = False) -> str | None:
    if value is None or len(value) <= width:
        return value
    if not key:
        return value[: width - 1] + "…"
    digest = "~" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    digest = digest[: max(9, width // 2)]
    return value[: width - len(digest)] + digest


class Base(DeclarativeBase):
    pass


class CallRow(Base):
    """One call attempt, stored before `POST /v1/calls` and updated after (write ahead)."""

    __tablename__ = "calls"

    id: Mapped[str] = mapped_column(Cut(32, key=True), primary_key=True)  # our correlation id
    pilot_call_id: Mapped[str | None] = mapped_column(Cut(128, key=True), unique=True)
    external_call_id: Mapped[str | None] = mapped_column(Cut(256, key=True), index=True)
    operator_id: Mapped[int] = mapped_column(BigInteger)
    operator_name: Mapped[str | None] = mapped_column(Cut(128))
    chat_id: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    number_type: Mapped[str] = mapped_column(Cut(8))
    phone: Mapped[str] = mapped_column(Cut(20))  # E.164
    phone_display: Mapped[str] = mapped_column(Cut(32))
    masked: Mapped[bool]
    locale: Mapped[str] = mapped_column(Cut(8))
    note: Mapped[str | None] = mapped_column(Text)
    spoken: Mapped[bool] = mapped_column(default=False, server_default=false())  # note said aloud
    status: Mapped[str] = mapped_column(Cut(16))
    error_code: Mapped[str | None] = mapped_column(Cut(64))
    duration_seconds: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the Telegram message a direct /call came from ("tg:<chat>:<message>"): a redelivered update
    # finds its attempt here instead of starting a second call
    request_key: Mapped[str | None] = mapped_column(Cut(64, key=True), unique=True)

    # Loaded only where asked for (Store.get_call): the hot path just appends rows.
    history: Mapped[list[StatusRow]] = relationship(
        back_populates="call", order_by="StatusRow.id", lazy="raise"
    )

    __table_args__ = (
        Index("ix_calls_chat_created", "chat_id", "created_at"),
        Index("ix_calls_status", "status"),
        Index("ix_calls_created_at", "created_at"),
    )


class StatusRow(Base):
    """Status history of a call: what changed, when, and who told us."""

    __tablename__ = "call_status"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(Cut(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(Cut(16))  # bot, api, webhook, poll, recovery

    call: Mapped[CallRow] = relationship(back_populates="history")


class PermissionRequestRow(Base):
    __tablename__ = "permission_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(Cut(20), index=True)
    phone_display: Mapped[str] = mapped_column(Cut(32))
    masked: Mapped[bool]
    operator_id: Mapped[int] = mapped_column(BigInteger)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    locale: Mapped[str] = mapped_column(Cut(8))
    message_id: Mapped[str | None] = mapped_column(Cut(256, key=True))  # wamid of the request
    status: Mapped[str] = mapped_column(Cut(16))  # requested, granted, denied, failed
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditRow(Base):
    """Append-only: who did what, when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor_id: Mapped[int | None] = mapped_column(BigInteger)
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(Cut(32))
    subject: Mapped[str | None] = mapped_column(Cut(128))
    detail: Mapped[dict[str, object] | None] = mapped_column(JSON)
    # who was called is removed after RETENTION_DAYS (bot/storage/retention.py)
    redacted: Mapped[bool] = mapped_column(default=False, server_default=false())


class DeliveryRow(Base):
    """Webhook deliveries already applied, by Idempotency-Key."""

    __tablename__ = "webhook_deliveries"

    key: Mapped[str] = mapped_column(Cut(256, key=True), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class ContactRow(Base):
    """A person the bot may call, by alias (`/call alice`)."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(Cut(32, key=True), unique=True)
    phone: Mapped[str] = mapped_column(Cut(20))
    phone_display: Mapped[str] = mapped_column(Cut(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # the person's Telegram user id: `/oncall take` knows who "I" is
    telegram_id: Mapped[int | None] = mapped_column(BigInteger, index=True)


class TeamRow(Base):
    """A team: its Telegram chat, its escalation list, who is on call and its policy."""

    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Cut(32, key=True), unique=True)
    chat_id: Mapped[int] = mapped_column(BigInteger, index=True)
    token_hash: Mapped[str] = mapped_column(Cut(64))  # sha256 of the alert intake token
    on_call: Mapped[str | None] = mapped_column(Cut(32, key=True))  # an alias; None: rotation/first
    rotation: Mapped[str] = mapped_column(Cut(8), default="none")  # none | weekly | layers
    rotation_start: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts_per_person: Mapped[int] = mapped_column(Integer, default=2)
    wait_seconds: Mapped[int] = mapped_column(Integer, default=300)
    max_rounds: Mapped[int] = mapped_column(Integer, default=2)
    answer_is_ack: Mapped[bool] = mapped_column(default=False)
    members: Mapped[str] = mapped_column(Text, default="")  # aliases in escalation order
    # seconds an acknowledgement holds before the incident fires again (0: for ever)
    ack_timeout: Mapped[int] = mapped_column(Integer, default=14400, server_default="14400")
    # seconds after an exhausted escalation when a repeat of its alert pages again (0: never)
    repage_after: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # rotation "layers": its shifts (bot/oncall/schedules.py), each {"rotation", "members"?,
    # "start"?}; a later layer wins where it has a shift
    layers: Mapped[list[dict[str, object]]] = mapped_column(JSON, default=list, server_default="[]")
    # its language (en, pt_BR): what its rings speak and its post says; None: DEFAULT_LOCALE
    locale: Mapped[str | None] = mapped_column(Cut(8))
    # who covers when: [{"alias", "start", "end", "by"}], ended ones dropped at the next write
    overrides: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list, server_default="[]")


class IncidentRow(Base):
    """An alert being escalated. `next_action_at` is its timer: stored, so it survives a
    restart. Firing: the next step; acknowledged: when the acknowledgement times out; None once
    resolved or exhausted. The post to the team's chat is an outbox step of its own:
    `post_status` pending until Telegram took it, retried at `post_next_at`."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    dedup_key: Mapped[str] = mapped_column(Cut(256, key=True))
    source: Mapped[str] = mapped_column(Cut(16))
    title: Mapped[str] = mapped_column(Cut(256))
    text: Mapped[str] = mapped_column(Text, default="")
    severity: Mapped[str | None] = mapped_column(Cut(32))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    links: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(Cut(16))  # firing, acknowledged, resolved, exhausted
    fired: Mapped[int] = mapped_column(Integer, default=1)
    step: Mapped[int] = mapped_column(Integer, default=0)  # index into the escalation plan
    call_id: Mapped[str | None] = mapped_column(Cut(32, key=True))  # our current call attempt
    next_action_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    post_message_id: Mapped[int | None] = mapped_column(BigInteger)
    acked_by: Mapped[str | None] = mapped_column(Cut(128))
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    notes: Mapped[list[str]] = mapped_column(JSON, default=list)  # what the post tells
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # a group of alerts: its first alerts, one line each, and how many it holds
    alert_items: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    alert_count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The fence of a step: each claim takes a new attempt, and a step's result is applied only
    # by the attempt that holds it (a stale worker's result is dropped).
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The call of the current step, stored before its POST /v1/calls (write ahead): set, the
    # step's ring may have been placed, and the call record says whether it was.
    ring_call_id: Mapped[str | None] = mapped_column(Cut(32, key=True))
    post_status: Mapped[str] = mapped_column(  # pending | posted
        Cut(16), default="pending", server_default="posted"
    )
    post_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    post_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    admins_told_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # chat unreachable
    exhausted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the silence that holds its escalation back (its post was made quietly); None: none
    silence_id: Mapped[int | None] = mapped_column(Integer, index=True)
    # An alert storm: past its team's share of posts in a minute, an incident has no post of
    # its own but a line in a digest post, held by the digest's first incident (digest_id =
    # its own id; its post_* columns are the digest's). digest_shown: the status its line shows.
    digest_id: Mapped[int | None] = mapped_column(Integer)
    digest_shown: Mapped[str | None] = mapped_column(Cut(16))

    __table_args__ = (
        Index("ix_incidents_team_key", "team_id", "dedup_key"),
        Index("ix_incidents_digest", "digest_id"),
        Index("ix_incidents_post_next_at", "post_next_at"),
        Index("ix_incidents_call", "call_id"),
        Index("ix_incidents_ring_call", "ring_call_id"),
    )


class RingRow(Base):
    """Each on-call ring of a number, for the per-destination throttles."""

    __tablename__ = "rings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    phone: Mapped[str] = mapped_column(Cut(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    # dropped if it was never placed
    call_id: Mapped[str | None] = mapped_column(Cut(32, key=True))

    __table_args__ = (
        Index("ix_rings_phone_at", "phone", "at"),
        Index("ix_rings_call", "call_id"),
        Index("ix_rings_at", "at"),
    )


class HeartbeatRow(Base):
    """A dead man's switch: monitoring pings it; no ping by `due_at` opens an incident.
    `due_at` is its timer (the last ping + interval + grace); `attempt` fences a check that
    claimed it, as a step's attempt does."""

    __tablename__ = "heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Cut(32, key=True))
    interval_seconds: Mapped[int] = mapped_column(Integer)
    grace_seconds: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Cut(16))  # waiting (never pinged), ok, missed
    last_ping_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    due_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    missed_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(Cut(8))  # chat | file
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("uq_heartbeats_team_name", "team_id", "name", unique=True),)


class SilenceRow(Base):
    """A silence or maintenance window: while it holds, a team's matching alerts are posted
    quietly and nobody is rung. `matchers`: label → value, all must match; empty: every alert."""

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    matchers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Cut(200), default="")
    created_by: Mapped[str] = mapped_column(Cut(128))
    source: Mapped[str] = mapped_column(Cut(8))  # chat | file
    # a window of ONCALL_FILE, by its name there (reloaded at each start); None: from chat
    file_name: Mapped[str | None] = mapped_column(Cut(64, key=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


def _cut_on_set(width: int, target: object, value: str | None, *_: object) -> str | None:
    return fit(value, width)


def _cut_text_attributes() -> None:
    """Text is cut when set on a row too, so what the bot shows from a row it just wrote is what
    a later read gives (identifiers are left whole: only their stored form is digested)."""
    for mapper in Base.registry.mappers:
        for prop in mapper.column_attrs:
            kind = prop.columns[0].type
            if isinstance(kind, Cut) and not kind.key:
                attribute = getattr(mapper.class_, prop.key)
                event.listen(attribute, "set", partial(_cut_on_set, kind.length), retval=True)


_cut_text_attributes()
