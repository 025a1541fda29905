"""On-call: alert received → `POST /v1/calls` sent, and escalation timers firing on time.

Run from the repo root:  .venv/bin/python -m bench.bench_oncall [--alerts 200] [--incidents 100]

The real CallbotApp runs in this process with its on-call timer on (ONCALL_TICK_SECONDS=1, woken
by each new incident); the fake Telegram, the fake Pilot Status (it stamps each request on
arrival) and the alerts' sender run in a second process (bench.bench_webhooks.Peer), so that
their CPU (the fake's contract check of each request) is not counted as the bot's. Throttles are off
(a throttle wait is excluded by the target), and every alert goes to its own team, so nobody is
rung twice.
1. Alerts: N generic alerts are posted, B at a time (default 1: each waits for the previous
   alert's call); per alert, from just before it is sent to
   the fake Pilot Status receiving the POST that rings the team's person on call. Targets:
   p99 <= 20 ms. Printed beside it, the floor in the same run: a relay that does only the
   transport (aiohttp takes the alert, one shared httpx client POSTs the ring, nothing stored).
2. Timers: M incidents ring their first person at once; every team waits `wait_seconds` (2 s)
   for an acknowledgement, so M second steps fall due together; lateness = when the step was
   taken (claimed under its row lock) minus when it was due (its stored next_action_at), and
   when its ring's POST reached the fake Pilot Status minus when it was due. The worst
   lateness is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from bench.bench_webhooks import TOKEN, Peer, rss_kib
from bot.app import CallbotApp
from bot.config import load_settings
from bot.oncall.engine import token_hash
from bot.storage.oncall import Contact
from bot.storage.store import utcnow

WAIT = 2


def phone(i: int) -> str:
    return f"+55119{i:08d}"


async def build(
    peer: Peer, pilot_url: str, teams: int, members: int, wait: int = WAIT, **overrides: Any
) -> CallbotApp:
    """The app on the fakes, with `teams` teams of `members` people each (`overrides`: more
    settings, e.g. bench_storm's)."""
    settings = load_settings(
        _env_file=None,
        bot_token=TOKEN,
        telegram_api_url=await peer.ask("url"),
        pilot_status_api_key="ps_" + "a" * 48,
        pilot_status_base_url=pilot_url,
        pilot_status_number_type="web",
        operator_ids="1",
        data_dir=tempfile.mkdtemp(),
        pilot_status_webhook_token="h" * 32,
        web_host="127.0.0.1",
        web_port=0,
        oncall_throttle="",
        oncall_tick_seconds=1,
        **({"telegram_edit_interval": 0} | overrides),
    )
    app = CallbotApp(settings)
    await app.start()
    now = utcnow()
    for t in range(teams):
        aliases = []
        for m in range(members):
            alias = f"p{t}x{m}"
            number = phone(t * members + m)
            display = f"+55 11 9{number[6:10]}-{number[10:]}"
            await app.oncall_store.save_contact(Contact(alias, number, display), at=now)
            aliases.append(alias)
        await app.oncall_store.save_team(
            f"t{t}",
            chat_id=-100000 - t,
            token_hash=token_hash(f"token-{t}"),
            at=now,
            members=aliases,
            attempts_per_person=1,
            wait_seconds=wait,
            max_rounds=1,
        )
    return app


async def send_alerts(port: int, teams: list[int]) -> dict[int, float]:
    """Post one alert per team to the bot on `port`, all at once; when each was sent (run in
    the Peer's process)."""
    sent: dict[int, float] = {}
    queue = list(teams)

    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                t = queue.pop(0)
                url = f"http://127.0.0.1:{port}/alerts/generic/t{t}"
                body = json.dumps({"title": f"alert {t}", "dedupKey": f"k{t}"})
                headers = {"Authorization": f"Bearer token-{t}"}
                sent[t] = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()

        await asyncio.gather(*(worker() for _ in teams))
    return sent


async def wait_for_posts(peer: Peer, count: int, seconds: float) -> dict[str, list[float]]:
    """Once `count` calls were placed: when each callee's POSTs arrived at the fake."""
    deadline = time.perf_counter() + seconds
    while len(rung := await peer.ask("rung")) < count:
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {len(rung)} of {count} calls placed")
        await asyncio.sleep(0.01)
    by_phone: dict[str, list[float]] = {}
    for to, received_at in rung:
        by_phone.setdefault(to, []).append(received_at)
    return by_phone


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


async def ring_latencies(peer: Peer, port: int, count: int, burst: int) -> list[float]:
    """One alert per team to whoever listens on `port`, `burst` at a time (each burst waits for
    its calls); per alert, ms from its send to its ring's POST reaching the fake."""
    sent: dict[int, float] = {}
    for first in range(0, count, burst):
        batch = range(first, min(count, first + burst))
        sent |= await peer.ask("alerts", port, list(batch))
        rung = await wait_for_posts(peer, batch.stop, 60)
    if sum(map(len, rung.values())) != count:
        raise SystemExit(f"{sum(map(len, rung.values()))} calls for {count} alerts")
    return [(rung[phone(t)][0] - sent[t]) * 1000 for t in range(count)]


async def part_alerts(count: int, burst: int) -> dict[str, Any]:
    peer = Peer()
    app = await build(peer, await peer.ask("pilot"), teams=count, members=1)
    try:
        rss_before = rss_kib()
        cpu, wall = time.process_time(), time.perf_counter()
        latencies = await ring_latencies(peer, app.web_port, count, burst)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {
            "p50": statistics.median(latencies),
            "p99": pct(latencies, 0.99),
            "max": max(latencies),
            "rss_mib": rss_kib() / 1024,
            "rss_growth_mib": (rss_kib() - rss_before) / 1024,
            # the bot's CPU while the alerts came (their posts and rings included), per alert
            "cpu_ms": cpu / count * 1000,
            "every_ms": wall / count * 1000,
        }
    finally:
        await app.close()
        await peer.close()


async def part_floor(count: int, burst: int) -> dict[str, Any]:
    """Part 1 against the relay: the alert's transport in and the ring's out, nothing else."""
    peer = Peer()
    pilot = httpx.AsyncClient(
        base_url=await peer.ask("pilot"), headers={"x-api-key": "ps_" + "a" * 48}
    )

    async def relay(request: web.Request) -> web.Response:
        team = int(request.match_info["team"][1:])
        if request.headers.get("Authorization") != f"Bearer token-{team}":
            raise web.HTTPUnauthorized
        await request.json()
        response = await pilot.post("/v1/calls", json={"to": phone(team)})
        response.raise_for_status()
        return web.json_response({"result": "created"})

    app = web.Application()
    app.router.add_post("/alerts/generic/{team}", relay)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        latencies = await ring_latencies(peer, port, count, burst)
        return {"p50": statistics.median(latencies), "p99": pct(latencies, 0.99)}
    finally:
        await runner.cleanup()
        await pilot.aclose()
        await peer.close()


async def part_timers(count: int) -> dict[str, Any]:
    peer = Peer()
    app = await build(peer, await peer.ask("pilot"), teams=count, members=2)
    late: list[float] = []
    due: dict[int, float] = {}  # team -> when its second step was due (perf_counter time)
    claim = app.oncall_store.claim_due
    epoch = utcnow().timestamp() - time.perf_counter()

    async def timed_claim(now: Any, lease: Any, **kwargs: Any) -> Any:
        claimed = await claim(now, lease, **kwargs)
        for incident in claimed.incidents:
            if incident.step == 1 and incident.next_action_at is not None:
                late.append((utcnow() - incident.next_action_at).total_seconds() * 1000)
                team = int(claimed.teams[incident.team_id].name[1:])
                due[team] = incident.next_action_at.timestamp() - epoch
        return claimed

    app.oncall_store.claim_due = timed_claim  # type: ignore[method-assign]
    try:
        await peer.ask("alerts", app.web_port, list(range(count)))
        rung = await wait_for_posts(peer, 2 * count, 120)
        if len(late) != count:
            raise SystemExit(f"{len(late)} second steps for {count} incidents")
        ring_late = [(rung[phone(2 * t + 1)][0] - at) * 1000 for t, at in due.items()]
        # whatever a step's due time is counted from: first POST -> second POST, minus the wait
        gaps = [
            (rung[phone(2 * t + 1)][0] - rung[phone(2 * t)][0] - WAIT) * 1000 for t in range(count)
        ]
        return {
            "p50": statistics.median(late),
            "p99": pct(late, 0.99),
            "worst": max(late),
            "least": min(late),
            "ring_p50": statistics.median(ring_late),
            "ring_p99": pct(ring_late, 0.99),
            "ring_worst": max(ring_late),
            "gap_p50": statistics.median(gaps),
            "gap_p99": pct(gaps, 0.99),
        }
    finally:
        await app.close()
        await peer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=200)
    parser.add_argument("--incidents", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1, help="alerts posted at once (part 1)")
    args = parser.parse_args()
    print(
        f"callbot on-call bench: Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        "fake Telegram, fake Pilot Status and the alert sender in a second process"
    )
    if args.alerts:  # --alerts 0: part 2 only
        floor = await part_floor(args.alerts, args.burst)
        alerts = await part_alerts(args.alerts, args.burst)
        verdict = "PASS" if alerts["p99"] <= 20 else "MISS"
        print(
            f"\n1. {args.alerts} alerts, {args.burst} at a time: alert sent -> POST /v1/calls "
            f"received: p50 {alerts['p50']:.1f} ms, p99 {alerts['p99']:.1f} ms, "
            f"max {alerts['max']:.1f} ms "
            f"(target p99 <= 20 ms: {verdict}); RSS {alerts['rss_mib']:.0f} MiB "
            f"(+{alerts['rss_growth_mib']:.1f} MiB during the run); the bot's CPU "
            f"{alerts['cpu_ms']:.1f} ms per alert, an alert every {alerts['every_ms']:.1f} ms\n"
            f"   the floor, a relay (transport only, same fakes, same run): "
            f"p50 {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms"
        )
    timers = await part_timers(args.incidents)
    print(
        f"2. {args.incidents} simultaneous incidents, second steps due together {WAIT} s "
        f"after the first calls: lateness p50 {timers['p50']:.1f} ms, p99 {timers['p99']:.1f} "
        f"ms, worst {timers['worst']:.1f} ms, least {timers['least']:.1f} ms; "
        f"due -> second ring's POST received: p50 {timers['ring_p50']:.1f} ms, "
        f"p99 {timers['ring_p99']:.1f} ms, worst {timers['ring_worst']:.1f} ms; "
        f"first POST -> second POST minus {WAIT} s: p50 {timers['gap_p50']:.1f} ms, "
        f"p99 {timers['gap_p99']:.1f} ms "
        f"(load average {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
