"""An alert storm: 300 alerts for 10 teams within 10 s, against a Telegram that enforces its limits.

Run from the repo root:  .venv/bin/python -m bench.bench_storm [--alerts 300] [--teams 10]
                                            [--seconds 10] [--no-baseline]

The real CallbotApp runs in this process with its defaults (on-call timer every second, send
pacing at 30 messages/s and 20 per minute per group, ONCALL_POSTS_PER_MINUTE=5), the fake Pilot
Status in this process too; the fake Telegram runs in a second process and answers 429 past
Telegram's limits (30/s overall, 20/min per group), as tests/test_telegram_limits.py does with
its windows scaled. The alerts are sent at even intervals over the storm (an open loop: each at
its time, whatever the bot is doing), round robin over the teams; each team's one member is on
call. Throttles are off: every incident rings its person, so the first ring of every alert can
be timed (with the default 1/60,3/900 the throttle would hold all but the first by design).
Figures:
- first ring: alert sent -> the fake Pilot Status receiving the POST /v1/calls of that
  incident's first step (matched by our correlation id); target: every one within 2 s;
- Telegram: messages sent or edited (what the limits count), the most into one group in any
  60 s and overall in any 1 s, and the 429s the fake answered; target: 0;
- posts: alerts with a post of their own, digest posts and their lines; acknowledgeable: alerts
  whose Acknowledge button (own post or digest line) is in the group when the posts settled.
The baseline is the same storm with ONCALL_POSTS_PER_MINUTE=0 (every alert its own post), after
which the bench waits as long (at most --settle seconds) and counts what was posted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
from aiohttp import web

from bench.bench_oncall import build, pct
from bench.bench_webhooks import TOKEN, Peer
from bot.app import CallbotApp
from bot.storage.store import utcnow
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import LIMITED, FakeTelegram, Window

_DAY = timedelta(days=1)  # posts due by then: every pending one


class CountingTelegram(FakeTelegram):
    """The fake Bot API, noting when each message it accepted arrived (what the limits count)."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.accepted: list[tuple[float, int]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        refusals = len(self.flood_refusals)
        response = await super()._handle(request)
        method = request.path.rsplit("/", 1)[-1].lower()
        if method in LIMITED and response.status == 200 and len(self.flood_refusals) == refusals:
            body = json.loads(response.text or "{}")
            chat = (body.get("result") or {}).get("chat", {}).get("id") if body else None
            if isinstance(chat, int):
                self.accepted.append((arrived, chat))
        return response


class TelegramPeer(Peer):
    """bench_webhooks' peer process, running this bench's fake Telegram instead."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_peer_main, args=(child,), daemon=True)
        self._process.start()


def _peer_main(conn: Connection) -> None:
    asyncio.run(_peer(conn))


async def _peer(conn: Connection) -> None:
    telegram = CountingTelegram(TOKEN)
    await telegram.start()
    telegram.enforce_limits(overall=Window(30, 1.0), group=Window(20, 60.0), private=None)
    try:
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "stop":
                conn.send(None)
                return
            if command == "url":
                conn.send(telegram.url)
            elif command == "report":
                chats: dict[int, list[tuple[str, list[str]]]] = {}
                for chat in args[0]:
                    chats[chat] = [
                        (m.plain.split("\n", 1)[0], [data for _, data in m.buttons()])
                        for m in telegram.bot_messages(chat)
                    ]
                conn.send(
                    {
                        "accepted": list(telegram.accepted),
                        "refused": [scope for _, _, scope in telegram.flood_refusals],
                        "chats": chats,
                    }
                )
    finally:
        await telegram.close()


async def storm(app: CallbotApp, count: int, teams: int, seconds: float) -> dict[int, float]:
    """Send `count` alerts evenly over `seconds`, round robin over the teams; incident -> when
    its alert was sent."""
    sent: dict[int, float] = {}
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(n: int) -> None:
            await asyncio.sleep(max(0.0, start + n * seconds / count - time.perf_counter()))
            t = n % teams
            url = f"http://127.0.0.1:{app.web_port}/alerts/generic/t{t}"
            body = json.dumps({"title": f"disk {n} full on db-{t}", "dedupKey": f"k{n}"})
            at = time.perf_counter()
            headers = {"Authorization": f"Bearer token-{t}"}
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                sent[(await response.json())["incident"]] = at

        await asyncio.gather(*(one(n) for n in range(count)))
    return sent


async def run(count: int, teams: int, seconds: float, share: int, settle: float) -> dict[str, Any]:
    peer, pilot = TelegramPeer(), FakePilotStatus(number_type="web")
    await pilot.start()
    app = await build(
        peer,  # type: ignore[arg-type]  (the same ask("url") as bench_webhooks.Peer)
        pilot.url,
        teams,
        1,
        wait=300,  # no second step during the bench: the storm's first rings are timed
        oncall_posts_per_minute=share,
        speech_engine="no-such-tts",  # nothing to say: the ring is what is timed
        telegram_edit_interval=1,
    )
    chats = [-100000 - t for t in range(teams)]
    try:
        begun, cpu = time.perf_counter(), time.process_time()
        sent = await storm(app, count, teams, seconds)
        storm_seconds = time.perf_counter() - begun
        deadline = time.perf_counter() + 60
        while len(pilot.calls_started()) < count:
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.05)
        posted_by = time.perf_counter() + settle
        while time.perf_counter() < posted_by:  # until every post is made (or `settle` s)
            if not await app.oncall_store.posts_due(utcnow() + _DAY):
                break
            await asyncio.sleep(0.25)
        settled = time.perf_counter() - begun
        cpu_ms = (time.process_time() - cpu) * 1000 / count  # bot + fake Pilot + sender
        pending = len(await app.oncall_store.posts_due(utcnow() + _DAY))
        report = await peer.ask("report", chats)
        arrivals = {r.json["bizOpaqueCallbackData"]: r.received_at for r in pilot.calls_started()}
        rings: list[float] = []
        for incident_id, at in sent.items():
            incident = await app.oncall_store.incident(incident_id)
            call = incident.call_id if incident else None
            if call in arrivals:
                rings.append((arrivals[call] - at) * 1000)
        return {
            "storm_s": storm_seconds,
            "settled_s": settled,
            "cpu_ms": cpu_ms,
            "pending": pending,
            "rings": rings,
            "calls": len(pilot.calls_started()),
            "incidents": sorted(sent),
            **report,
        }
    finally:
        await app.close()
        await peer.close()
        await pilot.close()


def most_in(times: list[float], window: float) -> int:
    times = sorted(times)
    best, first = 0, 0
    for last, moment in enumerate(times):
        while moment - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def figures(result: dict[str, Any], count: int) -> dict[str, Any]:
    rings = result["rings"]
    by_group: dict[int, list[float]] = {}
    for at, chat in result["accepted"]:
        by_group.setdefault(chat, []).append(at)
    acked = {
        int(data.split(":", 1)[1])
        for posts in result["chats"].values()
        for _, buttons in posts
        for data in buttons
        if data.startswith("ack:")
    }
    posts = [first for chat_posts in result["chats"].values() for first, _ in chat_posts]
    return {
        "ring_p50": statistics.median(rings) if rings else float("nan"),
        "ring_p99": pct(rings, 0.99) if rings else float("nan"),
        "ring_max": max(rings) if rings else float("nan"),
        "ring_within_2s": sum(1 for r in rings if r <= 2000),
        "rung": len(rings),
        "messages": len(result["accepted"]),
        "group_minute": max((most_in(t, 60.0) for t in by_group.values()), default=0),
        "overall_second": most_in([at for at, _ in result["accepted"]], 1.0),
        "refused": len(result["refused"]),
        "own_posts": sum(1 for p in posts if p.startswith("🚨")),
        "digests": sum(1 for p in posts if p.startswith("🗂")),
        "acknowledgeable": len(acked & set(result["incidents"])),
        "pending": result["pending"],
        "storm_s": result["storm_s"],
        "settled_s": result["settled_s"],
        "cpu_ms": result["cpu_ms"],
        "count": count,
    }


ROWS = (
    ("alerts sent over (s)", "storm_s", "{:.1f}"),
    ("first rings placed", "rung", "{}"),
    ("  alert -> POST /v1/calls p50 (ms)", "ring_p50", "{:.0f}"),
    ("  p99 (ms)", "ring_p99", "{:.0f}"),
    ("  max (ms)", "ring_max", "{:.0f}"),
    ("  within 2 s", "ring_within_2s", "{}"),
    ("Telegram messages (sent + edited)", "messages", "{}"),
    ("  most into one group in 60 s", "group_minute", "{}"),
    ("  most overall in 1 s", "overall_second", "{}"),
    ("  429s from the fake", "refused", "{}"),
    ("posts of their own", "own_posts", "{}"),
    ("digest posts", "digests", "{}"),
    ("alerts with a button in the group", "acknowledgeable", "{}"),
    ("posts still pending at the end", "pending", "{}"),
    ("storm start -> posts settled (s)", "settled_s", "{:.1f}"),
    ("CPU of this process per alert (ms)", "cpu_ms", "{:.1f}"),
)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=300)
    parser.add_argument("--teams", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for posts")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    print(
        f"callbot alert-storm bench: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start; fake Telegram (enforcing 30/s, "
        "20/min per group) in a second process"
    )
    print(
        f"  {args.alerts} generic alerts for {args.teams} teams over {args.seconds:.0f} s "
        "(open loop, round robin), throttles off, pacing and timer at their defaults"
    )
    runs = [("digest (5/min)", 5)] + ([] if args.no_baseline else [("baseline (off)", 0)])
    results = []
    for label, share in runs:
        result = await run(args.alerts, args.teams, args.seconds, share, args.settle)
        results.append((label, figures(result, args.alerts)))
    print()
    print(f"  {'':40s}" + "".join(f"{label:>18s}" for label, _ in results))
    for name, key, form in ROWS:
        print(f"  {name:40s}" + "".join(f"{form.format(r[key]):>18s}" for _, r in results))
    digest = results[0][1]
    ok = (
        digest["ring_within_2s"] == args.alerts
        and digest["refused"] == 0
        and digest["acknowledgeable"] == args.alerts
    )
    print(
        f"\n  targets (digest run): every first ring within 2 s, 0 429s, every alert "
        f"acknowledgeable: {'PASS' if ok else 'MISS'}"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
