"""Outer middlewares: drop updates Telegram delivers twice."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware
from aiogram.types import TelegramObject, Update

from bot.pending import SeenUpdates

log = logging.getLogger(__name__)


class DedupUpdatesMiddleware(BaseMiddleware):
    def __init__(self, seen: SeenUpdates) -> None:
        self._seen = seen

    async def __call__(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        if isinstance(event, Update) and not self._seen.first_time(event.update_id):
            log.info("update %s delivered again; ignored", event.update_id)
            return None
        return await handler(event, data)
