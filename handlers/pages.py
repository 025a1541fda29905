"""◀️ ▶️ under a list shown a page at a time (/calls, /contact list, /team list)."""

from __future__ import annotations

from collections.abc import Callable

from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardMarkup
from aiogram.utils.keyboard import InlineKeyboardBuilder

from bot.texts import button_newer, button_older


def pager(
    offset: int, size: int, total: int, page: Callable[[int], CallbackData]
) -> InlineKeyboardMarkup | None:
    """Buttons to the page before and after `offset`; `page(offset)` is a button's data."""
    builder = InlineKeyboardBuilder()
    if offset > 0:
        builder.button(text=button_newer(), callback_data=page(max(0, offset - size)))
    if offset + size < total:
        builder.button(text=button_older(), callback_data=page(offset + size))
    return builder.as_markup() if builder.buttons else None
