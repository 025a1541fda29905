"""Meta media across replicas: what a call's media waiter needs, from the replica a Pilot webhook
reached to the replica holding the call's peer connection.

A Meta call's peer connection lives in the process that placed it (A); Pilot's webhooks reach any
replica (B). B stores the change in the shared database as for any call; what A's waiter needs
(the SDP answer, a change of status) is published on one Redis pub/sub channel whenever B has no
waiter of its own for it. Every replica runs one subscriber that hands messages to its waiters.
An answer can come before A registers its waiter (the webhook outran the reply to A's POST): it is
also kept in Redis for a minute, and A looks there when it registers. A subscriber that lost
Redis subscribes again with backoff, then has its waiters look for what they may have missed.

A replica claims the calls whose media it holds (a key it refreshes while it runs): a replica
starting up leaves a live call alone while its claim is alive elsewhere, and hangs it up (its
media lost) only once the claim lapses.

The statuses of a web call with a note cross over the same way (its stream, too, lives in the
replica that placed it). Without Redis, `LocalRelay` carries nothing: one process has every
waiter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from bot.shared.redis import Keys, redis_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

ANSWER_TTL_SECONDS = 60  # as long as an early answer is kept in memory
BACKOFF_FIRST = 0.1  # seconds before subscribing again after Redis dropped
BACKOFF_MAX = 5.0
READ_TIMEOUT = 1.0  # seconds one read of the subscription waits for a message
CLAIM_TTL_SECONDS = 15  # a claim outlives its replica by at most this
CLAIM_REFRESH_SECONDS = 5.0


class Waiters(Protocol):
    """The media waiters of this process (bot.voice.service.Voice)."""

    def answer_came(self, ref: str, sdp: str) -> None:
        """Another replica received Meta's SDP answer for call `ref` (Pilot or wacid id)."""
        ...

    def status_came(self, call_id: str, status: str) -> None:
        """Another replica stored a new status of our call `call_id`."""
        ...

    async def catch_up(self) -> None:
        """Messages may have been lost (Redis was away): look up what the waiters wait for."""
        ...


class Relay(Protocol):
    shared: bool  # whether other replicas may hold waiters

    async def share_answer(self, ref: str, sdp: str) -> None: ...

    async def share_status(self, call_id: str, status: str) -> None: ...

    async def kept_answer(self, refs: Sequence[str]) -> str | None: ...

    async def claim(self, call_id: str) -> None:
        """This process holds the call's media (until `release`)."""
        ...

    async def release(self, call_id: str) -> None: ...

    async def claimed(self, call_ids: Sequence[str]) -> set[str]:
        """Those of `call_ids` whose media a running replica holds."""
        ...

    async def run(self, waiters: Waiters) -> None: ...


class LocalRelay:
    """One process: every waiter is local, nothing goes anywhere."""

    shared = False

    async def share_answer(self, ref: str, sdp: str) -> None:
        return None

    async def share_status(self, call_id: str, status: str) -> None:
        return None

    async def kept_answer(self, refs: Sequence[str]) -> str | None:
        return None

    async def claim(self, call_id: str) -> None:
        return None

    async def release(self, call_id: str) -> None:
        return None

    async def claimed(self, call_ids: Sequence[str]) -> set[str]:
        return set()

    async def run(self, waiters: Waiters) -> None:
        return None


class RedisRelay:
    """Pub/sub on `<prefix>meta-media`, answers kept under `<prefix>meta-answer:<ref>`, claims
    under `<prefix>meta-owner:<call id>`.

    Sharing never raises: a Redis that does not answer is logged, and A still has its own answer
    poll (`GET /v1/calls/{id}?includeSdp=1`) until MEDIA_ANSWER_TIMEOUT.
    """

    shared = True

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._channel = keys("meta-media")
        self._origin = uuid.uuid4().hex  # this process: its own messages come back to it
        self.subscribed = 0  # times the subscription was made (a reconnect adds one)
        self._claims: set[str] = set()

    @property
    def origin(self) -> str:
        """This process, as its claims name it."""
        return self._origin

    async def share_answer(self, ref: str, sdp: str) -> None:
        message = {"from": self._origin, "kind": "answer", "ref": ref, "sdp": sdp}
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                # kept first, then published: a waiter registered after the SET finds it, one
                # registered before gets the message
                pipe.set(self._keys("meta-answer", ref), sdp, ex=ANSWER_TTL_SECONDS)
                pipe.publish(self._channel, json.dumps(message))
                await pipe.execute()
        except (redis_error(), OSError) as err:
            log.warning("media relay: the SDP answer was not shared (%s)", type(err).__name__)

    async def share_status(self, call_id: str, status: str) -> None:
        message = {"from": self._origin, "kind": "status", "call": call_id, "status": status}
        try:
            await self._redis.publish(self._channel, json.dumps(message))
        except (redis_error(), OSError) as err:
            log.warning("media relay: a call status was not shared (%s)", type(err).__name__)

    async def kept_answer(self, refs: Sequence[str]) -> str | None:
        if not refs:
            return None
        try:
            values = await self._redis.mget([self._keys("meta-answer", ref) for ref in refs])
        except (redis_error(), OSError) as err:
            log.warning("media relay: kept answers not read (%s)", type(err).__name__)
            return None
        found = next((value for value in values if value), None)
        return found.decode() if isinstance(found, bytes) else found

    async def claim(self, call_id: str) -> None:
        self._claims.add(call_id)
        try:
            await self._set_claims([call_id])
        except (redis_error(), OSError) as err:
            log.warning("media relay: a call was not claimed (%s)", type(err).__name__)

    async def release(self, call_id: str) -> None:
        self._claims.discard(call_id)
        try:
            await self._redis.delete(self._keys("meta-owner", call_id))
        except (redis_error(), OSError) as err:
            log.warning("media relay: a claim was not released (%s)", type(err).__name__)

    async def claimed(self, call_ids: Sequence[str]) -> set[str]:
        """A Redis that does not answer: every call counts as claimed (rather leave a call
        than hang up one whose media is alive elsewhere)."""
        if not call_ids:
            return set()
        try:
            owners = await self._redis.mget([self._keys("meta-owner", c) for c in call_ids])
        except (redis_error(), OSError) as err:
            log.warning("media relay: claims not read (%s)", type(err).__name__)
            return set(call_ids)
        return {call_id for call_id, owner in zip(call_ids, owners, strict=True) if owner}

    async def _set_claims(self, call_ids: Sequence[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call_id in call_ids:
                pipe.set(self._keys("meta-owner", call_id), self._origin, ex=CLAIM_TTL_SECONDS)
            await pipe.execute()

    async def run(self, waiters: Waiters) -> None:
        """The subscriber, until cancelled: subscribe, hand messages over, refresh the claims;
        when Redis drops, subscribe again after a backoff, then let the waiters catch up."""
        delay = BACKOFF_FIRST
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed += 1
                if self.subscribed > 1:
                    log.info("media relay: subscribed again")
                delay = BACKOFF_FIRST
                await waiters.catch_up()
                refreshed = 0.0
                while True:
                    if self._claims and time.monotonic() - refreshed >= CLAIM_REFRESH_SECONDS:
                        await self._set_claims(sorted(self._claims))
                        refreshed = time.monotonic()
                    message = await pubsub.get_message(timeout=READ_TIMEOUT)
                    if message is not None:
                        self._hand_over(message, waiters)
            except (redis_error(), OSError) as err:
                log.warning(
                    "media relay: Redis subscription lost (%s); again in %.1f s",
                    type(err).__name__,
                    delay,
                )
            finally:
                with suppress(redis_error(), OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)

    def _hand_over(self, message: dict[str, Any], waiters: Waiters) -> None:
        try:
            body = json.loads(message["data"])
            if body.get("from") == self._origin:
                return  # ours: the local path has handled it
            if body["kind"] == "answer":
                waiters.answer_came(str(body["ref"]), str(body["sdp"]))
            elif body["kind"] == "status":
                waiters.status_came(str(body["call"]), str(body["status"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("media relay: an unreadable message was ignored")
