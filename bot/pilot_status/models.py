"""Pydantic models for the Pilot Status calls API (requests, answers)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated
from urllib.parse import quote

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

MAX_DURATION_SECONDS = 7 * 24 * 3600  # no WhatsApp call lasts a week; the column is 32-bit


def _duration_or_none(value: object) -> object:
    # An absurd duration from the API is dropped, not stored: the call's status still counts.
    if isinstance(value, int | float) and not 0 <= value <= MAX_DURATION_SECONDS:
        return None
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class NumberType(StrEnum):
    META = "meta"
    WEB = "web"


class CallStatus(StrEnum):
    INITIATED = "INITIATED"
    RINGING = "RINGING"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    MISSED = "MISSED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, value: object) -> CallStatus:
        # Statuses come upper-case in the REST DTO and lower-case in some examples.
        try:
            return cls(str(value).upper())
        except ValueError:
            return cls.UNKNOWN


Status = Annotated[CallStatus, BeforeValidator(CallStatus.parse)]


class StartCall(_Model):
    to: str
    sdp: str | None = None
    sdp_type: str | None = Field(default=None, alias="sdpType")
    biz_opaque_callback_data: str | None = Field(default=None, alias="bizOpaqueCallbackData")


class CallStarted(_Model):
    id: str
    external_call_id: str | None = Field(default=None, alias="externalCallId")
    # INITIATED per the spec, RINGING per the voice guide (API.md D6).
    status: Status


class Call(_Model):
    id: str
    external_call_id: str | None = Field(default=None, alias="externalCallId")
    direction: str | None = None
    status: Status
    peer_number: str | None = Field(default=None, alias="peerNumber")
    biz_opaque_callback_data: str | None = Field(default=None, alias="bizOpaqueCallbackData")
    started_at: datetime | None = Field(default=None, alias="startedAt")
    connected_at: datetime | None = Field(default=None, alias="connectedAt")
    ended_at: datetime | None = Field(default=None, alias="endedAt")
    duration_seconds: Annotated[int | None, BeforeValidator(_duration_or_none)] = Field(
        default=None, alias="durationSeconds"
    )
    error_code: str | None = Field(default=None, alias="errorCode")
    error_message: str | None = Field(default=None, alias="errorMessage")
    sdp_offer: str | None = Field(default=None, alias="sdpOffer")
    sdp_answer: str | None = Field(default=None, alias="sdpAnswer")
    created_at: datetime | None = Field(default=None, alias="createdAt")
    updated_at: datetime | None = Field(default=None, alias="updatedAt")


class CallList(_Model):
    calls: list[Call]


class CallAction(_Model):
    success: bool = True
    id: str | None = None
    status: Status | None = None


class RealtimeSession(_Model):
    """A WebSocket of raw PCM16 frames; `token` may come separately or inside `wsUrl` (D7)."""

    ws_url: str = Field(alias="wsUrl")
    token: str | None = None
    expires_in_seconds: int | None = Field(
        default=None, validation_alias=AliasChoices("expiresInSeconds", "expiresIn")
    )

    @property
    def url(self) -> str:
        """The URL to connect to, with the token as a query parameter when it is not there."""
        if not self.token or "token=" in self.ws_url:
            return self.ws_url
        separator = "&" if "?" in self.ws_url else "?"
        return f"{self.ws_url}{separator}token={quote(self.token)}"


class PermissionStatus(StrEnum):
    NO_PERMISSION = "no_permission"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"

    @classmethod
    def parse(cls, value: object) -> PermissionStatus:
        # Lower-case in the probe, upper-case in call.permission_updated (API.md §2.8).
        try:
            return cls(str(value).lower())
        except ValueError:
            return cls.NO_PERMISSION


PermissionState = Annotated[PermissionStatus, BeforeValidator(PermissionStatus.parse)]


class Limit(_Model):
    time_period: str = "PT24H"
    max_allowed: int | None = None
    current_usage: int | None = None


class PermissionAction(_Model):
    action_name: str
    can_perform_action: bool = False
    limits: list[Limit] = []


class Permission(_Model):
    status: PermissionState = PermissionStatus.NO_PERMISSION
    expiration_time: int | None = None


class PermissionProbe(_Model):
    permission: Permission = Permission()
    actions: list[PermissionAction] = []

    def action(self, name: str) -> PermissionAction | None:
        return next((a for a in self.actions if a.action_name == name), None)

    @property
    def may_call(self) -> bool:
        start = self.action("start_call")
        granted = self.permission.status is not PermissionStatus.NO_PERMISSION
        return granted and (start is None or start.can_perform_action)

    @property
    def may_ask(self) -> bool:
        ask = self.action("send_call_permission_request")
        return ask is None or ask.can_perform_action


class PermissionRequested(_Model):
    message_id: str | None = Field(default=None, alias="messageId")


class CallingSettings(_Model):
    calling: dict[str, object] = {}


class ServiceWindow(_Model):
    open: bool
    window_type: str | None = Field(default=None, alias="windowType")
