"""Who sent an update, as the handlers need it."""

from __future__ import annotations

from aiogram.types import Message, User


def sender_id(message: Message) -> int | None:
    return message.from_user.id if message.from_user else None


def operator_name(user: User | None) -> str | None:
    """How a call's message names who started it: @username, else the full name."""
    if user is None:
        return None
    return f"@{user.username}" if user.username else user.full_name
