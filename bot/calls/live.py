"""The Telegram side of following calls and incidents: their messages are edited as they change.

Bursts are coalesced per message (only the newest state is sent, at most one edit per
`min_interval`), Telegram's retry_after is honoured by the session middleware, and "message is
not modified" is ignored. The newest state is always the last one sent: an edit that fails for
a passing reason (Telegram 5xx, the network, a flood-control wait longer than the middleware's)
is tried again with backoff, each try with the newest state, until it is shown or
`give_up_after` seconds have passed. A message that is gone (400 "message to edit not found")
or a chat the bot left (403) ends the edits of that message at once. Each message has its own
worker, so one message's retries never hold back another's.

With several replicas (REDIS_URL) each edit is a turn (bot.shared.turns): one replica edits a
message at a time, and a call's state older than the one shown is not edited in.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from contextlib import suppress

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardMarkup
from aiogram.utils.i18n import I18n
from aiogram.utils.keyboard import InlineKeyboardBuilder

from bot.calls.service import CallRequest
from bot.oncall.engine import PostFailed
from bot.phones import Phone
from bot.shared.pending import Pending
from bot.shared.turns import EditTurns, LocalTurns
from bot.softphone.links import TalkLinks
from bot.states import rank
from bot.storage.oncall import Incident, Team
from bot.storage.store import CallRecord, PermissionRequestRecord
from bot.texts import (
    button_acknowledge,
    button_acknowledge_one,
    button_call_now,
    button_hang_up,
    button_talk,
    call_text,
    digest_text,
    incident_text,
    incident_unposted_text,
    permission_answered_text,
)

log = logging.getLogger(__name__)
LIVE = frozenset({"INITIATED", "RINGING", "ACCEPTED"})
MAX_BACKOFF = 60.0  # seconds between two tries of a failing edit, at most
# Telegram errors that pass: the same edit may succeed later
PASSING = (TelegramServerError, TelegramNetworkError, TelegramRetryAfter)
# An edit that fails like this has no message left to edit: a new post replaces it.
_GONE = ("message to edit not found", "message can't be edited", "message_id_invalid")


class HangUp(CallbackData, prefix="hang"):
    call: str


class CallNow(CallbackData, prefix="again"):
    token: str


def call_markup(record: CallRecord, talk: TalkLinks | None = None) -> InlineKeyboardMarkup | None:
    """A live call's buttons: 🎧 Talk (the Mini App softphone, when it is served) and Hang up."""
    if record.status not in LIVE or record.pilot_call_id is None:
        return None
    builder = InlineKeyboardBuilder()
    talk_button = talk.button(record, button_talk()) if talk is not None else None
    if talk_button is not None:
        builder.add(talk_button)
    builder.button(text=button_hang_up(), callback_data=HangUp(call=record.id))
    return builder.as_markup()


Render = Callable[[], tuple[str, InlineKeyboardMarkup | None]]
# what to edit in: the locale, how to render it, and its order (None: always newest)
State = tuple[str, Render, int | None]


def call_order(record: CallRecord) -> int:
    """A call's states in the order they happen: the status rank, then the last change (ms)."""
    return rank(record.status) * 10**13 + int(record.updated_at.timestamp() * 1000)


class Acknowledge(CallbackData, prefix="ack"):
    incident: int


def incident_markup(incident: Incident) -> InlineKeyboardMarkup | None:
    if incident.status != "firing":
        return None
    builder = InlineKeyboardBuilder()
    builder.button(text=button_acknowledge(), callback_data=Acknowledge(incident=incident.id))
    return builder.as_markup()


DIGEST_BUTTONS_PER_ROW = 4


def digest_markup(lines: list[Incident]) -> InlineKeyboardMarkup | None:
    """One Acknowledge button per alert of a digest that still fires (the same button as an
    alert's own post: the same handler, the same checks)."""
    firing = [line for line in lines if line.status == "firing"]
    if not firing:
        return None
    builder = InlineKeyboardBuilder()
    for line in firing:
        builder.button(
            text=button_acknowledge_one(line.id), callback_data=Acknowledge(incident=line.id)
        )
    builder.adjust(DIGEST_BUTTONS_PER_ROW)
    return builder.as_markup()


class LiveMessages:
    """Messages that follow something (a call, an incident): the newest state is edited in."""

    def __init__(
        self,
        bot: Bot,
        i18n: I18n,
        call_again: Pending[CallRequest],
        *,
        min_interval: float = 1.0,
        give_up_after: float = 900.0,
        turns: EditTurns | None = None,
        talk: TalkLinks | None = None,
    ) -> None:
        self.talk = talk  # the 🎧 Talk button of live calls (PUBLIC_BASE_URL set)
        self._bot = bot
        self._i18n = i18n
        self._call_again = call_again
        self._min_interval = min_interval
        self._give_up_after = give_up_after
        self._turns: EditTurns = turns or LocalTurns()
        self._latest: dict[tuple[int, int], State] = {}
        self._workers: dict[tuple[int, int], asyncio.Task[None]] = {}

    async def show_call(self, record: CallRecord) -> None:
        if record.message_id is None:
            return  # not announced yet: attach() shows the state then
        self._queue(
            (record.chat_id, record.message_id),
            record.locale,
            lambda: (call_text(record), call_markup(record, self.talk)),
            call_order(record),
        )

    async def show_incident(self, incident: Incident, team: Team) -> None:
        if incident.post_message_id is None:
            return
        self._queue(
            (team.chat_id, incident.post_message_id),
            team.locale or self._i18n.default_locale,
            lambda: (incident_text(incident, team), incident_markup(incident)),
            None,  # its status may go back (an acknowledgement that timed out): no order
        )

    async def post_incident(self, incident: Incident, team: Team) -> int:
        """The post shows this state: edited in, or sent anew when there is none or it is gone.
        Telegram's refusals and failures become PostFailed (the outbox retries)."""
        with self._i18n.context(), self._i18n.use_locale(team.locale or self._i18n.default_locale):
            text, markup = incident_text(incident, team), incident_markup(incident)
        return await self._post(incident, team, text, markup)

    async def post_digest(self, head: Incident, lines: list[Incident], team: Team) -> int:
        """The digest post of a storm's alerts past the team's share (its head holds it)."""
        with self._i18n.context(), self._i18n.use_locale(self._i18n.default_locale):
            text, markup = digest_text(lines, team), digest_markup(lines)
        return await self._post(head, team, text, markup)

    async def _post(
        self, incident: Incident, team: Team, text: str, markup: InlineKeyboardMarkup | None
    ) -> int:
        try:
            if incident.post_message_id is not None:
                try:
                    async with self._turns.turn(team.chat_id, incident.post_message_id):
                        await self._bot.edit_message_text(
                            text=text,
                            chat_id=team.chat_id,
                            message_id=incident.post_message_id,
                            reply_markup=markup,
                        )
                    return incident.post_message_id
                except TelegramBadRequest as err:
                    if "message is not modified" in err.message:
                        return incident.post_message_id
                    if not any(gone in err.message.lower() for gone in _GONE):
                        raise
                    log.info("post of incident %s is gone; posting it anew", incident.id)
            # a silenced alert is posted without a notification sound
            quiet = incident.silence_id is not None and incident.status == "firing"
            sent = await self._bot.send_message(
                team.chat_id, text, reply_markup=markup, disable_notification=quiet or None
            )
        except TelegramRetryAfter as err:
            raise PostFailed(err.message, unreachable=False, retry_after=err.retry_after) from err
        except (TelegramServerError, TelegramNetworkError) as err:
            raise PostFailed(err.message, unreachable=False) from err
        except TelegramAPIError as err:  # 403 removed from the chat, 400 chat not found, …
            raise PostFailed(err.message, unreachable=True) from err
        return sent.message_id

    async def tell_admins(
        self, incident: Incident, team: Team, admins: tuple[int, ...], reason: str
    ) -> int:
        with self._i18n.context(), self._i18n.use_locale(self._i18n.default_locale):
            text = incident_unposted_text(incident, team, reason) + "\n\n"
            text += incident_text(incident, team)
            markup = incident_markup(incident)
        told = 0
        for admin in admins:
            try:
                await self._bot.send_message(admin, text, reply_markup=markup)
                told += 1
            except TelegramAPIError as err:  # e.g. the admin never started the bot
                log.warning("cannot tell admin %s about incident %s: %s", admin, incident.id, err)
        return told

    def _queue(self, key: tuple[int, int], locale: str, render: Render, order: int | None) -> None:
        self._latest[key] = (locale, render, order)
        if key not in self._workers:
            task = asyncio.create_task(self._drain(key), name=f"edit {key}")
            self._workers[key] = task

    async def _drain(self, key: tuple[int, int]) -> None:
        try:
            while (latest := self._latest.pop(key, None)) is not None:
                await self._show_until_done(key, latest)
                await asyncio.sleep(self._min_interval)
        finally:
            self._workers.pop(key, None)

    async def _show_until_done(self, key: tuple[int, int], state: State) -> None:
        """Edit the message until Telegram shows the newest state, or it is of no use."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._give_up_after
        backoff = max(self._min_interval, 0.1)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._edit(key, *state)
                return
            except PASSING as err:
                wait = float(err.retry_after) if isinstance(err, TelegramRetryAfter) else backoff
                wait += random.uniform(0, wait / 4)  # jitter
                if loop.time() + wait > deadline:
                    log.error(
                        "gave up editing message %s in chat %s after %d tries (%s): "
                        "it may show an old state",
                        key[1],
                        key[0],
                        attempt,
                        err.message,
                    )
                    return
                log.warning(
                    "cannot edit message %s in chat %s (%s); trying again in %.1f s",
                    key[1],
                    key[0],
                    err.message,
                    wait,
                )
                await asyncio.sleep(wait)
                backoff = min(MAX_BACKOFF, backoff * 2)
                state = self._latest.pop(key, state)  # a newer state replaces this one

    async def _edit(
        self, key: tuple[int, int], locale: str, render: Render, order: int | None
    ) -> None:
        """One try, in this message's turn; raises only the errors that pass (PASSING)."""
        with self._i18n.context(), self._i18n.use_locale(locale):
            text, markup = render()
        chat_id, message_id = key
        async with self._turns.turn(chat_id, message_id) as turn:
            if await turn.stale(order):
                log.info("message %s in chat %s shows a newer state already", message_id, chat_id)
                return
            try:
                await self._bot.edit_message_text(
                    text=text, chat_id=chat_id, message_id=message_id, reply_markup=markup
                )
            except TelegramBadRequest as err:
                if "message is not modified" not in err.message:
                    log.warning(
                        "cannot edit message %s in chat %s: %s", message_id, chat_id, err.message
                    )
                    return
            except TelegramForbiddenError as err:
                log.warning(
                    "cannot edit message %s in chat %s: %s", message_id, chat_id, err.message
                )
                return
            await turn.shown(order)

    async def announce(self, record: CallRecord) -> int | None:
        with self._i18n.context(), self._i18n.use_locale(record.locale):
            text, markup = call_text(record), call_markup(record, self.talk)
        try:
            sent = await self._bot.send_message(record.chat_id, text, reply_markup=markup)
        except (TelegramBadRequest, TelegramForbiddenError) as err:
            log.warning(
                "cannot tell chat %s about call %s: %s", record.chat_id, record.id, err.message
            )
            return None
        return sent.message_id

    async def permission_answered(self, request: PermissionRequestRecord) -> None:
        token = None
        if request.status == "granted":
            again = CallRequest(
                operator_id=request.operator_id,
                chat_id=request.chat_id,
                phone=Phone(request.phone, request.phone_display),
                locale=request.locale,
                masked=request.masked,
            )
            token = await self._call_again.put(again)
        with self._i18n.context(), self._i18n.use_locale(request.locale):
            text = permission_answered_text(request)
            markup = None
            if token is not None:
                builder = InlineKeyboardBuilder()
                builder.button(text=button_call_now(), callback_data=CallNow(token=token))
                markup = builder.as_markup()
        try:
            await self._bot.send_message(request.chat_id, text, reply_markup=markup)
        except (TelegramBadRequest, TelegramForbiddenError) as err:
            log.warning("cannot tell chat %s about permission: %s", request.chat_id, err.message)

    async def wait_idle(self) -> None:
        """Let queued edits finish (shutdown, tests)."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._workers.values()):
            task.cancel()
        with suppress(Exception):
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)
