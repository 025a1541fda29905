"""Following calls from chat: /status, /hangup and its button, /calls, /permission, /export."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import timedelta

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import BufferedInputFile, CallbackQuery, InlineKeyboardMarkup, Message

from bot.access import AccessPolicy, Role
from bot.calls.live import HangUp, call_markup
from bot.calls.service import CallService
from bot.config import Settings
from bot.errors import CallbotError
from bot.phones import parse_phone
from bot.softphone.links import TalkLinks
from bot.storage.store import CallRecord, Store, utcnow
from bot.texts import (
    call_text,
    calls_page_text,
    error_text,
    export_caption,
    hung_up_text,
    permission_text,
)
from handlers.pages import pager
from handlers.people import sender_id

PAGE_DEFAULT, PAGE_MAX = 5, 20


class CallsPage(CallbackData, prefix="calls"):
    offset: int
    size: int


def build_router() -> Router:
    router = Router(name="lifecycle")
    router.message.register(status_command, Command("status"))
    router.message.register(hangup_command, Command("hangup"))
    router.callback_query.register(hangup_button, HangUp.filter())
    router.message.register(calls_command, Command("calls"))
    router.callback_query.register(calls_page, CallsPage.filter())
    router.message.register(permission_command, Command("permission"))
    router.message.register(export_command, Command("export"))
    return router


async def _call_ref(message: Message, command: CommandObject, store: Store, usage: str) -> str:
    """The call named in the command, or the call whose message this replies to."""
    if command.args:
        return command.args.split()[0]
    reply = message.reply_to_message
    if reply is not None:
        record = await store.call_by_message(message.chat.id, reply.message_id)
        if record is not None:
            return record.id
    raise CallbotError(usage)


async def status_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    calls: CallService,
    store: Store,
    talk_links: TalkLinks | None,
) -> None:
    access.require_caller(sender_id(message), message.chat.id)
    ref = await _call_ref(message, command, store, "status_usage")
    record = await calls.refresh(ref)
    [shown] = _in_chat([record], message)
    # the Talk button is the kind its own chat allows (web_app only in private chats)
    talk = talk_links if record.chat_id == message.chat.id else None
    await message.reply(call_text(shown), reply_markup=call_markup(record, talk))


async def hangup_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    calls: CallService,
    store: Store,
) -> None:
    user_id = sender_id(message)
    role = access.require_caller(user_id, message.chat.id)
    ref = await _call_ref(message, command, store, "hangup_usage")
    record = await calls.hang_up(ref, actor_id=user_id or 0, is_admin=role is Role.ADMIN)
    [shown] = _in_chat([record], message)
    await message.reply(call_text(shown))


async def hangup_button(
    query: CallbackQuery, callback_data: HangUp, access: AccessPolicy, calls: CallService
) -> None:
    role = access.role(query.from_user.id)
    if role is None:
        await query.answer(error_text(CallbotError("not_operator")), show_alert=True)
        return
    try:
        await calls.hang_up(
            callback_data.call, actor_id=query.from_user.id, is_admin=role is Role.ADMIN
        )
    except CallbotError as err:
        # A refusal is the presser's business only: the call's message stays as it is.
        await query.answer(error_text(err), show_alert=True)
        return
    await query.answer(hung_up_text())


async def calls_command(
    message: Message, command: CommandObject, access: AccessPolicy, calls: CallService
) -> None:
    access.require_caller(sender_id(message), message.chat.id)
    size = PAGE_DEFAULT
    if command.args and command.args.strip().isdigit():
        size = max(1, min(PAGE_MAX, int(command.args.strip())))
    records, total = await calls.recent(message.chat.id, limit=size, offset=0)
    await message.reply(
        calls_page_text(_in_chat(records, message), offset=0, total=total),
        reply_markup=_pager(0, size, total),
    )


async def calls_page(
    query: CallbackQuery, callback_data: CallsPage, access: AccessPolicy, calls: CallService
) -> None:
    if not isinstance(query.message, Message):
        await query.answer()
        return
    if access.role(query.from_user.id) is None:
        await query.answer(error_text(CallbotError("not_operator")), show_alert=True)
        return
    size = max(1, min(PAGE_MAX, callback_data.size))
    offset = max(0, callback_data.offset)
    records, total = await calls.recent(query.message.chat.id, limit=size, offset=offset)
    await query.answer()
    await query.message.edit_text(
        calls_page_text(_in_chat(records, query.message), offset=offset, total=total),
        reply_markup=_pager(offset, size, total),
    )


def _pager(offset: int, size: int, total: int) -> InlineKeyboardMarkup | None:
    return pager(offset, size, total, lambda start: CallsPage(offset=start, size=size))


def _in_chat(records: list[CallRecord], message: Message) -> list[CallRecord]:
    """Calls as this chat may see them: numbers masked in groups, wherever the call began."""
    if message.chat.type == "private":
        return records
    return [replace(record, masked=True) for record in records]


async def permission_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    calls: CallService,
    settings: Settings,
) -> None:
    access.require_caller(sender_id(message), message.chat.id)
    if not command.args:
        raise CallbotError("permission_usage")
    phone = parse_phone(command.args, settings.default_region)
    probe = await calls.check_permission(phone)
    await message.reply(permission_text(phone, probe, masked=message.chat.type != "private"))


async def export_command(
    message: Message, command: CommandObject, access: AccessPolicy, store: Store
) -> None:
    user_id = sender_id(message)
    if access.role(user_id) is not Role.ADMIN:
        raise CallbotError("admins_only")
    days = 30
    if command.args and command.args.strip().isdigit():
        days = max(1, min(3650, int(command.args.strip())))
    rows = await store.audit_since(utcnow() - timedelta(days=days))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["at", "actor_id", "chat_id", "action", "subject", "detail"])
    for row in rows:
        detail = json.dumps(row.detail, ensure_ascii=False) if row.detail else ""
        writer.writerow(
            [row.at.isoformat(), row.actor_id, row.chat_id, row.action, row.subject or "", detail]
        )
    await store.audit(
        "audit.export",
        actor_id=user_id,
        chat_id=message.chat.id,
        detail={"days": days, "rows": len(rows)},
    )
    name = f"callbot-audit-{utcnow():%Y%m%d}-{days}d.csv"
    await message.reply_document(
        BufferedInputFile(buffer.getvalue().encode("utf-8"), filename=name),
        caption=export_caption(days, len(rows)),
    )
