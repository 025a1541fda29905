"""Two replicas on one PostgreSQL database and one Redis (REDIS_URL): what one makes, the other
sees — confirmations and button tokens, the per-number guard, early webhook events, /play audio.

Replica A is the bot `start_bot` runs (long polling on the fake Telegram); replica B is a second
`CallbotApp` on the same settings that does not poll (two pollers on one token end each other's
getUpdates with 409, as on the real Telegram). An update meant for B is pushed to the fake like
any other, taken out of its queue before A can poll it, and fed to B's dispatcher — the way a
webhook replica would get it — so each test chooses which replica handles which update.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiogram.types import Update
from redis.asyncio import Redis

from bot.app import CallbotApp
from bot.calls.service import CallRequest
from bot.phones import Phone
from bot.pilot_status.webhooks import CallEvent
from bot.shared.early_events import MAX_PER_CALL, RedisEarlyEvents
from bot.shared.locks import Held, RedisLocks
from bot.shared.pending import RedisPending, Taken
from bot.shared.redis import Keys
from bot.voice.speech import Speech
from tests.conftest import GROUP, OPERATOR, RunningBot, StartBot, settings_for
from tests.fakes.pilot_status import FakePilotStatus, RecordedRequest
from tests.fakes.telegram import FakeTelegram, SentMessage
from tests.redis_fixtures import OwnRedis
from tests.speech import espeak
from tests.test_lifecycle import SECRET, TOKEN
from tests.test_oncall import ALICE, generic
from tests.test_oncall_replicas import OPS_FILE, OPS_TOKEN, SILENT, raise_alert
from tests.test_oncall_ring import created_by_pilot, posted, slow_post
from tests.test_voice import free_port, pilot_id_of

PHONE = "+5511999999999"
__all__ = ["espeak"]
on_postgresql = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


class Replica:
    """A second app on A's settings, fed updates directly (see the module docstring)."""

    def __init__(self, app: CallbotApp, telegram: FakeTelegram) -> None:
        self.app = app
        self.telegram = telegram

    async def feed(self, update_id: int) -> None:
        raw = self.telegram._queue.pop(update_id)  # A's poll never sees it
        update = Update.model_validate(raw, context={"bot": self.app.bot})
        await self.app.dp.feed_update(self.app.bot, update)

    async def command(self, text: str, **kwargs: Any) -> SentMessage:
        mark = self.telegram.mark()
        kwargs.setdefault("user_id", OPERATOR)
        update_id, _ = self.telegram.send_command(text, **kwargs)
        await self.feed(update_id)
        chat_id = kwargs.get("chat_id") or kwargs["user_id"]
        return await self.telegram.wait_for_message(chat_id=chat_id, after=mark)


Replicas = Callable[..., Awaitable[tuple[RunningBot, Replica]]]


@pytest.fixture
async def replicas(
    start_bot: StartBot,
    telegram: FakeTelegram,
    pilot: FakePilotStatus,
    db_url: str,
    shared_state: dict[str, str],
    tmp_path: Path,
) -> AsyncIterator[Replicas]:
    started: list[CallbotApp] = []

    async def start(
        b: dict[str, Any] | None = None, **overrides: Any
    ) -> tuple[RunningBot, Replica]:
        """Both on `overrides` (settings); B also on `b`."""
        overrides = {
            "database_url": db_url,
            "pilot_status_number_type": "web",
            "oncall_tick_seconds": 0,
            "retention_interval_seconds": 0,
            **shared_state,
            **overrides,
        }
        a = await start_bot(**overrides)
        settings = settings_for(
            telegram,
            pilot,
            data_dir=str(tmp_path / "replica-b"),
            telegram_edit_interval=0.05,
            call_poll_interval=0.05,
            **(overrides | (b or {})),
        )
        b = CallbotApp(settings)
        started.append(b)
        await b.start()
        return a, Replica(b, telegram)

    yield start
    for app in started:
        await app.close()


def button(message: SentMessage, label: str) -> str:
    return next(data for text, data in message.buttons() if label in text)


def press(telegram: FakeTelegram, prompt: SentMessage, label: str) -> tuple[int, str]:
    """Push a press of the prompt's button; (update id, callback query id)."""
    return telegram.press_button(
        user_id=OPERATOR,
        chat_id=GROUP,
        message_id=prompt.message_id,
        data=button(prompt, label),
        chat_type="supergroup",
    )


async def group_prompt(bot: RunningBot) -> SentMessage:
    mark = bot.telegram.mark()
    bot.telegram.send_command(
        f"/call {PHONE} db down", user_id=OPERATOR, chat_id=GROUP, chat_type="supergroup"
    )
    prompt = await bot.telegram.wait_for_message(chat_id=GROUP, after=mark)
    assert "Confirm" in str(prompt.buttons()), prompt
    return prompt


async def called(telegram: FakeTelegram, prompt: SentMessage) -> SentMessage:
    return await telegram.wait_for_message(
        lambda m: m.message_id == prompt.message_id and "Call to" in m.plain, chat_id=GROUP
    )


@pytest.mark.postgresql
@on_postgresql
async def test_a_group_confirmation_made_on_one_replica_is_pressed_on_the_other(
    replicas: Replicas,
) -> None:
    a, b = await replicas()
    prompt = await group_prompt(a)
    update_id, query_id = press(a.telegram, prompt, "Confirm")
    await b.feed(update_id)
    assert "already" not in (await a.telegram.wait_for_callback_answer(query_id)).get("text", "")
    await called(a.telegram, prompt)
    [post] = a.pilot.calls_started()
    assert post.json["to"] == PHONE


@pytest.mark.postgresql
@on_postgresql
async def test_a_token_pressed_on_both_replicas_starts_one_call(replicas: Replicas) -> None:
    a, b = await replicas()
    # One after the other: B takes the token A made; A's own press is then told so.
    prompt = await group_prompt(a)
    first, _ = press(a.telegram, prompt, "Confirm")
    await b.feed(first)
    await called(a.telegram, prompt)
    _, second = press(a.telegram, prompt, "Confirm")  # A polls this one
    assert "already handled" in (await a.telegram.wait_for_callback_answer(second))["text"]
    # At once, on both replicas: the token is handed out once.
    prompt = await group_prompt(a)
    on_a, on_b = press(a.telegram, prompt, "Confirm"), press(a.telegram, prompt, "Confirm")
    direct_a = Replica(a.app, a.telegram)
    await asyncio.gather(direct_a.feed(on_a[0]), b.feed(on_b[0]))
    answers = [await a.telegram.wait_for_callback_answer(q) for _, q in (on_a, on_b)]
    await called(a.telegram, prompt)
    assert sum("already handled" in (x.get("text") or "") for x in answers) == 1
    assert len(a.pilot.calls_started()) == 2  # one per prompt


@pytest.mark.postgresql
@on_postgresql
async def test_the_same_number_called_on_both_replicas_at_once_is_posted_once(
    replicas: Replicas,
) -> None:
    a, b = await replicas()
    slow_post(a.pilot, "call_slow", delay=1.0)  # under the 2 s read timeout
    mark = a.telegram.mark()
    a.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await posted(a.pilot, PHONE)  # A's POST is on its way, unanswered
    refused = await b.command(f"/call {PHONE}")
    assert "being started right now" in refused.plain
    reply = await a.telegram.wait_for_message(
        lambda m: "Call to" in m.plain, chat_id=OPERATOR, after=mark
    )
    assert "call_slow" in reply.plain
    assert len(a.pilot.calls_started()) == 1
    # The guard is released: the next attempt, on either replica, goes through.
    again = await b.command(f"/call {PHONE}")
    assert "Call to" in again.plain and len(a.pilot.calls_started()) == 2


def hook(app: CallbotApp) -> str:
    return f"http://127.0.0.1:{app.web_port}/pilot-status/{TOKEN}"


@pytest.mark.postgresql
@on_postgresql
async def test_an_early_webhook_event_on_the_other_replica_reaches_the_call_message(
    replicas: Replicas,
) -> None:
    a, b = await replicas(
        pilot_status_webhook_token=TOKEN, pilot_status_webhook_secret=SECRET, web_port=0
    )
    a.pilot.webhooks_to(hook(b.app), SECRET)  # every Pilot event lands on B
    slow_post(a.pilot, "call_early", delay=1.0)
    mark = a.telegram.mark()
    a.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    post: RecordedRequest = await posted(a.pilot, PHONE)
    # Pilot placed the call and it rings; B hears of it before A's POST has its answer.
    created_by_pilot(a.pilot, "call_early", post, status="INITIATED")
    a.pilot.emit_status("call_early", "RINGING")
    [early] = await a.pilot.wait_deliveries()
    assert early.status == 200
    reply = await a.telegram.wait_for_message(
        lambda m: "Call to" in m.plain and ": ringing" in m.plain, chat_id=OPERATOR, after=mark
    )
    # A call both know (it is in the shared database): B applies what it hears at once.
    a.pilot.emit_status("call_early", "ACCEPTED")
    a.pilot.emit_status("call_early", "COMPLETED")
    deliveries = await a.pilot.wait_deliveries()
    assert [d.status for d in deliveries] == [200, 200, 200]
    await a.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id and ": ended" in m.plain, chat_id=OPERATOR
    )
    record = await a.app.store.get_call("call_early")
    assert record is not None
    assert [h.status for h in record.history] == [
        "PENDING",
        "INITIATED",
        "RINGING",
        "ACCEPTED",
        "COMPLETED",
    ]


@pytest.mark.postgresql
@on_postgresql
async def test_a_play_url_made_by_one_replica_is_served_by_the_other(
    replicas: Replicas, espeak: str
) -> None:
    port = free_port()  # B's: the public URL of both replicas leads to B
    a, b = await replicas(
        b={"web_port": port}, public_base_url=f"http://127.0.0.1:{port}", speech_repeat=1
    )
    a.telegram.send_command(f"/call {PHONE} say: the database is down", user_id=OPERATOR)
    played = await a.pilot.wait_played(await pilot_id(a))
    assert played.status == 200 and played.content_type == "audio/wav"
    assert played.body.startswith(b"RIFF") and len(played.body) > 10_000
    assert played.url is not None and played.url.startswith(f"http://127.0.0.1:{port}/audio/")
    path = played.url.removeprefix(f"http://127.0.0.1:{port}")
    async with httpx.AsyncClient() as client:  # served once, by any replica
        for app in (b.app, a.app):
            assert (await client.get(f"http://127.0.0.1:{app.web_port}{path}")).status_code == 404


async def pilot_id(bot: RunningBot) -> str:
    await posted(bot.pilot, PHONE)
    return pilot_id_of(bot)


async def test_redis_down_mid_run_is_told_and_starts_nothing_twice(
    start_bot: StartBot, own_redis: OwnRedis
) -> None:
    bot = await start_bot(pilot_status_number_type="web", redis_url=own_redis.url)
    prompt = await group_prompt(bot)
    slow_post(bot.pilot, "call_slow", delay=1.0)
    mark = bot.telegram.mark()
    bot.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await posted(bot.pilot, PHONE)
    own_redis.stop()  # while the number's guard is held and its POST is on its way
    reply = await bot.telegram.wait_for_message(
        lambda m: "Call to" in m.plain, chat_id=OPERATOR, after=mark
    )
    assert "call_slow" in reply.plain  # the call in flight ends as it would have
    _, query_id = press(bot.telegram, prompt, "Confirm")
    answer = await bot.telegram.wait_for_callback_answer(query_id)
    assert "cannot reach my shared state (Redis)" in answer["text"] and answer["show_alert"]
    refused = await command(bot, f"/call {PHONE}")
    assert "cannot reach my shared state (Redis)" in refused.plain
    assert "nothing was done" in refused.plain
    assert len(bot.pilot.calls_started()) == 1


async def command(bot: RunningBot, text: str) -> SentMessage:
    mark = bot.telegram.mark()
    bot.telegram.send_command(text, user_id=OPERATOR)
    return await bot.telegram.wait_for_message(chat_id=OPERATOR, after=mark)


# The Redis forms on their own, two instances standing for two replicas.


@pytest.fixture
async def redis_client(shared_state: dict[str, str]) -> AsyncIterator[Redis]:
    client = Redis.from_url(shared_state["redis_url"])
    yield client
    await client.aclose()


async def test_a_redis_token_expired_is_told_apart_from_one_gone(
    redis_client: Redis, shared_state: dict[str, str]
) -> None:
    now = [1000.0]
    keys = Keys(shared_state["redis_key_prefix"])
    made_on_a, pressed_on_b = (
        RedisPending(redis_client, keys, "calls", CallRequest, 60, clock=lambda: now[0])
        for _ in range(2)
    )
    request = CallRequest(
        operator_id=OPERATOR,
        chat_id=GROUP,
        phone=Phone(PHONE, "+55 11 99999-9999"),
        note="db down",
        masked=True,
        speech=Speech("db down", "en-us"),
    )
    token = await made_on_a.put(request)
    raw = await redis_client.get(keys("pending", "calls", token))
    assert json.loads(raw)["item"]["phone"]["e164"] == PHONE  # JSON, not a pickle
    assert 0 < await redis_client.pttl(keys("pending", "calls", token)) <= 600_000
    assert await pressed_on_b.peek(token) == request
    now[0] += 61
    assert await pressed_on_b.take(token) == (Taken.EXPIRED, request)
    assert await made_on_a.take(token) == (Taken.GONE, None)


async def test_redis_early_events_are_bounded_and_handed_out_once(
    redis_client: Redis, shared_state: dict[str, str]
) -> None:
    keys = Keys(shared_state["redis_key_prefix"])
    kept_on_b, replayed_on_a = (RedisEarlyEvents(redis_client, keys, 120) for _ in range(2))
    events = [
        CallEvent.model_validate({"event": "call.ringing", "callId": "c1", "duration": n})
        for n in range(MAX_PER_CALL + 5)
    ]
    for one in events:
        await kept_on_b.keep("c1", one)
    assert 0 < await redis_client.pttl(keys("early", "c1")) <= 120_000
    assert await replayed_on_a.take("c1") == events[-MAX_PER_CALL:]  # the newest, in order
    assert await kept_on_b.take("c1") == []


async def test_a_redis_lock_held_past_its_lease_is_renewed(
    redis_client: Redis, shared_state: dict[str, str]
) -> None:
    keys = Keys(shared_state["redis_key_prefix"])
    on_a, on_b = (RedisLocks(redis_client, keys, "call", lease=0.3) for _ in range(2))
    async with on_a.hold(PHONE):
        await asyncio.sleep(1.0)  # three leases: held only because A renews it
        with pytest.raises(Held):
            async with on_b.hold(PHONE):
                pass
    async with on_b.hold(PHONE):  # released: the next one gets it
        pass


async def test_with_redis_down_an_alert_still_rings_the_person_on_call(
    start_bot: StartBot, own_redis: OwnRedis, tmp_path: Path
) -> None:
    """An operator's /call is refused without the shared number guard; a page is not: it rings
    under this process's guard, once."""

    path = tmp_path / "oncall.toml"
    path.write_text(OPS_FILE)
    running = await start_bot(
        redis_url=own_redis.url,
        oncall_file=str(path),
        pilot_status_number_type="web",
        pilot_status_webhook_token=TOKEN,
        speech_engine=SILENT,
    )
    own_redis.stop()
    await raise_alert(running, "ops", OPS_TOKEN, generic())
    for _ in range(200):
        if running.pilot.calls_started():
            break
        await asyncio.sleep(0.05)
    [ring] = running.pilot.calls_started()
    assert ring.json is not None and ring.json["to"] == ALICE
