"""Middlewares: handle each update once (the ledger); wait out Telegram's flood control; build
each answer's model once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware, Bot
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import TelegramObject, Update

from bot.ops.metrics import mark_duplicate
from bot.ops.shutdown import InFlight
from bot.shared.redis import redis_error
from bot.telegram.ledger import Claim, UpdateLedger, holding

log = logging.getLogger(__name__)


class InFlightUpdatesMiddleware(BaseMiddleware):
    """Each update being handled counts as in flight: a shutdown lets it finish (a /call's
    POST and the reply that follows it), within SHUTDOWN_GRACE_SECONDS."""

    def __init__(self, in_flight: InFlight) -> None:
        self._in_flight = in_flight

    async def __call__(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        async with self._in_flight.track():
            return await handler(event, data)


class LedgerMiddleware(BaseMiddleware):
    """Long polling: an update already handled, or being handled, is not handled again (the
    webhook receiver claims its updates itself, before answering Telegram)."""

    def __init__(self, ledger: UpdateLedger) -> None:
        self._ledger = ledger

    async def __call__(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        if not isinstance(event, Update):
            return await handler(event, data)
        try:
            claim = await self._ledger.claim(event.update_id)
        except redis_error() as err:
            # Polling gets each update once but for rare redeliveries: handle it rather than
            # lose it (its offset is confirmed already).
            log.warning("update %s: ledger unavailable (%s)", event.update_id, type(err).__name__)
            return await handler(event, data)
        if claim is not Claim.NEW:
            log.info("update %s delivered again (%s); ignored", event.update_id, claim.value)
            mark_duplicate()
            return None
        async with holding(self._ledger, event.update_id):
            return await handler(event, data)


class KeepResponseModels(BaseRequestMiddleware):
    """aiogram parses each answer as `Response[<the method's result type>]`, a pydantic generic
    model that pydantic caches only while something else references it: once the garbage
    collector had freed it, it was built again, ~7 % of a /call's CPU (bench/README.md, stop 17).
    Holding each one makes it once per method type."""

    def __init__(self) -> None:
        self._kept: dict[type[TelegramMethod[Any]], type[Response[Any]]] = {}

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        kind = type(method)
        if kind not in self._kept:
            self._kept[kind] = Response[method.__returning__]  # type: ignore[name-defined]
        return await make_request(bot, method)


class RetryAfterMiddleware(BaseRequestMiddleware):
    """Honour Telegram's flood control: wait `retry_after` and send again, a bounded number of
    times, so a reply announcing a started call is not lost to a 429."""

    def __init__(self, *, attempts: int = 3, max_wait: float = 60.0) -> None:
        self._attempts = attempts
        self._max_wait = max_wait

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        for attempt in range(self._attempts):
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as err:
                if attempt + 1 == self._attempts or err.retry_after > self._max_wait:
                    raise
                log.warning(
                    "telegram flood control on %s: waiting %s s",
                    type(method).__name__,
                    err.retry_after,
                )
                await asyncio.sleep(err.retry_after)
        raise AssertionError("unreachable")
