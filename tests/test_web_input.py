"""The web app under large and hostile input, through the real app over loopback.

Big alert groups page (own body limit, a summary post that fits Telegram); bad input gets a 4xx
with a short reason and changes nothing, on SQLite and PostgreSQL; an unexpected error is not a
5xx storm; and one delivery the database refuses does not fail the deliveries committed with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from bot.calls.lifecycle import GroupCommit
from bot.storage.store import NewCall, StatusUpdate, Store, Unstorable
from bot.texts import TELEGRAM_TEXT_LIMIT
from tests.conftest import RunningBot, StartBot
from tests.test_lifecycle import deliver, event, history, shown, sign, start_call, webhook_bot
from tests.test_oncall import ALICE, INFRA_CHAT, INFRA_TOKEN, Clock, alert, calls_to, oncall_bot

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def big_group(alerts: int) -> dict[str, Any]:
    """What Alertmanager sends for a crash-looping deployment: one alert per pod, each with the
    labels kube-prometheus-stack's rule puts on it, grouped by alertname and namespace."""
    common = {
        "alertname": "KubePodCrashLooping",
        "cluster": "prod-eu-west-1",
        "container": "checkout-api",
        "endpoint": "http",
        "job": "kube-state-metrics",
        "namespace": "shop",
        "prometheus": "monitoring/kube-prometheus-stack-prometheus",
        "service": "kube-prometheus-stack-kube-state-metrics",
        "severity": "critical",
    }
    generator = (
        "http://prometheus.example.com:9090/graph?g0.expr=max_over_time%28kube_pod_container_"
        "status_waiting_reason%7Breason%3D%22CrashLoopBackOff%22%2C+job%3D%22kube-state-metrics"
        "%22%2C+namespace%3D~%22.%2A%22%7D%5B5m%5D%29+%3E%3D+1&g0.tab=1"
    )
    items = []
    for n in range(alerts):
        pod = f"checkout-api-7d9f8c6b5-{n:05x}q"
        labels = common | {"instance": f"10.42.{n // 250}.{n % 250}:8080", "pod": pod}
        items.append(
            {
                "status": "firing",
                "labels": labels,
                "annotations": {
                    "description": (
                        f"Pod shop/{pod} (checkout-api) is in waiting state "
                        "(reason: CrashLoopBackOff)."
                    ),
                    "runbook_url": (
                        "https://runbooks.prometheus-operator.dev/runbooks/kubernetes/"
                        "kubepodcrashlooping"
                    ),
                    "summary": "Pod is crash looping.",
                },
                "startsAt": f"2026-12-01T09:{n % 60:02d}:{n % 59:02d}.512Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": generator,
                "fingerprint": f"{n * 2654435761 % 2**64:016x}",
            }
        )
    return {
        "receiver": "callbot-infra",
        "status": "firing",
        "alerts": items,
        "groupLabels": {"alertname": "KubePodCrashLooping", "namespace": "shop"},
        "commonLabels": common,
        "commonAnnotations": {
            "runbook_url": items[0]["annotations"]["runbook_url"],
            "summary": "Pod is crash looping.",
        },
        "externalURL": "http://alertmanager.example.com:9093",
        "version": "4",
        "groupKey": '{}/{severity="critical"}:{alertname="KubePodCrashLooping", namespace="shop"}',
        "truncatedAlerts": 0,
    }


async def started(bot: RunningBot, phone: str = "+5511999999999") -> tuple[Any, str]:
    """/call, and wait until the call's Pilot id is stored (a webhook may outrun it otherwise,
    which is another item's race, not what these tests are about)."""
    reply, pilot_id = await start_call(bot, phone)
    for _ in range(200):
        record = await bot.app.store.get_call(pilot_id)
        if record is not None and record.status != "PENDING":
            return reply, pilot_id
        await asyncio.sleep(0.01)
    raise AssertionError(f"call {pilot_id} never stored")


async def post_in(bot: RunningBot, text: str) -> Any:
    return await bot.telegram.wait_for_message(lambda m: text in m.plain, chat_id=INFRA_CHAT)


# --------------------------------------------------------------------------- item 2: big groups


@pytest.mark.parametrize(
    ("locale", "more"), [("en", "…and 140 more"), ("pt_BR", "…e mais 140")], ids=["en", "pt_BR"]
)
async def test_a_big_alertmanager_group_pages_with_a_summary_post(
    start_bot: StartBot, tmp_path: Path, clock: Clock, locale: str, more: str
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, default_locale=locale)
    body = json.dumps(big_group(150)).encode()
    assert 100_000 < len(body) < 300_000  # what a real group of 150 pods weighs
    response = await alert(bot, body, kind="alertmanager")
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "created"
    post = await post_in(bot, more)
    lines = post.plain.split("\n")
    assert "[CRITICAL] Pod is crash looping. (150 alerts)" in lines[0]
    # the first alerts, told apart by what differs between them
    assert lines[3].startswith("▸ instance=10.42.0.1:8080, pod=checkout-api-7d9f8c6b5-00001q — ")
    assert "(reason: CrashLoopBackOff)" in lines[3]
    assert sum(line.startswith("▸ ") for line in lines) == 10
    assert units(post.text) <= TELEGRAM_TEXT_LIMIT
    assert [label for label, _ in post.buttons()] == [
        "✋ Acknowledge" if locale == "en" else "✋ Reconhecer"
    ]
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1


async def test_a_group_that_grows_shows_its_current_size(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    first = await alert(bot, big_group(3), kind="alertmanager")
    await post_in(bot, "(3 alerts)")
    again = await alert(bot, big_group(300), kind="alertmanager")
    assert again.json() == {"result": "updated", "incident": first.json()["incident"]}
    post = await post_in(bot, "…and 290 more")
    assert "(300 alerts)" in post.plain and "fired 2 times" in post.plain
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1


async def test_alert_intake_has_its_own_body_limit(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, alert_max_body=4096)
    small = big_group(1)
    fits = small | {"pad": "x" * (4000 - len(json.dumps(small)))}
    assert (await alert(bot, fits, kind="alertmanager")).status_code == 200
    over = await alert(bot, small | {"pad": "x" * 4000}, kind="alertmanager")
    assert over.status_code == 413 and over.json() == {"error": "body over 4096 bytes"}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the stream is counted
        for _ in range(10):
            yield b" " * 1000

    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/infra"
    async with httpx.AsyncClient() as client:
        streamed = await client.post(
            url, content=chunks(), headers={"Authorization": f"Bearer {INFRA_TOKEN}"}
        )
    assert streamed.status_code == 413
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1  # only the first, small one


async def test_the_webhook_keeps_its_limit_while_alerts_get_theirs(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)  # defaults: 64 KiB and 1 MiB
    group = json.dumps(big_group(80)).encode()
    assert 64 * 1024 < len(group) < 1024 * 1024
    assert (await alert(bot, group, kind="alertmanager")).status_code == 200
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{'h' * 32}"
    async with httpx.AsyncClient() as client:
        hook = await client.post(url, content=group)
    assert hook.status_code == 413


async def test_a_post_fits_telegram_whatever_the_alert_sends(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    worst = {
        "title": "&" * 300,
        "text": '"' * 2000,
        "severity": "<" * 40,
        "dedupKey": "worst",
        "links": [f"https://example.com/{n}?" + "&a=b" * 500 for n in range(5)],
    }
    assert (await alert(bot, worst)).status_code == 200
    group = big_group(12)
    for item in group["alerts"]:
        item["labels"] |= {f"<label{n}>": "&" * 100 for n in range(18)}
        item["annotations"]["description"] = "🚨" * 500
    group["commonLabels"] = {f"<common{n}>": '"' * 100 for n in range(20)}
    assert (await alert(bot, group, kind="alertmanager")).status_code == 200
    first = await post_in(bot, "&&&&")
    second = await post_in(bot, "…and")
    for post in (first, second):
        assert units(post.text) <= TELEGRAM_TEXT_LIMIT
        assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]


# --------------------------------------------------------------------------- item 3: bad input


async def test_deeply_nested_json_is_400_everywhere(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, pilot_status_webhook_secret=None)
    nested = b"[" * 20_000 + b"]" * 20_000
    for kind in ("alertmanager", "grafana", "generic"):
        refused = await alert(bot, nested, kind=kind)
        assert refused.status_code == 400
        assert refused.json() == {"error": "body is nested too deeply"}
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{'h' * 32}"
    async with httpx.AsyncClient() as client:
        hook = await client.post(url, content=b'{"event": ' + nested + b"}")
    assert hook.status_code == 400 and hook.json() == {"error": "body is nested too deeply"}
    assert bot.telegram.bot_messages(INFRA_CHAT) == []


def meta_envelope(external: str, timestamp: object) -> dict[str, Any]:
    call = {"id": external, "event": "terminate", "status": "FAILED", "timestamp": timestamp}
    change = {"field": "calls", "value": {"calls": [call]}}
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}


async def test_a_meta_envelope_with_an_overflowing_timestamp_is_400(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await started(bot)
    external = bot.pilot.calls[pilot_id]["externalCallId"]
    for timestamp in (str(10**20), 10**20, "-5", "1.5e9", "9" * 5000):
        refused = await deliver(bot, meta_envelope(external, timestamp))
        assert refused.status_code == 400, timestamp
        assert "timestamp" in refused.json()["error"]
    wrapped = {"event": "calls", "data": meta_envelope(external, str(10**20))}
    assert (await deliver(bot, wrapped)).status_code == 400
    flat = event("call.ended", pilot_id, status="COMPLETED", timestamp="9999-12-31T23:59:59-05:00")
    assert (await deliver(bot, flat)).status_code == 400
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
    assert bot.telegram.message(reply.chat_id, reply.message_id).text == reply.text
    assert (await deliver(bot, meta_envelope(external, "1764237600"))).status_code == 200
    await shown(bot, reply, ": failed")


async def test_signatures_that_are_not_ascii_hex_are_401(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await started(bot)
    body = json.dumps(event("call.ended", pilot_id, status="COMPLETED")).encode()
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{'t' * 32}"
    async with httpx.AsyncClient() as client:
        for signature in ("é" * 64, "\xff" * 64, "abc", "0" * 63, "", "ü"):
            response = await client.post(
                url,
                content=body,
                headers={"x-pilot-status-signature": signature.encode("latin-1")},
            )
            assert response.status_code == 401, signature
            assert response.json() == {"error": "bad signature"}
        utf8 = await client.post(
            url, content=body, headers={"x-pilot-status-signature": "é".encode() * 32}
        )
        assert utf8.status_code == 401
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
    assert bot.telegram.message(reply.chat_id, reply.message_id).text == reply.text


async def test_headers_and_paths_of_any_bytes_are_refused_or_used_safely(
    start_bot: StartBot, tmp_path: Path, clock: Clock, db_url: str
) -> None:
    bot = await webhook_bot(start_bot, database_url=db_url)
    reply, pilot_id = await started(bot)
    body = event("call.ringing", pilot_id, status="RINGING")
    raw = json.dumps(body).encode()
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{'t' * 32}"
    headers = {"x-pilot-status-signature": sign(raw).encode(), "Idempotency-Key": b"\xff\xfe" * 200}
    async with httpx.AsyncClient() as client:
        first = await client.post(url, content=raw, headers=headers)
        again = await client.post(url, content=raw, headers=headers)
    assert first.status_code == 200 and first.json() == {"ok": True, "events": 1}
    assert again.status_code == 200 and again.json()["duplicate"] is True
    await shown(bot, reply, ": ringing")
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED", "RINGING"]


async def test_alert_tokens_and_team_names_of_any_bytes_are_401(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    base = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic"
    body = json.dumps({"title": "disk full"}).encode()
    async with httpx.AsyncClient() as client:
        for team, token in (
            ("infra", b"Bearer \xff\xfe"),
            ("infra", b"Bearer " + "é".encode()),
            ("%ff%fe", b"Bearer " + INFRA_TOKEN.encode()),
            ("%ED%A0%80", b"Bearer " + INFRA_TOKEN.encode()),
            ("x" * 5000, b"Bearer " + INFRA_TOKEN.encode()),
        ):
            response = await client.post(
                f"{base}/{team}", content=body, headers={"Authorization": token}
            )
            assert response.status_code == 401, (team, token)
    assert bot.telegram.bot_messages(INFRA_CHAT) == []


@pytest.mark.parametrize("duration", [10**20, 2**40, 2**31, -1])
async def test_durations_too_big_for_the_column_are_400(
    start_bot: StartBot, db_url: str, duration: object
) -> None:
    bot = await webhook_bot(start_bot, database_url=db_url)
    reply, pilot_id = await started(bot)
    ended = event("call.ended", pilot_id, status="COMPLETED")
    for field in ("duration", "durationSeconds"):
        refused = await deliver(bot, ended | {field: duration})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "bad call.ended payload"
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
    assert bot.telegram.message(reply.chat_id, reply.message_id).text == reply.text
    assert (await deliver(bot, ended | {"duration": 125})).status_code == 200
    assert "Duration: 2:05" in (await shown(bot, reply, ": ended")).plain


async def test_an_absurd_polled_duration_is_dropped_and_the_call_still_ends(
    start_bot: StartBot, db_url: str
) -> None:
    bot = await start_bot(pilot_status_number_type="web", database_url=db_url)
    reply, pilot_id = await started(bot)
    bot.pilot.emit_status(pilot_id, "COMPLETED", durationSeconds=10**20)
    final = await shown(bot, reply, ": ended")
    assert "Duration" not in final.plain and final.buttons() == []
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.status == "COMPLETED"
    assert record.duration_seconds is None


@pytest.mark.parametrize(
    "starts_at",
    ["99999-12-31T00:00:00Z", "not a date", 10**20, "1970-01-01T00:00:00Z", "2300-01-01T00:00:00Z"],
)
async def test_absurd_alert_times_are_400_and_page_nobody(
    start_bot: StartBot, tmp_path: Path, clock: Clock, starts_at: object
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    group = big_group(2)
    group["alerts"][1]["startsAt"] = starts_at
    refused = await alert(bot, group, kind="alertmanager")
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("alerts.1.startsAt: ")
    assert await bot.app.oncall_store.due(clock.now + timedelta(days=1)) == []
    assert bot.telegram.bot_messages(INFRA_CHAT) == []


async def test_an_unexpected_error_is_500_once_then_422_and_an_outage_is_503(
    start_bot: StartBot, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    failures = 0

    async def broken(*_args: object) -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("a bug this alert triggers")

    monkeypatch.setattr(bot.app.oncall, "intake", broken)
    poison = {"title": "disk full", "dedupKey": "poison"}
    assert (await alert(bot, poison)).status_code == 500
    for _ in range(3):  # the sender's redeliveries stop here: 4xx is not retried
        again = await alert(bot, poison)
        assert again.status_code == 422 and "cannot be processed" in again.json()["error"]
    assert (await alert(bot, poison | {"text": "another body"})).status_code == 500

    async def down(*_args: object) -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database is down"))

    monkeypatch.setattr(bot.app.oncall, "intake", down)
    for _ in range(2):  # an outage is worth retrying, every time
        outage = await alert(bot, poison)
        assert outage.status_code == 503 and outage.headers["Retry-After"] == "30"
    assert failures == 5  # every delivery reached the handler: nothing was answered from a cache
    monkeypatch.undo()
    assert (await alert(bot, poison)).json()["result"] == "created"


# --------------------------------------------------------------------------- item 4: neighbours


async def live_calls(store: Store, count: int) -> list[str]:
    refs = []
    for n in range(count):
        await store.create_call(
            NewCall(
                id=f"c{n}",
                operator_id=1,
                operator_name=None,
                chat_id=1,
                number_type="web",
                phone="+5511999990000",
                phone_display="+55 11 99999-0000",
                masked=False,
                locale="en",
            )
        )
        await store.call_started(
            f"c{n}", pilot_call_id=f"call_{n}", external_call_id=None, status="RINGING"
        )
        refs.append(f"call_{n}")
    return refs


async def test_one_unstorable_delivery_fails_alone_in_a_group_commit(store: Store) -> None:
    refs = await live_calls(store, 6)
    batches: list[list[str]] = []
    original = store.apply_deliveries

    async def spy(batch: list[tuple[str, list[StatusUpdate]]], **kwargs: Any) -> Any:
        batches.append([key for key, _ in batch])
        return await original(batch, **kwargs)

    store.apply_deliveries = spy  # type: ignore[method-assign]
    commits = GroupCommit(store)
    at = datetime.now(UTC)
    # A duration no column holds stands for any value the database refuses.
    bad = StatusUpdate(refs[3], "COMPLETED", at, "webhook", duration_seconds=10**20)
    deliveries = [
        (f"d{n}", [bad if n == 3 else StatusUpdate(ref, "COMPLETED", at, "webhook", 60)])
        for n, ref in enumerate(refs)
    ]
    results = await asyncio.gather(
        *(commits.submit(key, updates) for key, updates in deliveries), return_exceptions=True
    )
    assert batches[0] == [f"d{n}" for n in range(6)]  # they were committed together
    assert isinstance(results[3], Unstorable)
    for n in (0, 1, 2, 4, 5):
        [(record, changed)] = results[n]  # type: ignore[misc]
        assert record is not None and record.status == "COMPLETED" and changed
    for n, ref in enumerate(refs):
        stored = await store.get_call(ref)
        assert stored is not None
        assert stored.status == ("RINGING" if n == 3 else "COMPLETED")
    assert await store.apply_delivery("d0", deliveries[0][1]) is None  # applied once
    fixed = StatusUpdate(refs[3], "COMPLETED", at, "webhook", 61)
    [(record, _)] = await store.apply_delivery("d3", [fixed]) or []  # the refused key is free
    assert record is not None and record.duration_seconds == 61


async def test_neighbours_of_a_delivery_the_database_refuses_get_200(
    start_bot: StartBot, db_url: str
) -> None:
    bot = await webhook_bot(start_bot, database_url=db_url)
    calls = [await started(bot, f"+551199999{n:04d}") for n in range(4)]
    store = bot.app.store
    original = store.apply_deliveries
    batches: list[list[str]] = []

    async def refusing(batch: list[tuple[str, list[StatusUpdate]]], **kwargs: Any) -> Any:
        """Hold the first commit a moment, so that the deliveries arriving meanwhile share the
        next one; and make the database refuse delivery "bad" (a value out of its range)."""
        batches.append([key for key, _ in batch])
        if len(batches) == 1:
            await asyncio.sleep(0.3)
        poisoned = [
            (key, [StatusUpdate(u.pilot_ref, u.status, u.at, u.source, 10**20) for u in updates])
            if key == "bad"
            else (key, updates)
            for key, updates in batch
        ]
        return await original(poisoned, **kwargs)

    store.apply_deliveries = refusing  # type: ignore[method-assign]
    keys = ["first", "n1", "bad", "n3"]
    first = asyncio.create_task(
        deliver(bot, event("call.ended", calls[0][1], status="COMPLETED"), key="first")
    )
    await asyncio.sleep(0.1)
    rest = [
        deliver(bot, event("call.ended", pilot_id, status="COMPLETED"), key=key)
        for key, (_, pilot_id) in zip(keys[1:], calls[1:], strict=True)
    ]
    responses = [await first, *await asyncio.gather(*rest)]
    assert sorted(batches[1]) == ["bad", "n1", "n3"]  # the bad one shared a commit
    by_key = dict(zip(keys, responses, strict=True))
    assert by_key["bad"].status_code == 400
    assert by_key["bad"].json() == {"error": "the database refused a value of this delivery"}
    for key in ("first", "n1", "n3"):
        assert by_key[key].status_code == 200, by_key[key].text
    for (reply, pilot_id), key in zip(calls, keys, strict=True):
        if key == "bad":
            assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
        else:
            await shown(bot, reply, ": ended")
