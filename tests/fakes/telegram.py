"""Loopback fake of the Telegram Bot API, speaking real HTTP on 127.0.0.1.

``FakeTelegram`` runs an ``aiohttp.web`` server on a random free port and answers
``{url}/bot{token}/{method}`` the way api.telegram.org does, so the real aiogram ``Bot``
(``AiohttpSession(api=TelegramAPIServer.from_base(fake.url))``) and
``Dispatcher.start_polling`` run against it unmodified.

What it fakes:

* ``getUpdates`` long polling with ``offset`` confirmation, ``limit``, ``timeout`` and
  (persistent) ``allowed_updates``; a newer poll terminates an older pending one with 409.
* webhook mode: ``setWebhook`` (url, ``secret_token``, ``max_connections``, ``allowed_updates``,
  ``drop_pending_updates``), ``deleteWebhook``, ``getWebhookInfo``. While a webhook is set, every
  update is DELIVERED by ``POST`` to its URL with ``X-Telegram-Bot-Api-Secret-Token``, up to
  ``max_connections`` at once, and delivered again after ``webhook_retry_delay`` seconds while the
  answer is not 2xx (or times out, or the connection fails); ``deliveries`` records every attempt.
  ``getUpdates`` then answers 409, as Telegram does. ``webhook_targets`` stands in for a load
  balancer: attempts go round robin to those URLs instead of the one set.
* ``getMe``,  ``setMyCommands``/``getMyCommands``/
  ``deleteMyCommands``, ``sendMessage``, ``sendDocument``, ``editMessageText``,
  ``editMessageReplyMarkup``, ``deleteMessage``, ``answerCallbackQuery``, ``sendChatAction``.
* Telegram's HTML parse mode validation (``can't parse entities``), text length limits,
  "message is not modified", inline keyboard validation (callback_data 1..64 bytes; no
  web_app button in a group: BUTTON_TYPE_INVALID) and double-answered callback queries.

Test code feeds updates (``send_command``, ``press_button``, ``push_update``) and inspects
what the bot did (``requests``, ``sent``, ``edits``, ``callback_answers``, ``commands``,
``wait_for_message``). ``fail_next`` injects API errors such as 429 with ``retry_after``;
``delay_next`` makes answers slow. ``enforce_limits`` (opt-in) answers 429 like Telegram's flood
control when the bot sends faster than its limits, recorded in ``flood_refusals``; edits of one
message that are in flight at the same time are recorded in ``overlapping_edits``.

All public methods must be called from the event loop that runs the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["FakeTelegram", "HtmlParseError", "SentMessage", "WebhookDelivery", "parse_html"]

JSON = dict[str, Any]

MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_CALLBACK_ANSWER_LENGTH = 200

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
QUERY_INVALID = "Bad Request: query is too old and response timeout expired or query ID is invalid"
CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
WEBHOOK_ACTIVE = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")

# --------------------------------------------------------------------------- HTML parse mode

_TAG_ENTITY = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "span": "spoiler",
    "tg-spoiler": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
_SPECIAL = re.compile(r"[<&]")
_HTML_ENTITY = re.compile(r"&(?:(lt|gt|amp|quot)|#([0-9]{1,8})|#[xX]([0-9a-fA-F]{1,8}));")
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_ATTR_NAME = re.compile(r"[^\s=>]+")
_UNQUOTED_VALUE = re.compile(r"[^\s>]*")


class HtmlParseError(ValueError):
    """Raised by :func:`parse_html`; the message is Telegram's ``<reason>``."""


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _decode_entities(text: str, base: int, source: str) -> str:
    """Replace HTML entities in ``text``; a bare ``&`` is an error (offsets relative to base)."""
    out: list[str] = []
    i = 0
    while (amp := text.find("&", i)) >= 0:
        out.append(text[i:amp])
        match = _HTML_ENTITY.match(text, amp)
        char = _entity_char(match) if match else None
        if match is None or char is None:
            offset = len(source[: base + amp].encode())
            raise HtmlParseError(
                f"Character '&' at byte offset {offset} does not start a known HTML entity"
                " (escape it as &amp;)"
            )
        out.append(char)
        i = match.end()
    out.append(text[i:])
    return "".join(out)


def _entity_char(match: re.Match[str]) -> str | None:
    name, dec, hexa = match.groups()
    if name:
        return _NAMED_ENTITIES[name]
    code = int(dec) if dec else int(hexa, 16)
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return None
    return chr(code)


def parse_html(text: str) -> tuple[str, list[JSON]]:
    """Parse Telegram-flavoured HTML into (plain text, MessageEntity dicts).

    The result is not trimmed. Raises :class:`HtmlParseError` with a Telegram-like reason.
    Deliberately strict: a bare ``&`` is rejected even where Telegram might tolerate it.
    """
    out: list[str] = []
    pos = 0  # UTF-16 offset in the plain text
    stack: list[tuple[str, int, JSON | None]] = []
    entities: list[JSON] = []
    i, n = 0, len(text)

    def at(index: int) -> int:
        return len(text[:index].encode())

    while i < n:
        special = _SPECIAL.search(text, i)
        j = special.start() if special else n
        if j > i:
            out.append(text[i:j])
            pos += _utf16_len(text[i:j])
            i = j
            continue
        if text[i] == "&":
            match = _HTML_ENTITY.match(text, i)
            end = match.end() if match else i + 1
            char = _decode_entities(text[i:end], i, text)
            out.append(char)
            pos += _utf16_len(char)
            i = end
            continue
        if text.startswith("</", i):
            close = text.find(">", i)
            if close < 0:
                raise HtmlParseError(f"Unclosed end tag at byte offset {at(i)}")
            name = text[i + 2 : close].strip().lower()
            if not stack:
                raise HtmlParseError(f"Unexpected end tag at byte offset {at(i)}")
            open_name, start, entity = stack.pop()
            if name != open_name:
                raise HtmlParseError(
                    f'Unmatched end tag at byte offset {at(i)}, expected "</{open_name}>", '
                    f'found "</{name}>"'
                )
            if entity is not None and pos > start:
                entities.append({**entity, "offset": start, "length": pos - start})
            i = close + 1
            continue
        # start tag
        name_match = _TAG_NAME.match(text, i + 1)
        name = name_match.group().lower() if name_match else ""
        if name_match is None or name not in _TAG_ENTITY:
            raise HtmlParseError(f'Unsupported start tag "{name}" at byte offset {at(i)}')
        attrs, i = _parse_attributes(text, name, i, name_match.end())
        stack.append((name, pos, _tag_entity(name, attrs, stack)))

    if stack:
        raise HtmlParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def _parse_attributes(text: str, tag: str, tag_start: int, j: int) -> tuple[dict[str, str], int]:
    """Parse attributes of a start tag beginning at ``j``; returns (attrs, index after '>')."""
    n = len(text)
    attrs: dict[str, str] = {}

    def unclosed() -> HtmlParseError:
        return HtmlParseError(f"Unclosed start tag at byte offset {len(text[:tag_start].encode())}")

    while True:
        while j < n and text[j].isspace():
            j += 1
        if j >= n:
            raise unclosed()
        if text[j] == ">":
            return attrs, j + 1
        name_match = _ATTR_NAME.match(text, j)
        if name_match is None:
            raise HtmlParseError(
                f'Empty attribute name in the tag "{tag}" at byte offset {len(text[:j].encode())}'
            )
        attr = name_match.group().lower()
        j = name_match.end()
        while j < n and text[j].isspace():
            j += 1
        value = ""
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j].isspace():
                j += 1
            if j >= n:
                raise unclosed()
            if text[j] in "\"'":
                end = text.find(text[j], j + 1)
                if end < 0:
                    raise unclosed()
                value = _decode_entities(text[j + 1 : end], j + 1, text)
                j = end + 1
            else:
                value_match = _UNQUOTED_VALUE.match(text, j)
                assert value_match is not None
                value = _decode_entities(value_match.group(), j, text)
                j = value_match.end()
        attrs[attr] = value


def _tag_entity(
    name: str, attrs: dict[str, str], stack: list[tuple[str, int, JSON | None]]
) -> JSON | None:
    kind = _TAG_ENTITY[name]
    if name == "span" and attrs.get("class") != "tg-spoiler":
        raise HtmlParseError('Tag "span" must have class "tg-spoiler"')
    if name == "a":
        href = attrs.get("href", "")
        return {"type": kind, "url": href} if href else None
    if name == "tg-emoji":
        emoji_id = attrs.get("emoji-id", "")
        if not emoji_id.isdigit():
            raise HtmlParseError('Tag "tg-emoji" must have a numeric attribute "emoji-id"')
        return {"type": kind, "custom_emoji_id": emoji_id}
    if name == "code" and stack and stack[-1][0] == "pre":
        language = attrs.get("class", "")
        pre_entity = stack[-1][2]
        if language.startswith("language-") and pre_entity is not None:
            pre_entity["language"] = language.removeprefix("language-")
            return None
    if name == "blockquote" and "expandable" in attrs:
        return {"type": "expandable_blockquote"}
    return {"type": kind}


def _trim(text: str, entities: list[JSON]) -> tuple[str, list[JSON]]:
    """Strip surrounding whitespace like Telegram does, shifting entity offsets."""
    stripped = text.strip()
    if stripped == text:
        return text, entities
    lead = _utf16_len(text[: len(text) - len(text.lstrip())])
    total = _utf16_len(stripped)
    result: list[JSON] = []
    for entity in entities:
        start = max(int(entity["offset"]) - lead, 0)
        end = min(int(entity["offset"]) + int(entity["length"]) - lead, total)
        if end > start:
            result.append({**entity, "offset": start, "length": end - start})
    return stripped, result


def _is_html(parse_mode: str | None) -> bool:
    return parse_mode is not None and parse_mode.lower() == "html"


# --------------------------------------------------------------------------- records


@dataclass
class SentMessage:
    """Snapshot of a bot message after a sendMessage/sendDocument/edit* call."""

    chat_id: int
    message_id: int
    text: str  # raw text (or caption) as sent, with HTML markup
    parse_mode: str | None
    reply_markup: dict[str, Any] | None  # parsed JSON as sent
    method: str
    reply_to_message_id: int | None
    document: tuple[str, bytes] | None = None  # (filename, content) for sendDocument

    @property
    def plain(self) -> str:
        """Text as the user reads it: tags stripped, entities unescaped, trimmed."""
        if _is_html(self.parse_mode):
            return _trim(*parse_html(self.text))[0]
        return self.text.strip()

    def buttons(self) -> list[tuple[str, str]]:
        """(text, callback_data) of inline keyboard buttons, flattened ("" if no data)."""
        rows = (self.reply_markup or {}).get("inline_keyboard") or []
        return [
            (str(button.get("text", "")), str(button.get("callback_data", "")))
            for row in rows
            for button in row
        ]


@dataclass(frozen=True)
class WebhookDelivery:
    """One attempt to deliver an update: the HTTP status, or "timeout" / "error" (no answer)."""

    update_id: int
    status: int | str
    url: str

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300


@dataclass
class _Webhook:
    url: str
    secret: str | None
    max_connections: int


@dataclass(eq=False)
class _Job:
    """An update to deliver by webhook, until a 2xx answer."""

    update_id: int
    not_before: float = 0.0
    busy: bool = False


class _ApiError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


def _bad_request(reason: str) -> _ApiError:
    return _ApiError(400, f"Bad Request: {reason}")


# the methods Telegram's send limits count (the bot's pacer counts the same ones)
LIMITED = frozenset({"sendmessage", "senddocument", "editmessagetext", "editmessagereplymarkup"})


@dataclass(frozen=True)
class Window:
    """At most `count` messages per `seconds`."""

    count: int
    seconds: float


@dataclass
class _Limits:
    overall: Window | None
    group: Window | None
    private: Window | None
    grace: float  # seconds a window is shortened by: the time a request spends on the way
    sent: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def refuse(self, chat_id: int, now: float) -> tuple[str, int] | None:
        """(which limit, retry_after) when a message now would break one; else count it."""
        scopes = [("all", self.overall)]
        scopes.append(
            (f"group {chat_id}", self.group) if chat_id < 0 else (f"chat {chat_id}", self.private)
        )
        for scope, window in scopes:
            if window is None:
                continue
            recent = [
                t for t in self.sent.get(scope, []) if t > now - (window.seconds - self.grace)
            ]
            self.sent[scope] = recent
            if len(recent) >= window.count:
                return scope, max(1, int(recent[0] + window.seconds - now + 0.999))
        for scope, window in scopes:
            if window is not None:
                self.sent[scope].append(now)
        return None


@dataclass
class _Failure:
    error_code: int
    description: str
    retry_after: int | None
    times: int | None  # None: until cleared
    chat_id: int | None = None  # None: any chat
    drop: bool = False  # close the connection without an answer (a network error)
    delay: float = 0.0


class _Signal:
    """An edge-triggered notification: ``fire()`` wakes everyone currently waiting."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()


# --------------------------------------------------------------------------- param decoding

_PATH = re.compile(r"/bot([^/]+)/([A-Za-z0-9_]+)/?")
_JSON_FIELDS = frozenset(
    {
        "reply_markup",
        "commands",
        "scope",
        "allowed_updates",
        "link_preview_options",
        "reply_parameters",
        "entities",
        "caption_entities",
        "media",
        "results",
        "permissions",
    }
)
_INT_FIELDS = frozenset(
    {
        "chat_id",
        "message_id",
        "offset",
        "limit",
        "timeout",
        "reply_to_message_id",
        "cache_time",
        "user_id",
        "message_thread_id",
        "from_chat_id",
        "max_connections",
    }
)
_BOOL_FIELDS = frozenset(
    {
        "show_alert",
        "disable_notification",
        "protect_content",
        "disable_web_page_preview",
        "allow_sending_without_reply",
        "drop_pending_updates",
        "disable_content_type_detection",
        "allow_paid_broadcast",
        "show_caption_above_media",
    }
)
_BUTTON_ACTIONS = (
    "callback_data",
    "url",
    "web_app",
    "login_url",
    "switch_inline_query",
    "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat",
    "copy_text",
    "callback_game",
    "pay",
)
_SCOPES = frozenset(
    {
        "default",
        "all_private_chats",
        "all_group_chats",
        "all_chat_administrators",
        "chat",
        "chat_administrators",
        "chat_member",
    }
)
_COMMAND = re.compile(r"[a-z0-9_]{1,32}")


def _decode_value(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key in _JSON_FIELDS:
        try:
            return json.loads(value)
        except ValueError:
            raise _bad_request(f"can't parse {key} JSON object") from None
    if key in _INT_FIELDS:
        with contextlib.suppress(ValueError):
            return int(value)
    if key in _BOOL_FIELDS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


# --------------------------------------------------------------------------- the fake


class FakeTelegram:
    """In-process Telegram Bot API server; see the module docstring."""

    def __init__(
        self,
        token: str,
        *,
        bot_id: int = 1000,
        bot_username: str = "callbot_test_bot",
        webhook_retry_delay: float = 0.05,
        webhook_timeout: float = 10.0,
    ) -> None:
        self._token = token
        self.bot_id = bot_id
        self.bot_username = bot_username
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = False

        # what the bot did
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[SentMessage] = []
        self.edits: list[SentMessage] = []
        self.callback_answers: list[dict[str, Any]] = []
        self.commands: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        self.deleted: list[tuple[int, int]] = []
        self._events: list[SentMessage] = []  # sent + edits, in order
        self._answers: dict[str, dict[str, Any]] = {}
        self._activity = _Signal()

        # updates
        self._next_update_id = 100_000_001
        self._all_updates: dict[int, JSON] = {}
        self._queue: dict[int, JSON] = {}  # unconfirmed
        self._duplicates: list[int] = []
        self._confirmed = 0  # updates with id < this are confirmed
        self._allowed_updates: set[str] | None = None
        self._poll_generation = 0
        self._updates_signal = _Signal()

        # webhook mode
        self.webhook_retry_delay = webhook_retry_delay
        self.webhook_timeout = webhook_timeout
        self.webhook_targets: list[str] | None = None  # a load balancer's backends, round robin
        self.deliveries: list[WebhookDelivery] = []
        self.webhook_settings: list[dict[str, Any]] = []  # each setWebhook's parameters
        self._webhook: _Webhook | None = None
        self._jobs: list[_Job] = []
        self._deliverer: asyncio.Task[None] | None = None
        self._webhook_signal = _Signal()
        self._client: aiohttp.ClientSession | None = None
        self._next_target = 0
        self._last_webhook_error: str | None = None

        # chat state
        self._chats: dict[int, JSON] = {}
        self._users: dict[int, JSON] = {}
        self._last_message_id: dict[int, int] = {}
        self._api_messages: dict[tuple[int, int], JSON] = {}  # live messages (user + bot)
        self._bot_state: dict[tuple[int, int], SentMessage] = {}
        self._open_queries: set[str] = set()
        self._next_query_id = 4_200_000_000_000_000_001
        self._next_file_id = 1
        self._failures: dict[str, list[_Failure]] = {}
        self._delays: dict[str, list[_Failure]] = {}
        self._limits: _Limits | None = None
        self.flood_refusals: list[tuple[str, int, str]] = []  # (method, chat_id, which limit)
        self._editing: dict[tuple[int, int], int] = {}  # edits of a message now in flight
        self.overlapping_edits: list[tuple[int, int]] = []  # (chat_id, message_id)

        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "getme": self._get_me,
            "setwebhook": self._set_webhook,
            "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info,
            "setmycommands": self._set_my_commands,
            "getmycommands": self._get_my_commands,
            "deletemycommands": self._delete_my_commands,
            "sendmessage": self._send_message,
            "senddocument": self._send_document,
            "editmessagetext": self._edit_message_text,
            "editmessagereplymarkup": self._edit_message_reply_markup,
            "deletemessage": self._delete_message,
            "answercallbackquery": self._answer_callback_query,
            "sendchataction": self._send_chat_action,
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeTelegram is not started")
        return self._url

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self._url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing = True
        self._updates_signal.fire()
        await self._stop_delivering()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ feeding updates

    def push_update(self, update: dict[str, Any]) -> int:
        """Queue an update (assigning ``update_id`` if missing); returns its id."""
        update = dict(update)
        update_id = update.get("update_id")
        if update_id is None:
            update_id = self._next_update_id
            update["update_id"] = update_id
        self._next_update_id = max(self._next_update_id, update_id + 1)
        self._all_updates[update_id] = update
        self._queue[update_id] = update
        self._register_incoming(update)
        self._updates_signal.fire()
        if self._webhook is not None:
            self._enqueue(int(update_id))
        return int(update_id)

    def push_raw_duplicate(self, update_id: int) -> None:
        """Deliver an already pushed update once more, with the same id, even if confirmed."""
        if update_id not in self._all_updates:
            raise KeyError(f"update {update_id} was never pushed")
        if self._webhook is not None:
            self._enqueue(update_id)
            return
        self._duplicates.append(update_id)
        self._updates_signal.fire()

    def send_command(
        self,
        text: str,
        *,
        user_id: int,
        chat_id: int | None = None,
        chat_type: str = "private",
        language_code: str | None = "en",
        first_name: str = "Op",
        username: str | None = None,
        reply_to_message_id: int | None = None,
    ) -> tuple[int, int]:
        """Push a text ``message`` from a user; returns (update_id, message_id)."""
        if chat_id is None:
            if chat_type != "private":
                raise ValueError("chat_id is required for non-private chats")
            chat_id = user_id
        user: JSON = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username is not None:
            user["username"] = username
        if language_code is not None:
            user["language_code"] = language_code
        self._users[user_id] = user
        chat = self._register_chat(chat_id, chat_type, user)
        message_id = self._allocate_message_id(chat_id)
        message: JSON = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": user,
            "text": text,
        }
        command = re.match(r"/\S+", text)
        if command:
            message["entities"] = [
                {"type": "bot_command", "offset": 0, "length": _utf16_len(command.group())}
            ]
        if reply_to_message_id is not None:
            message["reply_to_message"] = self._reply_snapshot(chat_id, reply_to_message_id)
        update_id = self.push_update({"message": message})
        return update_id, message_id

    def press_button(
        self,
        *,
        user_id: int,
        chat_id: int,
        message_id: int,
        data: str,
        language_code: str | None = "en",
        chat_type: str = "private",
    ) -> tuple[int, str]:
        """Push a ``callback_query`` on a bot message; returns (update_id, callback_query_id).

        The button is not required to exist (stale/forged presses can be simulated). A
        deleted/unknown message is delivered as an InaccessibleMessage (date 0).
        """
        user = dict(
            self._users.get(user_id) or {"id": user_id, "is_bot": False, "first_name": "Op"}
        )
        user.pop("language_code", None)
        if language_code is not None:
            user["language_code"] = language_code
        chat = self._register_chat(chat_id, chat_type, user)
        message = self._api_messages.get((chat_id, message_id))
        if message is None:
            message = {"chat": chat, "message_id": message_id, "date": 0}
        query_id = str(self._next_query_id)
        self._next_query_id += 1
        update_id = self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "message": message,
                    "chat_instance": str(abs(chat_id) * 7919 % 10**15),
                    "data": data,
                }
            }
        )
        return update_id, query_id

    # ------------------------------------------------------------------ inspection

    def message(self, chat_id: int, message_id: int) -> SentMessage:
        """Latest state of a bot message (also after deletion, see ``deleted``)."""
        try:
            return self._bot_state[(chat_id, message_id)]
        except KeyError:
            raise KeyError(f"bot never sent message {message_id} in chat {chat_id}") from None

    def bot_messages(self, chat_id: int) -> list[SentMessage]:
        """Current state of the bot's non-deleted messages in a chat, by message_id."""
        keys = sorted(k for k in self._bot_state if k[0] == chat_id and k in self._api_messages)
        return [self._bot_state[k] for k in keys]

    def mark(self) -> int:
        return len(self._events)

    async def wait_for_message(
        self,
        predicate: Callable[[SentMessage], bool] | None = None,
        *,
        chat_id: int | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - public test-helper API
        after: int = 0,
    ) -> SentMessage:
        """Wait for a sent or edited message (event index >= ``after``) that matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in self._events[after:]:
                if chat_id is not None and event.chat_id != chat_id:
                    continue
                if predicate is None or predicate(event):
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching message (chat_id={chat_id}, after={after}) within {timeout}s;"
                    f" seen:\n{self._dump(after)}"
                )
            await self._activity.wait(remaining)

    async def wait_for_callback_answer(
        self,
        callback_query_id: str,
        timeout: float = 5.0,  # noqa: ASYNC109 - public test-helper API
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (answer := self._answers.get(callback_query_id)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"callback query {callback_query_id} not answered within {timeout}s;"
                    f" answers: {self.callback_answers}"
                )
            await self._activity.wait(remaining)
        return answer

    async def wait_for_request(
        self,
        method: str,
        count: int = 1,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - public test-helper API
    ) -> None:
        """Wait until ``method`` has been requested ``count`` times (answered or not)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sum(1 for name, _ in self.requests if name.lower() == method.lower()) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{method} not requested {count} times within {timeout}s")
            await self._activity.wait(remaining)

    def _dump(self, after: int) -> str:
        lines = [
            f"  #{index} {event.method} chat={event.chat_id} id={event.message_id} "
            f"text={event.plain!r} buttons={event.buttons()}"
            for index, event in enumerate(self._events)
            if index >= after
        ]
        return "\n".join(lines) or "  (nothing)"

    # ------------------------------------------------------------------ fault injection

    def fail_next(
        self,
        method: str,
        *,
        error_code: int = 500,
        description: str = "Internal Server Error",
        retry_after: int | None = None,
        times: int | None = 1,
        chat_id: int | None = None,
        drop: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail (checked before any side effect).

        ``times=None`` fails every call until ``clear_failures``. With ``chat_id`` only calls
        for that chat fail. ``drop=True`` closes the connection without an answer (the bot sees
        a network error); ``delay`` seconds pass before the failure is answered or dropped.
        """
        failure = _Failure(error_code, description, retry_after, times, chat_id, drop, delay)
        self._failures.setdefault(method.lower(), []).append(failure)

    def delay_next(
        self, method: str, seconds: float, *, times: int | None = 1, chat_id: int | None = None
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (in ``chat_id``) only after ``seconds``;
        the call then succeeds (or fails) as usual, and its effect is made at the end."""
        slow = _Failure(0, "", None, times, chat_id, delay=seconds)
        self._delays.setdefault(method.lower(), []).append(slow)

    def enforce_limits(
        self,
        *,
        overall: Window | None = Window(30, 1.0),
        group: Window | None = Window(20, 60.0),
        private: Window | None = Window(1, 1.0),
        grace: float = 0.25,
    ) -> None:
        """From now on answer 429 (with ``retry_after``) to a send or edit that breaks one of
        Telegram's limits: messages overall, into one group (negative chat id), into one
        private chat. A refused request does not count; each refusal is in ``flood_refusals``."""
        self._limits = _Limits(overall, group, private, grace)

    def clear_failures(self, method: str | None = None) -> None:
        """Stop failing ``method`` (or every method)."""
        if method is None:
            self._failures.clear()
        else:
            self._failures.pop(method.lower(), None)

    def _injected_failure(
        self, method: str, params: dict[str, Any], table: dict[str, list[_Failure]] | None = None
    ) -> _Failure | None:
        queue = (self._failures if table is None else table).get(method.lower())
        if not queue:
            return None
        for failure in queue:
            if failure.chat_id is not None and str(params.get("chat_id")) != str(failure.chat_id):
                continue
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    queue.remove(failure)
            return failure
        return None

    # ------------------------------------------------------------------ HTTP plumbing

    async def _handle(self, request: web.Request) -> web.Response:
        match = _PATH.fullmatch(request.path)
        if match is None:
            return _error_response(_ApiError(404, "Not Found"))
        token, method = match.groups()
        if token != self._token:
            return _error_response(_ApiError(401, "Unauthorized"))
        try:
            params = await self._read_params(request)
        except _ApiError as error:
            return _error_response(error)
        self.requests.append((method, params))
        self._activity.fire()
        key = method.lower()
        handler = self._methods.get(key)
        if handler is None and key != "getupdates":
            return _error_response(_ApiError(404, "Not Found: method not found"))
        if self._limits is not None and key in LIMITED and isinstance(params.get("chat_id"), int):
            loop = asyncio.get_running_loop()
            if refused := self._limits.refuse(params["chat_id"], loop.time()):
                scope, retry_after = refused
                self.flood_refusals.append((method, params["chat_id"], scope))
                error = _ApiError(429, f"Too Many Requests: retry after {retry_after}", retry_after)
                return _error_response(error)
        if key.startswith("edit") and isinstance(params.get("chat_id"), int):
            with self._editing_one((params["chat_id"], params.get("message_id"))):
                return await self._answer(request, method, params, handler)
        return await self._answer(request, method, params, handler)

    @contextlib.contextmanager
    def _editing_one(self, message: tuple[int, Any]) -> Any:
        key = (message[0], int(message[1]) if isinstance(message[1], int) else 0)
        if self._editing.get(key):
            self.overlapping_edits.append(key)
        self._editing[key] = self._editing.get(key, 0) + 1
        try:
            yield
        finally:
            self._editing[key] -= 1

    async def _answer(
        self,
        request: web.Request,
        method: str,
        params: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]] | None,
    ) -> web.Response:
        if slow := self._injected_failure(method, params, self._delays):
            await asyncio.sleep(slow.delay)
        if failure := self._injected_failure(method, params):
            if failure.delay:
                await asyncio.sleep(failure.delay)
            if failure.drop:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # no answer at all
            error = _ApiError(failure.error_code, failure.description, failure.retry_after)
            return _error_response(error)
        try:
            if handler is None:
                result: Any = await self._get_updates(params, request)
            else:
                result = await handler(params)
        except _ApiError as error:
            return _error_response(error)
        return web.json_response({"ok": True, "result": result})

    async def _read_params(self, request: web.Request) -> dict[str, Any]:
        raw: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise _bad_request("can't parse JSON body") from None
            if not isinstance(body, dict):
                raise _bad_request("JSON body must be an object")
            raw.update(body)
        else:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    try:
                        raw[key] = (value.filename, value.file.read())
                    finally:
                        value.file.close()
                else:
                    raw[key] = value
        return {key: _decode_value(key, value) for key, value in raw.items()}

    # ------------------------------------------------------------------ getUpdates

    async def _get_updates(self, params: dict[str, Any], request: web.Request) -> list[JSON]:
        if self._webhook is not None:
            raise _ApiError(409, WEBHOOK_ACTIVE)
        offset = params.get("offset")
        limit = min(max(_as_int(params.get("limit"), 100), 1), 100)
        timeout = max(_as_int(params.get("timeout"), 0), 0)
        if "allowed_updates" in params:
            allowed = params["allowed_updates"]
            self._allowed_updates = set(allowed) if allowed else None
        if isinstance(offset, int) and offset != 0:
            self._confirm(offset)
        self._poll_generation += 1
        generation = self._poll_generation
        self._updates_signal.fire()  # terminates an older pending poll with 409
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            duplicates, batch = self._collect(limit)
            if batch or self._closing:
                break
            if generation != self._poll_generation:
                raise _ApiError(409, CONFLICT)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self._updates_signal.wait(remaining)
        transport = request.transport
        if duplicates and transport is not None and not transport.is_closing():
            for update_id in duplicates:
                self._duplicates.remove(update_id)
        return batch

    def _confirm(self, offset: int) -> None:
        if offset < 0:  # "-N": keep only the last N pending updates
            pending = sorted(u for u in self._queue if u >= self._confirmed)
            offset = pending[offset] if len(pending) >= -offset else self._confirmed
        self._confirmed = max(self._confirmed, offset)
        for update_id in [u for u in self._queue if u < self._confirmed]:
            del self._queue[update_id]

    def _collect(self, limit: int) -> tuple[list[int], list[JSON]]:
        """(duplicate ids used, batch): duplicates first, then unconfirmed updates by id."""
        duplicates = [u for u in self._duplicates if self._allowed(self._all_updates[u])][:limit]
        batch = [self._all_updates[u] for u in duplicates]
        for update_id in sorted(self._queue):
            if len(batch) >= limit:
                break
            if update_id >= self._confirmed and self._allowed(self._queue[update_id]):
                batch.append(self._queue[update_id])
        return duplicates, batch

    def _allowed(self, update: JSON) -> bool:
        if self._allowed_updates is None:
            return True
        return any(key in self._allowed_updates for key in update if key != "update_id")

    # ------------------------------------------------------------------ chat state helpers

    def _bot_user(self) -> JSON:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Callbot",
            "username": self.bot_username,
        }

    def _register_chat(self, chat_id: int, chat_type: str, user: JSON) -> JSON:
        if chat_id not in self._chats:
            chat: JSON = {"id": chat_id, "type": chat_type}
            if chat_type == "private":
                chat["first_name"] = user.get("first_name", "Op")
                if "username" in user:
                    chat["username"] = user["username"]
            else:
                chat["title"] = f"Test {chat_type} {chat_id}"
            self._chats[chat_id] = chat
        return self._chats[chat_id]

    def _chat(self, chat_id: int) -> JSON:
        if chat_id in self._chats:
            return self._chats[chat_id]
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": f"User {chat_id}"}
        return {"id": chat_id, "type": "supergroup", "title": f"Test supergroup {chat_id}"}

    def _allocate_message_id(self, chat_id: int) -> int:
        self._last_message_id[chat_id] = self._last_message_id.get(chat_id, 0) + 1
        return self._last_message_id[chat_id]

    def _register_incoming(self, update: JSON) -> None:
        message = update.get("message")
        if isinstance(message, dict) and "message_id" in message and "chat" in message:
            chat_id = int(message["chat"]["id"])
            message_id = int(message["message_id"])
            self._chats.setdefault(chat_id, message["chat"])
            self._api_messages[(chat_id, message_id)] = message
            self._last_message_id[chat_id] = max(self._last_message_id.get(chat_id, 0), message_id)
        query = update.get("callback_query")
        if isinstance(query, dict) and "id" in query:
            self._open_queries.add(str(query["id"]))

    def _reply_snapshot(self, chat_id: int, message_id: int) -> JSON:
        message = self._api_messages.get((chat_id, message_id))
        if message is None:
            return {"message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id)}
        return {k: v for k, v in message.items() if k != "reply_to_message"}

    def _record(self, snapshot: SentMessage, *, edit: bool) -> None:
        self._bot_state[(snapshot.chat_id, snapshot.message_id)] = snapshot
        (self.edits if edit else self.sent).append(snapshot)
        self._events.append(snapshot)
        self._activity.fire()

    # ------------------------------------------------------------------ validation helpers

    @staticmethod
    def _chat_id(params: dict[str, Any]) -> int:
        value = params.get("chat_id")
        if value is None or value == "":
            raise _bad_request("chat_id is empty")
        if isinstance(value, bool) or not isinstance(value, int) or value == 0:
            raise _bad_request("chat not found")
        return value

    @staticmethod
    def _parse_mode(params: dict[str, Any]) -> str | None:
        mode = params.get("parse_mode") or None
        if mode is not None and mode.lower() not in ("html", "markdown", "markdownv2"):
            raise _bad_request("unsupported parse_mode")
        return mode

    @staticmethod
    def _parse_text(text: str, parse_mode: str | None, entities: Any) -> tuple[str, list[JSON]]:
        if _is_html(parse_mode):
            try:
                return _trim(*parse_html(text))
            except HtmlParseError as error:
                raise _bad_request(f"can't parse entities: {error}") from None
        # Markdown modes are passed through unvalidated.
        return _trim(text, list(entities) if isinstance(entities, list) else [])

    @staticmethod
    def _markup(params: dict[str, Any]) -> JSON | None:
        markup = params.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _bad_request("can't parse reply keyboard markup JSON object")
        if "inline_keyboard" not in markup:
            return markup
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise _bad_request('field "inline_keyboard" must be an Array of Arrays')
        for button in (button for row in rows for button in row):
            if not isinstance(button, dict) or not button.get("text"):
                raise _bad_request("can't parse inline keyboard button: text is empty")
            if not any(action in button for action in _BUTTON_ACTIONS):
                raise _bad_request(
                    "can't parse inline keyboard button: "
                    "Text buttons are unallowed in the inline keyboard"
                )
            if "web_app" in button and str(params.get("chat_id", "")).startswith("-"):
                raise _bad_request("BUTTON_TYPE_INVALID")  # web_app buttons: private chats only
            data = button.get("callback_data")
            if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA_BYTES:
                raise _bad_request("BUTTON_DATA_INVALID")
            url = button.get("url")
            if url is not None and not re.match(r"(https?|tg)://\S+$", str(url)):
                raise _bad_request("BUTTON_URL_INVALID")
        return markup

    def _reply_to(self, chat_id: int, params: dict[str, Any]) -> int | None:
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id = reply.get("message_id")
            allow = bool(reply.get("allow_sending_without_reply"))
        else:
            message_id = params.get("reply_to_message_id")
            allow = bool(params.get("allow_sending_without_reply"))
        if message_id is None:
            return None
        if (chat_id, message_id) not in self._api_messages:
            if allow:
                return None
            raise _bad_request("message to be replied not found")
        return int(message_id)

    def _editable(self, params: dict[str, Any], verb: str = "edit") -> tuple[int, int]:
        if "chat_id" not in params and "inline_message_id" in params:
            raise _bad_request("inline messages are not supported by FakeTelegram")
        chat_id = self._chat_id(params)
        message_id = params.get("message_id")
        if message_id is None:
            raise _bad_request("message identifier is not specified")
        if not isinstance(message_id, int) or (chat_id, message_id) not in self._api_messages:
            raise _bad_request(f"message to {verb} not found")
        if (chat_id, message_id) not in self._bot_state:
            raise _bad_request(
                "message can't be edited" if verb == "edit" else "message can't be deleted"
            )
        return chat_id, message_id

    def _new_message(
        self,
        chat_id: int,
        text: str,
        entities: list[JSON],
        markup: JSON | None,
        reply_to: int | None,
        *,
        text_key: str = "text",
        extra: JSON | None = None,
    ) -> JSON:
        message_id = self._allocate_message_id(chat_id)
        message: JSON = {
            "message_id": message_id,
            "from": self._bot_user(),
            "date": int(time.time()),
            "chat": self._chat(chat_id),
        }
        if reply_to is not None:
            message["reply_to_message"] = self._reply_snapshot(chat_id, reply_to)
        message.update(extra or {})
        if text:
            message[text_key] = text
        if entities:
            message["entities" if text_key == "text" else "caption_entities"] = entities
        if (inline := _inline(markup)) is not None:
            message["reply_markup"] = inline
        self._api_messages[(chat_id, message_id)] = message
        return message

    # ------------------------------------------------------------------ methods

    async def _get_me(self, params: dict[str, Any]) -> JSON:
        return {
            **self._bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _set_webhook(self, params: dict[str, Any]) -> bool:
        url = str(params.get("url") or "")
        if not url:
            return await self._delete_webhook(params)
        if not re.match(r"https?://[^/\s]+", url):
            raise _bad_request("bad webhook: HTTPS url must be provided for webhook")
        secret = params.get("secret_token") or None
        if secret is not None and not _SECRET_TOKEN.fullmatch(str(secret)):
            raise _bad_request("secret token contains unallowed characters")
        max_connections = _as_int(params.get("max_connections"), 40)
        if not 1 <= max_connections <= 100:
            raise _bad_request("bad webhook: max_connections must be between 1 and 100")
        self.webhook_settings.append(dict(params))
        if "allowed_updates" in params:
            allowed = params["allowed_updates"]
            self._allowed_updates = set(allowed) if allowed else None
        if params.get("drop_pending_updates"):
            self._confirm(self._next_update_id)
        self._webhook = _Webhook(url, secret and str(secret), max_connections)
        pending = sorted(u for u in self._queue if u >= self._confirmed) + self._duplicates
        self._duplicates = []
        for update_id in pending:
            self._enqueue(update_id)
        if self._deliverer is None:
            self._deliverer = asyncio.create_task(self._deliver_forever(), name="fake webhook")
        return True

    async def _delete_webhook(self, params: dict[str, Any]) -> bool:
        if self._webhook is not None:
            self._webhook = None
            await self._stop_delivering()
        if params.get("drop_pending_updates"):
            self._confirm(self._next_update_id)
        return True

    async def _get_webhook_info(self, params: dict[str, Any]) -> JSON:
        hook = self._webhook
        if hook is None:
            pending = sum(1 for u in self._queue if u >= self._confirmed)
            return {"url": "", "has_custom_certificate": False, "pending_update_count": pending}
        info: JSON = {
            "url": hook.url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._jobs),
            "max_connections": hook.max_connections,
        }
        if self._allowed_updates is not None:
            info["allowed_updates"] = sorted(self._allowed_updates)
        if self._last_webhook_error is not None:
            info["last_error_message"] = self._last_webhook_error
        return info

    # ------------------------------------------------------------------ webhook delivery

    def _enqueue(self, update_id: int) -> None:
        self._jobs.append(_Job(update_id))
        self._webhook_signal.fire()

    async def _stop_delivering(self) -> None:
        task, self._deliverer = self._deliverer, None
        self._jobs = []
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _deliver_forever(self) -> None:
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        if self._client is None:
            self._client = aiohttp.ClientSession()
        try:
            while (hook := self._webhook) is not None:
                now = loop.time()
                for job in [j for j in self._jobs if not j.busy and j.not_before <= now]:
                    if sum(j.busy for j in self._jobs) >= hook.max_connections:
                        break
                    job.busy = True
                    task = asyncio.create_task(self._deliver(hook, job))
                    running.add(task)
                    task.add_done_callback(running.discard)
                waiting = [j.not_before - now for j in self._jobs if not j.busy]
                await self._webhook_signal.wait(max(min(waiting, default=1.0), 0.001))
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _deliver(self, hook: _Webhook, job: _Job) -> None:
        update = self._all_updates[job.update_id]
        if not self._allowed(update):  # Telegram never sends those
            self._settle(job, None)
            return
        url = hook.url
        if self.webhook_targets:
            url = self.webhook_targets[self._next_target % len(self.webhook_targets)]
            self._next_target += 1
        headers = {SECRET_HEADER: hook.secret} if hook.secret else {}
        status: int | str
        assert self._client is not None
        try:
            async with self._client.post(
                url,
                json=update,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.webhook_timeout),
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            status = "timeout"
        except aiohttp.ClientError:
            status = "error"
        delivery = WebhookDelivery(job.update_id, status, url)
        self.deliveries.append(delivery)
        self._settle(job, delivery)

    def _settle(self, job: _Job, delivery: WebhookDelivery | None) -> None:
        if delivery is None or delivery.ok:
            if job in self._jobs:
                self._jobs.remove(job)
            self._queue.pop(job.update_id, None)
        else:
            self._last_webhook_error = f"Wrong response from the webhook: {delivery.status}"
            job.busy = False
            job.not_before = asyncio.get_running_loop().time() + self.webhook_retry_delay
        self._activity.fire()
        self._webhook_signal.fire()

    async def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - public test-helper API
    ) -> None:
        """Wait until `condition()` holds; checked after each request, message and delivery."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"condition not reached within {timeout}s")
            await self._activity.wait(remaining)

    def deliveries_of(self, update_id: int) -> list[WebhookDelivery]:
        return [d for d in self.deliveries if d.update_id == update_id]

    async def wait_delivered(
        self,
        update_id: int,
        timeout: float = 10.0,  # noqa: ASYNC109 - public test-helper API
    ) -> WebhookDelivery:
        """Wait until the update was answered 2xx by the webhook; that delivery."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for delivery in self.deliveries_of(update_id):
                if delivery.ok:
                    return delivery
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"update {update_id} not delivered within {timeout}s; attempts: "
                    f"{self.deliveries_of(update_id)}"
                )
            await self._activity.wait(remaining)

    async def wait_for_delivery(
        self,
        predicate: Callable[[WebhookDelivery], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - public test-helper API
    ) -> WebhookDelivery:
        """Wait for a delivery attempt that matches (any answer, or none)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for delivery in self.deliveries:
                if predicate(delivery):
                    return delivery
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no such delivery within {timeout}s: {self.deliveries}")
            await self._activity.wait(remaining)

    @staticmethod
    def _commands_key(params: dict[str, Any]) -> tuple[str, str | None]:
        scope = params.get("scope") or {"type": "default"}
        if not isinstance(scope, dict) or scope.get("type") not in _SCOPES:
            raise _bad_request("can't parse BotCommandScope JSON object")
        language = params.get("language_code") or None
        if language is not None and not re.fullmatch(r"[a-z]{2}", str(language)):
            raise _bad_request("invalid language code specified")
        return str(scope["type"]), language

    async def _set_my_commands(self, params: dict[str, Any]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad_request("can't parse commands JSON object")
        for command in commands:
            if not isinstance(command, dict) or not _COMMAND.fullmatch(
                str(command.get("command", ""))
            ):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad_request("command description is empty or too long")
        key = self._commands_key(params)
        if commands:
            self.commands[key] = commands
        else:
            self.commands.pop(key, None)
        return True

    async def _get_my_commands(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.commands.get(self._commands_key(params), [])

    async def _delete_my_commands(self, params: dict[str, Any]) -> bool:
        self.commands.pop(self._commands_key(params), None)
        return True

    async def _send_message(self, params: dict[str, Any]) -> JSON:
        chat_id = self._chat_id(params)
        text = params.get("text")
        if not text:
            raise _bad_request("message text is empty")
        parse_mode = self._parse_mode(params)
        plain, entities = self._parse_text(str(text), parse_mode, params.get("entities"))
        if not plain:
            raise _bad_request("message text is empty")
        if len(plain) > MAX_TEXT_LENGTH:
            raise _bad_request("message is too long")
        markup = self._markup(params)
        reply_to = self._reply_to(chat_id, params)
        message = self._new_message(chat_id, plain, entities, markup, reply_to)
        snapshot = SentMessage(
            chat_id, message["message_id"], str(text), parse_mode, markup, "sendMessage", reply_to
        )
        self._record(snapshot, edit=False)
        return message

    async def _send_document(self, params: dict[str, Any]) -> JSON:
        chat_id = self._chat_id(params)
        document = params.get("document")
        if isinstance(document, str) and document.startswith("attach://"):
            document = params.get(document.removeprefix("attach://"))
        if not document:
            raise _bad_request("there is no document in the request")
        filename, content = document if isinstance(document, tuple) else (str(document), b"")
        if isinstance(document, tuple) and not content:
            raise _bad_request("file must be non-empty")
        caption = str(params.get("caption") or "")
        parse_mode = self._parse_mode(params)
        plain, entities = self._parse_text(caption, parse_mode, params.get("caption_entities"))
        if len(plain) > MAX_CAPTION_LENGTH:
            raise _bad_request("message caption is too long")
        markup = self._markup(params)
        reply_to = self._reply_to(chat_id, params)
        file_id = f"FAKEDOC{self._next_file_id}"
        self._next_file_id += 1
        info = {
            "file_id": file_id,
            "file_unique_id": f"U{file_id}",
            "file_name": filename,
            "file_size": len(content),
        }
        message = self._new_message(
            chat_id,
            plain,
            entities,
            markup,
            reply_to,
            text_key="caption",
            extra={"document": info},
        )
        snapshot = SentMessage(
            chat_id,
            message["message_id"],
            caption,
            parse_mode,
            markup,
            "sendDocument",
            reply_to,
            document=(filename, content),
        )
        self._record(snapshot, edit=False)
        return message

    async def _edit_message_text(self, params: dict[str, Any]) -> JSON:
        chat_id, message_id = self._editable(params)
        current = self._api_messages[(chat_id, message_id)]
        text = params.get("text")
        if not text:
            raise _bad_request("message text is empty")
        if "text" not in current:
            raise _bad_request("there is no text in the message to edit")
        parse_mode = self._parse_mode(params)
        plain, entities = self._parse_text(str(text), parse_mode, params.get("entities"))
        if not plain:
            raise _bad_request("message text is empty")
        if len(plain) > MAX_TEXT_LENGTH:
            raise _bad_request("message is too long")
        markup = self._markup(params)
        inline = _inline(markup)
        if (
            plain == current["text"]
            and entities == current.get("entities", [])
            and inline == current.get("reply_markup")
        ):
            raise _ApiError(400, NOT_MODIFIED)
        message = {k: v for k, v in current.items() if k not in ("entities", "reply_markup")}
        message.update(text=plain, edit_date=int(time.time()))
        if entities:
            message["entities"] = entities
        if inline is not None:
            message["reply_markup"] = inline
        self._api_messages[(chat_id, message_id)] = message
        previous = self._bot_state[(chat_id, message_id)]
        snapshot = dataclasses.replace(
            previous,
            text=str(text),
            parse_mode=parse_mode,
            reply_markup=markup,
            method="editMessageText",
        )
        self._record(snapshot, edit=True)
        return message

    async def _edit_message_reply_markup(self, params: dict[str, Any]) -> JSON:
        chat_id, message_id = self._editable(params)
        current = self._api_messages[(chat_id, message_id)]
        markup = self._markup(params)
        inline = _inline(markup)
        if inline == current.get("reply_markup"):
            raise _ApiError(400, NOT_MODIFIED)
        message = {k: v for k, v in current.items() if k != "reply_markup"}
        message["edit_date"] = int(time.time())
        if inline is not None:
            message["reply_markup"] = inline
        self._api_messages[(chat_id, message_id)] = message
        previous = self._bot_state[(chat_id, message_id)]
        snapshot = dataclasses.replace(
            previous, reply_markup=markup, method="editMessageReplyMarkup"
        )
        self._record(snapshot, edit=True)
        return message

    async def _delete_message(self, params: dict[str, Any]) -> bool:
        chat_id, message_id = self._editable(params, verb="delete")
        del self._api_messages[(chat_id, message_id)]
        self.deleted.append((chat_id, message_id))
        return True

    async def _answer_callback_query(self, params: dict[str, Any]) -> bool:
        query_id = params.get("callback_query_id")
        if query_id is None or str(query_id) not in self._open_queries:
            raise _ApiError(400, QUERY_INVALID)
        if len(str(params.get("text") or "")) > MAX_CALLBACK_ANSWER_LENGTH:
            raise _bad_request("MESSAGE_TOO_LONG")
        self._open_queries.discard(str(query_id))
        self.callback_answers.append(params)
        self._answers[str(query_id)] = params
        self._activity.fire()
        return True

    async def _send_chat_action(self, params: dict[str, Any]) -> bool:
        self._chat_id(params)
        if not params.get("action"):
            raise _bad_request("action is empty")
        return True


def _inline(markup: JSON | None) -> JSON | None:
    """The markup Telegram attaches to a message: only a non-empty inline keyboard."""
    if markup is None:
        return None
    rows = markup.get("inline_keyboard")
    if not rows or not any(rows):
        return None
    return markup


def _as_int(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _bad_request("invalid integer parameter") from None


def _error_response(error: _ApiError) -> web.Response:
    payload: JSON = {"ok": False, "error_code": error.code, "description": error.description}
    if error.retry_after is not None:
        payload["parameters"] = {"retry_after": error.retry_after}
    return web.json_response(payload, status=error.code)
