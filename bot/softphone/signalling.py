"""The softphone's signalling across replicas: a browser's request for a Meta call (its SDP offer,
mute) reaches whichever replica the load balancer picked, but the call's media lives in the one
that placed it. That replica's claim (`<prefix>meta-owner:<call id>`, bot.voice.relay) names it;
the request is published on its own channel `<prefix>softphone:<replica>`, and its answer comes
back on `<prefix>softphone-reply:<request id>`, which the asking replica subscribed to first.

Nothing is kept: a request no replica answers within the timeout is refused (504), one whose
call no running replica claims is refused at once (409).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ValidationError

from bot.shared.redis import Keys, redis_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

ASK_TIMEOUT = 15.0  # seconds for the holder's answer (its peer gathers candidates first)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class TalkRequest(BaseModel):
    """What a browser asked of the replica holding the call's media (already authenticated)."""

    op: Literal["offer", "mute"]
    call: str  # our call id
    user: int  # the operator, as their initData said
    sdp: str | None = None
    muted: bool = False


class TalkReply(BaseModel):
    status: int = 200
    reason: str = ""
    sdp: str | None = None


Handler = Callable[[TalkRequest], Awaitable[TalkReply]]


class _Envelope(BaseModel):
    id: str
    request: TalkRequest


class RedisSignals:
    def __init__(
        self, redis: Redis, keys: Keys, origin: str, *, ask_timeout: float = ASK_TIMEOUT
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._origin = origin  # this replica, as its media claims name it
        self.ask_timeout = ask_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()

    async def ask(self, request: TalkRequest) -> TalkReply:
        """The holding replica's reply to `request`."""
        try:
            owner = await self._redis.get(self._keys("meta-owner", request.call))
            if owner is None:
                return TalkReply(status=409, reason="no running replica holds the call's media")
            owner = owner.decode() if isinstance(owner, bytes) else str(owner)
            rid = uuid.uuid4().hex
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys("softphone-reply", rid))
                body = _Envelope(id=rid, request=request).model_dump_json()
                if not await self._redis.publish(self._keys("softphone", owner), body):
                    return TalkReply(status=409, reason="the replica holding the call is gone")
                async with asyncio.timeout(self.ask_timeout):
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            return TalkReply.model_validate_json(message["data"])
            finally:
                with suppress(redis_error(), OSError):
                    await pubsub.aclose()
        except TimeoutError:
            log.warning("softphone: call %s: the holding replica did not answer", request.call)
            return TalkReply(status=504, reason="the replica holding the call did not answer")
        except (redis_error(), OSError) as err:
            log.warning("softphone: request not forwarded (%s)", type(err).__name__)
            return TalkReply(status=503, reason="shared state unavailable")
        except ValidationError:
            return TalkReply(status=502, reason="unreadable reply from the holding replica")

    async def run(self, handle: Handler) -> None:
        """Until cancelled: answer the requests other replicas forward to this one."""
        delay = BACKOFF_FIRST
        channel = self._keys("softphone", self._origin)
        try:
            while True:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(channel)
                    self.subscribed.set()
                    delay = BACKOFF_FIRST
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._answer(message["data"], handle)
                except (redis_error(), OSError) as err:
                    log.warning(
                        "softphone: subscription lost (%s); again in %.1f s",
                        type(err).__name__,
                        delay,
                    )
                finally:
                    self.subscribed.clear()
                    with suppress(redis_error(), OSError):
                        await pubsub.aclose()
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _answer(self, data: bytes | str, handle: Handler) -> None:
        try:
            envelope = _Envelope.model_validate_json(data)
        except ValidationError:
            log.warning("softphone: an unreadable request was ignored")
            return
        task = asyncio.create_task(self._reply(envelope, handle), name="softphone request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, envelope: _Envelope, handle: Handler) -> None:
        try:
            reply = await handle(envelope.request)
        except Exception:
            log.exception("softphone: call %s: request failed", envelope.request.call)
            reply = TalkReply(status=500, reason="internal error")
        try:
            await self._redis.publish(
                self._keys("softphone-reply", envelope.id), reply.model_dump_json()
            )
        except (redis_error(), OSError) as err:
            log.warning("softphone: reply not sent (%s)", type(err).__name__)
