"""Webhook events applied per second, and event → message edit latency, on SQLite and PostgreSQL.

Run from the repo root:  .venv/bin/python -m bench.bench_webhooks [--calls 300] [--concurrency 50]

The real CallbotApp (as `python -m bot` builds it, webhook receiver on) and the loopback fakes run
in this process; the deliveries come from a second process (aiohttp client). For each of N stored
calls, three signed deliveries (ringing, connected, ended) are posted to the receiver, one phase
at a time, C at once. Figures:
- events/s applied: deliveries answered 2xx (signature checked, event stored, edit queued) per
  second of wall time, per backend;
- event → edit p50/p99: from just before the delivery is sent to the fake Telegram receiving the
  editMessageText that shows it. TELEGRAM_EDIT_INTERVAL is 0 here: the bot's own pacing of edits
  (a Telegram rate-limit wait) is excluded, as the target says;
- CPU per event: this process's CPU time (all its threads: the receiver, aiosqlite's, the edits)
  over the three phases, per event; steadier than the latency on a loaded machine;
- CPU/event: this process's CPU time (all its threads: receiver, aiosqlite's, edits) over the
  three phases, per event; steadier than the latency on a loaded machine;
- peak RSS of the process during the run.
Targets (2-core machine): >= 500 events/s on SQLite, p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.app import CallbotApp
from bot.config import load_settings
from bot.storage.store import NewCall
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

TOKEN = "123456:" + "A" * 35
HOOK = "h" * 32
SECRET = "bench-secret"
CHAT = 7001
PHASES = (
    ("call.ringing", "RINGING", "ringing"),
    ("call.connected", "ACCEPTED", "answered"),
    ("call.ended", "COMPLETED", "ended"),
)


class StampedTelegram(FakeTelegram):
    """The fake Bot API, noting when each edit arrives (perf_counter, same process)."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.edit_times: dict[tuple[int, str], float] = {}

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        response = await super()._handle(request)
        if request.path.endswith("/editMessageText") and self.edits:
            last = self.edits[-1]
            key = (last.message_id, last.plain.split("\n", 1)[0].rsplit(": ", 1)[-1])
            self.edit_times.setdefault(key, arrived)
        return response


class Peer:
    """The world outside the bot, in another process: the fake Telegram (noting when each edit
    arrives), the sender of the deliveries and, for bench_oncall, the fake Pilot Status (noting
    when each POST arrives, after its contract check) and the sender of the alerts, so none of
    them spends the bot's CPU or waits in its event loop's queue.
    time.perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_peer_main, args=(child,), daemon=True)
        self._process.start()

    async def ask(self, *command: Any) -> Any:
        self._conn.send(command)
        return await asyncio.to_thread(self._conn.recv)

    async def close(self) -> None:
        await self.ask("stop")
        self._process.join(10)


def _peer_main(conn: Connection) -> None:
    asyncio.run(_peer(conn))


async def _peer(conn: Connection) -> None:
    import aiohttp

    telegram = StampedTelegram(TOKEN)
    await telegram.start()
    pilot: FakePilotStatus | None = None
    try:
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "stop":
                conn.send(None)
                return
            if command == "url":
                conn.send(telegram.url)
            elif command == "seed":  # messages the bot "sent" earlier, to be edited
                async with aiohttp.ClientSession() as session:
                    for i in range(args[0]):
                        url = f"{telegram.url}/bot{TOKEN}/sendMessage"
                        async with session.post(url, data={"chat_id": CHAT, "text": f"call {i}"}):
                            pass
                conn.send(None)
            elif command == "phase":
                conn.send(await _send_phase(*args))
            elif command == "edits":
                conn.send(dict(telegram.edit_times))
            elif command == "pilot":  # a fake Pilot Status here too (bench_oncall)
                pilot = FakePilotStatus(number_type="web")
                await pilot.start()
                conn.send(pilot.url)
            elif command == "rung":  # (callee, when its POST /v1/calls arrived) so far
                assert pilot is not None
                conn.send([(r.json["to"], r.received_at) for r in pilot.calls_started()])
            elif command == "alerts":  # bench_oncall's alerts, sent from here
                from bench.bench_oncall import send_alerts

                conn.send(await send_alerts(*args))
    finally:
        if pilot is not None:
            await pilot.close()
        await telegram.close()


async def _send_phase(
    url: str, event: str, status: str, ids: list[str], concurrency: int
) -> tuple[int, dict[str, float], float]:
    import aiohttp

    sent_at: dict[str, float] = {}
    queue = list(reversed(ids))
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal ok
            while queue:
                pilot_id = queue.pop()
                body = json.dumps(
                    {
                        "event": event,
                        "callId": pilot_id,
                        "status": status,
                        "direction": "OUTBOUND",
                        "to": "5511999990000",
                        "timestamp": "2026-11-27T10:00:00Z",
                        "duration": 30,
                    }
                ).encode()
                signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                headers = {
                    "x-pilot-status-signature": signature,
                    "Idempotency-Key": f"{pilot_id}-{event}",
                    "content-type": "application/json",
                }
                sent_at[pilot_id] = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok += response.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, sent_at, time.perf_counter()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def sample_peak(peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib())
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.005)


async def postgres_url() -> tuple[str | None, str]:
    import asyncpg

    name = f"callbot_bench_{secrets.token_hex(4)}"
    try:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=3)
    except (OSError, asyncpg.PostgresError) as err:
        return None, f"no PostgreSQL on 127.0.0.1:5432 ({err})"
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql://postgres@127.0.0.1:5432/{name}", name


async def drop_postgres(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def run_backend(backend: str, calls: int, concurrency: int) -> dict[str, Any] | str:
    db_url, pg_name = (await postgres_url()) if backend == "postgresql" else (None, "")
    if backend == "postgresql" and db_url is None:
        return pg_name
    peer, pilot = Peer(), FakePilotStatus(number_type="web")
    telegram_url = await peer.ask("url")
    await pilot.start()
    data_dir = tempfile.mkdtemp(prefix="callbot-bench-")
    settings = load_settings(
        _env_file=None,
        bot_token=TOKEN,
        telegram_api_url=telegram_url,
        pilot_status_api_key="ps_" + "a" * 48,
        pilot_status_base_url=pilot.url,
        pilot_status_number_type="web",
        operator_ids="1",
        data_dir=data_dir,
        database_url=db_url,
        pilot_status_webhook_token=HOOK,
        pilot_status_webhook_secret=SECRET,
        web_host="127.0.0.1",
        web_port=0,
        telegram_edit_interval=0,
        # Telegram's send limits off too (as bench_calls does): the figures are the bot's
        telegram_sends_per_second=0,
        telegram_group_sends_per_minute=0,
        telegram_chat_sends_per_second=0,
    )
    app = CallbotApp(settings)
    await app.start()
    try:
        await peer.ask("seed", calls)
        for i in range(calls):
            await app.store.create_call(
                NewCall(
                    id=f"cb_bench{i:08d}",
                    operator_id=1,
                    operator_name="bench",
                    chat_id=CHAT,
                    number_type="web",
                    phone="+5511999990000",
                    phone_display="+55 11 99999-0000",
                    masked=False,
                    locale="en",
                    message_id=i + 1,
                )
            )
            await app.store.call_started(
                f"cb_bench{i:08d}",
                pilot_call_id=f"call_bench{i}",
                external_call_id=None,
                status="INITIATED",
            )
        message_of = {f"call_bench{i}": i + 1 for i in range(calls)}  # fake ids: 1..N
        url = f"http://127.0.0.1:{app.web_port}/pilot-status/{HOOK}"
        latencies: list[float] = []
        applied = 0
        peak, stop = [rss_kib()], asyncio.Event()
        sampler = asyncio.create_task(sample_peak(peak, stop))
        started, cpu_before = time.perf_counter(), time.process_time()
        applying = 0.0  # seconds from a phase's first send to its last 2xx, summed
        for event, status, label in PHASES:
            begun = time.perf_counter()
            ok, sent_at, last_answer = await peer.ask(
                "phase", url, event, status, list(message_of), concurrency
            )
            applying += last_answer - begun
            applied += ok
            await asyncio.wait_for(app.live.wait_idle(), 60)
            edit_times = await peer.ask("edits")
            for pilot_id, when in sent_at.items():
                edit = edit_times.get((message_of[pilot_id], label))
                if edit is not None:
                    latencies.append((edit - when) * 1000)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before  # this process: receiver, store, edits
        stop.set()
        await sampler
        if applied != 3 * calls or len(latencies) != 3 * calls:
            raise SystemExit(
                f"{backend}: applied {applied}, edits seen {len(latencies)}, "
                f"expected {3 * calls} each"
            )
        latencies.sort()
        return {
            "events": applied,
            "events_per_s": applied / applying,
            "with_edits_per_s": applied / elapsed,
            "p50": statistics.median(latencies),
            "p99": latencies[int(len(latencies) * 0.99) - 1],
            "cpu_ms": cpu * 1000 / applied,
            "peak_rss_mib": peak[0] / 1024,
        }
    finally:
        await app.close()
        await peer.close()
        await pilot.close()
        if pg_name and db_url:
            await drop_postgres(pg_name)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    import aiogram
    import sqlalchemy

    print(
        f"callbot webhook bench: Python {platform.python_version()}, aiogram "
        f"{aiogram.__version__}, SQLAlchemy {sqlalchemy.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{args.calls} calls x 3 events, {args.concurrency} deliveries at once; sender and fake "
        "Telegram in a second process; edit pacing off (TELEGRAM_EDIT_INTERVAL=0)"
    )
    print("applied/s: 2xx answers (signature checked, stored, edit queued) per second of sending")
    print("with edits/s: the same events per second until every edit reached Telegram\n")
    print(
        f"{'backend':<11} {'events':>7} {'applied/s':>10} {'with edits/s':>13} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU/event':>9} {'peak RSS':>9}  "
        "targets: >=500 applied/s (SQLite), p99 <= 20 ms"
    )
    for backend in ("sqlite", "postgresql"):
        result = await run_backend(backend, args.calls, args.concurrency)
        if isinstance(result, str):
            print(f"{backend:<11} skipped: {result}")
            continue
        rate_ok = (
            "n/a" if backend != "sqlite" else ("PASS" if result["events_per_s"] >= 500 else "MISS")
        )
        p99_ok = "PASS" if result["p99"] <= 20 else "MISS"
        print(
            f"{backend:<11} {result['events']:>7} {result['events_per_s']:>10.0f} "
            f"{result['with_edits_per_s']:>13.0f} {result['p50']:>7.1f} {result['p99']:>7.1f} "
            f"{result['cpu_ms']:>6.2f} ms "
            f"{result['peak_rss_mib']:>7.0f} MiB"
            f"  rate {rate_ok}, p99 {p99_ok}"
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
