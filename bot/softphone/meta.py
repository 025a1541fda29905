"""Talking on a Meta call from the operator's browser: who may, where their request goes, and how
long a lost browser is waited for.

`join` takes the browser's SDP offer and returns our answer (bot.softphone.bridge makes the
peer); `mute` stops forwarding the operator's microphone. Either is checked here, on whichever
replica received it (the call as stored: its caller or an admin, a live Meta call), then done
by the replica holding the call's media, directly or through bot.softphone.signalling.

One browser leg per call: the same operator joining again (a reload) replaces their leg; another
operator is refused while one talks. A browser leg lost (its connection failed or closed) is
waited for `grace` seconds, then the call is hung up unless the operator came back. When the call
ends from the callee's side, the leg is closed with it.

Nothing here knows aiogram or aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING

from bot import states
from bot.access import AccessPolicy
from bot.errors import NotAllowed, TalkRefused
from bot.pilot_status.models import NumberType
from bot.softphone.auth import require_joiner
from bot.softphone.ice import IceServer
from bot.softphone.signalling import RedisSignals, TalkReply, TalkRequest
from bot.storage.store import CallRecord, Store
from bot.voice.service import TalkLine, Voice

if TYPE_CHECKING:
    from bot.softphone.bridge import BrowserLeg

log = logging.getLogger(__name__)

LEG_GRACE = 5.0  # seconds a lost browser leg is waited for before the call is hung up


class MetaTalk:
    def __init__(
        self,
        voice: Voice,
        store: Store,
        *,
        access: AccessPolicy,
        ice: Sequence[IceServer] = (),
        signals: RedisSignals | None = None,
        grace: float = LEG_GRACE,
    ) -> None:
        self._voice = voice
        self._store = store
        self._access = access
        self._ice = tuple(ice)
        self.signals = signals
        self.grace = grace
        self._legs: dict[str, BrowserLeg] = {}  # by our call id, on the replica holding it
        self._tasks: set[asyncio.Task[None]] = set()

    async def allowed(self, call_id: str, user_id: int) -> CallRecord:
        """The live Meta call `call_id` if `user_id` may talk on it: else NotAllowed (403, an
        unknown call too: no probing for call ids) or TalkRefused (409)."""
        record = await self._store.get_call(call_id)
        if record is None:
            raise NotAllowed("miniapp_not_your_call", status=403)
        require_joiner(self._access, user_id, record.operator_id)
        if record.number_type != NumberType.META.value:
            raise TalkRefused(409, "not a Meta call")
        if states.is_terminal(record.status):
            raise TalkRefused(409, "the call has ended")
        return record

    async def ice_servers(self, call_id: str, user_id: int) -> tuple[IceServer, ...]:
        """What the page's RTCPeerConnection needs: TURN credentials included, and so only for
        a browser that may join this Meta call."""
        await self.allowed(call_id, user_id)
        return self._ice

    def ice_for(self, record: CallRecord) -> list[dict[str, object]]:
        """The session JSON's `ice_servers` for a call the page's user was allowed to open:
        TURN credentials only for a live Meta call (the browser needs them for its own leg)."""
        if record.number_type != NumberType.META.value or states.is_terminal(record.status):
            return []
        return [server.model_dump(exclude_none=True) for server in self._ice]

    async def join(self, call_id: str, user_id: int, offer_sdp: str) -> str:
        """The browser's offer → our answer, made by the replica holding the call's media."""
        record = await self.allowed(call_id, user_id)
        request = TalkRequest(op="offer", call=record.id, user=user_id, sdp=offer_sdp)
        reply = await self._at_holder(request)
        if reply.sdp is None:
            raise TalkRefused(502, "no answer")
        return reply.sdp

    async def mute(self, call_id: str, user_id: int, muted: bool) -> None:
        record = await self.allowed(call_id, user_id)
        await self._at_holder(TalkRequest(op="mute", call=record.id, user=user_id, muted=muted))

    async def _at_holder(self, request: TalkRequest) -> TalkReply:
        if self._voice.line(request.call) is not None or self.signals is None:
            reply = await self.handle(request)
        else:
            reply = await self.signals.ask(request)
        if reply.status != 200:
            raise TalkRefused(reply.status, reply.reason)
        return reply

    async def handle(self, request: TalkRequest) -> TalkReply:
        """On the replica holding the call's media (a request checked by `allowed`)."""
        line = self._voice.line(request.call)
        if line is None:
            return TalkReply(status=409, reason="the call's media is not held here")
        leg = self._legs.get(request.call)
        if leg is not None and leg.operator_id != request.user:
            return TalkReply(status=409, reason="another operator is talking on this call")
        if request.op == "mute":
            if leg is None:
                return TalkReply(status=409, reason="not talking on this call")
            leg.muted = request.muted
            log.info("call %s: operator %s muted=%s", request.call, request.user, request.muted)
            return TalkReply()
        if leg is not None:  # the same operator again (a reload): their new leg replaces it
            self._legs.pop(request.call, None)
            await leg.close()
        try:
            return TalkReply(sdp=await self._open(line, request))
        except TalkRefused as refused:
            return TalkReply(status=refused.status, reason=refused.reason)

    async def _open(self, line: TalkLine, request: TalkRequest) -> str:
        from bot.softphone.bridge import BrowserLeg  # aiortc is loaded: the call's media is here

        leg = BrowserLeg(line, request.user, self._ice)
        try:
            answer = await leg.answer(request.sdp or "")
        except BaseException:
            await leg.close()
            raise
        self._legs[line.call_id] = leg
        log.info("call %s: operator %s joins with their browser", line.call_id, request.user)
        task = asyncio.create_task(self._follow(leg), name=f"softphone leg {line.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return answer

    async def _follow(self, leg: BrowserLeg) -> None:
        """Until the call's media ends, or the browser is gone past the grace: then both legs."""
        line = leg.line
        try:
            await _first(line.ended, leg.lost)
            if line.ended.is_set() or self._legs.get(line.call_id) is not leg:
                return  # the call ended, or the operator's new leg replaced this one
            log.info("call %s: browser leg lost; %.0f s to come back", line.call_id, self.grace)
            with suppress(TimeoutError):
                await asyncio.wait_for(line.ended.wait(), self.grace)
            if not line.ended.is_set() and self._legs.get(line.call_id) is leg:
                await line.hang_up()
        finally:
            if self._legs.get(line.call_id) is leg:
                del self._legs[line.call_id]
            await leg.close()

    @property
    def talking(self) -> int:
        """Browser legs this replica holds."""
        return len(self._legs)

    async def run(self) -> None:
        """Answer what other replicas forward (with Redis); until cancelled."""
        if self.signals is not None:
            await self.signals.run(self.handle)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
