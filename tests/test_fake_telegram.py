"""Tests of the loopback Telegram fake, driven through the real aiogram Bot."""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
from collections.abc import AsyncIterator

import aiohttp
import aiohttp.web
import pytest
from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
)
from aiogram.filters import Command
from aiogram.types import (
    BotCommand,
    BotCommandScopeAllPrivateChats,
    BufferedInputFile,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
)

from tests.fakes.telegram import FakeTelegram, HtmlParseError, parse_html

TOKEN = "123456:" + "A" * 35


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram(TOKEN)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    session = AiohttpSession(api=TelegramAPIServer.from_base(fake.url))
    client = Bot(TOKEN, session=session)
    yield client
    await client.session.close()


def keyboard(*pairs: tuple[str, str]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text=t, callback_data=d)] for t, d in pairs]
    )


# --------------------------------------------------------------------------- HTML parser


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script>",
        "a < b",
        "AT&T",
        "<b>x",
        "<b>x</i>",
        "x</b>",
        "<span>x</span>",
        "<br>",
        "&nbsp;",
        '<a href="x&y">z</a>',
        "<b",
    ],
)
def test_parse_html_rejects_broken_markup(text: str) -> None:
    with pytest.raises(HtmlParseError):
        parse_html(text)


@pytest.mark.parametrize(
    "raw",
    ["a < b & c > d", "AT&T \"quoted\" 'single'", "<script>x</script>", "&amp; already", "ü€😀"],
)
def test_parse_html_accepts_escaped_text(raw: str) -> None:
    plain, entities = parse_html(f"<b>{html.escape(raw)}</b>")
    assert plain == raw
    assert entities == [{"type": "bold", "offset": 0, "length": len(raw.encode("utf-16-le")) // 2}]


def test_parse_html_entities_and_nesting() -> None:
    text = (
        '<b>bold <i>both</i></b> <a href="https://e.x/?a=1&amp;b=2">link</a> '
        '<pre><code class="language-py">x = 1</code></pre> <span class="tg-spoiler">s</span> '
        "<blockquote expandable>q</blockquote> &#x27;&#39;"
    )
    plain, entities = parse_html(text)
    assert plain == "bold both link x = 1 s q ''"
    kinds = [(e["type"], e["offset"], e["length"]) for e in entities]
    assert kinds == [
        ("bold", 0, 9),
        ("italic", 5, 4),
        ("text_link", 10, 4),
        ("pre", 15, 5),
        ("spoiler", 21, 1),
        ("expandable_blockquote", 23, 1),
    ]
    assert entities[2]["url"] == "https://e.x/?a=1&b=2"
    assert entities[3]["language"] == "py"


# --------------------------------------------------------------------------- through aiogram


async def test_send_message_html_validation(fake: FakeTelegram, bot: Bot) -> None:
    raw = "a < b & <script>AT&T</script>"
    message = await bot.send_message(
        42, f"  <b>{html.escape(raw)}</b>\n", parse_mode="HTML", reply_markup=keyboard(("Go", "go"))
    )
    assert message.text == raw
    assert message.chat.type == "private"
    assert message.from_user is not None and message.from_user.is_bot
    assert message.entities is not None and message.entities[0].type == "bold"
    sent = fake.sent[-1]
    assert (sent.chat_id, sent.message_id, sent.method) == (42, message.message_id, "sendMessage")
    assert sent.plain == raw
    assert sent.buttons() == [("Go", "go")]
    assert fake.message(42, message.message_id) is sent

    for broken in ("<script>x</script>", "a < b", "AT&T", "<b>x"):
        with pytest.raises(TelegramBadRequest, match="can't parse entities"):
            await bot.send_message(42, broken, parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(42, "x" * 4097)
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(42, "<b> </b>", parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(42, "x", reply_markup=keyboard(("Too long", "x" * 65)))
    assert len(fake.sent) == 1
    assert await bot.send_message(42, "x" * 4096, parse_mode=None)


async def test_edit_message(fake: FakeTelegram, bot: Bot) -> None:
    fake.send_command("/start", user_id=7)
    first = await bot.send_message(
        7, "<i>hi</i>", parse_mode="HTML", reply_markup=keyboard(("A", "a"))
    )
    assert first.message_id == 2  # ids are shared with the user's messages in the chat
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text(
            text="<i>hi</i>",
            chat_id=7,
            message_id=first.message_id,
            parse_mode="HTML",
            reply_markup=keyboard(("A", "a")),
        )
    edited = await bot.edit_message_text(
        text="<b>hi</b>", chat_id=7, message_id=first.message_id, parse_mode="HTML"
    )
    assert isinstance(edited, Message) and edited.reply_markup is None
    state = fake.message(7, first.message_id)
    assert (state.method, state.plain, state.buttons()) == ("editMessageText", "hi", [])
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_reply_markup(chat_id=7, message_id=first.message_id)
    await bot.edit_message_reply_markup(
        chat_id=7, message_id=first.message_id, reply_markup=keyboard(("B", "b"))
    )
    assert fake.message(7, first.message_id).buttons() == [("B", "b")]
    assert [e.method for e in fake.edits] == ["editMessageText", "editMessageReplyMarkup"]
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text(text="x", chat_id=7, message_id=99)
    with pytest.raises(TelegramBadRequest, match="message can't be edited"):
        await bot.edit_message_text(text="x", chat_id=7, message_id=1)

    reply = await bot.send_message(7, "re", reply_parameters=ReplyParameters(message_id=1))
    assert reply.reply_to_message is not None and reply.reply_to_message.text == "/start"
    assert await bot.delete_message(7, reply.message_id)
    assert [m.message_id for m in fake.bot_messages(7)] == [first.message_id]


async def test_get_updates_long_poll_offset_and_duplicates(fake: FakeTelegram, bot: Bot) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await asyncio.sleep(0.05)
    update_id, message_id = fake.send_command("/ping@callbot_test_bot now", user_id=5)
    updates = await poll
    assert loop.time() - started < 1
    assert [u.update_id for u in updates] == [update_id]
    message = updates[0].message
    assert message is not None and message.message_id == message_id
    assert message.entities is not None
    assert message.entities[0].length == len("/ping@callbot_test_bot")

    # not confirmed yet -> returned again; confirmed via offset -> long poll times out with []
    assert [u.update_id for u in await bot.get_updates()] == [update_id]
    started = loop.time()
    assert await bot.get_updates(offset=update_id + 1, timeout=1) == []
    assert 0.9 < loop.time() - started < 2

    # Telegram delivering the same update twice
    fake.push_raw_duplicate(update_id)
    again = await bot.get_updates(offset=update_id + 1)
    assert [u.update_id for u in again] == [update_id]
    assert await bot.get_updates(offset=update_id + 1) == []


async def test_fail_next_retry_after(fake: FakeTelegram, bot: Bot) -> None:
    fake.fail_next(
        "sendMessage", error_code=429, description="Too Many Requests: retry after 3", retry_after=3
    )
    with pytest.raises(TelegramRetryAfter) as caught:
        await bot.send_message(1, "x")
    assert caught.value.retry_after == 3
    assert (await bot.send_message(1, "x")).text == "x"
    assert [m for m, _ in fake.requests] == ["sendMessage", "sendMessage"]


async def test_fail_next_per_chat_forever_and_dropped(fake: FakeTelegram, bot: Bot) -> None:
    fake.fail_next(
        "sendMessage",
        error_code=403,
        description="Forbidden: bot was kicked",
        chat_id=-5,
        times=None,
    )
    for _ in range(2):
        with pytest.raises(TelegramForbiddenError):
            await bot.send_message(-5, "x")
    assert (await bot.send_message(7, "other chat")).text == "other chat"
    fake.clear_failures("sendMessage")
    assert (await bot.send_message(-5, "x")).text == "x"

    fake.fail_next("editMessageText", drop=True)
    with pytest.raises(TelegramNetworkError):
        await bot.edit_message_text("y", chat_id=-5, message_id=1)
    assert fake.edits == []


async def test_callbacks_commands_and_documents(fake: FakeTelegram, bot: Bot) -> None:
    sent = await bot.send_message(-100, "pick", reply_markup=keyboard(("One", "one")))
    assert sent.chat.type == "supergroup"
    _, query_id = fake.press_button(
        user_id=3, chat_id=-100, message_id=sent.message_id, data="one", chat_type="supergroup"
    )
    [update] = await bot.get_updates()
    query = update.callback_query
    assert isinstance(query, CallbackQuery) and query.id == query_id and query.data == "one"
    assert isinstance(query.message, Message) and query.message.text == "pick"
    assert await bot.answer_callback_query(query_id, text="ok", show_alert=True)
    assert await fake.wait_for_callback_answer(query_id) == {
        "callback_query_id": query_id,
        "text": "ok",
        "show_alert": True,
    }
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query_id)

    commands = [BotCommand(command="call", description="Place a call")]
    private = BotCommandScopeAllPrivateChats()
    assert await bot.set_my_commands(commands, scope=private, language_code="de")
    stored = [{"command": "call", "description": "Place a call"}]
    assert fake.commands == {("all_private_chats", "de"): stored}
    got = await bot.get_my_commands(scope=private, language_code="de")
    assert [c.model_dump() for c in got] == [c.model_dump() for c in commands]
    assert await bot.get_my_commands() == []

    doc = await bot.send_document(
        5,
        BufferedInputFile(b"a,b\n", filename="calls.csv"),
        caption="<b>report</b>",
        parse_mode="HTML",
    )
    assert doc.document is not None and doc.document.file_name == "calls.csv"
    assert doc.caption == "report"
    assert fake.sent[-1].document == ("calls.csv", b"a,b\n")
    assert await bot.send_chat_action(5, "typing")


async def test_raw_http_errors(fake: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.url}/bot1:wrong/getMe") as resp:
            assert resp.status == 401
            assert resp.content_type == "application/json"
            unauthorized = {"ok": False, "error_code": 401, "description": "Unauthorized"}
            assert await resp.json() == unauthorized
        async with http.post(f"{fake.url}/bot{TOKEN}/noSuchMethod") as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["description"] == "Not Found: method not found"
        async with http.post(f"{fake.url}/bot{TOKEN}/sendMessage", json={"text": "x"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["description"] == "Bad Request: chat_id is empty"
        async with http.get(f"{fake.url}/bot{TOKEN}/getme") as resp:
            assert (await resp.json())["result"]["username"] == "callbot_test_bot"


async def test_dispatcher_polling_roundtrip(fake: FakeTelegram, bot: Bot) -> None:
    dp = Dispatcher()

    @dp.message(Command("ping"))
    async def ping(message: Message) -> None:
        await message.answer("<b>pong</b> &amp; more", parse_mode="HTML")

    polling = asyncio.create_task(dp.start_polling(bot, handle_signals=False, polling_timeout=1))
    try:
        mark = fake.mark()
        _, message_id = fake.send_command("/ping", user_id=77)
        reply = await fake.wait_for_message(
            lambda m: m.plain == "pong & more", chat_id=77, after=mark
        )
        assert reply.message_id == message_id + 1
        with pytest.raises(AssertionError, match="pong & more"):
            await fake.wait_for_message(lambda m: False, after=mark, timeout=0.05)
    finally:
        await dp.stop_polling()
        await polling
    assert [m for m, _ in fake.requests][:1] == ["getMe"]


async def test_webhook_delivery_parallel_redelivered_and_recorded(
    fake: FakeTelegram, bot: Bot
) -> None:
    """setWebhook makes the fake POST each update with the secret, at most max_connections at
    once, again after a non-2xx answer, a timeout or a refused connection; getUpdates is 409."""
    seen: list[tuple[int, str | None]] = []
    current, most = 0, 0
    pair = asyncio.Event()

    async def receive(request: aiohttp.web.Request) -> aiohttp.web.Response:
        nonlocal current, most
        update = await request.json()
        update_id = update["update_id"]
        seen.append((update_id, request.headers.get("X-Telegram-Bot-Api-Secret-Token")))
        attempt = sum(1 for u, _ in seen if u == update_id)
        if update_id == first and attempt == 1:
            return aiohttp.web.Response(status=500)
        if update_id == first and attempt == 2:
            await asyncio.sleep(5)  # past webhook_timeout: no answer in time
        current += 1
        most = max(most, current)
        if current >= 2:
            pair.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pair.wait(), 2)
        current -= 1
        return aiohttp.web.json_response({"ok": True})

    app = aiohttp.web.Application()
    app.router.add_post("/hook", receive)
    runner = aiohttp.web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/hook"
    fake.webhook_timeout, fake.webhook_retry_delay = 0.5, 0.01
    try:
        first, _ = fake.send_command("/start", user_id=5)  # queued before the webhook: sent too
        assert await bot.set_webhook(url, secret_token="s-1", max_connections=2)
        others = [fake.send_command(f"/n{i}", user_id=5)[0] for i in range(4)]
        with pytest.raises(TelegramConflictError, match="webhook is active"):
            await bot.get_updates()
        for update_id in [first, *others]:
            await fake.wait_delivered(update_id)
        assert [d.status for d in fake.deliveries_of(first)] == [500, "timeout", 200]
        assert most == 2
        assert {secret for _, secret in seen} == {"s-1"}
        info = await bot.get_webhook_info()
        assert (info.url, info.pending_update_count, info.max_connections) == (url, 0, 2)
        # a load balancer whose first backend is down: the attempt fails, the next one lands
        dead = f"http://127.0.0.1:{_closed_port()}/hook"
        fake.webhook_targets = [dead, url]
        again, _ = fake.send_command("/again", user_id=5)
        await fake.wait_delivered(again)
        assert [(d.url, d.status) for d in fake.deliveries_of(again)] == [
            (dead, "error"),
            (url, 200),
        ]
        # back to polling: nothing left to deliver, getUpdates works again
        assert await bot.delete_webhook()
        assert await bot.get_updates(timeout=0) == []
    finally:
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
