"""Webhook mode: Telegram delivers updates by POST; each is handled once, across replicas, and
answered 200 only once it was handled."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiogram.types import TelegramObject

import bot.app
from tests.conftest import (
    API_KEY,
    OPERATOR,
    TOKEN,
    WEBHOOK_SECRET,
    RunningBot,
    StartBot,
    free_port,
)
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import SECRET_HEADER, FakeTelegram
from tests.processes import run_bot_process
from tests.test_oncall_ring import created_by_pilot, posted, slow_post

PHONE = "+5511999999999"


async def post_update(
    bot: RunningBot, body: bytes | dict[str, Any], *, secret: str | None = WEBHOOK_SECRET
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[SECRET_HEADER] = secret
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(bot.webhook_url, data=io.BytesIO(raw), headers=headers) as response,
    ):
        return response.status, await response.json()


def call_update(telegram: FakeTelegram, update_id: int, message_id: int = 7) -> dict[str, Any]:
    """A /call update as Telegram would send it (not queued in the fake)."""
    user = {"id": OPERATOR, "is_bot": False, "first_name": "Op", "language_code": "en"}
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id,
            "date": 1_780_000_000,
            "chat": {"id": OPERATOR, "type": "private", "first_name": "Op"},
            "from": user,
            "text": f"/call {PHONE}",
            "entities": [{"type": "bot_command", "offset": 0, "length": 5}],
        },
    }


def counted(running: RunningBot, result: str) -> float:
    """callbot_telegram_webhook_requests_total{result=...}"""
    value = running.app.metrics.registry.get_sample_value(
        "callbot_telegram_webhook_requests_total", {"result": result}
    )
    return value or 0.0


def tasks_handling(running: RunningBot) -> list[asyncio.Task[Any]]:
    """The tasks that handle updates, as they begin (to kill one mid-update)."""
    handling: list[asyncio.Task[Any]] = []

    async def remember(
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        handling.append(asyncio.current_task())  # type: ignore[arg-type]
        return await handler(event, data)

    running.dp.update.outer_middleware(remember)
    return handling


def replies(telegram: FakeTelegram) -> list[str]:
    return [m.plain for m in telegram.sent if m.chat_id == OPERATOR]


async def test_set_webhook_names_the_url_secret_update_types_and_connections(
    start_bot: StartBot, telegram: FakeTelegram
) -> None:
    running = await start_bot(webhook=True, telegram_webhook_max_connections=7)
    [params] = telegram.webhook_settings
    assert params["url"] == running.webhook_url
    assert params["secret_token"] == WEBHOOK_SECRET
    assert int(params["max_connections"]) == 7
    assert {"message", "callback_query"} <= set(params["allowed_updates"])
    assert params.get("drop_pending_updates") in (False, None)
    assert not any(method == "getUpdates" for method, _ in telegram.requests)
    await running.stop()
    assert not any(method.lower() == "deletewebhook" for method, _ in telegram.requests)


async def test_call_by_webhook_gets_one_reply_and_one_post(
    start_bot: StartBot, telegram: FakeTelegram
) -> None:
    running = await start_bot(webhook=True)
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    delivery = await telegram.wait_delivered(update_id)
    assert delivery.status == 200
    # answered 200 only after it was handled: the reply is already there
    [reply] = replies(telegram)
    assert ": started" in reply
    assert len(running.pilot.calls_started()) == 1


@pytest.mark.parametrize("secret", [None, "wrong", WEBHOOK_SECRET + "x", "ünïcode"])
async def test_a_request_without_the_secret_gets_401_and_nothing_is_handled(
    start_bot: StartBot, telegram: FakeTelegram, secret: str | None
) -> None:
    running = await start_bot(webhook=True)
    if secret is not None and not secret.isascii():
        headers = {SECRET_HEADER.encode(): secret.encode()}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                running.webhook_url,
                data=json.dumps(call_update(telegram, 5)),
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()},
            ) as response,
        ):
            status = response.status
    else:
        status, _ = await post_update(running, call_update(telegram, 5), secret=secret)
    assert status == 401
    assert counted(running, "unauthorized") == 1
    # the same update with the secret is new: the refused one left no trace in the ledger
    status, _ = await post_update(running, call_update(telegram, 5))
    assert status == 200
    assert len(replies(telegram)) == 1
    assert len(running.pilot.calls_started()) == 1


async def test_bad_bodies_get_400_and_nothing_is_handled(
    start_bot: StartBot, telegram: FakeTelegram
) -> None:
    running = await start_bot(webhook=True)
    for body in (b"not json", b"[]", b'{"message": {}}', b'{"update_id": "x"}'):
        status, _ = await post_update(running, body)
        assert status == 400, body
    huge = json.dumps(call_update(telegram, 6) | {"padding": "x" * 1024 * 1024}).encode()
    status, _ = await post_update(running, huge)
    assert status == 413
    assert (counted(running, "malformed"), counted(running, "too_large")) == (4, 1)
    assert replies(telegram) == []
    assert running.pilot.calls_started() == []


async def test_a_redelivered_update_is_handled_once(
    start_bot: StartBot, telegram: FakeTelegram
) -> None:
    running = await start_bot(webhook=True)
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await telegram.wait_delivered(update_id)
    telegram.push_raw_duplicate(update_id)
    await telegram.wait_until(
        lambda: len([d for d in telegram.deliveries_of(update_id) if d.ok]) == 2
    )
    status, body = await post_update(running, telegram._all_updates[update_id])
    assert (status, body.get("duplicate")) == (200, True)
    assert len(replies(telegram)) == 1
    assert len(running.pilot.calls_started()) == 1
    assert (counted(running, "handled"), counted(running, "duplicate")) == (1, 2)


async def test_a_handler_killed_before_its_200_is_redelivered_and_calls_once(
    start_bot: StartBot, telegram: FakeTelegram
) -> None:
    """The call was POSTed, then the replica died before its reply and its 200: Telegram
    delivers the update again; it is handled, and the call it started is shown, not redone."""
    running = await start_bot(webhook=True)
    handling = tasks_handling(running)
    telegram.fail_next("sendMessage", delay=60)  # the reply hangs: the replica is stuck
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await telegram.wait_until(lambda: any(m == "sendMessage" for m, _ in telegram.requests))
    assert len(running.pilot.calls_started()) == 1
    handling[0].cancel()  # killed: no answer to Telegram
    delivery = await telegram.wait_delivered(update_id)
    assert delivery.ok
    assert not telegram.deliveries_of(update_id)[0].ok  # the first attempt got no answer
    [reply] = replies(telegram)
    assert ": started" in reply
    assert len(running.pilot.calls_started()) == 1


@pytest.mark.parametrize(
    ("language", "expected"),
    [("en", "whether its call started is not known yet"), ("pt-br", "ainda não se sabe")],
)
async def test_a_handler_killed_mid_post_is_redelivered_and_says_the_outcome_is_unknown(
    start_bot: StartBot, telegram: FakeTelegram, language: str, expected: str
) -> None:
    """Killed while `POST /v1/calls` was on its way: the call may ring. The redelivery must
    not POST again; it says the outcome is not known yet."""
    running = await start_bot(webhook=True)
    handling = tasks_handling(running)
    slow_post(running.pilot, "call_slow", delay=60)
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR, language_code=language)
    await posted(running.pilot, PHONE)
    handling[0].cancel()
    await telegram.wait_delivered(update_id)
    [reply] = replies(telegram)
    assert expected in reply
    assert len(running.pilot.calls_started()) == 1


async def test_readyz_names_the_webhook_until_set_webhook_succeeds(
    start_bot: StartBot, telegram: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.app, "WEBHOOK_RETRY_FIRST_SECONDS", 0.05)
    telegram.fail_next("setWebhook", error_code=502, description="Bad Gateway", times=2)
    running = await start_bot(webhook=True)
    port = running.app.web_port
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        assert response.status == 503
        assert "webhook" in (await response.json())["failing"]
    await asyncio.wait_for(running.app.webhook_set.wait(), 10)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        assert response.status == 200
    assert len(telegram.webhook_settings) == 1  # the two failures stored nothing


async def test_get_updates_while_a_webhook_is_set_is_a_conflict(telegram: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as session:
        base = f"{telegram.url}/bot{telegram._token}"
        async with session.post(f"{base}/setWebhook", json={"url": "http://127.0.0.1:9/x"}):
            pass
        async with session.post(f"{base}/getUpdates", json={}) as response:
            assert response.status == 409
            assert "webhook is active" in (await response.json())["description"]


async def test_polling_without_redis_still_handles_a_duplicate_once(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path
) -> None:
    running = await start_bot()  # zero setup: polling, SQLite, no Redis
    assert running.app.redis is None and not running.settings.webhook_mode
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await telegram.wait_for_message(chat_id=OPERATOR)
    telegram.push_raw_duplicate(update_id)
    telegram.send_command("/whoami", user_id=OPERATOR)
    await telegram.wait_for_message(lambda m: str(OPERATOR) in m.plain and "id" in m.plain)
    assert len([r for r in replies(telegram) if ": started" in r]) == 1
    assert len(running.pilot.calls_started()) == 1


# two replicas: one PostgreSQL, one Redis, the same fakes


async def two_replicas(
    start_bot: StartBot, db_url: str, shared_state: dict[str, str]
) -> tuple[RunningBot, RunningBot]:
    first = await start_bot(webhook=True, database_url=db_url, **shared_state)
    second = await start_bot(webhook=True, database_url=db_url, **shared_state)
    return first, second


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_replicas_given_the_same_update_at_once_call_once(
    start_bot: StartBot, telegram: FakeTelegram, db_url: str, shared_state: dict[str, str]
) -> None:
    first, second = await two_replicas(start_bot, db_url, shared_state)
    update = call_update(telegram, 900_000_001)
    answers = await asyncio.gather(post_update(first, update), post_update(second, update))
    statuses = sorted(status for status, _ in answers)
    # the one holding it answers 200 once handled; the other 503 (busy) or 200 (done already)
    assert statuses in ([200, 503], [200, 200])
    if statuses == [200, 200]:
        assert any(body.get("duplicate") for _, body in answers)
    else:
        assert counted(first, "busy") + counted(second, "busy") == 1
    # Telegram redelivers the 503: whoever gets it finds it done
    for replica in (first, second):
        status, body = await post_update(replica, update)
        assert (status, body.get("duplicate")) == (200, True)
    [reply] = replies(telegram)
    assert ": started" in reply
    assert len(first.pilot.calls_started()) == 1


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_draining_replica_answers_503_and_the_other_handles_the_redelivery(
    start_bot: StartBot, telegram: FakeTelegram, db_url: str, shared_state: dict[str, str]
) -> None:
    first, second = await two_replicas(start_bot, db_url, shared_state)
    first.app.stop()  # SIGTERM: it drains, its web app still answers
    telegram.webhook_targets = [first.webhook_url, second.webhook_url]  # the load balancer
    update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    delivered = await telegram.wait_delivered(update_id)
    attempts = telegram.deliveries_of(update_id)
    assert [(a.url, a.status) for a in attempts] == [
        (first.webhook_url, 503),
        (second.webhook_url, 200),
    ]
    assert delivered.url == second.webhook_url
    [reply] = replies(telegram)
    assert ": started" in reply
    assert len(second.pilot.calls_started()) == 1
    port = first.app.web_port
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        assert response.status == 503
        assert (await response.json())["failing"] == {"shutdown": "draining"}


async def test_python_m_bot_in_webhook_mode_finishes_the_update_in_flight_on_sigterm(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    port = free_port()
    env_file = (
        f"BOT_TOKEN={TOKEN}\n"
        f"TELEGRAM_API_URL={telegram.url}\n"
        f"TELEGRAM_WEBHOOK_URL=http://127.0.0.1:{port}/tg/hook\n"
        f"TELEGRAM_WEBHOOK_SECRET={WEBHOOK_SECRET}\n"
        f"PILOT_STATUS_API_KEY={API_KEY}\n"
        f"PILOT_STATUS_BASE_URL={pilot.url}\n"
        "PILOT_STATUS_NUMBER_TYPE=web\n"
        f"OPERATOR_IDS={OPERATOR}\n"
        "WEB_HOST=127.0.0.1\n"
        f"WEB_PORT={port}\n"
        "SHUTDOWN_GRACE_SECONDS=15\n"
        "STUN_SERVERS=none\n"
    )
    process = await run_bot_process(tmp_path, env_file)
    try:
        await process.listening()
        await process.started()
        [params] = telegram.webhook_settings
        assert params["url"] == f"http://127.0.0.1:{port}/tg/hook"
        slow_post(pilot, "call_term", delay=1.5)
        update_id, _ = telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
        post = await posted(pilot, PHONE)
        created_by_pilot(pilot, "call_term", post)
        assert await process.signal(signal.SIGTERM) == 0
    finally:
        if process.process.returncode is None:
            process.process.kill()
            await process.exited(10)
    # before it exited: the update in flight was handled, replied to and answered 200
    [delivery] = telegram.deliveries_of(update_id)
    assert delivery.status == 200
    [reply] = replies(telegram)
    assert "call_term" in reply
    assert "draining" in process.text and "Traceback" not in process.text
    # the webhook stays: the other replicas serve it
    assert not any(method.lower() == "deletewebhook" for method, _ in telegram.requests)


async def test_redis_down_an_update_gets_503_and_nothing_is_handled(
    start_bot: StartBot, telegram: FakeTelegram, own_redis: Any
) -> None:
    """The ledger cannot be asked: nothing is handled (it might be a duplicate), Telegram
    is told to come back."""
    running = await start_bot(webhook=True, redis_url=own_redis.url)
    own_redis.stop()
    status, _ = await post_update(running, call_update(telegram, 700))
    assert status == 503
    assert counted(running, "unavailable") == 1
    assert replies(telegram) == []
    assert running.pilot.calls_started() == []


async def test_polling_with_redis_down_still_handles_an_update(
    start_bot: StartBot, telegram: FakeTelegram, own_redis: Any
) -> None:
    """The update is handled (not dropped by the ledger); the per-number guard, in Redis too,
    then refuses the call with a clear line (tests/test_shared_state.py)."""
    running = await start_bot(redis_url=own_redis.url)
    own_redis.stop()
    telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    reply = await telegram.wait_for_message(chat_id=OPERATOR, timeout=15)
    assert "cannot reach my shared state (Redis)" in reply.plain
    assert running.pilot.calls_started() == []
