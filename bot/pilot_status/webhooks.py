"""Pilot Status webhook payloads → call events (API.md §6).

Tolerant where the docs disagree: `duration` or `durationSeconds` (D10), upper- or lower-case
statuses, the normalized flat `call.*` events and Meta's raw `calls` envelope (§6.2). Strict
where a value would reach the database: ids are bounded printable text, a timestamp lies between
2000 and 2100, a duration between 0 and `MAX_DURATION_SECONDS`; anything else is a
`WebhookError` (answered 400, nothing stored).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from bot.pilot_status.models import MAX_DURATION_SECONDS

_IMPLIED = {
    "call.ringing": "RINGING",
    "call.connected": "ACCEPTED",
    "call.ended": "COMPLETED",
    "call.missed": "MISSED",
}
# Meta's raw statuses/events in the `calls` envelope.
_META_STATUS = {
    "ringing": "RINGING",
    "accepted": "ACCEPTED",
    "connect": None,  # carries the SDP answer; the status comes with `statuses`
    "rejected": "REJECTED",
    "completed": "COMPLETED",
    "failed": "FAILED",
    "terminate": "COMPLETED",
}


class WebhookError(ValueError):
    """A delivery we cannot read (answered 400)."""


EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
MAX_REF_CHARS = 256  # CallRow.external_call_id; Pilot ids are shorter


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _text(value: str) -> str:
    # Lone surrogates (JSON may escape them) and NUL are not text: no database stores them.
    if _NOT_TEXT.search(value):
        raise ValueError("not text")
    return value


def _moment(value: datetime) -> datetime:
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not EARLIEST <= when <= LATEST:
        raise ValueError("timestamp out of range")
    return when.astimezone(UTC)


_Ref = Annotated[str, StringConstraints(max_length=MAX_REF_CHARS), AfterValidator(_text)]
_Short = Annotated[str, StringConstraints(max_length=64), AfterValidator(_text)]
_Any = Annotated[str, AfterValidator(_text)]


class CallEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event: _Short
    call_id: _Ref | None = Field(default=None, validation_alias=AliasChoices("callId", "call_id"))
    external_call_id: _Ref | None = Field(
        default=None, validation_alias=AliasChoices("externalCallId", "external_call_id")
    )
    status: _Short | None = None
    to: _Short | None = None
    timestamp: Annotated[datetime, AfterValidator(_moment)] | None = None
    duration: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DURATION_SECONDS,
        validation_alias=AliasChoices("duration", "durationSeconds"),
    )
    biz_opaque_callback_data: _Any | None = Field(
        default=None,
        validation_alias=AliasChoices("bizOpaqueCallbackData", "biz_opaque_callback_data"),
    )
    sdp_answer: _Any | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def is_permission(self) -> bool:
        return self.event == "call.permission_updated"

    @property
    def call_status(self) -> str | None:
        """The call status this event means (ended events carry COMPLETED/FAILED/REJECTED)."""
        if self.is_permission:
            return None
        return self.status or _IMPLIED.get(self.event)

    @property
    def ref(self) -> str | None:
        return self.call_id or self.external_call_id

    @property
    def at(self) -> datetime:
        return self.timestamp or datetime.now(UTC)


def parse_delivery(payload: object) -> list[CallEvent]:
    """All call events in one delivery; other events (messages, numbers) give an empty list."""
    if not isinstance(payload, dict):
        raise WebhookError("body is not a JSON object")
    envelope = payload.get("data") if payload.get("event") == "calls" else payload
    if isinstance(envelope, dict) and "entry" in envelope:
        return _meta_envelope(envelope)
    event = payload.get("event")
    if not isinstance(event, str):
        raise WebhookError("no event name")
    if not event.startswith("call."):
        return []
    try:
        return [CallEvent.model_validate(payload)]
    except ValidationError as err:
        raise WebhookError(f"bad {event} payload") from err


def _meta_envelope(envelope: dict[str, Any]) -> list[CallEvent]:
    events: list[CallEvent] = []
    try:
        for entry in envelope["entry"]:
            for change in entry.get("changes", []):
                if change.get("field") != "calls":
                    continue
                value = change.get("value", {})
                for call in value.get("calls", []):
                    events.append(_meta_call(call))
                for status in value.get("statuses", []):
                    if status.get("type", "call") == "call":
                        events.append(_meta_status(status))
    except (AttributeError, TypeError, KeyError, ValidationError) as err:
        raise WebhookError("bad calls envelope") from err
    return events


def _meta_time(value: object) -> datetime | None:
    """Meta's timestamps are Unix seconds as a string."""
    if value is None:
        return None
    text = str(value)
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise WebhookError("bad calls envelope: timestamp is not Unix seconds")
    seconds = int(text)
    if not EARLIEST.timestamp() <= seconds <= LATEST.timestamp():
        raise WebhookError("bad calls envelope: timestamp out of range")
    return datetime.fromtimestamp(seconds, UTC)


def _meta_call(call: dict[str, Any]) -> CallEvent:
    kind = str(call.get("event", "")).lower()
    status = call.get("status")
    mapped = str(status).upper() if status else _META_STATUS.get(kind)
    session = call.get("session") or {}
    return CallEvent(
        event=f"calls.{kind or 'unknown'}",
        external_call_id=call.get("id"),
        status=mapped,
        to=call.get("to"),
        timestamp=_meta_time(call.get("timestamp")),
        duration=call.get("duration"),
        biz_opaque_callback_data=call.get("biz_opaque_callback_data"),
        sdp_answer=session.get("sdp") if session.get("sdp_type", "answer") == "answer" else None,
    )


def _meta_status(status: dict[str, Any]) -> CallEvent:
    raw = str(status.get("status", "")).lower()
    return CallEvent(
        event=f"calls.status.{raw}",
        external_call_id=status.get("id"),
        status=_META_STATUS.get(raw) or raw.upper() or None,
        to=status.get("recipient_id"),
        timestamp=_meta_time(status.get("timestamp")),
        biz_opaque_callback_data=status.get("biz_opaque_callback_data"),
    )
