"""`POST <path of TELEGRAM_WEBHOOK_URL>`: Telegram delivers updates here in webhook mode.

An update is answered 200 only once it was handled, in the request (never in the background,
as aiogram's SimpleRequestHandler does by default: a replica dying then loses it):

- the `X-Telegram-Bot-Api-Secret-Token` header must equal TELEGRAM_WEBHOOK_SECRET (compared in
  constant time), else 401 and nothing is handled; a body over MAX_BODY gets 413, one that is not
  an Update 400;
- while this replica drains, 503: Telegram redelivers the update, to a replica that takes it;
- the ledger decides the rest: DONE (handled before) → 200 at once; BUSY (another replica holds
  it) → 503, redelivered later; NEW → handled now, marked done, then 200. A handler error that
  aiogram's error handlers reported is still done: redelivering it would fail again.

A replica killed mid-update never answers 200; its lease expires and Telegram's redelivery is
handled by whoever gets it. The first /call of a redelivered update is idempotent
(calls.request_key), so no call is started twice.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiogram import Bot, Dispatcher
from aiogram.types import Update
from aiohttp import web
from pydantic import ValidationError

from bot.ops.metrics import Metrics
from bot.ops.shutdown import InFlight
from bot.shared.redis import redis_error
from bot.telegram.ledger import Claim, UpdateLedger, holding
from bot.web.bodies import parse_json, read_body, refuse

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_BODY = 1024 * 1024  # an update with a long message, its reply and entities stays far below
RETRY_AFTER = "5"


@dataclass
class TelegramWebhook:
    """What the receiver needs: the bot and dispatcher that handle updates, and the rules."""

    bot: Bot
    dispatcher: Dispatcher
    ledger: UpdateLedger
    secret: str
    in_flight: InFlight
    metrics: Metrics
    draining: Callable[[], bool]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        count = self.metrics.telegram_update
        given = request.headers.get(SECRET_HEADER, "")
        if not (given.isascii() and hmac.compare_digest(given.encode(), self.secret.encode())):
            log.warning("telegram webhook refused: bad or missing secret token")
            count("unauthorized")
            return refuse(401, "bad secret token")
        if self.draining():
            count("draining")
            return _unavailable("shutting down")
        try:
            raw = await read_body(request, MAX_BODY)
        except web.HTTPRequestEntityTooLarge:
            count("too_large")
            raise
        try:
            update = Update.model_validate(parse_json(raw), context={"bot": self.bot})
        except (ValueError, ValidationError):  # bad JSON is a ValueError
            count("malformed")
            return refuse(400, "not a Telegram update")
        async with self.in_flight.track():
            return await self._handle(update)

    async def _handle(self, update: Update) -> web.StreamResponse:
        count = self.metrics.telegram_update
        try:
            claim = await self.ledger.claim(update.update_id)
        except redis_error() as err:
            log.warning("update %s: ledger unavailable (%s)", update.update_id, type(err).__name__)
            count("unavailable")
            return _unavailable("temporarily unavailable")
        if claim is Claim.DONE:
            log.info("update %s delivered again; handled before", update.update_id)
            count("duplicate")
            return web.json_response({"ok": True, "duplicate": True})
        if claim is Claim.BUSY:
            log.info("update %s is being handled elsewhere; answered 503", update.update_id)
            count("busy")
            return _unavailable("being handled")
        try:
            async with holding(self.ledger, update.update_id):
                await self.dispatcher.feed_update(self.bot, update)
        except Exception:  # no error handler took it: reported here, and not handled again
            log.exception("update %s failed", update.update_id)
        count("handled")
        return web.json_response({"ok": True})


def _unavailable(reason: str) -> web.Response:
    response = refuse(503, reason)
    response.headers["Retry-After"] = RETRY_AFTER
    return response
