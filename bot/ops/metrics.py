"""Prometheus metrics: every definition lives here, in one registry per app (tests build several).

Services do not import this module: they are given plain callbacks (CallService's `events`,
OnCall's `on_step`, the Pilot client's `observe`), and the rest is counted at the edges (the
update middleware, the Telegram session middleware, the web app's handlers). No label carries a
chat, phone, call or user id: every label value comes from a closed list, anything else is
`other` (docs: https://prometheus.io/docs/practices/naming/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from aiogram import BaseMiddleware, Bot
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.exceptions import TelegramBadRequest, TelegramRetryAfter
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import TelegramObject, Update
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bot import states
from bot.storage.store import CallRecord
from bot.texts import ERRORS

UPDATE_TYPES = frozenset(
    {"message", "edited_message", "callback_query", "my_chat_member", "chat_member"}
)
TELEGRAM_METHODS = frozenset(
    {
        "getUpdates",
        "getMe",
        "deleteWebhook",
        "setMyCommands",
        "sendMessage",
        "editMessageText",
        "editMessageReplyMarkup",
        "deleteMessage",
        "answerCallbackQuery",
        "sendChatAction",
        "pinChatMessage",
    }
)
PILOT_OPERATIONS = frozenset(
    {
        "start_call",
        "get_call",
        "list_calls",
        "terminate",
        "play",
        "realtime_session",
        "get_permission",
        "request_permission",
        "get_settings",
        "service_window",
    }
)
NUMBER_TYPES = frozenset({"web", "meta"})
ORIGINS = frozenset({"operator", "alert"})
CALL_OUTCOMES = {
    "COMPLETED": "completed",
    "REJECTED": "rejected",
    "MISSED": "missed",
    "FAILED": "failed",
    states.LOST: "lost",
}
WEBHOOK_EVENTS = frozenset(
    {
        "call.ringing",
        "call.connected",
        "call.ended",
        "call.missed",
        "call.status",
        "call.permission_updated",
    }
)
WEBHOOK_RESULTS = frozenset({"applied", "duplicate", "bad_signature", "too_large", "malformed"})
# what the Telegram webhook answered: handled (200), duplicate (200, done before), busy (503,
# another replica holds it), draining (503), unavailable (503, the ledger did not answer),
# unauthorized (401), malformed (400), too_large (413)
TELEGRAM_WEBHOOK_RESULTS = frozenset(
    {
        "handled",
        "duplicate",
        "busy",
        "draining",
        "unavailable",
        "unauthorized",
        "malformed",
        "too_large",
    }
)
ALERT_SOURCES = frozenset({"alertmanager", "grafana", "generic", "heartbeat"})
ALERT_RESULTS = frozenset(
    {
        "created",
        "updated",
        "resolved",
        "repaged",
        "ignored",
        "ok",
        "recovered",
        "unauthorized",
        "too_large",
        "malformed",
    }
)
STEP_RESULTS = frozenset(
    {
        "rang",
        "skipped",
        "throttled",
        "failed",
        "no_permission",
        "exhausted",
        "superseded",
        "settled",
        "silenced",
    }
)
INCIDENT_STATES = ("firing", "acknowledged", "exhausted")
# generate_latest writes the classic text format every Prometheus reads (names here are plain
# ASCII, so nothing needs the newer 1.0.0 escaping): say so, whatever the client's version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger(__name__)
SUMMARY_TIMEOUT_SECONDS = 2.0
# the outcome of the update being handled, for the error middleware to mark
_update_outcome: ContextVar[list[str] | None] = ContextVar("update_outcome", default=None)


def closed(value: str | None, known: frozenset[str] | set[str] | dict[str, Any]) -> str:
    return value if value is not None and value in known else "other"


def status_class(status: int | None) -> str:
    """`network` when no answer came; 429 apart (a refusal to retry later)."""
    if status is None:
        return "network"
    if status == 429:
        return "429"
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class Metrics:
    """The app's metrics. Gauges that need the database are filled by `collect()` at scrape."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._build = Gauge("callbot_build_info", "The running build.", ["version"], registry=r)
        self._build.labels(version).set(1)
        self.updates = Counter(
            "callbot_telegram_updates_total",
            "Telegram updates handled, by type and result (ok, error, duplicate).",
            ["update_type", "result"],
            registry=r,
        )
        self.update_seconds = Histogram(
            "callbot_telegram_update_duration_seconds",
            "Time to handle one Telegram update.",
            ["update_type"],
            registry=r,
        )
        self.updates_in_flight = Gauge(
            "callbot_telegram_updates_in_flight", "Telegram updates being handled now.", registry=r
        )
        self.telegram_requests = Counter(
            "callbot_telegram_api_requests_total",
            "Bot API requests, each attempt, by method and result "
            "(ok, retry_after, not_modified, error).",
            ["method", "result"],
            registry=r,
        )
        self.calls_started = Counter(
            "callbot_calls_started_total",
            "Calls the Pilot Status API accepted.",
            ["number_type", "origin"],
            registry=r,
        )
        self.calls_failed = Counter(
            "callbot_calls_failed_total",
            "Call attempts that did not start, by error code.",
            ["number_type", "code"],
            registry=r,
        )
        self.calls_ended = Counter(
            "callbot_calls_ended_total",
            "Started calls that reached their end, by outcome.",
            ["number_type", "outcome"],
            registry=r,
        )
        self.pilot_requests = Counter(
            "callbot_pilot_requests_total",
            "Pilot Status requests, each attempt, by operation and status class.",
            ["operation", "status_class"],
            registry=r,
        )
        self.pilot_seconds = Histogram(
            "callbot_pilot_request_duration_seconds",
            "Pilot Status request latency, each attempt.",
            ["operation", "status_class"],
            registry=r,
        )
        self.webhooks = Counter(
            "callbot_pilot_webhook_deliveries_total",
            "Pilot Status webhook deliveries, by first event and result.",
            ["event", "result"],
            registry=r,
        )
        self.telegram_webhook = Counter(
            "callbot_telegram_webhook_requests_total",
            "Telegram webhook requests, by result (handled, duplicate, busy, draining, "
            "unavailable, unauthorized, malformed, too_large).",
            ["result"],
            registry=r,
        )
        self.alerts = Counter(
            "callbot_alerts_received_total",
            "Alerts received from monitoring, by source and result.",
            ["source", "result"],
            registry=r,
        )
        self.steps = Counter(
            "callbot_escalation_steps_total",
            "Escalation steps run, by result.",
            ["result"],
            registry=r,
        )
        self.incidents_open = Gauge(
            "callbot_incidents_open", "Open incidents, by state.", ["state"], registry=r
        )
        self.step_lag = Gauge(
            "callbot_escalation_next_step_lag_seconds",
            "Now minus the oldest overdue escalation step; 0 when none is overdue.",
            registry=r,
        )
        self.media_sessions = Gauge(
            "callbot_media_sessions", "Media sessions in use, by kind.", ["kind"], registry=r
        )
        self._summaries: list[Callable[[], Awaitable[None]]] = []
        # Series the alert rules (deploy/prometheus-rules.yml) divide by or watch for a first
        # increase exist from the start, at 0: increase() cannot see a series' first sample.
        for number_type in sorted(NUMBER_TYPES):
            for origin in sorted(ORIGINS):
                self.calls_started.labels(number_type, origin)
        self.webhooks.labels("none", "bad_signature")

    # --- what the app wires in

    def media(self, kind: str, count: Callable[[], int]) -> None:
        self.media_sessions.labels(kind).set_function(lambda: float(count()))

    def incidents(self, summary: Callable[[], Awaitable[tuple[dict[str, int], float]]]) -> None:
        """Read at every scrape: (open incidents by state, seconds of step lag)."""

        async def refresh() -> None:
            by_state, lag = await summary()
            for state in INCIDENT_STATES:
                self.incidents_open.labels(state).set(by_state.get(state, 0))
            self.step_lag.set(lag)

        self._summaries.append(refresh)

    async def render(self) -> bytes:
        """The exposition, the database gauges refreshed first. A database that does not answer
        leaves them as they were (logged): the rest is still worth scraping, and /readyz says
        what is wrong."""
        for refresh in self._summaries:
            try:
                await asyncio.wait_for(refresh(), SUMMARY_TIMEOUT_SECONDS)
            except Exception as err:
                log.warning("metrics: the incident gauges were not read (%s)", type(err).__name__)
        return generate_latest(self.registry)

    # --- callbacks given to the services and the client

    def pilot_request(self, operation: str, status: int | None, seconds: float) -> None:
        labels = (closed(operation, PILOT_OPERATIONS), status_class(status))
        self.pilot_requests.labels(*labels).inc()
        self.pilot_seconds.labels(*labels).observe(seconds)

    def call_started(self, number_type: str, origin: str) -> None:
        self.calls_started.labels(closed(number_type, NUMBER_TYPES), closed(origin, ORIGINS)).inc()

    def call_failed(self, number_type: str | None, code: str) -> None:
        known = number_type if number_type in NUMBER_TYPES else "unknown"
        self.calls_failed.labels(known, closed(code, ERRORS)).inc()

    async def call_changed(self, record: CallRecord) -> None:
        """A tracker observer: a stored change; a terminal status is final, so counted once."""
        outcome = CALL_OUTCOMES.get(record.status)
        if outcome is not None:
            self.calls_ended.labels(closed(record.number_type, NUMBER_TYPES), outcome).inc()

    def step(self, result: str) -> None:
        self.steps.labels(closed(result, STEP_RESULTS)).inc()

    def webhook(self, event: str | None, result: str) -> None:
        label = "none" if event is None else closed(event, WEBHOOK_EVENTS)
        self.webhooks.labels(label, closed(result, WEBHOOK_RESULTS)).inc()

    def telegram_update(self, result: str) -> None:
        self.telegram_webhook.labels(closed(result, TELEGRAM_WEBHOOK_RESULTS)).inc()

    def alert(self, source: str, result: str) -> None:
        self.alerts.labels(closed(source, ALERT_SOURCES), closed(result, ALERT_RESULTS)).inc()


class UpdateMetricsMiddleware(BaseMiddleware):
    """Outer middleware on updates, inside aiogram's errors middleware: an exception that
    leaves the handlers passes here on its way to the error router."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        kind = closed(_update_type(event), UPDATE_TYPES)
        outcome = ["ok"]
        token = _update_outcome.set(outcome)
        started = time.perf_counter()
        try:
            with self._metrics.updates_in_flight.track_inprogress():
                return await handler(event, data)
        except BaseException:
            outcome[0] = "error"
            raise
        finally:
            _update_outcome.reset(token)
            self._metrics.updates.labels(kind, outcome[0]).inc()
            self._metrics.update_seconds.labels(kind).observe(time.perf_counter() - started)


def mark_duplicate() -> None:
    """Called by the ledger middleware: the update being handled was handled before."""
    outcome = _update_outcome.get()
    if outcome is not None:
        outcome[0] = "duplicate"


def _update_type(event: TelegramObject) -> str | None:
    if not isinstance(event, Update):
        return None
    try:
        return event.event_type
    except Exception:  # aiogram's UpdateTypeLookupError for a type it does not know
        return None


class TelegramRequestMetrics(BaseRequestMiddleware):
    """Session middleware counting each Bot API attempt (inside the retry-after middleware)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        name = closed(getattr(method, "__api_method__", None), TELEGRAM_METHODS)
        result = "error"
        try:
            response = await make_request(bot, method)
            result = "ok"
            return response
        except TelegramRetryAfter:
            result = "retry_after"
            raise
        except TelegramBadRequest as err:
            if "not modified" in err.message:
                result = "not_modified"
            raise
        finally:
            self._metrics.telegram_requests.labels(name, result).inc()
