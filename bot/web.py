"""The bot's small web app (aiohttp, same event loop as the bot): Pilot Status webhooks, alert
intake from monitoring, health.

- `POST /pilot-status/<token>`: the path token is unguessable (API-created webhooks may carry no
  signature, API.md D5); when a secret is configured, `x-pilot-status-signature` must be the hex
  HMAC-SHA256 of the raw body. Each delivery is stored before the 2xx; the edit is queued.
- `POST /alerts/{alertmanager|grafana|generic}/<team>` with `Authorization: Bearer <token>`:
  401 for a bad token, 400 with a reason for a bad body, nothing stored in either case.
- `GET /audio/<signed ref>.wav`: a spoken message for Pilot's `/play`, served once, short-lived.
- `GET /healthz`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bot.alerts import Alert, AlertError, parse_alertmanager, parse_generic, parse_grafana
from bot.lifecycle import CallTracker
from bot.oncall import OnCall
from bot.pilot_status.webhooks import WebhookError, parse_delivery
from bot.voice.shelf import AudioShelf

log = logging.getLogger(__name__)
TRACKER = web.AppKey("tracker", CallTracker)
ONCALL = web.AppKey("oncall", OnCall)
PARSERS: dict[str, Callable[[object], Alert]] = {
    "alertmanager": parse_alertmanager,
    "grafana": parse_grafana,
    "generic": parse_generic,
}
Handler = Callable[[web.Request], Awaitable[web.Response]]


def build_web_app(
    *,
    tracker: CallTracker,
    oncall: OnCall,
    path_token: str | None,
    secret: str | None,
    max_body: int = 64 * 1024,
    shelf: AudioShelf | None = None,
) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app[TRACKER] = tracker
    app[ONCALL] = oncall
    if path_token:
        app.router.add_post(f"/pilot-status/{path_token}", _receiver(secret))
    app.router.add_post("/alerts/{kind}/{team}", _alerts)
    app.router.add_get("/healthz", _health)
    if shelf is not None:
        app.router.add_get("/audio/{ref}.wav", shelf.serve)
    return app


def _receiver(secret: str | None) -> Handler:
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


async def _alerts(request: web.Request) -> web.Response:
    parser = PARSERS.get(request.match_info["kind"])
    if parser is None:
        raise web.HTTPNotFound()
    oncall = request.app[ONCALL]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    team = None
    if scheme.lower() == "bearer" and token.strip():
        team = await oncall.authorize(request.match_info["team"], token.strip())
    if team is None:
        return web.json_response({"error": "unknown team or bad token"}, status=401)
    raw = await request.read()
    try:
        alert = parser(json.loads(raw))
    except ValueError as err:  # AlertError is a ValueError, and so is bad JSON
        reason = str(err) if isinstance(err, AlertError) else "body is not JSON"
        return web.json_response({"error": reason[:300]}, status=400)
    result, incident = await oncall.intake(team, alert)
    return web.json_response({"result": result, "incident": incident.id if incident else None})


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
