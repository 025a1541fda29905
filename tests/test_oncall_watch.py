"""Heartbeats, silences and the outbound heartbeat over the loopback fakes, with a controllable
clock (issue 12): what the team's chat shows, who is rung, what the heartbeat URL receives."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web
from sqlalchemy.exc import OperationalError

from bot.ops.pulse import Pulse
from tests.conftest import ADMIN, OPERATOR, RunningBot, StartBot, free_port
from tests.test_oncall import (
    ALICE,
    BOB,
    INFRA_CHAT,
    INFRA_TOKEN,
    ONCALL_FILE,
    WEB_TOKEN,
    alert,
    calls_to,
    generic,
    oncall_bot,
    post_in,
)
from tests.test_oncall import Clock as OnCallClock

SAMPLES = Path(__file__).parent / "samples"
HEARTBEATS = """
[teams.infra.heartbeats.backup]
every = "5m"
grace = "2m"
"""


class Clock(OnCallClock):
    """Starts at the current minute: ONCALL_FILE is loaded with the real clock at start."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def hm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M")


async def watch_bot(
    start_bot: StartBot, tmp_path: Path, clock: Clock, extra: str = HEARTBEATS, **overrides: Any
) -> RunningBot:
    """The bot of tests/test_oncall.py, its ONCALL_FILE extended with `extra`."""
    return await oncall_bot(start_bot, tmp_path, clock, ONCALL_FILE + extra, **overrides)


async def ping(
    bot: RunningBot,
    name: str = "backup",
    body: bytes = b"",
    *,
    team: str = "infra",
    token: str = INFRA_TOKEN,
) -> httpx.Response:
    url = f"http://127.0.0.1:{bot.app.web_port}/heartbeat/{team}/{name}"
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=body, headers={"Authorization": f"Bearer {token}"})


async def say(bot: RunningBot, text: str, *, user: int = ADMIN, chat: int = INFRA_CHAT) -> str:
    mark = bot.telegram.mark()
    bot.telegram.send_command(text, user_id=user, chat_id=chat, chat_type="supergroup")
    reply = await bot.telegram.wait_for_message(
        lambda m: not m.method.startswith("edit"), chat_id=chat, after=mark
    )
    return reply.plain


def watchdog(status: str = "firing") -> bytes:
    body = json.loads((SAMPLES / "alertmanager_watchdog.json").read_text())
    body["status"] = status
    for item in body["alerts"]:
        item["status"] = status
    return json.dumps(body).encode()


def disk_full(alertname: str = "DiskFull", status: str = "firing") -> dict[str, Any]:
    body = json.loads((SAMPLES / "alertmanager_firing.json").read_text())
    body["groupKey"] = f"{{}}:{{alertname={alertname!r}}}"
    body["status"] = status
    body["commonLabels"]["alertname"] = body["groupLabels"]["alertname"] = alertname
    body["commonAnnotations"]["summary"] = f"{alertname} on db-1"
    for item in body["alerts"]:
        item["labels"]["alertname"] = alertname
        item["status"] = status
    return body


def quiet_sends(bot: RunningBot, chat: int) -> list[bool]:
    """For each incident post sent to the chat: whether it was sent without a notification."""
    return [
        bool(params.get("disable_notification"))
        for method, params in bot.telegram.requests
        if method.lower() == "sendmessage"
        and int(params.get("chat_id", 0)) == chat
        and "ack:" in str(params.get("reply_markup"))
    ]


# --------------------------------------------------------------------------- heartbeats


async def test_a_missed_heartbeat_opens_one_incident_that_pages_and_the_next_ping_resolves_it(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock)
    beats = bot.app.heartbeats
    pinged_at = clock.now
    assert (await ping(bot)).json() == {"result": "ok"}
    clock.advance(6 * 60)
    assert await beats.check_due() == 0  # within interval + grace
    clock.advance(61)
    assert await beats.check_due() == 1
    post = await post_in(bot, INFRA_CHAT, "heartbeat backup missed since")
    assert f"heartbeat backup missed since {hm(pinged_at + timedelta(minutes=5))}" in post.plain
    assert "[CRITICAL]" in post.plain
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    clock.advance(60)
    assert await beats.check_due() == 0  # still missed: no second incident
    assert (await ping(bot)).json() == {"result": "recovered"}
    await post_in(bot, INFRA_CHAT, "resolved")
    assert "✅ last ping" in await say(bot, "/heartbeat list", user=OPERATOR)


async def test_a_portuguese_team_reads_its_missed_heartbeat_in_portuguese(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock)
    await say(bot, "/team policy infra locale=pt_BR")
    pinged_at = clock.now
    await ping(bot)
    clock.advance(7 * 60 + 1)
    assert await bot.app.heartbeats.check_due() == 1
    post = await post_in(bot, INFRA_CHAT, "heartbeat backup ausente desde")
    assert f"ausente desde {hm(pinged_at + timedelta(minutes=5))}" in post.plain
    assert "esperado a cada 5 m, tolerância 2 m; último ping" in post.plain


async def test_alertmanager_watchdog_body_is_a_ping_while_it_fires(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock)
    assert (await ping(bot, body=watchdog())).json() == {"result": "ok"}
    clock.advance(6 * 60)
    # a resolved Watchdog means the pipeline broke: not a ping, the heartbeat runs out
    assert (await ping(bot, body=watchdog("resolved"))).json() == {"result": "ignored"}
    clock.advance(61)
    assert await bot.app.heartbeats.check_due() == 1
    # anything else is refused as an alert would be, and counts as no ping
    bad = json.loads(watchdog())
    del bad["alerts"][0]["labels"]
    bad["alerts"] = "nope"
    assert (await ping(bot, body=json.dumps(bad).encode())).status_code == 400
    assert (await ping(bot, token=WEB_TOKEN)).status_code == 401
    assert (await ping(bot, "nosuch")).status_code == 404
    assert (await ping(bot, body=b"backup done in 31 s")).json() == {"result": "recovered"}


async def test_heartbeats_and_silences_from_chat_are_stored_and_survive_a_restart(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock, extra="")
    assert "Only admins" in await say(bot, "/heartbeat add nightly every 5m", user=OPERATOR)
    assert "Usage" in await say(bot, "/heartbeat add nightly every 5s")
    added = await say(bot, "/heartbeat add nightly every 10m grace 5m")
    assert "POST /heartbeat/infra/nightly" in added and "every 10 m, grace 5 m" in added
    listed = await say(bot, "/heartbeat list", user=OPERATOR)
    assert "infra/nightly every 10 m, grace 5 m: ⏳ never pinged" in listed
    await say(bot, "/silence infra 3h cabling", user=OPERATOR)
    await bot.stop()

    bot = await watch_bot(start_bot, tmp_path, clock, extra="")
    assert (await ping(bot, "nightly")).json() == {"result": "ok"}
    assert f"✅ last ping {hm(clock.now)} UTC" in await say(bot, "/heartbeat list", user=OPERATOR)
    assert "cabling" in await say(bot, "/silence list", user=OPERATOR)
    assert "Done" in await say(bot, "/heartbeat remove nightly")
    assert (await ping(bot, "nightly")).status_code == 404


# --------------------------------------------------------------------------- silences


async def test_during_a_silence_alerts_post_quietly_ring_nobody_and_page_when_it_ends(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock, extra="")
    reply = await say(bot, "/silence infra 1h db failover", user=OPERATOR)
    assert "Silence 1 of team infra until" in reply and "nobody is rung" in reply
    until = hm(clock.now + timedelta(hours=1))
    await alert(bot, generic())
    post = await post_in(bot, INFRA_CHAT, "silenced until")
    assert f"silenced until {until} by Op" in post.plain
    assert quiet_sends(bot, INFRA_CHAT) == [True]
    assert await bot.app.oncall.run_due() == 0
    clock.advance(59 * 60)
    await bot.app.oncall.run_due()
    assert bot.pilot.calls_started() == []
    listed = await say(bot, "/silence list", user=OPERATOR)
    assert f"1 infra until {until} UTC by Op" in listed and "db failover" in listed
    clock.advance(61)  # the silence is over and the alert still fires: it pages
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    await post_in(bot, INFRA_CHAT, "silence over: paging")
    [audit] = [
        r
        for r in await bot.app.store.audit_since(clock.now - timedelta(days=1))
        if r.action == "silence"
    ]
    assert audit.subject == "infra" and audit.actor_id == OPERATOR


async def test_a_silence_started_mid_escalation_holds_its_next_step(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock, extra="")
    await alert(bot, generic())
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    await say(bot, "/silence infra 30m", user=OPERATOR)
    clock.advance(301)  # bob's step is due: the silence holds it
    assert await bot.app.oncall.run_due() == 1
    await post_in(
        bot,
        INFRA_CHAT,
        f"silenced until {hm(clock.now - timedelta(seconds=301) + timedelta(minutes=30))}",
    )
    assert calls_to(bot, BOB) == []
    clock.advance(30 * 60)
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, BOB)) == 1


async def test_unsilence_pages_at_once_what_the_silence_held_back(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await watch_bot(start_bot, tmp_path, clock, extra="")
    await say(bot, "/silence infra 2h", user=OPERATOR)
    await alert(bot, generic())
    await post_in(bot, INFRA_CHAT, "silenced until")
    await bot.app.oncall.run_due()
    assert bot.pilot.calls_started() == []
    assert "No silence 7" in await say(bot, "/unsilence 7", user=OPERATOR)
    assert "1 incidents it held back page now" in await say(bot, "/unsilence 1", user=OPERATOR)
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    assert "No silences" in await say(bot, "/silence list", user=OPERATOR)


async def test_a_maintenance_window_in_the_file_silences_only_its_matching_alerts(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    zone = ZoneInfo("America/Sao_Paulo")
    start = (clock.now - timedelta(minutes=10)).astimezone(zone)
    end = (clock.now + timedelta(minutes=50)).astimezone(zone)
    window = f"""
[teams.infra.windows.db-upgrade]
start = "{start:%Y-%m-%d %H:%M}"
end = "{end:%Y-%m-%d %H:%M}"
timezone = "America/Sao_Paulo"
matchers = {{ alertname = "DiskFull" }}
reason = "db upgrade"
"""
    bot = await watch_bot(start_bot, tmp_path, clock, extra=window)
    await alert(bot, disk_full(), kind="alertmanager")
    post = await post_in(bot, INFRA_CHAT, "DiskFull on db-1")
    until = hm(clock.now + timedelta(minutes=50))
    assert f"silenced until {until} by window db-upgrade" in post.plain
    await alert(bot, disk_full("HighLoad"), kind="alertmanager")  # not matched: pages
    await post_in(bot, INFRA_CHAT, "HighLoad on db-1")
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1
    assert quiet_sends(bot, INFRA_CHAT) == [True, False]
    await alert(bot, disk_full("HighLoad", "resolved"), kind="alertmanager")
    clock.advance(50 * 60)  # the window is over and DiskFull still fires: it pages
    assert await bot.app.oncall.run_due() == 1
    await post_in(bot, INFRA_CHAT, "silence over: paging")
    assert len(calls_to(bot, ALICE)) == 2 and calls_to(bot, BOB) == []


# --------------------------------------------------------------------------- outbound heartbeat


async def test_outbound_heartbeat_stops_while_steps_are_overdue(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    hits: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        hits.append(request.method)
        return web.Response(text="OK")

    receiver = web.Application()
    receiver.router.add_get("/ping/{uuid}", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"http://127.0.0.1:{port}/ping/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278"
        bot = await watch_bot(start_bot, tmp_path, clock, extra="", heartbeat_url=url)
        pulse = bot.app.pulse
        assert pulse is not None
        for _ in range(100):  # the first request goes out at start
            if hits:
                break
            await asyncio.sleep(0.05)
        assert hits == ["GET"]
        assert await pulse.beat() and len(hits) == 2
        await alert(bot, generic())  # its first step is due now; nobody takes it
        clock.advance(3 * 60)
        assert await pulse.beat() is False
        assert pulse.last_problem == "escalation steps overdue by 180 s"
        assert len(hits) == 2
        assert await bot.app.oncall.run_due() == 1  # the step is taken: healthy again
        assert await pulse.beat() and len(hits) == 3
    finally:
        await runner.cleanup()


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_replicas_checking_a_missed_heartbeat_at_once_open_one_incident(
    start_bot: StartBot, tmp_path: Path, clock: Clock, db_url: str
) -> None:
    bots = [
        await watch_bot(start_bot, tmp_path, clock, database_url=db_url, data_dir=str(tmp_path / n))
        for n in ("a", "b")
    ]
    assert (await ping(bots[0])).json() == {"result": "ok"}
    clock.advance(7 * 60 + 1)
    opened = await asyncio.gather(*(bot.app.heartbeats.check_due() for bot in bots))
    assert sorted(opened) == [0, 1]
    await post_in(bots[0], INFRA_CHAT, "heartbeat backup missed since")
    await asyncio.gather(*(bot.app.oncall.run_due() for bot in bots))
    assert len(calls_to(bots[0], ALICE)) == 1
    posts = [m for m in bots[0].telegram.bot_messages(INFRA_CHAT) if "missed since" in m.plain]
    assert len(posts) == 1
    # the ping that comes back resolves it, whichever replica it reaches
    assert (await ping(bots[1])).json() == {"result": "recovered"}
    assert (await ping(bots[0])).json() == {"result": "ok"}


def alertmanager_binary() -> str:
    """Alertmanager's path, or the test is skipped (failed under CALLBOT_REQUIRE_ALERTMANAGER=1)."""
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        reason = "alertmanager is not installed (Debian package prometheus-alertmanager)"
        if os.environ.get("CALLBOT_REQUIRE_ALERTMANAGER") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_ALERTMANAGER=1)", pytrace=False)
        pytest.skip(reason)
    return found


# The README's route ("Heartbeats"), with a test's short timers.
ALERTMANAGER_CONFIG = """
route:
  receiver: default
  routes:
    - matchers: ['alertname = "Watchdog"']
      receiver: callbot-heartbeat
      group_wait: 0s
      group_interval: 1s
      repeat_interval: 1m
receivers:
  - name: default
  - name: callbot-heartbeat
    webhook_configs:
      - url: "http://127.0.0.1:{port}/heartbeat/infra/backup"
        send_resolved: true
        http_config:
          authorization:
            credentials: "{token}"
"""


async def test_the_real_alertmanager_watchdog_route_pings_the_heartbeat(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    binary = alertmanager_binary()
    bot = await watch_bot(start_bot, tmp_path, clock)
    config = tmp_path / "alertmanager.yml"
    config.write_text(ALERTMANAGER_CONFIG.format(port=bot.app.web_port, token=INFRA_TOKEN))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'am'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    watchdog_alert = json.loads((SAMPLES / "alertmanager_watchdog.json").read_text())["alerts"][0]
    sent = {k: watchdog_alert[k] for k in ("labels", "annotations", "generatorURL")}
    store = bot.app.watch_store
    infra = await bot.app.oncall_store.team("infra")
    assert infra is not None
    registry = bot.app.metrics.registry

    def received(result: str) -> float:
        labels = {"source": "heartbeat", "result": result}
        return registry.get_sample_value("callbot_alerts_received_total", labels) or 0.0

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(200):  # until it listens
                try:
                    if (await client.get("/-/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            assert (await client.post("/api/v2/alerts", json=[sent])).status_code == 200

            for _ in range(200):
                if received("ok"):
                    break
                await asyncio.sleep(0.05)
            assert received("ok") == 1, "Alertmanager's Watchdog notification did not come"
            beat = await store.heartbeat(infra.id, "backup")
            assert beat is not None and beat.state == "ok" and beat.last_ping_at == clock.now
            # The Watchdog stops (Prometheus died): Alertmanager sends it resolved; no ping.
            ended = sent | {"endsAt": datetime.now(UTC).isoformat()}
            assert (await client.post("/api/v2/alerts", json=[ended])).status_code == 200
            for _ in range(200):
                if received("ignored"):
                    break
                await asyncio.sleep(0.05)
            assert received("ignored") == 1 and received("ok") == 1
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
        log.close()


async def test_outbound_heartbeat_is_held_back_when_the_database_does_not_answer() -> None:
    requested: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        requested.append(request)
        return httpx.Response(200, text="OK")

    async def unreachable(_now: datetime) -> tuple[dict[str, int], float]:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "refused"))

    client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
    pulse = Pulse(
        "https://hc-ping.example.com/uuid", client, unreachable, lambda: datetime.now(UTC)
    )
    try:
        assert await pulse.beat() is False
        assert pulse.last_problem == "database unavailable (OperationalError)"
        assert requested == []
    finally:
        await pulse.aclose()
