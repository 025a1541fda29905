"""Replies per second with 1 vs 2 replicas behind HAProxy, and what Redis costs per /call.

Run from the repo root:
    .venv/bin/python -m bench.bench_replicas [--calls 600] [--warmup 20] [--repeat 3]

The test bed of tests/replicas.py: real `python -m bot` processes in Telegram webhook mode behind
a real HAProxy (deploy/haproxy.cfg), on a fresh PostgreSQL database, with the fake Telegram
(delivering updates by webhook POSTs through HAProxy, up to max_connections = 40 at once) and the
fake Pilot Status in this process. Three runs on the same burst of N `/call` from 200 private
chats, each to a number of its own:

- 1 replica, REDIS_URL set;
- 2 replicas, REDIS_URL set (the same Redis, one key prefix);
- 1 replica without REDIS_URL (everything shared kept in memory): against the first run, the
  cost Redis adds per /call.

Redis is a redis-server of the bench's own (free port, no persistence), so its command counts
are the bot's alone. Figures per run: replies/s (N / first update pushed -> last update answered
2xx; the bot answers an update once it is handled, its reply sent), CPU of the bot processes per
/call, Redis commands and Redis CPU per /call, delivery attempts per update (> 1: redelivered).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from tests.conftest import API_KEY, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram
from tests.replicas import (
    TestBed,
    find_haproxy,
    free_port,
    start_testbed,
    until,
)

POSTGRES = os.environ.get("TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
CHATS = tuple(800_001 + n for n in range(200))
SETTINGS = {
    "OPERATOR_IDS": ",".join(map(str, CHATS)),
    "TELEGRAM_SENDS_PER_SECOND": "0",  # Telegram's send limits: not what is measured
    "TELEGRAM_GROUP_SENDS_PER_MINUTE": "0",
    "TELEGRAM_CHAT_SENDS_PER_SECOND": "0",
    "LOG_LEVEL": "WARNING",
}


@dataclass(frozen=True)
class Run:
    label: str
    replicas: int
    redis: bool


@dataclass
class Result:
    run: Run
    calls: int
    seconds: float
    bot_cpu: float  # seconds, all replicas
    redis_commands: int
    redis_cpu: float  # seconds
    attempts: int  # webhook deliveries tried, 2xx or not
    fakes_cpu: float  # seconds, this process (fake Telegram + fake Pilot Status)
    by_command: dict[str, int]  # Redis commands by name
    busy: float  # share of the machine's CPU time not idle during the burst

    @property
    def replies_per_second(self) -> float:
        return self.calls / self.seconds

    def per_call_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.calls


RUNS = (
    Run("1 replica, Redis", 1, True),
    Run("2 replicas, Redis", 2, True),
    Run("1 replica, no Redis", 1, False),
)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs so far (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/<pid>/stat, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OwnRedis:
    """A redis-server of the bench's own: its counters are the bot's alone."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian package redis-server)")
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), *options], stdout=subprocess.DEVNULL
        )
        self.client = aioredis.Redis.from_url(self.url)

    async def ready(self) -> None:
        for _ in range(200):
            try:
                await self.client.ping()
                return
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.05)
        raise SystemExit("redis-server did not start")

    async def counters(self) -> tuple[int, float]:
        """(commands processed, CPU seconds) so far; the INFO calls themselves are counted."""
        stats = await self.client.info("stats")
        cpu = await self.client.info("cpu")
        return int(stats["total_commands_processed"]), float(cpu["used_cpu_sys"]) + float(
            cpu["used_cpu_user"]
        )

    async def commands(self) -> dict[str, int]:
        """Commands processed so far, by name."""
        stats = await self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    async def close(self) -> None:
        await self.client.aclose()
        self.process.kill()
        self.process.wait(10)


async def fresh_database() -> tuple[str, str]:
    """(SQLAlchemy URL, name) of a new PostgreSQL database."""
    name = f"callbot_bench_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(POSTGRES, timeout=5)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}", name


async def drop_database(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def burst(bed: TestBed, count: int) -> float:
    """Push `count` /call at once; seconds until the last is answered 2xx."""
    started = time.perf_counter()
    commands = bed.push_calls(count, CHATS)
    wanted = {c.update_id for c in commands}
    await until(
        lambda: wanted <= bed.answered(),
        lambda: f"{len(wanted - bed.answered())} updates never answered\n{bed.logs()[-5000:]}",
        timeout=600,
    )
    return time.perf_counter() - started


async def one_round(bed: TestBed, run: Run, calls: int, own_redis: OwnRedis | None) -> Result:
    """One measured burst on a running bed."""
    pids = [r.process.process.pid for r in bed.replicas if r.process is not None]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    commands_before = await own_redis.commands() if own_redis else {}
    redis_before = await own_redis.counters() if own_redis else (0, 0.0)
    attempts_before = len(bed.telegram.deliveries)
    own_before, ticks_before = own_cpu_seconds(), machine_ticks()
    seconds = await burst(bed, calls)
    bot_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    fakes_cpu = own_cpu_seconds() - own_before
    ticks_after = machine_ticks()
    idle = ticks_after[0] - ticks_before[0]
    busy = 1 - idle / max(1, ticks_after[1] - ticks_before[1])
    redis_after = await own_redis.counters() if own_redis else (3, 0.0)
    commands_after = await own_redis.commands() if own_redis else {}
    by_command = {
        name: count - commands_before.get(name, 0)
        for name, count in commands_after.items()
        if name not in ("info", "ping") and count > commands_before.get(name, 0)
    }
    return Result(
        run,
        calls,
        seconds,
        bot_cpu,
        redis_after[0] - redis_before[0] - 3,  # the INFO commands of counters() and commands()
        redis_after[1] - redis_before[1],
        len(bed.telegram.deliveries) - attempts_before,
        fakes_cpu,
        by_command,
        busy,
    )


async def measure(run: Run, calls: int, warmup: int, repeat: int, haproxy: str) -> list[Result]:
    """`repeat` measured bursts on one bed, after a warm-up burst."""
    database_url, database = await fresh_database()
    own_redis = OwnRedis() if run.redis else None
    telegram = FakeTelegram(TOKEN, webhook_retry_delay=0.5, webhook_timeout=120)
    pilot = FakePilotStatus(api_key=API_KEY, number_type="web")
    folder = Path(tempfile.mkdtemp(prefix="callbot-bench-"))
    try:
        await telegram.start()
        await pilot.start()
        shared = None
        if own_redis is not None:
            await own_redis.ready()
            shared = {"redis_url": own_redis.url, "redis_key_prefix": "callbot-bench:"}
        async with start_testbed(
            folder,
            telegram=telegram,
            pilot=pilot,
            database_url=database_url,
            shared_state=shared,
            replicas=run.replicas,
            settings=SETTINGS,
            haproxy=haproxy,
        ) as bed:
            await burst(bed, warmup)
            rounds = [await one_round(bed, run, calls, own_redis) for _ in range(repeat)]
            started = len(pilot.calls_started())
            if started != warmup + calls * repeat:
                raise SystemExit(f"FAIL {run.label}: {started} POST /v1/calls, not all once")
        return rounds
    finally:
        await pilot.close()
        await telegram.close()
        if own_redis is not None:
            await own_redis.close()
        await drop_database(database)
        shutil.rmtree(folder, ignore_errors=True)


def median_round(rounds: list[Result]) -> Result:
    return sorted(rounds, key=lambda r: r.replies_per_second)[len(rounds) // 2]


def report(all_rounds: list[list[Result]], args: argparse.Namespace) -> None:
    results = [median_round(rounds) for rounds in all_rounds]
    print(
        "callbot replicas bench: python -m bot in webhook mode behind HAProxy (deploy/haproxy.cfg)"
    )
    print(f"  Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.system()}")
    print(
        f"  N = {args.calls} /call from {len(CHATS)} private chats at once, {args.repeat} rounds "
        f"per run after {args.warmup} warm-up calls (the median round shown); the fake Telegram "
        "delivers them by webhook, 40 at once"
    )
    print("  PostgreSQL (fresh database per run); fakes and HAProxy share this machine's CPUs")
    print()
    width = max(len(r.run.label) for r in results)
    print(
        f"  {'run':<{width}}  replies/s  wall s  bot CPU ms/call  fakes CPU ms/call  "
        "Redis cmds/call  Redis CPU ms/call  attempts/update  machine busy"
    )
    for r in results:
        print(
            f"  {r.run.label:<{width}}  {r.replies_per_second:9.1f}  {r.seconds:6.2f}  "
            f"{r.per_call_ms(r.bot_cpu):15.2f}  {r.per_call_ms(r.fakes_cpu):17.2f}  "
            f"{r.redis_commands / r.calls:15.1f}  {r.per_call_ms(r.redis_cpu):17.3f}  "
            f"{r.attempts / r.calls:15.2f}  {100 * r.busy:11.0f}%"
        )
    for rounds in all_rounds:
        rates = ", ".join(f"{r.replies_per_second:.1f}" for r in rounds)
        print(f"    {rounds[0].run.label}: replies/s of each round {rates}")
    one, two, alone = results
    print()
    names = ", ".join(
        f"{name} {count / one.calls:.1f}"
        for name, count in sorted(one.by_command.items(), key=lambda item: -item[1])
    )
    print(f"  Redis commands per /call (1 replica): {names}")
    ratio = two.replies_per_second / one.replies_per_second
    print(f"  2 replicas / 1 replica, replies/s: {ratio:.2f}x")
    extra_cpu = one.per_call_ms(one.bot_cpu) - alone.per_call_ms(alone.bot_cpu)
    print(
        f"  Redis's cost per /call (1 replica, with - without): {extra_cpu:+.2f} ms of bot CPU, "
        f"{one.redis_commands / one.calls:.1f} Redis commands "
        f"({one.per_call_ms(one.redis_cpu):.3f} ms of Redis CPU); replies/s with/without: "
        f"{one.replies_per_second / alone.replies_per_second:.2f}x"
    )


async def bench(args: argparse.Namespace) -> int:
    haproxy = find_haproxy()
    if haproxy is None:
        print("haproxy is not installed (Debian package haproxy)", file=sys.stderr)
        return 2
    results = []
    for run in RUNS:
        print(f"running: {run.label} ...", file=sys.stderr)
        results.append(await measure(run, args.calls, args.warmup, args.repeat, haproxy))
    report(results, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=600, help="calls per measured burst")
    parser.add_argument("--warmup", type=int, default=20, help="calls before each run's bursts")
    parser.add_argument("--repeat", type=int, default=3, help="measured bursts per run")
    args = parser.parse_args(argv)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
