"""Starting a call: the number-type checks, the Meta permission gate, then `POST /v1/calls`."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.exc import IntegrityError

from bot import states
from bot.calls.lifecycle import CallTracker
from bot.calls.numbers import NumberTypes
from bot.errors import CallbotError, describe
from bot.ops.shutdown import InFlight
from bot.phones import Phone
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.errors import APIConnectionError, PilotStatusError
from bot.pilot_status.models import (
    CallStarted,
    Limit,
    NumberType,
    PermissionProbe,
    PermissionRequested,
    StartCall,
)
from bot.shared.locks import Held, LocalLocks, Locks
from bot.shared.redis import redis_error
from bot.storage.store import Audit, CallRecord, NewCall, Store, utcnow
from bot.voice.media import Leg, VoiceSide
from bot.voice.speech import Speech

log = logging.getLogger(__name__)
NOTE_MAX = 1000  # characters of a call's note: its messages must fit Telegram's 4096


def cut_note(note: str | None) -> str | None:
    """A call's note as stored and shown: at most NOTE_MAX characters, cut with "…"."""
    if note is None or len(note) <= NOTE_MAX:
        return note
    return note[: NOTE_MAX - 1].rstrip() + "…"


@dataclass(frozen=True)
class CallRequest:
    operator_id: int
    chat_id: int
    phone: Phone
    note: str | None = None
    operator_name: str | None = None
    locale: str = "en"
    masked: bool = False  # show the number masked (group chats)
    message_id: int | None = None  # the message that will follow the call, when known already
    speech: Speech | None = None  # said to the callee once they answer
    origin: str = "operator"  # or "alert": an on-call ring (counted apart in the metrics)
    # the Telegram message of a direct /call: a second attempt with it starts no call
    request_key: str | None = None
    talk: bool = False  # the operator speaks (bot.softphone), no message is played


@dataclass(frozen=True)
class PendingPermission:
    """What the Ask-for-permission button under a "needs permission" reply asks for."""

    operator_id: int
    phone: Phone
    note: str | None
    masked: bool
    locale: str


@dataclass(frozen=True)
class Started:
    call: CallStarted
    number_type: NumberType
    record: CallRecord
    limits: tuple[Limit, ...] = ()

    @property
    def correlation_id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class NeedsPermission:
    """Meta number, and the callee has not allowed calls from the business."""

    probe: PermissionProbe


CallOutcome = Started | NeedsPermission


class CallCounts(Protocol):
    """Told of each attempt's result (bot.ops.metrics counts them)."""

    def call_started(self, number_type: str, origin: str) -> None: ...

    def call_failed(self, number_type: str | None, code: str) -> None: ...


BeforePost = Callable[[CallRecord], Awaitable[None]]


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
        store: Store,
        tracker: CallTracker,
        voice: VoiceSide | None = None,
        *,
        drain: InFlight | None = None,
        in_flight: Locks | None = None,
        counts: CallCounts | None = None,
    ) -> None:
        self._counts = counts
        self._client = client
        self._types = number_types
        self._store = store
        self._tracker = tracker
        self._voice = voice
        self._in_flight = in_flight or LocalLocks()  # one attempt per number at a time
        self._fallback = LocalLocks()  # on-call rings while Redis does not answer
        self._drain = drain or InFlight()  # a shutdown waits for calls being started

    async def start(
        self, request: CallRequest, *, before_post: BeforePost | None = None
    ) -> CallOutcome:
        """Run the checks and start the call; one attempt per number at a time.

        `before_post` is given the written-ahead attempt right before `POST /v1/calls`; if it
        raises, nothing is sent (the attempt is settled as not started) and the error goes on.
        """
        try:
            async with self._holding(request), self._drain.track():
                outcome = await self._start(request, before_post)
        except (CallbotError, PilotStatusError, redis_error()) as err:
            if self._counts is not None:
                known = self._types.known
                self._counts.call_failed(known.value if known else None, describe(err).code)
            raise
        if self._counts is not None and isinstance(outcome, Started):
            self._counts.call_started(outcome.number_type.value, request.origin)
        return outcome

    @asynccontextmanager
    async def _holding(self, request: CallRequest) -> AsyncIterator[None]:
        """The number's in-flight guard (across replicas with Redis). When Redis does not
        answer, an operator's /call is refused (bot.errors says why), but an on-call ring goes
        on under this process's guard: a page matters more than the rare double dial."""
        key = request.phone.e164
        async with AsyncExitStack() as held:
            try:
                await held.enter_async_context(self._in_flight.hold(key))
            except Held:
                raise CallbotError("call_in_flight") from None
            except redis_error() as err:
                if request.origin != "alert":
                    raise
                log.warning(
                    "on-call ring without the shared number guard: Redis does not answer (%s)",
                    type(err).__name__,
                )
                try:
                    await held.enter_async_context(self._fallback.hold(key))
                except Held:
                    raise CallbotError("call_in_flight") from None
            yield

    async def _start(self, request: CallRequest, before_post: BeforePost | None) -> CallOutcome:
        number_type = await self._types.get()
        correlation_id = new_correlation_id()
        limits: tuple[Limit, ...] = ()
        if number_type is NumberType.META:
            probe = await self._client.get_permission(request.phone.e164)
            if not probe.may_call:
                return NeedsPermission(probe)
            if self._voice is None:
                raise CallbotError("media_unavailable")  # a Meta call needs our SDP offer
            limits = start_limits(probe)
        leg: Leg | None = None
        if self._voice is not None:
            leg = await self._voice.prepare(
                number_type, request.speech, request.locale, talk=request.talk
            )
        elif request.speech is not None:
            raise CallbotError("speech_unavailable")
        try:
            record = await self._write_ahead(request, correlation_id, number_type)
            if before_post is not None:
                await self._before_post(record, before_post)
            call = await self._post(record, leg)
            record = await self._store.call_started(
                record.id,
                pilot_call_id=call.id,
                external_call_id=call.external_call_id,
                status=call.status.value,
                audit=Audit("call.started", request.operator_id, {"call": call.id}),
            )
        except BaseException:
            # Refused, or cancelled mid-request (then the attempt stays PENDING and the next
            # start settles it): either way the media leg is of no use.
            if leg is not None:
                await leg.close()
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
        if leg is not None and self._voice is not None:
            self._voice.begin(leg, record)
        await self._tracker.started(record)
        return Started(call, number_type, record, limits)

    async def _post(self, record: CallRecord, leg: Leg | None) -> CallStarted:
        offer = leg.offer_sdp if leg is not None else None
        body = StartCall(
            to=record.phone,
            sdp=offer,
            sdpType="offer" if offer else None,
            bizOpaqueCallbackData=record.id,
        )
        try:
            return await self._client.start_call(body)
        except PilotStatusError as err:
            await self._failed(record, err)
            raise

    async def _before_post(self, record: CallRecord, before_post: BeforePost) -> None:
        try:
            await before_post(record)
        except Exception:
            await self._store.call_failed(
                record.id,
                error_code="not_sent",
                audit=Audit("call.not_started", record.operator_id, {"reason": "not_sent"}),
            )
            raise

    async def _write_ahead(
        self, request: CallRequest, correlation_id: str, number_type: NumberType
    ) -> CallRecord:
        try:
            return await self._create(request, correlation_id, number_type)
        except IntegrityError:
            if request.request_key is None:
                raise
            # the same /call message, being started by another replica right now
            raise CallbotError("call_in_flight") from None

    async def _create(
        self, request: CallRequest, correlation_id: str, number_type: NumberType
    ) -> CallRecord:
        record = await self._store.create_call(
            NewCall(
                id=correlation_id,
                operator_id=request.operator_id,
                operator_name=request.operator_name,
                chat_id=request.chat_id,
                number_type=number_type.value,
                phone=request.phone.e164,
                phone_display=request.phone.display,
                masked=request.masked,
                locale=request.locale,
                note=cut_note(request.note),
                message_id=request.message_id,
                spoken=request.speech is not None,
                request_key=request.request_key,
            ),
            audit=Audit(
                "call.requested",
                request.operator_id,
                {"to": request.phone.masked, "type": number_type.value},
            ),
        )
        return record

    async def _failed(self, record: CallRecord, error: PilotStatusError) -> None:
        maybe_sent = isinstance(error, APIConnectionError) and error.maybe_sent
        code = describe(error).code
        await self._store.call_failed(
            record.id,
            error_code=code,
            status=states.UNKNOWN_OUTCOME if maybe_sent else states.NOT_STARTED,
            audit=Audit("call.failed", record.operator_id, {"error": code}),
        )

    async def attach(self, started: CallRecord, message_id: int) -> None:
        """The message that announced the call (`started` as it showed it); it is edited from
        now on."""
        current = await self._store.set_message(started.id, message_id)
        if current is not None and (
            current.status != started.status or current.duration_seconds != started.duration_seconds
        ):
            await self._tracker.show(current)

    async def earlier_attempt(self, request_key: str) -> CallRecord | None:
        """The attempt a /call message made already: Telegram redelivered its update (a replica
        died before answering it). It is shown again, never started twice."""
        return await self._store.call_by_request(request_key)

    def resume(self, record: CallRecord) -> None:
        """Follow a started call here too (its starter may be gone); once per process."""
        self._tracker.follow(record)

    async def check_permission(self, phone: Phone) -> PermissionProbe | None:
        """The Meta permission probe; None on web numbers, which need no permission."""
        if await self._types.get() is not NumberType.META:
            return None
        return await self._client.get_permission(phone.e164)

    async def request_permission(
        self,
        phone: Phone,
        text: str,
        *,
        operator_id: int,
        chat_id: int,
        locale: str,
        masked: bool,
    ) -> PermissionRequested:
        if await self._types.get() is not NumberType.META:
            raise CallbotError("permission_not_needed")
        sent = await self._client.request_permission(phone.e164, text[:500])
        await self._store.add_permission_request(
            phone=phone.e164,
            phone_display=phone.display,
            masked=masked,
            operator_id=operator_id,
            chat_id=chat_id,
            locale=locale,
            message_id=sent.message_id,
        )
        await self._store.audit(
            "permission.requested",
            actor_id=operator_id,
            chat_id=chat_id,
            subject=phone.masked,
            detail={"message": sent.message_id},
        )
        log.info("permission requested: to=%s message=%s", phone.masked, sent.message_id)
        return sent

    # following and ending calls

    async def record(self, call_id: str) -> CallRecord | None:
        return await self._store.get_call(call_id)

    async def find(self, ref: str) -> CallRecord:
        record = await self._store.get_call(ref.strip())
        if record is None:
            raise CallbotError("call_unknown", {"ref": ref[:64]})
        return record

    async def refresh(self, ref: str) -> CallRecord:
        """The call's state fresh from the API (stored and shown on its message too)."""
        record = await self.find(ref)
        if record.pilot_call_id is None:
            return record
        return await self._tracker.refresh(record.pilot_call_id) or record

    async def hang_up(self, ref: str, *, actor_id: int, is_admin: bool) -> CallRecord:
        record = await self.find(ref)
        if actor_id != record.operator_id and not is_admin:
            raise CallbotError("not_your_call")
        if record.terminal or record.pilot_call_id is None:
            raise CallbotError("call_already_ended")
        result = await self._client.terminate(record.pilot_call_id)
        await self._store.audit(
            "call.hangup",
            actor_id=actor_id,
            chat_id=record.chat_id,
            subject=record.id,
        )
        status = result.status.value if result.status else "COMPLETED"
        updated, changed = await self._store.apply_status(
            record.pilot_call_id, status, at=utcnow(), source="bot"
        )
        if updated is not None and changed:
            await self._tracker.changed(updated)
        return updated or record

    async def recent(
        self, chat_id: int, *, limit: int, offset: int
    ) -> tuple[list[CallRecord], int]:
        calls = await self._store.recent_calls(chat_id, limit=limit, offset=offset)
        return calls, await self._store.count_calls(chat_id)
