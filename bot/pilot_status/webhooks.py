"""Pilot Status webhook payloads → call events (API.md §6).

Tolerant where the docs disagree: `duration` or `durationSeconds` (D10), upper- or lower-case
statuses, the normalized flat `call.*` events and Meta's raw `calls` envelope (§6.2).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class CallEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event: str
    call_id: str | None = Field(default=None, validation_alias=AliasChoices("callId", "call_id"))
    external_call_id: str | None = Field(
        default=None, validation_alias=AliasChoices("externalCallId", "external_call_id")
    )
    status: str | None = None
    to: str | None = None
    timestamp: datetime | None = None
    duration: int | None = Field(
        default=None, validation_alias=AliasChoices("duration", "durationSeconds")
    )
    biz_opaque_callback_data: str | None = Field(
        default=None,
        validation_alias=AliasChoices("bizOpaqueCallbackData", "biz_opaque_callback_data"),
    )
    sdp_answer: str | None = None

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
        when = self.timestamp or datetime.now(UTC)
        return when if when.tzinfo else when.replace(tzinfo=UTC)


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
    try:
        return datetime.fromtimestamp(int(str(value)), UTC)
    except (TypeError, ValueError):
        return None


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
