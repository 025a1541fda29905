"""Wiring: everything is built here, at start, never at import time."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import signal
import tomllib
from collections.abc import Callable, Coroutine
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramNetworkError,
    TelegramUnauthorizedError,
)
from aiogram.types import BotCommand
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.access import AccessPolicy
from bot.calls.lifecycle import EARLY_EVENTS_TTL, CallTracker, PollPolicy
from bot.calls.live import LiveMessages
from bot.calls.numbers import NumberTypes
from bot.calls.service import CallRequest, CallService, PendingPermission
from bot.config import Settings
from bot.errors import CallbotError, describe
from bot.i18n import LOCALES, LocaleMiddleware, build_i18n
from bot.oncall.engine import TEST_SOURCE, OnCall, Throttle, answer_acknowledges, valid_alias
from bot.oncall.heartbeats import Heartbeats
from bot.oncall.silences import Silences
from bot.ops.metrics import Metrics, TelegramRequestMetrics, UpdateMetricsMiddleware
from bot.ops.pulse import Pulse, build_pulse_client
from bot.ops.retention import Retention
from bot.ops.shutdown import InFlight
from bot.pilot_status import PilotStatusClient, RetryPolicy, build_http_client
from bot.pilot_status.errors import PilotStatusError
from bot.shared.early_events import early_events
from bot.shared.locks import locks
from bot.shared.pending import Pending, pending_store
from bot.shared.redis import Keys
from bot.shared.redis import connect as connect_redis
from bot.shared.tasks import stop_all
from bot.shared.turns import LocalTurns, SharedTurns
from bot.softphone.auth import InitDataCheck
from bot.softphone.ice import ice_servers
from bot.softphone.links import TalkLinks
from bot.softphone.meta import MetaTalk
from bot.softphone.meta_web import install_webrtc
from bot.softphone.presence import presence
from bot.softphone.signalling import RedisSignals
from bot.softphone.web import Softphone
from bot.storage.db import (
    ONCALL_FILE_LOCK,
    DatabaseInUse,
    SqliteFileLock,
    create_engine,
    database_url,
    head_revision,
    migrate,
    one_at_a_time,
    schema_revision,
    sessionmaker,
)
from bot.storage.oncall import Incident, OnCallStore, PostShare, Team
from bot.storage.retention import RetentionStore
from bot.storage.store import Store, utcnow
from bot.storage.watch import WatchStore
from bot.telegram.ledger import MemoryLedger, RedisLedger, UpdateLedger
from bot.telegram.middlewares import (
    InFlightUpdatesMiddleware,
    KeepResponseModels,
    LedgerMiddleware,
    RetryAfterMiddleware,
)
from bot.telegram.pacing import SendLimits, SendPacer
from bot.texts import COMMANDS, spoken_alert, spoken_default
from bot.voice.media import MediaEndpoint
from bot.voice.relay import LocalRelay, RedisRelay
from bot.voice.service import LazyEndpoint, Voice, VoicePolicy
from bot.voice.shelf import audio_shelf
from bot.voice.speech import Speaker, Speech
from bot.web.routes import Handler, build_web_app
from bot.web.server import ConnectionLimits, WebServer
from bot.web.telegram import TelegramWebhook
from handlers import build_router

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("callbot")
# A replica killed while starting a call frees its number's guard within this lease. It must be
# shorter than the least an update it held stays claimed after its death (the ledger's lease
# minus one renewal period, 20 s): Telegram's redelivery of that /call then finds the number
# free, and is not told "being started right now" by a dead replica's guard.
NUMBER_GUARD_LEASE_SECONDS = 15.0
T = TypeVar("T")
STARTUP_PROBE_SECONDS = 10.0
# replicas: how often open call attempts of a replica that died are looked for, and how old
ATTEMPT_SWEEP_SECONDS = 30.0
ATTEMPT_SWEEP_AGE = timedelta(minutes=1)
# after a restart: how often open attempts a live process held the number's guard for are looked
# at again (their holder may have died: its guard's lease then runs out)
ATTEMPT_RECHECK_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 3.0  # a readiness probe's database check
# setWebhook failed at start: tried again in the background, waiting this long, doubled each time
WEBHOOK_RETRY_FIRST_SECONDS = 1.0
WEBHOOK_RETRY_MAX_SECONDS = 60.0


def build_version() -> str:
    try:
        return importlib.metadata.version("callbot")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_pilot_client(settings: Settings, metrics: Metrics | None = None) -> PilotStatusClient:
    http = build_http_client(
        base_url=str(settings.pilot_status_base_url),
        api_key=settings.pilot_status_api_key,
        api_key_id=settings.pilot_status_api_key_id,
        number_id=settings.pilot_status_number_id,
        connect_timeout=settings.pilot_status_connect_timeout,
        read_timeout=settings.pilot_status_read_timeout,
        max_connections=settings.pilot_status_max_connections,
    )
    retry = RetryPolicy(
        max_retries=settings.pilot_status_max_retries, backoff=settings.pilot_status_retry_backoff
    )
    return PilotStatusClient(
        http, retry=retry, observe=metrics.pilot_request if metrics is not None else None
    )


def build_engine(settings: Settings) -> AsyncEngine:
    """The database of DATABASE_URL, or the SQLite file under DATA_DIR."""
    secret = settings.database_url
    url = database_url(secret.get_secret_value() if secret else None, settings.data_dir)
    return create_engine(url)


def build_pacer(settings: Settings, redis: Redis | None, keys: Keys) -> SendPacer:
    limits = SendLimits.of(
        per_second=settings.telegram_sends_per_second,
        group_per_minute=settings.telegram_group_sends_per_minute,
        chat_per_second=settings.telegram_chat_sends_per_second,
    )
    return SendPacer(limits, redis=redis, key_prefix=keys("limits"))


def build_bot(
    settings: Settings, metrics: Metrics | None = None, pacer: SendPacer | None = None
) -> Bot:
    session = AiohttpSession()
    if settings.telegram_api_url is not None:
        base = str(settings.telegram_api_url).rstrip("/")
        session = AiohttpSession(api=TelegramAPIServer.from_base(base))
    session.middleware(KeepResponseModels())
    session.middleware(RetryAfterMiddleware())
    if pacer is not None:  # inside the retry: a send tried again waits for a slot again
        session.middleware(pacer)
    if metrics is not None:  # inside the retry: each attempt is counted
        session.middleware(TelegramRequestMetrics(metrics))
    return Bot(
        settings.bot_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


class CallbotApp:
    """Everything one process runs: the bot, its services, storage and web app, on one loop."""

    def __init__(self, settings: Settings, *, media: MediaEndpoint | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(build_version())
        self.draining = False  # /readyz answers 503 from the start of a shutdown
        self._head: str | None = None  # the newest migration, read once at start
        self.pilot = build_pilot_client(settings, self.metrics)
        redis_url = settings.redis_url
        self.redis: Redis | None = (
            connect_redis(redis_url.get_secret_value(), instance=settings.instance_name)
            if redis_url is not None
            else None
        )
        self.keys = Keys(settings.redis_key_prefix)
        self.pacer = build_pacer(settings, self.redis, self.keys)
        self.bot = build_bot(settings, self.metrics, self.pacer)
        self.engine = build_engine(settings)
        # which updates were handled, across replicas when Redis is shared
        self.ledger: UpdateLedger = (
            RedisLedger(self.redis, self.keys) if self.redis is not None else MemoryLedger()
        )
        self.webhook_set = asyncio.Event()  # webhook mode: Telegram took our setWebhook
        self._webhook_failure = "setWebhook not answered yet"
        self._stop = asyncio.Event()  # webhook mode: SIGTERM/SIGINT (or stop()) came
        self._file_lock = SqliteFileLock.of(self.engine)
        self.store = Store(sessionmaker(self.engine))
        self.i18n = build_i18n(settings.default_locale)
        self.call_again: Pending[CallRequest] = self._pending("call_again", CallRequest, 24 * 3600)
        base = settings.public_base_url
        self.talk_links = (
            TalkLinks(str(base), short_name=settings.miniapp_short_name)
            if base is not None
            else None
        )
        self.live = LiveMessages(
            self.bot,
            self.i18n,
            self.call_again,
            min_interval=settings.telegram_edit_interval,
            give_up_after=settings.telegram_edit_give_up_after,
            turns=SharedTurns(self.redis, self.keys) if self.redis is not None else LocalTurns(),
            talk=self.talk_links,
        )
        webhooks = settings.pilot_status_webhook_token is not None
        poll = (
            None
            if webhooks
            else PollPolicy(
                first_interval=settings.call_poll_interval, give_up_after=settings.call_poll_timeout
            )
        )
        # one attempt per number at a time, across replicas with Redis; recovery after a
        # restart leaves alone the attempts a live process holds it for
        number_guard = locks(self.redis, self.keys, "call", lease=NUMBER_GUARD_LEASE_SECONDS)
        self.tracker = CallTracker(
            self.store,
            self.pilot,
            self.live,
            poll=poll,
            early=early_events(self.redis, self.keys, EARLY_EVENTS_TTL),
            follow_for=settings.call_poll_timeout,
            confirm_after=settings.call_poll_interval,
            guard=number_guard,
            recheck_after=ATTEMPT_RECHECK_SECONDS,
        )
        self.number_types = NumberTypes(self.pilot, settings.pilot_status_number_type)
        self.speaker = Speaker(
            settings.speech_engine, words_per_minute=settings.speech_words_per_minute
        )
        # a /play URL lives while the call may still ring, and at least two minutes
        ttl = max(120.0, settings.call_ring_timeout + 60)
        self.shelf = (
            audio_shelf(self.redis, self.keys, str(base), ttl=ttl) if base is not None else None
        )
        self.access = AccessPolicy(
            operator_ids=settings.caller_ids,
            admin_ids=settings.admin_ids,
            allowed_chat_ids=settings.allowed_chat_ids,
        )
        relay = RedisRelay(self.redis, self.keys) if self.redis is not None else LocalRelay()
        self.voice = Voice(
            self.pilot,
            self.store,
            self.tracker,
            self.speaker,
            media or LazyEndpoint(settings.stun_servers),
            policy=VoicePolicy(
                repeat=settings.speech_repeat,
                answer_timeout=settings.media_answer_timeout,
                connect_timeout=settings.media_connect_timeout,
                ring_timeout=settings.call_ring_timeout,
                max_sessions=settings.media_max_calls,
                realtime_rate=settings.realtime_sample_rate,
            ),
            shelf=self.shelf,
            relay=relay,
            default_text=self._say(spoken_default),
        )
        # the softphone on Meta numbers: the operator's browser bridged to the call's media
        self.meta_talk = MetaTalk(
            self.voice,
            self.store,
            access=self.access,
            ice=ice_servers(settings),
            signals=(
                RedisSignals(self.redis, self.keys, relay.origin)
                if self.redis is not None and isinstance(relay, RedisRelay)
                else None
            ),
        )
        self.in_flight = InFlight()  # what a shutdown lets finish
        self.calls = CallService(
            self.pilot,
            self.number_types,
            self.store,
            self.tracker,
            self.voice,
            drain=self.in_flight,
            in_flight=number_guard,
            counts=self.metrics,
        )
        self.oncall_store = OnCallStore(sessionmaker(self.engine))
        self.watch_store = WatchStore(sessionmaker(self.engine))
        self.silences = Silences(self.watch_store)
        self.oncall = OnCall(
            self.oncall_store,
            self.calls,
            self.live,
            throttles=Throttle.parse_many(settings.oncall_throttle),
            locale=settings.default_locale,
            speech=self._alert_speech,
            translate=lambda locale, template: self.i18n.gettext(template, locale=locale),
            lease=timedelta(seconds=settings.oncall_lease_seconds),
            post_share=PostShare(settings.oncall_posts_per_minute)
            if settings.oncall_posts_per_minute
            else None,
            drain=self.in_flight,
            admins=tuple(sorted(settings.admin_ids)),
            on_step=self.metrics.step,
            silences=self.silences,
        )
        self.heartbeats = Heartbeats(self.oncall, self.watch_store, self.oncall_store)
        self.pulse: Pulse | None = None
        if settings.heartbeat_url is not None:
            self.pulse = Pulse(
                settings.heartbeat_url.get_secret_value(),
                build_pulse_client(),
                self.oncall_store.open_summary,
                lambda: self.oncall.clock(),
                stopping=lambda: self.draining,
            )
        self.tracker.subscribe(self.oncall.call_changed)
        self.tracker.subscribe(self.metrics.call_changed)
        self.metrics.media("meta", lambda: self.voice.open_sessions)
        self.metrics.media("realtime", lambda: self.voice.realtime_sessions)
        self.metrics.incidents(lambda: self.oncall_store.open_summary(self.oncall.clock()))
        self.retention = Retention(
            RetentionStore(sessionmaker(self.engine)), days=settings.retention_days
        )
        self.softphone = Softphone(
            check=InitDataCheck(
                settings.bot_token.get_secret_value(), settings.miniapp_init_data_max_age
            ),
            access=self.access,
            calls=self.calls,
            pilot=self.pilot,
            sample_rate=settings.realtime_sample_rate,
            presence=presence(self.redis, self.keys),
            ice_servers=lambda _user, record: self.meta_talk.ice_for(record),
        )
        self.dp = self._dispatcher()
        self.web: WebServer | None = None
        self.web_port: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._started_at = utcnow()

    def _pending(self, name: str, item_type: type[T], ttl: float) -> Pending[T]:
        """Prompts awaiting a button: in Redis with REDIS_URL (any replica takes the press)."""
        return pending_store(self.redis, self.keys, name, item_type, ttl)

    def _say(self, text: Callable[..., str]) -> Callable[..., str]:
        """A text of bot.texts in a given locale, outside any Telegram update."""

        def render(locale: str, **params: str) -> str:
            with self.i18n.context(), self.i18n.use_locale(locale):
                return text(**params)

        return render

    def _alert_speech(self, team: Team, incident: Incident) -> Speech | None:
        """What an on-call ring says, in the team's language: the alert, then how it is
        acknowledged; when speaking is available."""
        if not self.speaker.available:
            return None
        locale = team.locale or self.settings.default_locale
        with self.i18n.context(), self.i18n.use_locale(locale):
            text = spoken_alert(
                team.name,
                incident.title,
                acked_on_answer=answer_acknowledges(team, incident),
                test=incident.source == TEST_SOURCE,
            )
        return Speech.for_locale(text, locale)

    def _dispatcher(self) -> Dispatcher:
        settings = self.settings
        dp = Dispatcher(
            settings=settings,
            access=self.access,
            number_types=self.number_types,
            calls=self.calls,
            pending_calls=self._pending("calls", CallRequest, settings.confirm_ttl_seconds),
            pending_permissions=self._pending("permissions", PendingPermission, 24 * 3600),
            call_again=self.call_again,
            store=self.store,
            oncall=self.oncall,
            oncall_store=self.oncall_store,
            heartbeats=self.heartbeats,
            silences=self.silences,
            i18n=self.i18n,
            talk_links=self.talk_links,
        )
        dp.update.outer_middleware(UpdateMetricsMiddleware(self.metrics))  # sees duplicates too
        if not settings.webhook_mode:  # the webhook receiver claims its updates itself
            dp.update.outer_middleware(LedgerMiddleware(self.ledger))
        dp.update.outer_middleware(InFlightUpdatesMiddleware(self.in_flight))
        LocaleMiddleware(self.i18n).setup(dp)
        dp.include_router(build_router())
        dp.startup.register(on_startup)
        dp.startup.register(self._recover_in_background)
        return dp

    async def start(self) -> None:
        """Schema up to date, on-call file loaded, web app listening; then polling may begin."""
        settings = self.settings
        lock_sqlite_file(self._file_lock)
        await migrate(self.engine)
        self._head = head_revision()
        if settings.oncall_file is not None:
            # replicas starting together would insert the same contacts at once
            async with one_at_a_time(self.engine, ONCALL_FILE_LOCK):
                await self._load_oncall_file(settings.oncall_file)
        token = settings.pilot_status_webhook_token
        secret = settings.pilot_status_webhook_secret
        metrics_token = settings.metrics_token
        app = build_web_app(
            tracker=self.tracker,
            oncall=self.oncall,
            path_token=token.get_secret_value() if token else None,
            secret=secret.get_secret_value() if secret else None,
            max_body=settings.webhook_max_body,
            alert_max_body=settings.alert_max_body,
            shelf=self.shelf,
            metrics=self.metrics,
            metrics_token=metrics_token.get_secret_value() if metrics_token else None,
            readiness=self.readiness,
            telegram=self._telegram_route(),
            heartbeats=self.heartbeats,
            softphone=self.softphone,
        )
        install_webrtc(app, self.softphone.check, self.meta_talk)  # Meta numbers' signalling
        limits = ConnectionLimits(
            header_timeout=settings.web_header_timeout,
            body_timeout=settings.web_body_timeout,
            keepalive_timeout=settings.web_keepalive_timeout,
            max_connections=settings.web_max_connections,
        )
        server = WebServer(app, limits)
        try:
            self.web_port = await server.start(settings.web_host, settings.web_port)
        except OSError as err:
            raise StartupError(
                f"cannot listen on {settings.web_host}:{settings.web_port} ({err.strerror}); "
                "set WEB_PORT"
            ) from None
        self.web = server
        log.info("web app listening on port %s", self.web_port)
        if token is None:
            log.info("no PILOT_STATUS_WEBHOOK_TOKEN: calls are followed by polling")
        if settings.webhook_mode and self.redis is None:
            log.warning(
                "telegram webhook mode without REDIS_URL: an update is handled once per process "
                "only; run one replica, or set REDIS_URL for several"
            )
        if not self.speaker.available:
            log.warning(
                "%s is not installed: speaking is off (install the Debian package espeak-ng); "
                "Meta calls play beeps instead of a message",
                settings.speech_engine,
            )
        if self.voice.relay.shared:  # one subscriber per replica, for its Meta calls' media
            self._spawn(self.voice.relay.run(self.voice), "media relay")
        if self.meta_talk.signals is not None:  # a browser's request for a call held here
            self._spawn(self.meta_talk.run(), "softphone signalling")
        if self.redis is not None:  # replicas: one may die after the others started
            sweep = self.tracker.sweep_forever(ATTEMPT_SWEEP_SECONDS, ATTEMPT_SWEEP_AGE)
            self._spawn(sweep, "attempt sweep")
        if settings.oncall_tick_seconds > 0:
            self._spawn(self.oncall.run_forever(settings.oncall_tick_seconds), "on-call timer")
            self._spawn(self.heartbeats.run_forever(settings.oncall_tick_seconds), "heartbeats")
        if self.pulse is not None:
            self._spawn(self.pulse.run_forever(), "outbound heartbeat")
        if settings.retention_interval_seconds > 0:
            self._spawn(
                self.retention.run_forever(settings.retention_interval_seconds), "retention"
            )

    def _telegram_route(self) -> tuple[str, Handler] | None:
        """Webhook mode: the receiver, at the path of TELEGRAM_WEBHOOK_URL."""
        url, secret = self.settings.telegram_webhook_url, self.settings.telegram_webhook_secret
        if url is None or secret is None:
            return None
        receiver = TelegramWebhook(
            bot=self.bot,
            dispatcher=self.dp,
            ledger=self.ledger,
            secret=secret.get_secret_value(),
            in_flight=self.in_flight,
            metrics=self.metrics,
            draining=lambda: self.draining,
        )
        return url.path or "/", receiver.handle

    async def _load_oncall_file(self, path: Path) -> None:
        try:
            config = tomllib.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))
            contacts, teams = await self.oncall.load(config, region=self.settings.default_region)
            await self._load_watch(config)
        except (OSError, ValueError, CallbotError) as err:
            raise StartupError(f"ONCALL_FILE {path}: {err}") from None
        log.info("on-call file loaded: %d contacts, %d teams", contacts, teams)

    async def _load_watch(self, config: dict[str, Any]) -> None:
        """Each team's heartbeats and maintenance windows of ONCALL_FILE."""
        now = self.oncall.clock()
        for name, spec in config.get("teams", {}).items():
            team = await self.oncall_store.team(valid_alias(name))
            if team is None or not isinstance(spec, dict):
                continue
            await self.heartbeats.load(team, spec.get("heartbeats"))
            await self.silences.load_windows(team.id, team.name, spec.get("windows"), now=now)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _recover_in_background(self) -> None:
        self._spawn(self._recover(), "recover")

    async def _recover(self) -> None:
        try:
            await self.tracker.recover()
        except Exception:
            log.exception("recovery after restart failed; it runs again at the next start")
        finally:
            self.oncall.calls_recovered.set()
        try:
            await self.voice.end_orphans(started_before=self._started_at)
        except Exception:
            log.exception("recovery after restart failed; it runs again at the next start")

    async def run_polling(self, **kwargs: Any) -> None:
        try:
            await self.bot.delete_webhook(drop_pending_updates=False)
        except TelegramUnauthorizedError:
            raise StartupError("Telegram rejected BOT_TOKEN: check it with @BotFather") from None
        except TelegramNetworkError as err:
            raise StartupError(
                f"cannot reach the Telegram Bot API ({err.message}); "
                "check the network or TELEGRAM_API_URL"
            ) from None
        await self.dp.start_polling(
            self.bot, allowed_updates=self.dp.resolve_used_update_types(), **kwargs
        )

    async def run_webhook(self, *, handle_signals: bool = True) -> None:
        """Webhook mode: set the webhook, run until SIGTERM/SIGINT (or `stop()`), then drain:
        /readyz and new updates get 503, updates in flight finish. The webhook is never
        deleted at shutdown: the other replicas serve it."""
        await self.start_webhook()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for number in signals:
            loop.add_signal_handler(number, self.stop)
        try:
            await self._stop.wait()
        finally:
            for number in signals:
                loop.remove_signal_handler(number)
        log.info("shutdown: draining (new updates are refused with 503)")
        await self.drain()
        await self.dp.emit_shutdown(**self._workflow())

    def stop(self) -> None:
        """Webhook mode: begin the shutdown, as SIGTERM does (from now on /readyz and new
        updates get 503)."""
        self.draining = True
        self._stop.set()

    async def start_webhook(self) -> None:
        """setWebhook (retried in the background while Telegram fails), then the startup."""
        try:
            set_now = await self._set_webhook()
        except TelegramUnauthorizedError:
            raise StartupError("Telegram rejected BOT_TOKEN: check it with @BotFather") from None
        if not set_now:
            self._spawn(self._set_webhook_until_done(), "setWebhook")
        await self.dp.emit_startup(**self._workflow())

    def _workflow(self) -> dict[str, Any]:
        """What aiogram's polling hands its startup and shutdown handlers."""
        return {"bot": self.bot, "dispatcher": self.dp, "bots": [self.bot], **self.dp.workflow_data}

    async def _set_webhook(self) -> bool:
        settings = self.settings
        assert settings.telegram_webhook_url is not None
        assert settings.telegram_webhook_secret is not None
        try:
            await self.bot.set_webhook(
                url=str(settings.telegram_webhook_url),
                secret_token=settings.telegram_webhook_secret.get_secret_value(),
                allowed_updates=self.dp.resolve_used_update_types(),
                max_connections=settings.telegram_webhook_max_connections,
                drop_pending_updates=False,
            )
        except TelegramUnauthorizedError:
            raise
        except (TelegramAPIError, TelegramNetworkError) as err:
            self._webhook_failure = f"setWebhook failed: {err.message}"[:200]
            log.warning("%s; trying again", self._webhook_failure)
            return False
        self.webhook_set.set()
        log.info(
            "telegram webhook set (max %d connections)", settings.telegram_webhook_max_connections
        )
        return True

    async def _set_webhook_until_done(self) -> None:
        delay = WEBHOOK_RETRY_FIRST_SECONDS
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, WEBHOOK_RETRY_MAX_SECONDS)
            try:
                if await self._set_webhook():
                    return
            except TelegramUnauthorizedError:
                self._webhook_failure = "setWebhook: Telegram rejected BOT_TOKEN"
                log.error("%s; check it with @BotFather", self._webhook_failure)

    async def close(self) -> None:
        await self.drain()
        await stop_all(list(self._background))
        await self.voice.stop()
        await self.meta_talk.stop()
        await self.tracker.stop()
        await self.oncall.close()
        if self.pulse is not None:
            await self.pulse.aclose()
        with suppress(TimeoutError):
            await asyncio.wait_for(self.live.wait_idle(), 5)
        await self.live.stop()
        if self.web is not None:
            await self.web.close()
        await self.pilot.aclose()
        await self.engine.dispose()
        if self.redis is not None:
            await self.redis.aclose()
        if self._file_lock is not None:
            self._file_lock.release()
        await self.bot.session.close()

    async def readiness(self) -> dict[str, str]:
        """What keeps this process from taking traffic (part → reason); empty when ready."""
        if self.draining:
            return {"shutdown": "draining"}
        if self.settings.webhook_mode and not self.webhook_set.is_set():
            return {"webhook": self._webhook_failure}
        head = self._head
        try:
            revision = await asyncio.wait_for(schema_revision(self.engine), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            return {"database": f"no answer within {READY_TIMEOUT_SECONDS:.0f} s"}
        except Exception as err:
            log.warning("readiness: the database does not answer (%s)", type(err).__name__)
            return {"database": f"unavailable ({type(err).__name__})"}
        if revision != head:
            return {"migrations": f"database at {revision or 'none'}, code at {head}"}
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.execute_command("PING"), READY_TIMEOUT_SECONDS)
            except TimeoutError:
                return {"redis": f"no answer within {READY_TIMEOUT_SECONDS:.0f} s"}
            except Exception as err:
                log.warning("readiness: Redis does not answer (%s)", type(err).__name__)
                return {"redis": f"unavailable ({type(err).__name__})"}
        return {}

    async def drain(self) -> None:
        """No new escalation step; let steps, rings and /call replies in flight finish
        (bounded by SHUTDOWN_GRACE_SECONDS)."""
        self.draining = True
        self.oncall.stop()
        self.heartbeats.stop()
        seconds = self.settings.shutdown_grace_seconds
        if self.in_flight.count:
            log.info(
                "shutdown: letting calls and steps in flight finish (%d tasks, up to %.0f s)",
                self.in_flight.count,
                seconds,
            )
        if not await self.in_flight.wait_idle(seconds):
            log.warning(
                "shutdown: %d still in flight after %.0f s (SHUTDOWN_GRACE_SECONDS); cut off, "
                "they are reconciled at the next start",
                self.in_flight.count,
                seconds,
            )


async def on_startup(
    bot: Bot, dispatcher: Dispatcher, number_types: NumberTypes, talk_links: TalkLinks | None
) -> None:
    i18n = dispatcher["i18n"]
    for locale in LOCALES:
        with i18n.context(), i18n.use_locale(locale):
            commands = [BotCommand(command=name, description=str(text)) for name, text in COMMANDS]
        language = None if locale == "en" else locale.split("_")[0]
        await bot.set_my_commands(commands, language_code=language)
    me = await bot.get_me()
    if talk_links is not None:  # groups' Talk links name the bot
        talk_links.bot_username = me.username
    kind = "unknown (will probe again on the first /call)"
    try:
        number_type = await asyncio.wait_for(number_types.get(), STARTUP_PROBE_SECONDS)
        kind = f"{number_type.value} ({'detected' if number_types.detected else 'configured'})"
    except (TimeoutError, PilotStatusError) as err:
        log.warning("number type probe failed: %s", describe(err).code)
    except Exception as err:  # e.g. number_unsupported: still start and say so
        log.warning("number type probe failed: %s", describe(err).code)
    log.info("callbot started as @%s; business number type: %s", me.username, kind)


class StartupError(Exception):
    """The bot cannot start; the message says what to fix."""


async def run(settings: Settings) -> None:
    app = CallbotApp(settings)
    try:
        await app.start()
        if settings.webhook_mode:
            await app.run_webhook()
        else:
            await app.run_polling()
    finally:
        await app.close()


def lock_sqlite_file(lock: SqliteFileLock | None) -> None:
    """SQLite is for one process: a second one on the same file is refused, never let in."""
    if lock is None:
        return
    try:
        lock.acquire()
    except DatabaseInUse as err:
        raise StartupError(
            f"callbot cannot start: another callbot process uses the SQLite database {err.path} "
            f"(pid {err.pid}); run one process per SQLite file, or use PostgreSQL "
            "(DATABASE_URL) for several replicas"
        ) from None


async def migrate_only(settings: Settings) -> None:
    engine = build_engine(settings)
    lock = SqliteFileLock.of(engine)
    try:
        lock_sqlite_file(lock)
        await migrate(engine)
    finally:
        await engine.dispose()
        if lock is not None:
            lock.release()
