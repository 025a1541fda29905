"""/call, its confirmation buttons in groups, and the Ask-for-permission button."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Protocol, TypeVar

from aiogram import Router
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, InlineKeyboardMarkup, Message, ReplyParameters
from aiogram.utils.i18n import I18n
from aiogram.utils.keyboard import InlineKeyboardBuilder

from bot import states
from bot.access import AccessPolicy
from bot.calls.live import CallNow, call_markup
from bot.calls.service import (
    CallOutcome,
    CallRequest,
    CallService,
    NeedsPermission,
    PendingPermission,
    Started,
    cut_note,
)
from bot.config import Settings
from bot.errors import CallbotError, describe
from bot.oncall.engine import OnCall
from bot.shared.pending import Pending, Taken
from bot.softphone.links import TalkLinks
from bot.storage.store import CallRecord
from bot.texts import (
    button_ask_permission,
    button_cancel,
    button_confirm,
    call_text,
    calling_text,
    cancelled_text,
    confirm_text,
    default_permission_reason,
    error_text,
    needs_permission_text,
    permission_sent_text,
)
from bot.voice.speech import spoken_note
from handlers.people import operator_name, sender_id

log = logging.getLogger(__name__)
REPLY_TRIES = 3  # sends of a started call's reply when Telegram fails
TALK = "talk"  # `/call <phone> talk`: the operator talks through the Mini App


class ConfirmCall(CallbackData, prefix="call"):
    ok: bool
    token: str


class AskPermission(CallbackData, prefix="perm"):
    token: str


def build_router() -> Router:
    router = Router(name="calls")
    router.message.register(call_command, Command("call"))
    router.callback_query.register(confirm_call, ConfirmCall.filter())
    router.callback_query.register(ask_permission, AskPermission.filter())
    router.callback_query.register(call_now, CallNow.filter())
    return router


def _is_group(message: Message) -> bool:
    return message.chat.type != "private"


async def call_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    calls: CallService,
    settings: Settings,
    pending_calls: Pending[CallRequest],
    pending_permissions: Pending[PendingPermission],
    i18n: I18n,
    oncall: OnCall,
    talk_links: TalkLinks | None,
) -> None:
    user_id = sender_id(message)
    access.require_caller(user_id, message.chat.id)
    if not command.args:
        raise CallbotError("usage")
    phone, note = await oncall.callee(message.chat.id, command.args, region=settings.default_region)
    talk = note is not None and note.strip().lower() == TALK
    if talk:
        # the operator speaks: nothing is said for them, and the Talk button must work here
        if talk_links is None:
            raise CallbotError("talk_unavailable")
        if not talk_links.available(private=not _is_group(message)):
            raise CallbotError("talk_needs_short_name")
        note = None
    note, speech = spoken_note(cut_note(note), i18n.current_locale)
    request = CallRequest(
        operator_id=user_id or 0,
        chat_id=message.chat.id,
        phone=phone,
        note=note,
        operator_name=operator_name(message.from_user),
        locale=i18n.current_locale,
        masked=_is_group(message),
        speech=speech,
        talk=talk,  # a Meta call then plays nothing: it waits for the operator's voice
    )
    if request.masked:
        token = await pending_calls.put(request)
        text = confirm_text(
            phone, note, masked=True, ttl=settings.confirm_ttl_seconds, spoken=speech is not None
        )
        await message.reply(text, reply_markup=_confirm_keyboard(token))
        return
    # Telegram redelivers this update if a replica died before answering it: never call twice
    key = f"tg:{message.chat.id}:{message.message_id}"
    earlier = await calls.earlier_attempt(key)
    if earlier is not None:
        await _show_earlier(message, earlier, calls, talk_links)
        return
    request = replace(request, request_key=key)
    outcome = await calls.start(request)
    text, markup = await _render(
        outcome, request, pending_permissions=pending_permissions, talk=talk_links
    )
    if not isinstance(outcome, Started):
        await message.reply(text, reply_markup=markup)
        return
    sent = await _reply_started(message, text, markup, outcome.record)
    if sent is not None:
        await calls.attach(outcome.record, sent.message_id)


async def _show_earlier(
    message: Message, record: CallRecord, calls: CallService, talk: TalkLinks | None
) -> None:
    """The /call message made an attempt already: its reply, as it would have been."""
    log.info("update of message %s again: attempt %s shown, no call", message.message_id, record.id)
    if record.pilot_call_id is None:
        unknown = record.status in (states.PENDING, states.UNKNOWN_OUTCOME)
        code = "call_repeated_unknown" if unknown else record.error_code or "internal"
        await message.reply(error_text(CallbotError(code)))
        return
    calls.resume(record)  # the replica that started it may have died
    if record.message_id is not None:
        return  # its reply was sent: that live message follows the call
    sent = await _reply_started(message, call_text(record), call_markup(record, talk), record)
    if sent is not None:
        await calls.attach(record, sent.message_id)


async def _reply_started(
    message: Message, text: str, markup: InlineKeyboardMarkup | None, started: CallRecord
) -> Message | None:
    """The reply to a call that was started must reach the chat: a generic "try again" would
    invite a second, billed call. Tried a few times, also if the /call message is gone."""
    reply_to = ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True)
    for attempt in range(1, REPLY_TRIES + 1):
        try:
            return await message.answer(text, reply_markup=markup, reply_parameters=reply_to)
        except TelegramBadRequest as err:
            log.error("call %s started; its reply was refused: %s", started.id, err.message)
            return None
        except TelegramAPIError as err:
            log.warning("call %s started; its reply failed (%s), try %d", started.id, err, attempt)
            if attempt < REPLY_TRIES:
                await asyncio.sleep(attempt)
    log.error("call %s started; Telegram never took its reply", started.id)
    return None


async def confirm_call(
    query: CallbackQuery,
    callback_data: ConfirmCall,
    access: AccessPolicy,
    calls: CallService,
    pending_calls: Pending[CallRequest],
    pending_permissions: Pending[PendingPermission],
    talk_links: TalkLinks | None,
) -> None:
    request = await _take(query, pending_calls, callback_data.token)
    if request is None or not isinstance(query.message, Message):
        return
    if not callback_data.ok:
        await query.answer()
        await query.message.edit_text(cancelled_text())
        return
    await query.answer()
    await _dial_from(query.message, request, access, calls, pending_permissions, talk_links)


async def call_now(
    query: CallbackQuery,
    callback_data: CallNow,
    access: AccessPolicy,
    calls: CallService,
    call_again: Pending[CallRequest],
    pending_permissions: Pending[PendingPermission],
    talk_links: TalkLinks | None,
) -> None:
    """The button under "now allows calls": pressing it is the confirmation."""
    request = await _take(query, call_again, callback_data.token)
    if request is None or not isinstance(query.message, Message):
        return
    await query.answer()
    request = replace(
        request, operator_id=query.from_user.id, operator_name=operator_name(query.from_user)
    )
    await _dial_from(query.message, request, access, calls, pending_permissions, talk_links)


async def _dial_from(
    message: Message,
    request: CallRequest,
    access: AccessPolicy,
    calls: CallService,
    pending_permissions: Pending[PendingPermission],
    talk: TalkLinks | None,
) -> None:
    """Start the call and let the pressed message follow it; it shows why if none started."""
    try:
        access.require_caller(request.operator_id, request.chat_id)
        request = replace(request, message_id=message.message_id)
        await message.edit_text(calling_text(request.phone, masked=request.masked))
        outcome = await calls.start(request)
    except Exception as err:
        # A one-time button, answered already: its message says why no call was started.
        await message.edit_text(error_text(describe(err)))
        raise
    text, markup = await _render(
        outcome, request, pending_permissions=pending_permissions, talk=talk
    )
    try:
        await message.edit_text(text, reply_markup=markup)
    except TelegramAPIError as err:
        # The call was started: never a generic error now. The message stays attached to the
        # call (its id is stored), so the call's next change is edited in with retries.
        log.warning("message %s of a call attempt was not edited: %s", message.message_id, err)


async def ask_permission(
    query: CallbackQuery,
    callback_data: AskPermission,
    calls: CallService,
    pending_permissions: Pending[PendingPermission],
) -> None:
    pending = await _take(query, pending_permissions, callback_data.token)
    if pending is None or not isinstance(query.message, Message):
        return
    await query.answer()
    try:
        await calls.request_permission(
            pending.phone,
            pending.note or default_permission_reason(),
            operator_id=pending.operator_id,
            chat_id=query.message.chat.id,
            locale=pending.locale,
            masked=pending.masked,
        )
    except Exception as err:
        # A one-time button: its message says how the request ended.
        await query.message.edit_text(error_text(describe(err)))
        raise
    await query.message.edit_text(permission_sent_text(pending.phone, masked=pending.masked))


class _Owned(Protocol):
    @property
    def operator_id(self) -> int: ...


T = TypeVar("T", bound=_Owned)


async def _take(query: CallbackQuery, store: Pending[T], token: str) -> T | None:
    """The pending item behind a button, if this user may press it and it is still valid."""
    item = await store.peek(token)
    # Items the bot made itself (operator 0: the on-call escalation) are anyone's to answer;
    # whether the presser may call is checked when the call starts.
    if item is not None and item.operator_id not in (0, query.from_user.id):
        await query.answer(error_text(CallbotError("not_your_button")), show_alert=True)
        return None
    taken, item = await store.take(token)
    if taken is Taken.OK:
        return item
    if taken is Taken.EXPIRED:
        await query.answer(error_text(CallbotError("confirm_expired")), show_alert=True)
        if isinstance(query.message, Message):
            await query.message.edit_text(error_text(CallbotError("confirm_expired")))
        return None
    await query.answer(error_text(CallbotError("already_handled")))
    return None


async def _render(
    outcome: CallOutcome,
    request: CallRequest,
    *,
    pending_permissions: Pending[PendingPermission],
    talk: TalkLinks | None = None,
) -> tuple[str, InlineKeyboardMarkup | None]:
    masked = request.masked
    if isinstance(outcome, NeedsPermission):
        markup = None
        if outcome.probe.may_ask:
            pending = PendingPermission(
                request.operator_id, request.phone, request.note, masked, request.locale
            )
            token = await pending_permissions.put(pending)
            builder = InlineKeyboardBuilder()
            builder.button(text=button_ask_permission(), callback_data=AskPermission(token=token))
            markup = builder.as_markup()
        return needs_permission_text(outcome, request.phone, masked=masked), markup
    return call_text(outcome.record, outcome.limits), call_markup(outcome.record, talk)


def _confirm_keyboard(token: str) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    builder.button(text=button_confirm(), callback_data=ConfirmCall(ok=True, token=token))
    builder.button(text=button_cancel(), callback_data=ConfirmCall(ok=False, token=token))
    return builder.as_markup()
