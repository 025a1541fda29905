"""/start, /help, /whoami."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandStart
from aiogram.types import Message

from bot.access import AccessPolicy, Role
from bot.calls.numbers import NumberTypes
from bot.texts import help_text, whoami_text
from handlers.people import sender_id


def build_router() -> Router:
    router = Router(name="common")
    router.message.register(help_command, CommandStart())
    router.message.register(help_command, Command("help"))
    router.message.register(whoami_command, Command("whoami"))
    return router


async def help_command(message: Message, access: AccessPolicy, number_types: NumberTypes) -> None:
    role = access.role(sender_id(message))
    await message.answer(
        help_text(
            is_caller=role is not None, is_admin=role is Role.ADMIN, number_type=number_types.known
        )
    )


async def whoami_command(message: Message) -> None:
    user_id = sender_id(message)
    await message.answer(whoami_text(user_id, message.chat.id, message.chat.type))
