"""Heartbeats and silences from chat: /heartbeat, /silence, /unsilence.

Admins declare and remove heartbeats (as they configure teams); anyone who may place calls may
silence a team's alerts and end a silence (a responder's job), and each silence is audited.
"""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from bot.access import AccessPolicy, Role
from bot.errors import CallbotError
from bot.oncall.engine import OnCall, valid_alias
from bot.oncall.heartbeats import Heartbeats, parse_add
from bot.oncall.silences import Silences
from bot.storage.oncall import OnCallStore, Team
from bot.storage.store import Store
from bot.texts import done_text
from bot.watch_texts import (
    heartbeat_added_text,
    heartbeats_text,
    silence_added_text,
    silences_text,
    unsilenced_text,
)
from handlers.people import operator_name, sender_id


def build_router() -> Router:
    router = Router(name="watch")
    router.message.register(heartbeat_command, Command("heartbeat"))
    router.message.register(silence_command, Command("silence"))
    router.message.register(unsilence_command, Command("unsilence"))
    return router


async def _team_named(oncall_store: OnCallStore, name: str) -> Team:
    team = await oncall_store.team(valid_alias(name))
    if team is None:
        raise CallbotError("unknown_team", {"team": name[:32]})
    return team


async def _team_and_name(oncall_store: OnCallStore, chat_id: int, ref: str) -> tuple[Team, str]:
    """`<team>/<name>`, or `<name>` in the team's own chat."""
    team_name, slash, name = ref.rpartition("/")
    if slash:
        return await _team_named(oncall_store, team_name), valid_alias(name)
    team = await oncall_store.team_of_chat(chat_id)
    if team is None:
        raise CallbotError("heartbeat_usage")
    return team, valid_alias(name)


async def _team_names(oncall_store: OnCallStore) -> dict[int, str]:
    return {team.id: team.name for team in await oncall_store.teams()}


async def heartbeat_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall_store: OnCallStore,
    heartbeats: Heartbeats,
    oncall: OnCall,
) -> None:
    """/heartbeat list | add <name> every 5m [grace 2m] | remove <name>  (`<team>/<name>`
    outside the team's chat)"""
    user_id = sender_id(message)
    words = (command.args or "list").split()
    action = words[0].lower()
    if action == "list":
        access.require_caller(user_id, message.chat.id)
        here = await oncall_store.team_of_chat(message.chat.id)
        listed = await heartbeats.listed(here)
        text = heartbeats_text(listed, await _team_names(oncall_store), oncall.clock())
        await message.reply(text)
        return
    if access.role(user_id) is not Role.ADMIN:
        raise CallbotError("admins_only")
    if action == "add" and len(words) >= 4:
        team, name = await _team_and_name(oncall_store, message.chat.id, words[1])
        interval, grace = parse_add(" ".join(words[2:]))
        heartbeat = await heartbeats.declare(team, name, interval, grace)
        await message.reply(heartbeat_added_text(team, heartbeat))
        return
    if action == "remove" and len(words) == 2:
        team, name = await _team_and_name(oncall_store, message.chat.id, words[1])
        await heartbeats.remove(team, name)
        await message.reply(done_text())
        return
    raise CallbotError("heartbeat_usage")


async def silence_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    oncall_store: OnCallStore,
    silences: Silences,
    oncall: OnCall,
    store: Store,
) -> None:
    """/silence <team> <duration> [label=value…] [reason] | /silence list"""
    user_id = sender_id(message)
    access.require_caller(user_id, message.chat.id)
    words = (command.args or "list").split()
    now = oncall.clock()
    if words[0].lower() == "list":
        here = await oncall_store.team_of_chat(message.chat.id)
        listed = await silences.listed(now, here.id if here else None)
        await message.reply(silences_text(listed, await _team_names(oncall_store), now))
        return
    if len(words) < 2:
        raise CallbotError("silence_usage")
    team = await _team_named(oncall_store, words[0])
    by = operator_name(message.from_user) or "?"
    silence = await silences.add(team.id, words[1:], by=by, now=now)
    await store.audit(
        "silence",
        actor_id=user_id,
        chat_id=message.chat.id,
        subject=team.name,
        detail={
            "silence": silence.id,
            "until": silence.ends_at.isoformat(),
            "matchers": silence.matchers,
            "reason": silence.reason,
        },
        at=now,
    )
    await message.reply(silence_added_text(silence, team, now))


async def unsilence_command(
    message: Message,
    command: CommandObject,
    access: AccessPolicy,
    silences: Silences,
    oncall: OnCall,
    store: Store,
) -> None:
    """/unsilence <id>: the silence ends now; alerts it held back and still firing page."""
    user_id = sender_id(message)
    access.require_caller(user_id, message.chat.id)
    ref = (command.args or "").strip().lstrip("#")
    if not (ref.isascii() and ref.isdigit()) or len(ref) > 12:
        raise CallbotError("silence_usage")
    now = oncall.clock()
    silence, held = await silences.end(int(ref), now)
    oncall.wake()
    await store.audit(
        "unsilence",
        actor_id=user_id,
        chat_id=message.chat.id,
        subject=str(silence.id),
        detail={"silence": silence.id, "released": held},
        at=now,
    )
    await message.reply(unsilenced_text(silence, len(held)))
