"""On-call from chat: /contact, /team, /oncall, /ack and the Acknowledge button of alert posts.

An intake token is a secret: it is only ever shown in the admin's private chat with the bot.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import suppress
from datetime import datetime, timedelta

from aiogram import Bot, Router
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest, TelegramForbiddenError
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import CallbackQuery, Chat, InlineKeyboardMarkup, Message

from bot.access import AccessPolicy, Role
from bot.calls.live import Acknowledge
from bot.config import Settings
from bot.errors import CallbotError
from bot.oncall.engine import (
    DURATION_FIELDS,
    LOCALES,
    OnCall,
    parse_duration,
    policy_duration,
    token_hash,
    valid_alias,
)
from bot.oncall.schedules import Override, parse_until, rotation_fields, team_schedule
from bot.phones import parse_phone
from bot.storage.oncall import Contact, OnCallStore, Team
from bot.storage.store import Store, utcnow
from bot.texts import (
    contacts_text,
    done_text,
    error_text,
    on_call_text,
    override_set_text,
    team_moved_text,
    team_token_sent_text,
    team_token_text,
    teams_text,
    test_page_text,
)
from handlers.pages import pager
from handlers.people import operator_name, sender_id

log = logging.getLogger(__name__)
CONTACTS_PAGE, TEAMS_PAGE = 20, 10
TAKE_HOURS = 4  # `/oncall take` without a duration
MAX_OVERRIDE = timedelta(days=7)


class ContactsPage(CallbackData, prefix="contacts"):
    offset: int


class TeamsPage(CallbackData, prefix="teams"):
    offset: int


POLICY_KEYS = {
    "attempts": ("attempts_per_person", 1, 10),
    "wait": ("wait_seconds", 30, 3600),
    "rounds": ("max_rounds", 1, 10),
}


def build_router() -> Router:
    router = Router(name="oncall")
    router.message.register(contact_command, Command("contact"))
    router.message.register(team_command, Command("team"))
    router.message.register(oncall_command, Command("oncall"))
    router.message.register(ack_command, Command("ack"))
    router.callback_query.register(acknowledge_button, Acknowledge.filter())
    router.callback_query.register(contacts_page, ContactsPage.filter())
    router.callback_query.register(teams_page, TeamsPage.filter())
    return router


def _require_admin(access: AccessPolicy, message: Message) -> None:
    if access.role(sender_id(message)) is not Role.ADMIN:
        raise CallbotError("admins_only")


async def contact_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall_store: OnCallStore,
    settings: Settings,
) -> None:
    """/contact add <alias> <phone> | link <alias> <telegram id> | remove <alias> | list"""
    words = (command.args or "list").split()
    action = words[0].lower()
    if action == "list":
        access.require_caller(sender_id(message), message.chat.id)
        text, markup = await _contacts(oncall_store, 0, private=_private(message))
        await message.reply(text, reply_markup=markup)
        return
    _require_admin(access, message)
    if action == "add" and len(words) >= 3:
        phone = parse_phone(" ".join(words[2:]), settings.default_region)
        contact = Contact(valid_alias(words[1]), phone.e164, phone.display)
        await oncall_store.save_contact(contact, at=utcnow())
    elif action == "link" and len(words) == 3 and words[2].isdigit():
        known = await oncall_store.contact(valid_alias(words[1]))
        if known is None:
            raise CallbotError("unknown_contact", {"alias": words[1][:32]})
        linked = Contact(known.alias, known.phone, known.phone_display, int(words[2]))
        await oncall_store.save_contact(linked, at=utcnow())
    elif action == "remove" and len(words) == 2:
        if not await oncall_store.remove_contact(valid_alias(words[1])):
            raise CallbotError("unknown_contact", {"alias": words[1][:32]})
    else:
        raise CallbotError("contact_usage")
    await message.reply(done_text())


def _private(message: Message) -> bool:
    return message.chat.type == "private"


async def _contacts(
    oncall_store: OnCallStore, offset: int, *, private: bool
) -> tuple[str, InlineKeyboardMarkup | None]:
    """A page of contacts; their numbers masked outside private chats."""
    contacts = await oncall_store.contacts()
    offset = max(0, min(offset, len(contacts) - 1))
    page = contacts[offset : offset + CONTACTS_PAGE]
    text = contacts_text(page, offset=offset, total=len(contacts), masked=not private)
    return text, pager(offset, CONTACTS_PAGE, len(contacts), lambda o: ContactsPage(offset=o))


async def _teams(oncall_store: OnCallStore, offset: int) -> tuple[str, InlineKeyboardMarkup | None]:
    teams = await oncall_store.teams()
    offset = max(0, min(offset, len(teams) - 1))
    page = teams[offset : offset + TEAMS_PAGE]
    text = teams_text(page, utcnow(), offset=offset, total=len(teams))
    return text, pager(offset, TEAMS_PAGE, len(teams), lambda o: TeamsPage(offset=o))


async def contacts_page(
    query: CallbackQuery,
    callback_data: ContactsPage,
    access: AccessPolicy,
    oncall_store: OnCallStore,
) -> None:
    if (message := await _paged(query, access)) is not None:
        private = message.chat.type == "private"
        text, markup = await _contacts(oncall_store, callback_data.offset, private=private)
        await query.answer()
        await message.edit_text(text, reply_markup=markup)


async def teams_page(
    query: CallbackQuery, callback_data: TeamsPage, access: AccessPolicy, oncall_store: OnCallStore
) -> None:
    if (message := await _paged(query, access)) is not None:
        text, markup = await _teams(oncall_store, callback_data.offset)
        await query.answer()
        await message.edit_text(text, reply_markup=markup)


async def _paged(query: CallbackQuery, access: AccessPolicy) -> Message | None:
    """The list whose ◀️ ▶️ was pressed, if the presser may read it (else the press is answered)."""
    if not isinstance(query.message, Message):
        await query.answer()
        return None
    if access.role(query.from_user.id) is None:
        await query.answer(error_text(CallbotError("not_operator")), show_alert=True)
        return None
    return query.message


async def team_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall_store: OnCallStore,
    bot: Bot,
    oncall: OnCall,
    store: Store,
) -> None:
    """/team list | add <name> | members <name> <alias…> | policy <name> k=v… |
    rotation <name> <rotation> | token <name> | move <name> | test <name>"""
    words = (command.args or "list").split()
    action = words[0].lower()
    if action == "list":
        access.require_caller(sender_id(message), message.chat.id)
        text, markup = await _teams(oncall_store, 0)
        await message.reply(text, reply_markup=markup)
        return
    if action == "test":
        await _test_page(message, words[1:], access, oncall_store, oncall, store)
        return
    _require_admin(access, message)
    if len(words) < 2:
        raise CallbotError("team_usage")
    name = valid_alias(words[1])
    existing = await oncall_store.team(name)
    if action == "add":
        if existing is not None:
            here = existing.chat_id == message.chat.id
            raise CallbotError("team_exists_here" if here else "team_elsewhere", {"team": name})
        await _new_token(message, bot, oncall_store, name, message.chat.id)
        return
    if existing is None:
        raise CallbotError("unknown_team", {"team": name})
    if action == "token":
        await _new_token(message, bot, oncall_store, name, existing.chat_id)
        return
    if action == "move":
        if existing.chat_id == message.chat.id:
            raise CallbotError("team_exists_here", {"team": name})
        if await oncall_store.has_open_incidents(existing.id):
            raise CallbotError("team_has_open_incidents", {"team": name})
        moved = await oncall_store.save_team(
            name, chat_id=message.chat.id, token_hash=None, at=utcnow()
        )
        await message.reply(team_moved_text(moved))
        return
    team = existing
    fields = _team_fields(action, words[2:])
    if "members" in fields:
        for alias in fields["members"]:  # type: ignore[attr-defined]
            if await oncall_store.contact(alias) is None:
                raise CallbotError("unknown_contact", {"alias": alias})
    await oncall_store.save_team(name, chat_id=team.chat_id, token_hash=None, at=utcnow(), **fields)
    await message.reply(done_text())


async def _test_page(
    message: Message,
    args: list[str],
    access: AccessPolicy,
    oncall_store: OnCallStore,
    oncall: OnCall,
    store: Store,
) -> None:
    """/team test [name]: admins anywhere, operators in the team's own chat."""
    user = sender_id(message)
    access.require_caller(user, message.chat.id)
    if len(args) > 1:
        raise CallbotError("team_usage")
    team = await _team_here(oncall_store, message.chat.id, args[0] if args else None)
    if access.role(user) is not Role.ADMIN and team.chat_id != message.chat.id:
        raise CallbotError("admins_only")
    by = operator_name(message.from_user) or "?"
    incident = await oncall.test_page(team, by)
    await store.audit(
        "team_test",
        actor_id=user,
        chat_id=message.chat.id,
        subject=team.name,
        detail={"incident": incident.id},
        at=oncall.clock(),
    )
    await message.reply(test_page_text(team, incident.id))


async def _new_token(
    message: Message, bot: Bot, oncall_store: OnCallStore, name: str, chat_id: int
) -> None:
    """A new intake token for the team (made if new), told only in the admin's private chat.
    From a group, the token is sent privately before it replaces the old one: if the admin
    cannot be messaged, nothing changes."""
    token = secrets.token_urlsafe(24)
    text = team_token_text(name, chat_id, token)
    admin = sender_id(message)
    if _private(message) or admin is None:
        await oncall_store.save_team(
            name, chat_id=chat_id, token_hash=token_hash(token), at=utcnow()
        )
        await message.reply(text)
        return
    try:
        told = await bot.send_message(admin, text)
    except (TelegramForbiddenError, TelegramBadRequest) as err:
        log.info("cannot message admin %s privately: %s", admin, err.message)
        me = await bot.me()
        raise CallbotError("cannot_message_you", {"bot": me.username or "me"}) from None
    try:
        team = await oncall_store.save_team(
            name, chat_id=chat_id, token_hash=token_hash(token), at=utcnow()
        )
    except BaseException:
        with suppress(TelegramAPIError):  # the token it shows was never saved
            await bot.delete_message(admin, told.message_id)
        raise
    await message.reply(team_token_sent_text(team))


def _team_fields(action: str, args: list[str]) -> dict[str, object]:
    if action == "members" and args:
        return {"members": [valid_alias(a) for a in args]}
    if action == "rotation" and args:
        try:
            rotation = rotation_fields({"rotation": " ".join(args)})
        except ValueError:
            raise CallbotError("bad_rotation") from None
        return rotation | {"rotation_start": utcnow()}
    if action == "policy" and args:
        fields: dict[str, object] = {}
        for pair in args:
            key, _, value = pair.partition("=")
            if key == "locale" and value in LOCALES:
                fields["locale"] = value
                continue
            if key == "ack_on_answer" and value in ("yes", "no"):
                fields["answer_is_ack"] = value == "yes"
                continue
            if key in DURATION_FIELDS:
                try:
                    fields[key] = policy_duration(value)  # 4h, 30m, 900, off
                except ValueError:
                    raise CallbotError("team_usage") from None
                continue
            if key not in POLICY_KEYS or not value.isdigit():
                raise CallbotError("team_usage")
            column, low, high = POLICY_KEYS[key]
            fields[column] = max(low, min(high, int(value)))
        return fields
    raise CallbotError("team_usage")


async def _team_here(oncall_store: OnCallStore, chat_id: int, name: str | None) -> Team:
    team = await (
        oncall_store.team(valid_alias(name)) if name else oncall_store.team_of_chat(chat_id)
    )
    if team is None:
        raise CallbotError("unknown_team", {"team": name or "-"})
    return team


async def oncall_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall_store: OnCallStore,
    oncall: OnCall,
    store: Store,
) -> None:
    """/oncall [team] | take [duration] [team] | set <alias> until <time> [team] |
    set <alias> [team]"""
    access.require_caller(sender_id(message), message.chat.id)
    words = (command.args or "").split()
    now = oncall.clock()
    action = words[0].lower() if words else ""
    if action == "take":
        await _take(message, words[1:], oncall_store, store, now)
        return
    if action == "set" and "until" in (w.lower() for w in words):
        _require_admin(access, message)
        await _set_until(message, words[1:], oncall_store, store, now)
        return
    if action == "set":
        _require_admin(access, message)
        if len(words) < 2:
            raise CallbotError("oncall_usage")
        alias = valid_alias(words[1])
        team = await _team_here(oncall_store, message.chat.id, words[2] if len(words) > 2 else None)
        if alias not in team.members:
            raise CallbotError("not_a_member", {"alias": alias, "team": team.name})
        team = await oncall_store.save_team(
            team.name, chat_id=team.chat_id, token_hash=None, at=utcnow(), on_call=alias
        )
        await message.reply(on_call_text(team, now))
        return
    team = await _team_here(oncall_store, message.chat.id, words[0] if words else None)
    await message.reply(on_call_text(team, now))


async def _take(
    message: Message, args: list[str], oncall_store: OnCallStore, store: Store, now: datetime
) -> None:
    """/oncall take [duration] [team]: the sender covers from now (default TAKE_HOURS)."""
    user = sender_id(message)
    contact = await oncall_store.contact_of_user(user) if user is not None else None
    if contact is None:
        raise CallbotError("who_are_you")
    duration = timedelta(hours=TAKE_HOURS)
    if args and args[0][:1].isdigit():
        try:
            duration = timedelta(seconds=parse_duration(args.pop(0)))
        except ValueError:
            raise CallbotError("bad_until") from None
    if len(args) > 1:
        raise CallbotError("oncall_usage")
    team = await _team_here(oncall_store, message.chat.id, args[0] if args else None)
    await _override(message, team, contact.alias, now, now + duration, oncall_store, store)


async def _set_until(
    message: Message, args: list[str], oncall_store: OnCallStore, store: Store, now: datetime
) -> None:
    """/oncall set <alias> until <time> [team]"""
    lowered = [w.lower() for w in args]
    if len(args) < 3 or lowered[1] != "until":
        raise CallbotError("oncall_usage")
    alias, rest = valid_alias(args[0]), args[2:]
    team = await oncall_store.team_of_chat(message.chat.id)
    if len(rest) > 1 and (named := await oncall_store.team(rest[-1].lower())) is not None:
        team, rest = named, rest[:-1]
    if team is None:
        raise CallbotError("unknown_team", {"team": "-"})
    try:
        until = parse_until(" ".join(rest), now, team_schedule(team).zone)
    except ValueError:
        raise CallbotError("bad_until") from None
    await _override(message, team, alias, now, until, oncall_store, store)


async def _override(
    message: Message,
    team: Team,
    alias: str,
    start: datetime,
    end: datetime,
    oncall_store: OnCallStore,
    store: Store,
) -> None:
    if alias not in team.members:
        raise CallbotError("not_a_member", {"alias": alias, "team": team.name})
    if not start < end <= start + MAX_OVERRIDE:
        raise CallbotError("bad_until")
    by = operator_name(message.from_user) or "?"
    override = Override(alias, start, end, by)
    team = await oncall_store.add_override(team.id, override, at=start)
    await store.audit(
        "oncall_override",
        actor_id=sender_id(message),
        chat_id=message.chat.id,
        subject=team.name,
        detail={"alias": alias, "start": start.isoformat(), "end": end.isoformat()},
        at=start,
    )
    log.info("team %s: %s on call until %s (override)", team.name, alias, end.isoformat())
    await message.reply(override_set_text(team, start))


def _admin_in_private(access: AccessPolicy, user_id: int, chat: Chat) -> bool:
    return chat.type == "private" and chat.id == user_id and access.role(user_id) is Role.ADMIN


async def acknowledge_button(
    query: CallbackQuery,
    callback_data: Acknowledge,
    access: AccessPolicy,
    oncall: OnCall,
) -> None:
    """Accepted in the team's own chat, or from an admin's private chat (the message the bot
    sent when the team's chat could not be reached); refused anywhere else."""
    user = query.from_user
    if access.role(user.id) is None:
        await query.answer(error_text(CallbotError("not_operator")), show_alert=True)
        return
    if query.message is None:  # an inline message: no chat to check
        await query.answer(error_text(CallbotError("ack_wrong_chat")), show_alert=True)
        return
    chat = query.message.chat
    try:
        incident = await oncall.acknowledge(
            callback_data.incident,
            operator_name(user) or "?",
            chat_id=chat.id,
            admin=_admin_in_private(access, user.id, chat),
        )
    except CallbotError as err:
        await query.answer(error_text(err), show_alert=True)
        return
    await query.answer(done_text() if incident else error_text(CallbotError("already_handled")))
    if chat.type == "private" and isinstance(query.message, Message):
        with suppress(TelegramAPIError):  # the team's post shows the state; this is a copy
            await query.message.edit_reply_markup(reply_markup=None)


async def ack_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall: OnCall,
) -> None:
    """/ack <incident id>: in the team's chat, or an admin in private (as the button)."""
    user_id = sender_id(message)
    if access.role(user_id) is None:
        raise CallbotError("not_operator")
    ref = (command.args or "").strip().lstrip("#")
    if not (ref.isascii() and ref.isdigit()) or len(ref) > 12:
        raise CallbotError("ack_usage")
    admin = user_id is not None and _admin_in_private(access, user_id, message.chat)
    incident = await oncall.acknowledge(
        int(ref), operator_name(message.from_user) or "?", chat_id=message.chat.id, admin=admin
    )
    await message.reply(done_text() if incident else error_text(CallbotError("already_handled")))
