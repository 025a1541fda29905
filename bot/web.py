"""The bot's small web app (aiohttp, same event loop as the bot): Pilot Status webhooks, health.

`POST /pilot-status/<token>`: the path token is unguessable (API-created webhooks may carry no
signature, API.md D5); when a secret is configured, `x-pilot-status-signature` must be the hex
HMAC-SHA256 of the raw body. Each delivery is stored before the 2xx; the message edit is queued.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from aiohttp import web

from bot.lifecycle import CallTracker
from bot.pilot_status.webhooks import WebhookError, parse_delivery

log = logging.getLogger(__name__)
TRACKER = web.AppKey("tracker", CallTracker)


def build_web_app(
    *,
    tracker: CallTracker,
    path_token: str,
    secret: str | None,
    max_body: int = 64 * 1024,
) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app[TRACKER] = tracker
    app.router.add_post(f"/pilot-status/{path_token}", _receiver(secret))
    app.router.add_get("/healthz", _health)
    return app


def _receiver(secret: str | None):  # type: ignore[no-untyped-def]
    key = secret.encode() if secret else None

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()  # over client_max_size: aiohttp answers 413
        if key is not None:
            expected = hmac.new(key, raw, hashlib.sha256).hexdigest()
            given = request.headers.get("x-pilot-status-signature", "").strip().lower()
            if not hmac.compare_digest(expected, given):
                log.warning("webhook refused: bad or missing signature")
                return web.json_response({"error": "bad signature"}, status=401)
        try:
            events = parse_delivery(json.loads(raw))
        except (ValueError, WebhookError) as err:
            return web.json_response({"error": str(err)[:200] or "bad body"}, status=400)
        delivery = request.headers.get("Idempotency-Key") or hashlib.sha256(raw).hexdigest()
        if not await request.app[TRACKER].on_delivery(delivery[:256], events):
            return web.json_response({"ok": True, "duplicate": True})
        return web.json_response({"ok": True, "events": len(events)})

    return receive


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
