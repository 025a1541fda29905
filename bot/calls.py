"""Starting a call: the number-type checks, the Meta permission gate, then `POST /v1/calls`."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from bot.errors import CallbotError
from bot.media import MediaEndpoint, MediaSession
from bot.numbers import NumberTypes
from bot.phones import Phone
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.models import (
    CallStarted,
    Limit,
    NumberType,
    PermissionProbe,
    PermissionRequested,
    StartCall,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallRequest:
    operator_id: int
    chat_id: int
    phone: Phone
    note: str | None = None


@dataclass(frozen=True)
class Started:
    call: CallStarted
    number_type: NumberType
    correlation_id: str
    limits: tuple[Limit, ...] = ()
    media: MediaSession | None = None


@dataclass(frozen=True)
class NeedsPermission:
    """Meta number, and the callee has not allowed calls from the business."""

    probe: PermissionProbe


@dataclass(frozen=True)
class NeedsMedia:
    """Meta number with permission, but no WebRTC endpoint of ours to make the offer."""

    probe: PermissionProbe

    @property
    def limits(self) -> tuple[Limit, ...]:
        return start_limits(self.probe)


CallOutcome = Started | NeedsPermission | NeedsMedia


def start_limits(probe: PermissionProbe) -> tuple[Limit, ...]:
    action = probe.action("start_call")
    return tuple(action.limits) if action else ()


def new_correlation_id() -> str:
    """Our tag for a call attempt, sent as bizOpaqueCallbackData (never the operator's text)."""
    return "cb_" + secrets.token_hex(8)


class CallService:
    def __init__(
        self,
        client: PilotStatusClient,
        number_types: NumberTypes,
        media: MediaEndpoint | None = None,
    ) -> None:
        self._client = client
        self._types = number_types
        self._media = media
        self._in_flight: set[str] = set()

    async def start(self, request: CallRequest) -> CallOutcome:
        """Run the checks and start the call; one attempt per number at a time."""
        key = request.phone.e164
        if key in self._in_flight:
            raise CallbotError("call_in_flight")
        self._in_flight.add(key)
        try:
            return await self._start(request)
        finally:
            self._in_flight.discard(key)

    async def _start(self, request: CallRequest) -> CallOutcome:
        number_type = await self._types.get()
        correlation_id = new_correlation_id()
        limits: tuple[Limit, ...] = ()
        session: MediaSession | None = None
        if number_type is NumberType.META:
            probe = await self._client.get_permission(request.phone.e164)
            if not probe.may_call:
                return NeedsPermission(probe)
            if self._media is None:
                return NeedsMedia(probe)
            limits = start_limits(probe)
            session = await self._media.open_session(correlation_id)
        body = StartCall(
            to=request.phone.e164,
            sdp=session.offer_sdp if session else None,
            sdpType="offer" if session else None,
            bizOpaqueCallbackData=correlation_id,
        )
        try:
            call = await self._client.start_call(body)
        except BaseException:
            if session is not None:
                await session.close()
            raise
        log.info(
            "call started: call_id=%s correlation=%s to=%s type=%s operator=%s chat=%s",
            call.id,
            correlation_id,
            request.phone.masked,
            number_type.value,
            request.operator_id,
            request.chat_id,
        )
        return Started(call, number_type, correlation_id, limits, session)

    async def check_permission(self, phone: Phone) -> PermissionProbe | None:
        """The Meta permission probe; None on web numbers, which need no permission."""
        if await self._types.get() is not NumberType.META:
            return None
        return await self._client.get_permission(phone.e164)

    async def request_permission(self, phone: Phone, text: str) -> PermissionRequested:
        if await self._types.get() is not NumberType.META:
            raise CallbotError("permission_not_needed")
        sent = await self._client.request_permission(phone.e164, text[:500])
        log.info("permission requested: to=%s message=%s", phone.masked, sent.message_id)
        return sent
