"""Following calls to their end: webhook events, polling, recovery after a restart.

Every change is stored first, then shown through a `CallView` (the Telegram side), which
coalesces edits. Nothing here knows aiogram.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

from bot import states
from bot.errors import describe
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.errors import NotFoundError, PilotStatusError
from bot.pilot_status.models import Call
from bot.pilot_status.webhooks import CallEvent
from bot.shared.early_events import EarlyEvents, LocalEarlyEvents
from bot.shared.locks import Held, LocalLocks, Locks
from bot.storage.store import (
    Applied,
    Audit,
    CallRecord,
    PermissionRequestRecord,
    StatusUpdate,
    Store,
    Unstorable,
    utcnow,
)

log = logging.getLogger(__name__)

# Why a call was settled as states.LOST (texts.ERRORS explains each).
NO_LONGER_KNOWN = "call_lost"  # 404 CALL_NOT_FOUND, seen twice
NOT_SEEN_ENDING = "call_unfollowed"  # no end within CALL_POLL_TIMEOUT
EARLY_EVENTS_TTL = 120.0  # seconds an event for a call not known yet waits for its POST's reply


def _unknown_call(error: PilotStatusError) -> bool:
    """Pilot's answer that it has no such call (not a wrong URL's bare 404)."""
    return isinstance(error, NotFoundError) and error.code == "CALL_NOT_FOUND"


class CallView(Protocol):
    """Where call changes become visible (implemented with aiogram in bot/live.py)."""

    async def show_call(self, record: CallRecord) -> None: ...

    async def announce(self, record: CallRecord) -> int | None:
        """Post a new message for a call that has none yet; its id, or None."""
        ...

    async def permission_answered(self, request: PermissionRequestRecord) -> None: ...


@dataclass(frozen=True)
class PollPolicy:
    first_interval: float = 2.0
    max_interval: float = 15.0
    factor: float = 1.5
    give_up_after: float = 900.0


class GroupCommit:
    """Deliveries arriving together are stored in one transaction: each request still gets its
    2xx only after its own change is committed, but the commit's cost is shared. A delivery the
    database refuses fails alone (`Unstorable`); its neighbours are applied."""

    def __init__(self, store: Store, max_batch: int = 200) -> None:
        self._store = store
        self._max = max_batch
        self._queue: list[tuple[str, list[StatusUpdate], asyncio.Future[Applied]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, key: str, updates: list[StatusUpdate]) -> Applied:
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._queue.append((key, updates, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="group commit")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            try:
                results = await self._store.apply_deliveries([(k, u) for k, u, _ in batch])
            except Exception as err:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Unstorable):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class CallTracker:
    def __init__(
        self,
        store: Store,
        client: PilotStatusClient,
        view: CallView,
        *,
        poll: PollPolicy | None = None,
        early: EarlyEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        follow_for: float = 900.0,
        confirm_after: float = 2.0,
        guard: Locks | None = None,
        recheck_after: float = 10.0,
    ) -> None:
        self._store = store
        self._client = client
        self._view = view
        self._poll = poll  # None: webhooks deliver the changes
        self._follow_for = follow_for  # a call not seen ending by then is settled as lost
        self._confirm_after = confirm_after  # seconds before a CALL_NOT_FOUND is asked again
        self._clock = clock
        # events that outran the POST's reply (shared by replicas with Redis)
        self._early = early or LocalEarlyEvents(EARLY_EVENTS_TTL, clock=clock)
        self._commits = GroupCommit(store)
        self._observers: list[Callable[[CallRecord], Awaitable[None]]] = []
        self._answer_observers: list[Callable[[str, str], Awaitable[None]]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # the per-number guard CallService holds from the write-ahead to the stored answer: an
        # open attempt whose number it holds is being started by a live process (this one, or
        # another replica), not left behind by a crash
        self._guard = guard or LocalLocks()
        self._recheck_after = recheck_after
        self._recheck: asyncio.Task[None] | None = None

    # events

    async def on_delivery(self, key: str, events: list[CallEvent]) -> bool:
        """One webhook delivery, applied once and in one transaction. False for a replay."""
        calls = [e for e in events if not e.is_permission and e.ref and e.call_status]
        updates = [
            StatusUpdate(e.ref, e.call_status, e.at, "webhook", e.duration)  # type: ignore[arg-type]
            for e in calls
        ]
        results = await self._commits.submit(key, updates)
        if results is None:
            return False
        for event, (record, changed) in zip(calls, results, strict=True):
            if record is None:
                record, changed = await self._by_external_id(event)
            await self._settle(event, record, changed)
        for event in events:
            if event.is_permission:
                await self.on_permission(event)
            elif event.sdp_answer:
                await self._answered(event)
        return True

    async def on_event(self, event: CallEvent, *, replayed: bool = False) -> CallRecord | None:
        """Store what a webhook says, then show it. Unknown calls are kept briefly: a webhook can
        outrun the answer to our own POST."""
        if event.is_permission:
            await self.on_permission(event)
            return None
        if event.sdp_answer:
            await self._answered(event)
        ref, status = event.ref, event.call_status
        if ref is None or status is None:
            return None
        record, changed = await self._store.apply_status(
            ref, status, at=event.at, source="webhook", duration_seconds=event.duration
        )
        if record is None:
            record, changed = await self._by_external_id(event)
        await self._settle(event, record, changed, replayed=replayed)
        return record

    async def _by_external_id(self, event: CallEvent) -> tuple[CallRecord | None, bool]:
        """An event naming both ids whose Pilot id is unknown: try the provider's id."""
        status = event.call_status
        if not (event.external_call_id and event.call_id and status):
            return None, False
        return await self._store.apply_status(
            event.external_call_id,
            status,
            at=event.at,
            source="webhook",
            duration_seconds=event.duration,
        )

    async def _settle(
        self, event: CallEvent, record: CallRecord | None, changed: bool, *, replayed: bool = False
    ) -> None:
        """After an event is stored: show a change, or keep an event for a call not known yet."""
        if record is None:
            ref = event.ref or ""
            await self._early.keep(ref, event)
            # The POST's reply may have been stored meanwhile, and its early events replayed
            # (by another replica, or before this one was kept): then they are replayed here.
            if not replayed and ref and await self._store.get_call(ref) is not None:
                await self._replay(ref)
        elif changed:
            await self.changed(record)
            if record.terminal:
                self._stop_polling(record.id)

    async def on_permission(self, event: CallEvent) -> None:
        if not event.to:
            return
        phone = "+" + event.to.lstrip("+")
        answer = {"TEMPORARY": "granted", "PERMANENT": "granted"}.get(event.status or "", "denied")
        for request in await self._store.answer_permission_requests(phone, answer, at=event.at):
            await self._store.audit(
                "permission.answered",
                chat_id=request.chat_id,
                subject=event.status,
                detail={"request": request.id},
            )
            await self._view.permission_answered(request)

    async def _replay(self, ref: str) -> None:
        for event in await self._early.take(ref):
            await self.on_event(event, replayed=True)

    async def show(self, record: CallRecord) -> None:
        """Display only (e.g. a message that learnt of its call late)."""
        await self._view.show_call(record)

    def on_answer(self, observer: Callable[[str, str], Awaitable[None]]) -> None:
        """Be given each SDP answer a webhook carries, as (call ref, sdp): Meta's media answer."""
        self._answer_observers.append(observer)

    async def _answered(self, event: CallEvent) -> None:
        for observer in self._answer_observers:
            await observer(event.ref or "", event.sdp_answer or "")

    def subscribe(self, observer: Callable[[CallRecord], Awaitable[None]]) -> None:
        """Be told of every stored change of a call (the on-call escalation listens)."""
        self._observers.append(observer)

    async def changed(self, record: CallRecord) -> None:
        """A stored change: shown, and told to the observers."""
        await self._view.show_call(record)
        for observer in self._observers:
            try:
                await observer(record)
            except Exception:
                log.exception("observer of call %s failed", record.id)

    # our own calls

    async def started(self, record: CallRecord) -> None:
        """A call the API accepted: replay early events, show it, and poll if no webhooks."""
        for ref in filter(None, (record.pilot_call_id, record.external_call_id)):
            try:
                await self._replay(ref)
            except Exception as err:  # e.g. Redis is down: the call is started all the same
                log.warning(
                    "call %s: its early events are out of reach (%s)", record.id, type(err).__name__
                )
        self.follow(record)

    def follow(self, record: CallRecord) -> None:
        if self._poll is None or record.terminal or record.pilot_call_id is None:
            return
        if record.id not in self._tasks:
            task = asyncio.create_task(self._follow(record), name=f"poll {record.id}")
            self._tasks[record.id] = task
            task.add_done_callback(partial(self._forget, record.id))

    def _forget(self, call_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(call_id, None)

    async def _follow(self, record: CallRecord) -> None:
        assert self._poll is not None and record.pilot_call_id is not None
        left = self._poll.give_up_after - (utcnow() - record.created_at).total_seconds()
        interval, deadline = self._poll.first_interval, self._clock() + max(0.0, left)
        while self._clock() < deadline:
            await asyncio.sleep(interval)
            interval = min(self._poll.max_interval, interval * self._poll.factor)
            try:
                current = await self._look(record, source="poll")
            except PilotStatusError as err:
                log.info("poll %s: %s", record.id, describe(err).code)
                continue
            if current is None or current.terminal:
                return
        log.warning("stopped following call %s after %.0f s", record.id, self._poll.give_up_after)
        await self._settle_lost(record, NOT_SEEN_ENDING)

    async def _look(self, record: CallRecord, *, source: str) -> CallRecord | None:
        """The call fresh from the API, stored and shown. Pilot's CALL_NOT_FOUND is an answer,
        not a failure: asked once more (a new call may not be listed yet), then the call is
        settled as lost. Other errors are raised."""
        ref = record.pilot_call_id or record.id
        for attempt in range(2):
            try:
                return await self.refresh(ref, source=source)
            except PilotStatusError as err:
                if not _unknown_call(err):
                    raise
            if attempt == 0:
                await asyncio.sleep(self._confirm_after)
        return await self._settle_lost(record, NO_LONGER_KNOWN)

    async def _settle_lost(self, record: CallRecord, reason: str) -> CallRecord:
        """A call whose end will never be learnt: final, shown as such, no longer followed."""
        settled = await self._store.call_failed(
            record.id,
            error_code=reason,
            status=states.LOST,
            audit=Audit("call.lost", None, {"reason": reason}),
        )
        if settled.status == states.LOST and settled.error_code == reason:
            log.warning("call %s settled as lost: %s", record.id, reason)
            await self.changed(settled)
            self._stop_polling(record.id)
        return settled

    def _stop_polling(self, call_id: str) -> None:
        task = self._tasks.get(call_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def refresh(self, pilot_call_id: str, *, source: str = "api") -> CallRecord | None:
        """Fresh state from the API, stored and shown."""
        call = await self._client.get_call(pilot_call_id)
        return await self.apply_call(call, source=source)

    async def apply_call(self, call: Call, *, source: str) -> CallRecord | None:
        at = call.ended_at or call.connected_at or call.updated_at or utcnow()
        record, changed = await self._store.apply_status(
            call.id,
            call.status.value,
            at=at,
            source=source,
            duration_seconds=call.duration_seconds,
            error_code=call.error_code,
        )
        if record is not None and changed:
            await self.changed(record)
        return record

    # after a restart

    async def recover(self) -> None:
        """Settle attempts a crash left half-done, and pick up calls still in progress."""
        open_attempts = await self._store.calls_in(states.PENDING, states.UNKNOWN_OUTCOME)
        busy = await self._reconcile(open_attempts) if open_attempts else []
        if busy:
            self._recheck = asyncio.create_task(self._recheck_later(busy), name="recheck attempts")
        for record in await self._store.live_calls():
            age = (utcnow() - record.created_at).total_seconds()
            if age >= self._follow_for:
                await self._last_look(record)
                continue
            try:
                current = await self._look(record, source="recovery")
            except PilotStatusError as err:
                log.info("recovery refresh %s: %s", record.id, describe(err).code)
                current = record
            if current is not None:
                self.follow(current)

    async def _last_look(self, record: CallRecord) -> None:
        """A call older than CALL_POLL_TIMEOUT: one GET, then it is settled either way."""
        try:
            current = await self.refresh(record.pilot_call_id or record.id, source="recovery")
        except PilotStatusError as err:
            log.info("recovery refresh %s: %s", record.id, describe(err).code)
            reason = NO_LONGER_KNOWN if _unknown_call(err) else NOT_SEEN_ENDING
            await self._settle_lost(record, reason)
            return
        if current is not None and not current.terminal:
            await self._settle_lost(current, NOT_SEEN_ENDING)

    async def _recheck_later(self, busy: list[CallRecord]) -> None:
        """Attempts being started when we looked: settled by whoever started them, unless that
        process died; then its guard's lease runs out and they are reconciled here."""
        while busy:
            await asyncio.sleep(self._recheck_after)
            ids = {a.id for a in busy}
            still = await self._store.calls_in(states.PENDING, states.UNKNOWN_OUTCOME)
            attempts = [a for a in still if a.id in ids]
            busy = await self._reconcile(attempts) if attempts else []

    async def sweep_forever(self, interval: float, older_than: timedelta) -> None:
        """Replicas: attempts left open by a replica that died after every other one started
        (no restart runs `recover` for them) are reconciled here once their guard is free."""
        while True:
            await asyncio.sleep(interval)
            try:
                horizon = utcnow() - older_than
                still = await self._store.calls_in(states.PENDING, states.UNKNOWN_OUTCOME)
                stale = [a for a in still if a.created_at <= horizon]
                if stale:
                    await self._reconcile(stale)
            except Exception:
                log.exception("sweep of open attempts failed; it runs again in %.0f s", interval)

    async def _reconcile(self, attempts: list[CallRecord]) -> list[CallRecord]:
        """Settle open attempts nobody is starting; returns those a live process is starting."""
        async with AsyncExitStack() as held:
            busy, mine = [], []
            for attempt in attempts:
                try:
                    await held.enter_async_context(self._guard.hold(attempt.phone))
                except Held:
                    busy.append(attempt)
                    continue
                mine.append(attempt)
            # read again under the guards: an attempt its process finished meanwhile is done
            ids = {a.id for a in mine}
            still = await self._store.calls_in(states.PENDING, states.UNKNOWN_OUTCOME)
            await self._settle_attempts([a for a in still if a.id in ids])
        if busy:
            log.info("%d open attempts are being started by a live process: not settled", len(busy))
        return busy

    async def _settle_attempts(self, attempts: list[CallRecord]) -> None:
        if not attempts:
            return
        oldest = min(a.created_at for a in attempts) - timedelta(minutes=5)
        try:
            by_tag = await self._recent_calls_by_tag(oldest)
        except PilotStatusError as err:
            log.warning("cannot reconcile %d attempts now: %s", len(attempts), describe(err).code)
            return
        for attempt in attempts:
            call = by_tag.get(attempt.id)
            if call is None:
                record = await self._store.call_failed(
                    attempt.id,
                    error_code="interrupted",
                    audit=Audit("call.not_started", None, {"reason": "interrupted"}),
                )
            else:
                record = await self._store.call_started(
                    attempt.id,
                    pilot_call_id=call.id,
                    external_call_id=call.external_call_id,
                    status=call.status.value,
                    source="recovery",
                )
                record = await self.apply_call(call, source="recovery") or record
                await self._store.audit(
                    "call.recovered",
                    chat_id=record.chat_id,
                    subject=record.id,
                    detail={"call": call.id},
                )
            log.info("recovered attempt %s: %s", attempt.id, record.status)
            if record.message_id is None:
                # The crash came before the reply: tell the chat in a new message.
                message_id = await self._view.announce(record)
                if message_id is not None:
                    await self._store.set_message(record.id, message_id)
            else:
                await self.changed(record)
            self.follow(record)

    async def _recent_calls_by_tag(self, oldest: datetime) -> dict[str, Call]:
        found: dict[str, Call] = {}
        before: str | None = None
        for _page in range(20):
            calls = await self._client.list_calls(limit=100, before=before)
            for call in calls:
                if call.biz_opaque_callback_data:
                    found.setdefault(call.biz_opaque_callback_data, call)
            last = calls[-1].created_at if calls else None
            if len(calls) < 100 or last is None or last < oldest:
                break
            before = last.isoformat().replace("+00:00", "Z")
        return found

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        if self._recheck is not None:
            tasks.append(self._recheck)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
