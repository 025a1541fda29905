"""/metrics, /readyz and the shipped alert rules, through the real app over loopback.

A real Prometheus (Debian package `prometheus`, run here on a free loopback port) scrapes the bot,
and promtool checks and unit-tests deploy/prometheus-rules.yml. Without the binaries those tests
skip, unless CALLBOT_REQUIRE_PROMETHEUS=1 (scripts/install-test-peers.sh installs them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from tests.conftest import OPERATOR, RunningBot, StartBot
from tests.db_fixtures import DEFAULT_POSTGRES_URL, _execute
from tests.redis_fixtures import OwnRedis
from tests.test_lifecycle import PHONE, SECRET, command, event, sign, start_call
from tests.test_oncall import ALICE, HOOK, INFRA_CHAT, Clock, alert, generic, oncall_bot

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus-rules.yml"
RULE_TESTS = ROOT / "tests" / "samples" / "prometheus-rules-test.yml"
OTHER_PHONE = "+5511988887777"
METRICS_TOKEN = "m" * 32

Samples = list[tuple[str, dict[str, str], float]]


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (scripts/install-test-peers.sh installs it)"
        if os.environ.get("CALLBOT_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_PROMETHEUS=1)", pytrace=False)
        pytest.skip(reason)
    return path


async def get(bot: RunningBot, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{bot.app.web_port}{path}", headers=headers)


async def scrape(bot: RunningBot, token: str | None = None) -> Samples:
    response = await get(bot, "/metrics", token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    return sum(v for n, have, v in samples if n == name and labels.items() <= have.items())


async def until(check: Any, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def deliver(bot: RunningBot, payload: Any, *, key: str, signature: str | None = None) -> Any:
    """A Pilot Status webhook delivery to the on-call bot's receiver, signed unless told."""
    body = json.dumps(payload).encode()
    headers = {"Idempotency-Key": key, "x-pilot-status-signature": signature or sign(body)}
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}"
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=body, headers=headers)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_metrics_count_calls_webhooks_alerts_and_steps(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, pilot_status_webhook_secret=SECRET)
    before = await scrape(bot)
    assert value(before, "callbot_build_info", version="0.1.0") == 1
    assert value(before, "callbot_calls_started_total") == 0

    # an operator's call, then a failed one, then the first call's end by webhook
    reply, pilot_id = await start_call(bot)
    bot.pilot.error("start_call", "BILLING_SUSPENDED", status=402, times=1)
    failed = await command(bot, f"/call {OTHER_PHONE}")
    assert "suspended" in failed.plain.lower()
    mark = bot.telegram.mark()
    body = event("call.ended", pilot_id, status="COMPLETED", durationSeconds=12)
    assert (await deliver(bot, body, key="d-1")).status_code == 200
    assert (await deliver(bot, body, key="d-1")).json()["duplicate"] is True
    assert (await deliver(bot, body, key="d-2", signature="0" * 64)).status_code == 401
    await bot.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id, chat_id=OPERATOR, after=mark
    )

    # an alert, a refused one, time passing before the step is taken, then the step
    assert (await alert(bot, generic())).json()["result"] == "created"
    assert (await alert(bot, generic(), token="wrong" * 8)).status_code == 401
    clock.advance(150)
    lagging = await scrape(bot)
    assert value(lagging, "callbot_incidents_open", state="firing") == 1
    assert value(lagging, "callbot_escalation_next_step_lag_seconds") == 150
    assert await bot.app.oncall.run_due() == 1
    await bot.telegram.wait_for_message(lambda m: "calling alice" in m.plain, chat_id=INFRA_CHAT)
    samples = await scrape(bot)

    started = "callbot_calls_started_total"
    assert value(samples, started, number_type="web", origin="operator") == 1
    assert value(samples, started, number_type="web", origin="alert") == 1
    failures = "callbot_calls_failed_total"
    assert value(samples, failures, number_type="web", code="api_billing_suspended") == 1
    assert value(samples, failures) == 1
    ended = "callbot_calls_ended_total"
    assert value(samples, ended, number_type="web", outcome="completed") == 1
    hooks = "callbot_pilot_webhook_deliveries_total"
    assert value(samples, hooks, event="call.ended", result="applied") == 1
    assert value(samples, hooks, event="call.ended", result="duplicate") == 1
    assert value(samples, hooks, result="bad_signature") == 1
    alerts = "callbot_alerts_received_total"
    assert value(samples, alerts, source="generic", result="created") == 1
    assert value(samples, alerts, source="generic", result="unauthorized") == 1
    assert value(samples, "callbot_escalation_steps_total", result="rang") == 1
    assert value(samples, "callbot_escalation_next_step_lag_seconds") == 0  # due in 300 s now
    pilot = "callbot_pilot_requests_total"
    assert value(samples, pilot, operation="start_call", status_class="2xx") == 2
    assert value(samples, pilot, operation="start_call", status_class="4xx") == 1
    latency = "callbot_pilot_request_duration_seconds_count"
    assert value(samples, latency, operation="start_call") == 3
    telegram = "callbot_telegram_api_requests_total"
    assert value(samples, telegram, method="sendMessage", result="ok") >= 3
    updates = "callbot_telegram_updates_total"
    assert value(samples, updates, update_type="message", result="ok") == 1
    assert value(samples, updates, update_type="message", result="error") == 1  # the refused call
    assert value(samples, "callbot_telegram_update_duration_seconds_count") == 2
    assert value(samples, "callbot_media_sessions", kind="meta") == 0
    assert value(samples, "callbot_telegram_updates_in_flight") == 0

    # no label carries a number, a chat, a user or a call
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None
    secrets = {PHONE[1:], OTHER_PHONE[1:], ALICE[1:], str(OPERATOR), str(INFRA_CHAT)}
    secrets |= {pilot_id, record.id, HOOK}
    secrets |= {r.json["bizOpaqueCallbackData"] for r in bot.pilot.calls_started()}
    for name, labels, _ in samples:
        for label in labels.values():
            assert not any(s in label for s in secrets), (name, labels)


async def test_errors_duplicates_and_429s_are_counted_apart(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.telegram.fail_next("sendMessage", error_code=429, retry_after=1, times=1)
    await command(bot, "/call 12")  # not a number: the error router answers it
    update_id, _ = bot.telegram.send_command("/help", user_id=OPERATOR)
    await bot.telegram.wait_for_message(lambda m: "/call" in m.plain, chat_id=OPERATOR)
    bot.telegram.push_raw_duplicate(update_id)
    samples: Samples = []

    async def duplicate_counted() -> bool:
        nonlocal samples
        samples = await scrape(bot)
        return value(samples, "callbot_telegram_updates_total", result="duplicate") == 1

    await until(duplicate_counted)
    updates = "callbot_telegram_updates_total"
    assert value(samples, updates, update_type="message", result="error") == 1
    assert value(samples, updates, update_type="message", result="ok") == 1
    telegram = "callbot_telegram_api_requests_total"
    assert value(samples, telegram, method="sendMessage", result="retry_after") == 1


async def test_the_metrics_token_is_required_when_set(start_bot: StartBot) -> None:
    bot = await start_bot(metrics_token=METRICS_TOKEN)
    assert (await get(bot, "/metrics")).status_code == 401
    assert (await get(bot, "/metrics", "x" * 32)).status_code == 401
    refused = await get(bot, "/metrics", METRICS_TOKEN + "x")
    assert refused.status_code == 401 and "callbot_" not in refused.text
    assert value(await scrape(bot, METRICS_TOKEN), "callbot_build_info") == 1
    assert (await get(bot, "/healthz")).status_code == 200  # health stays open


async def test_readyz_names_migrations_behind_and_draining(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    ready = await get(bot, "/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True}

    async with bot.app.engine.begin() as connection:
        head = await connection.scalar(text("SELECT version_num FROM alembic_version"))
        await connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    behind = await get(bot, "/readyz")
    assert behind.status_code == 503
    assert "0001" in behind.json()["failing"]["migrations"]
    async with bot.app.engine.begin() as connection:
        await connection.execute(
            text("UPDATE alembic_version SET version_num = :head"), {"head": head}
        )
    assert (await get(bot, "/readyz")).status_code == 200

    # a shutdown begins while a /call's POST is in flight: not ready, but alive, till it ends
    bot.pilot.script("start_call", delay=1.0, times=1)
    bot.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await until(lambda: _true(bot.app.in_flight.count > 0))
    drain = asyncio.create_task(bot.app.drain())
    draining = await get(bot, "/readyz")
    assert draining.status_code == 503
    assert draining.json()["failing"] == {"shutdown": "draining"}
    assert (await get(bot, "/healthz")).status_code == 200
    await drain
    assert len(bot.pilot.calls_started()) == 1


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def doomed_database(postgres_database: URL) -> AsyncIterator[URL]:
    """A PostgreSQL database of its own, which the test drops under the running bot."""
    server = make_url(os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    name = f"callbot_doomed_{uuid.uuid4().hex}"
    await _execute(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name)
    finally:
        await _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgresql
async def test_readyz_names_the_database_when_it_is_gone(
    start_bot: StartBot, doomed_database: URL
) -> None:
    url = doomed_database.render_as_string(hide_password=False)
    bot = await start_bot(database_url=url, oncall_tick_seconds=0, retention_interval_seconds=0)
    assert (await get(bot, "/readyz")).status_code == 200
    server = make_url(os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    await _execute(server, f'DROP DATABASE "{doomed_database.database}" WITH (FORCE)')
    gone = await get(bot, "/readyz")
    assert gone.status_code == 503
    assert "unavailable" in gone.json()["failing"]["database"]
    assert (await get(bot, "/healthz")).status_code == 200
    assert value(await scrape(bot), "callbot_build_info") == 1  # metrics are still served


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_real_prometheus_scrapes_the_bot(start_bot: StartBot, tmp_path: Path) -> None:
    prometheus = binary("prometheus")
    bot = await start_bot(metrics_token=METRICS_TOKEN)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: callbot
    authorization: {{type: Bearer, credentials: "{METRICS_TOKEN}"}}
    static_configs: [{{targets: ["127.0.0.1:{bot.app.web_port}"]}}]
"""
    )
    process = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def query(expr: str) -> list[dict[str, Any]]:
                try:
                    response = await client.get(f"{api}/query", params={"query": expr})
                except httpx.TransportError:
                    return []  # not listening yet
                if response.status_code != 200:
                    return []  # still starting (its storage is opened first)
                result: list[dict[str, Any]] = response.json()["data"]["result"]
                return result

            async def scraped() -> bool:
                up = await query('up{job="callbot"}')
                info = await query("callbot_build_info")
                return bool(up and up[0]["value"][1] == "1" and info)

            await until(scraped, seconds=60)
            [info] = await query("callbot_build_info")
            assert info["metric"]["version"] == "0.1.0"
            rules = (await client.get(f"{api}/rules")).json()["data"]["groups"]
            names = {rule["name"] for group in rules for rule in group["rules"]}
            assert "CallbotDown" in names and "CallbotEscalationLagging" in names
    finally:
        process.terminate()
        _, errors = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, errors.decode()[-2000:]


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    promtool = binary("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "4 rules found" in check.stdout
    test = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert test.returncode == 0, test.stdout + test.stderr


async def test_readyz_names_redis_when_it_is_gone(start_bot: StartBot, own_redis: OwnRedis) -> None:
    bot = await start_bot(redis_url=own_redis.url, oncall_tick_seconds=0)
    assert (await get(bot, "/readyz")).status_code == 200
    own_redis.stop()
    gone = await get(bot, "/readyz")
    assert gone.status_code == 503
    assert "unavailable" in gone.json()["failing"]["redis"]
    assert (await get(bot, "/healthz")).status_code == 200
