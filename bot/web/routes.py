"""The bot's small web app (aiohttp, same event loop as the bot): Pilot Status webhooks, alert
intake from monitoring, health.

- `POST /pilot-status/<token>`: the path token is unguessable (API-created webhooks may carry no
  signature, API.md D5); when a secret is configured, `x-pilot-status-signature` must be the hex
  HMAC-SHA256 of the raw body. Each delivery is stored before the 2xx; the edit is queued.
- `POST /alerts/{alertmanager|grafana|generic}/<team>` with `Authorization: Bearer <token>`:
  401 for a bad token, 413 over `ALERT_MAX_BODY`, 400 with a reason for a bad body, nothing
  stored in any of these cases.
- `POST /heartbeat/<team>/<name>` with the same bearer token: a heartbeat's ping (see
  bot/oncall/heartbeats.py); 404 for a heartbeat the team did not declare.
- `GET /audio/<signed ref>.wav`: a spoken message for Pilot's `/play`, served once, short-lived.
- `POST <path of TELEGRAM_WEBHOOK_URL>`: Telegram updates in webhook mode (bot/web/telegram.py).
- `GET /healthz`: the process is alive. `GET /readyz`: 200 when the database answers and its
  schema is at the newest migration, 503 naming what is not ready otherwise (and while draining).
- `/app/…`: the Mini App softphone and its API (bot/softphone/web.py).
- `GET /metrics`: Prometheus text format (bot/metrics.py), behind `METRICS_TOKEN` when set.

Each route has its own body limit (Pilot's events are small, an Alertmanager group of a few
hundred alerts is not), read as a stream and refused with 413 past it. Bad input always gets a
4xx with a short reason and changes nothing; see `_contain` for what an unexpected error gets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bot.calls.lifecycle import CallTracker
from bot.errors import CallbotError
from bot.oncall.alerts import Alert, parse_alertmanager, parse_generic, parse_grafana
from bot.oncall.engine import OnCall, valid_alias
from bot.oncall.heartbeats import Heartbeats, counts_as_ping
from bot.ops.metrics import CONTENT_TYPE, Metrics
from bot.pilot_status.webhooks import parse_delivery
from bot.softphone.web import Softphone
from bot.storage.oncall import Team
from bot.storage.store import Unstorable
from bot.voice.shelf import Shelf
from bot.web.bodies import BODY, parse_json, read_body, refuse

log = logging.getLogger(__name__)
TRACKER = web.AppKey("tracker", CallTracker)
ONCALL = web.AppKey("oncall", OnCall)
PARSERS: dict[str, Callable[[object], Alert]] = {
    "alertmanager": parse_alertmanager,
    "grafana": parse_grafana,
    "generic": parse_generic,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SIGNATURE = "x-pilot-status-signature"
METRICS = web.AppKey("metrics", Metrics)
Readiness = Callable[[], Awaitable[dict[str, str]]]  # what is not ready → why; empty: ready
MAX_DELIVERY_KEY = 256  # DeliveryRow.key
# The storage or the network is down for now: the sender's retry is what we want (503).
TRANSIENT = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    ConnectionError,
    TimeoutError,
)


def build_web_app(
    *,
    tracker: CallTracker,
    oncall: OnCall,
    path_token: str | None,
    secret: str | None,
    max_body: int = 64 * 1024,
    alert_max_body: int = 1024 * 1024,
    shelf: Shelf | None = None,
    metrics: Metrics | None = None,
    metrics_token: str | None = None,
    readiness: Readiness | None = None,
    telegram: tuple[str, Handler] | None = None,
    heartbeats: Heartbeats | None = None,
    softphone: Softphone | None = None,
) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[_contain()])
    app[TRACKER] = tracker
    app[ONCALL] = oncall
    app[METRICS] = metrics or Metrics("unknown")
    if path_token:
        app.router.add_post(f"/pilot-status/{path_token}", _receiver(secret, max_body))
    app.router.add_post("/alerts/{kind}/{team}", _intake(alert_max_body))
    if heartbeats is not None:
        app.router.add_post("/heartbeat/{team}/{name}", _heartbeat(heartbeats, alert_max_body))
    if telegram is not None:  # webhook mode: (path, receiver), bot/web/telegram.py
        app.router.add_post(*telegram)
    app.router.add_get("/healthz", _health)
    if readiness is not None:
        app.router.add_get("/readyz", _ready(readiness))
    if metrics is not None:
        app.router.add_get("/metrics", _metrics(metrics, metrics_token))
    if shelf is not None:
        app.router.add_get("/audio/{ref}.wav", shelf.serve)
    if softphone is not None:  # the Mini App at /app/ (bot/softphone/web.py)
        softphone.install(app)
    return app


def _receiver(secret: str | None, max_body: int) -> Handler:
    key = secret.encode() if secret else None

    async def receive(request: web.Request) -> web.StreamResponse:
        count = request.app[METRICS].webhook
        try:
            raw = await read_body(request, max_body)
        except web.HTTPRequestEntityTooLarge:
            count(None, "too_large")
            raise
        if key is not None and not _signed(key, raw, request.headers.get(SIGNATURE)):
            log.warning("webhook refused: bad or missing signature")
            count(None, "bad_signature")
            return refuse(401, "bad signature")
        try:
            events = parse_delivery(parse_json(raw))
        except ValueError as err:  # WebhookError is a ValueError, and so is bad JSON
            count(None, "malformed")
            return refuse(400, str(err) or "bad body")
        first = events[0].event if events else None
        delivery = _delivery_key(request.headers.get("Idempotency-Key"), raw)
        try:
            applied = await request.app[TRACKER].on_delivery(delivery, events)
        except Unstorable as err:
            log.warning("webhook delivery %s refused by the database: %s", delivery, err)
            count(first, "malformed")
            return refuse(400, str(err))
        if not applied:
            count(first, "duplicate")
            return web.json_response({"ok": True, "duplicate": True})
        count(first, "applied")
        return web.json_response({"ok": True, "events": len(events)})

    return receive


def _intake(max_body: int) -> Handler:
    async def alerts(request: web.Request) -> web.StreamResponse:
        parser = PARSERS.get(request.match_info["kind"])
        if parser is None:
            raise web.HTTPNotFound()
        oncall = request.app[ONCALL]
        source = request.match_info["kind"]
        count = request.app[METRICS].alert
        team = await _authorized_team(request)
        if team is None:
            count(source, "unauthorized")
            return refuse(401, "unknown team or bad token")
        try:
            raw = await read_body(request, max_body)
        except web.HTTPRequestEntityTooLarge:
            count(source, "too_large")
            raise
        try:
            alert = parser(parse_json(raw))
        except ValueError as err:  # AlertError is a ValueError, and so is bad JSON
            count(source, "malformed")
            return refuse(400, str(err) or "bad body")
        result, incident = await oncall.intake(team, alert)
        count(source, result)
        return web.json_response({"result": result, "incident": incident.id if incident else None})

    return alerts


async def _authorized_team(request: web.Request) -> Team | None:
    """The team of the path, if the request carries its intake token as a bearer token."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name, token = _alias_or_none(request.match_info["team"]), token.strip()
    if scheme.lower() == "bearer" and name and token.isascii() and token.isprintable():
        return await request.app[ONCALL].authorize(name, token)
    return None


def _heartbeat(heartbeats: Heartbeats, max_body: int) -> Handler:
    """`POST /heartbeat/<team>/<name>`: a ping, with any body or none; an Alertmanager body
    (the Watchdog alert) counts while it is firing."""

    async def ping(request: web.Request) -> web.StreamResponse:
        count = request.app[METRICS].alert
        team = await _authorized_team(request)
        if team is None:
            count("heartbeat", "unauthorized")
            return refuse(401, "unknown team or bad token")
        name = _alias_or_none(request.match_info["name"])
        if name is None:
            return refuse(404, "unknown heartbeat")
        try:
            raw = await read_body(request, max_body)
        except web.HTTPRequestEntityTooLarge:
            count("heartbeat", "too_large")
            raise
        try:
            body = parse_json(raw) if raw.strip() else None
        except ValueError:
            body = None  # a ping may carry any text (curl -d, a cron job's output)
        try:
            pinged = counts_as_ping(body)
        except ValueError as err:  # an Alertmanager body that is not one
            count("heartbeat", "malformed")
            return refuse(400, str(err) or "bad body")
        if not pinged:
            count("heartbeat", "ignored")
            return web.json_response({"result": "ignored"})
        try:
            result = await heartbeats.ping(team, name)
        except CallbotError:
            return refuse(404, "unknown heartbeat")
        count("heartbeat", result)
        return web.json_response({"result": result})

    return ping


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def _ready(readiness: Readiness) -> Handler:
    async def ready(_request: web.Request) -> web.StreamResponse:
        failing = await readiness()
        if failing:
            return web.json_response({"ready": False, "failing": failing}, status=503)
        return web.json_response({"ready": True})

    return ready


def _metrics(metrics: Metrics, token: str | None) -> Handler:
    expected = f"Bearer {token}".encode() if token else None

    async def scrape(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").strip()
        if expected is not None and not (
            given.isascii() and hmac.compare_digest(given.encode(), expected)
        ):
            return web.Response(
                status=401, text="bearer token required\n", headers={"WWW-Authenticate": "Bearer"}
            )
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return scrape


# --------------------------------------------------------------------------- input hygiene


def _signed(key: bytes, raw: bytes, given: str | None) -> bool:
    """Whether `given` is the hex HMAC-SHA256 of the body (any other text simply is not)."""
    given = (given or "").strip().lower()
    if not given.isascii():
        return False
    expected = hmac.new(key, raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


def _delivery_key(header: str | None, raw: bytes) -> str:
    """Idempotency-Key as sent when it fits the column as plain text, else its digest; without
    one, the body's digest (a redelivery repeats the body)."""
    if header is None:
        return hashlib.sha256(raw).hexdigest()
    if len(header) <= MAX_DELIVERY_KEY and header.isascii() and header.isprintable():
        return header
    return "sha256:" + hashlib.sha256(header.encode("utf-8", "surrogateescape")).hexdigest()


def _alias_or_none(name: str) -> str | None:
    try:
        return valid_alias(name)
    except CallbotError:
        return None


class _Poison:
    """Digests of bodies that made a handler fail unexpectedly, for a while (bounded)."""

    def __init__(self, size: int = 1024, ttl: float = 3600.0) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._size, self._ttl = size, ttl

    def again(self, digest: str) -> bool:
        """Record a failure; True when the same body failed before, within the ttl."""
        now = time.monotonic()
        before = self._seen.pop(digest, None)
        self._seen[digest] = now
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return before is not None and now - before < self._ttl


def _contain() -> Middleware:
    """What an error no handler expected becomes.

    - The storage or network is down (transient): 503 with Retry-After. Nothing was stored, and
      the sender's retry is exactly what should happen.
    - Anything else is a bug this body triggers. The first time, 500 and the traceback in the log
      (a retry may still succeed). When the same body fails again it is poison: 422 and one log
      line, so that neither Pilot Status nor Alertmanager redelivers it forever and the log does
      not fill with the same traceback.
    """
    poison = _Poison()

    @web.middleware
    async def contain(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except TRANSIENT as err:
            log.warning("%s: unavailable (%s)", _route(request), type(err).__name__)
            response = refuse(503, "temporarily unavailable, retry later")
            response.headers["Retry-After"] = "30"
            return response
        except Exception:
            raw = request.get(BODY, b"")  # empty when the failure came before the body was read
            digest = hashlib.sha256(request.path.encode() + b"\0" + raw).hexdigest()
            if poison.again(digest):
                log.error("%s: the same body failed again; answered 422", _route(request))
                return refuse(422, "this body cannot be processed; see the bot's log")
            log.exception("%s failed", _route(request))
            return refuse(500, "internal error")

    return contain


def _route(request: web.Request) -> str:
    """The request for a log line, without the webhook's secret path token."""
    if request.path.startswith("/pilot-status/"):
        return f"{request.method} /pilot-status/<token>"
    return f"{request.method} {request.path[:200]}"
