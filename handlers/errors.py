"""Every error ends here: one reply a person understands, one log line with the update id."""

from __future__ import annotations

import logging
from contextlib import suppress

from aiogram import Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.types import ErrorEvent, Message

from bot.errors import describe
from bot.texts import error_text

log = logging.getLogger(__name__)


def build_router() -> Router:
    router = Router(name="errors")
    router.errors.register(on_error)
    return router


async def on_error(event: ErrorEvent) -> None:
    update = event.update
    error = describe(event.exception)
    if error.code == "internal":
        log.error("update %s failed", update.update_id, exc_info=event.exception)
    else:
        log.info("update %s ended with %s", update.update_id, error.code)
    text = error_text(error)
    if update.message is not None:
        await update.message.reply(text)
    elif update.callback_query is not None:
        query = update.callback_query
        with suppress(TelegramBadRequest):  # the handler may have answered it already
            await query.answer()
        if isinstance(query.message, Message):
            await query.message.edit_text(text)
