"""Wiring: everything is built here, at start, never at import time."""

from __future__ import annotations

import asyncio
import logging

from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import TelegramNetworkError, TelegramUnauthorizedError
from aiogram.types import BotCommand

from bot.access import AccessPolicy
from bot.calls import CallService
from bot.config import Settings
from bot.errors import describe
from bot.i18n import LOCALES, LocaleMiddleware, build_i18n
from bot.media import MediaEndpoint
from bot.middlewares import DedupUpdatesMiddleware, RetryAfterMiddleware
from bot.numbers import NumberTypes
from bot.pending import PendingStore, SeenUpdates
from bot.pilot_status import PilotStatusClient, RetryPolicy, build_http_client
from bot.pilot_status.errors import PilotStatusError
from bot.texts import COMMANDS
from handlers import build_router

log = logging.getLogger("callbot")
STARTUP_PROBE_SECONDS = 10.0


def build_pilot_client(settings: Settings) -> PilotStatusClient:
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
    return PilotStatusClient(http, retry=retry)


def build_bot(settings: Settings) -> Bot:
    session = AiohttpSession()
    if settings.telegram_api_url is not None:
        base = str(settings.telegram_api_url).rstrip("/")
        session = AiohttpSession(api=TelegramAPIServer.from_base(base))
    session.middleware(RetryAfterMiddleware())
    return Bot(
        settings.bot_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


def build_dispatcher(
    settings: Settings, pilot: PilotStatusClient, *, media: MediaEndpoint | None = None
) -> Dispatcher:
    number_types = NumberTypes(pilot, settings.pilot_status_number_type)
    access = AccessPolicy(
        operator_ids=settings.caller_ids,
        admin_ids=settings.admin_ids,
        allowed_chat_ids=settings.allowed_chat_ids,
    )
    dp = Dispatcher(
        settings=settings,
        access=access,
        number_types=number_types,
        calls=CallService(pilot, number_types, media),
        pending_calls=PendingStore(settings.confirm_ttl_seconds),
        pending_permissions=PendingStore(24 * 3600),
    )
    dp.update.outer_middleware(DedupUpdatesMiddleware(SeenUpdates()))
    i18n = build_i18n(settings.default_locale)
    dp["i18n"] = i18n
    LocaleMiddleware(i18n).setup(dp)
    dp.include_router(build_router())
    dp.startup.register(on_startup)
    return dp


async def on_startup(bot: Bot, dispatcher: Dispatcher, number_types: NumberTypes) -> None:
    i18n = dispatcher["i18n"]
    for locale in LOCALES:
        with i18n.context(), i18n.use_locale(locale):
            commands = [BotCommand(command=name, description=str(text)) for name, text in COMMANDS]
        language = None if locale == "en" else locale.split("_")[0]
        await bot.set_my_commands(commands, language_code=language)
    me = await bot.get_me()
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
    pilot = build_pilot_client(settings)
    bot = build_bot(settings)
    dp = build_dispatcher(settings, pilot)
    try:
        try:
            await bot.delete_webhook(drop_pending_updates=False)
        except TelegramUnauthorizedError:
            raise StartupError("Telegram rejected BOT_TOKEN: check it with @BotFather") from None
        except TelegramNetworkError as err:
            raise StartupError(
                f"cannot reach the Telegram Bot API ({err.message}); "
                "check the network or TELEGRAM_API_URL"
            ) from None
        await dp.start_polling(bot, allowed_updates=dp.resolve_used_update_types())
    finally:
        await pilot.aclose()
        await bot.session.close()
