"""Every error ends here: one reply a person understands, one log line with the update id.

A press of a button is answered with a short alert; its message and buttons stay as they were
(the error is the presser's business, and the message may be a call or an incident others follow).
"""

from __future__ import annotations

import logging
from contextlib import suppress

from aiogram import Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.types import ErrorEvent

from bot.errors import describe
from bot.texts import error_text, plain

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
        with suppress(TelegramBadRequest):  # the handler may have answered it already
            await update.callback_query.answer(plain(text), show_alert=True)
