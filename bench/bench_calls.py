"""How fast `/call` goes through the real bot: one shared httpx client vs a client per call.

Run from the repo root::

    .venv/bin/python -m bench.bench_calls [--calls 1000] [--concurrency 100] [--fakes subprocess]
        [--database sqlite|postgres] [--redis]

N `/call` updates (one operator in a private chat, each to a different Brazilian mobile) are fed
to the real aiogram Dispatcher (`dp.feed_raw_update`, at most `--concurrency` in flight) of a
`bot.app.CallbotApp` built as `python -m bot` builds it, against the loopback fakes of
`tests/fakes`: FakePilotStatus answers `POST /v1/calls`, FakeTelegram receives the replies
(sendMessage) over HTTP from the real aiogram Bot session. The same run is then repeated with a
client-per-call baseline. Each run has a fresh database: a SQLite file (the default) or a new
PostgreSQL database (`--database postgres`, on TEST_POSTGRES_URL's server); `--redis` puts the
shared state (update ledger, number guard) on a redis-server of the bench's own.
bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any
from unittest import mock

import aiogram
import aiohttp
import httpx
from aiohttp import web

import bot.app
from bench.bench_replicas import OwnRedis, drop_database, fresh_database
from bot.app import CallbotApp, build_pilot_client
from bot.config import Settings, load_settings
from bot.ops.metrics import Metrics
from bot.pilot_status import PilotStatusClient
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

TOKEN = "123456:" + "A" * 35
API_KEY = "ps_" + "a" * 48
OPERATOR = 111
WEBHOOK_TOKEN = "bench-" + "w" * 24
TARGET_P99_MS = 5.0
TARGET_SPEEDUP = 5.0
TARGET_CONNECTIONS_PER_1000 = 2.0
_NUMBER = re.compile(r"\+55 (\d\d) (\d{5})-(\d{4})")  # as typed in /call and shown in replies

Update = dict[str, Any]


def callee(text: str) -> str | None:
    """Digits of the Brazilian mobile in a /call command or a reply ("5511900000001")."""
    found = _NUMBER.search(text)
    return "55" + "".join(found.groups()) if found else None


# ------------------------------------------------------------------ the fakes (either process)

_received_at: ContextVar[float] = ContextVar("received_at")


@dataclass(frozen=True)
class Post:
    """One POST /v1/calls as FakePilotStatus recorded it."""

    to: str  # digits
    received_at: float
    responded_at: float
    status: int | None


@dataclass(frozen=True)
class Reply:
    """One sendMessage as StampedTelegram received it."""

    text: str
    reply_to: int | None
    received_at: float


@dataclass(frozen=True)
class Snapshot:
    """What the fakes recorded so far (every list only grows); picklable across processes."""

    posts: list[Post]
    other_pilot_requests: list[str]
    replies: list[Reply]
    telegram_methods: list[str]
    call_ids: dict[str, str]  # callee digits -> id of the call the fake started
    connections_opened: int
    contract_violations: list[str]
    cpu_seconds: float  # CPU time of the process that runs the fakes


class StampedTelegram(FakeTelegram):
    """FakeTelegram that stamps time.perf_counter() when a request reaches its handler."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.replies: list[Reply] = []

    async def _handle(self, request: web.Request) -> web.Response:
        _received_at.set(time.perf_counter())  # the point where FakePilotStatus stamps too
        return await super()._handle(request)

    async def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        message = await super()._send_message(params)
        reply = params.get("reply_parameters")
        reply_to = reply.get("message_id") if isinstance(reply, dict) else None
        self.replies.append(Reply(str(params.get("text")), reply_to, _received_at.get()))
        return message


class Fakes:
    """Both fakes on one event loop; the bench reaches them only through `run`."""

    def __init__(self) -> None:
        self.pilot = FakePilotStatus(api_key=API_KEY, number_type="web")
        self.telegram = StampedTelegram(TOKEN)

    async def start(self) -> tuple[str, str]:
        await self.pilot.start()
        await self.telegram.start()
        return self.pilot.url, self.telegram.url

    async def close(self) -> None:
        await self.telegram.close()
        await self.pilot.close()

    def run(self, command: str, *args: Any) -> Any:
        if command == "register":  # the user messages the bot will reply to
            for update in args[0]:
                self.telegram.push_update(update)
            return None
        if command == "clock":
            return time.perf_counter()
        if command == "snapshot":
            return self.snapshot()
        raise ValueError(f"unknown command {command!r}")

    def snapshot(self) -> Snapshot:
        cpu = time.process_time()
        posts: list[Post] = []
        others: list[str] = []
        for request in self.pilot.requests:
            if request.operation == "start_call" and isinstance(request.json, dict):
                to = re.sub(r"\D", "", str(request.json.get("to")))
                responded = request.responded_at if request.responded_at is not None else math.nan
                posts.append(Post(to, request.received_at, responded, request.status))
            else:
                others.append(f"{request.method} {request.path}")
        return Snapshot(
            posts=posts,
            other_pilot_requests=others,
            replies=list(self.telegram.replies),
            telegram_methods=[method for method, _ in self.telegram.requests],
            call_ids={call["peerNumber"]: call["id"] for call in self.pilot.calls.values()},
            connections_opened=self.pilot.connections_opened,
            contract_violations=list(self.pilot.contract_violations),
            cpu_seconds=cpu,
        )


def _serve_fakes(conn: Connection) -> None:
    """Entry point of the fakes' process: serve commands until the parent sends None."""
    asyncio.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    fakes = Fakes()
    conn.send(await fakes.start())
    try:
        while (message := await asyncio.to_thread(conn.recv)) is not None:
            command, args = message
            conn.send(fakes.run(command, *args))
    finally:
        await fakes.close()


class FakesHandle:
    """The fakes on this event loop (`inprocess`) or in a spawned process (`subprocess`)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._local: Fakes | None = None
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self.pilot_url = self.telegram_url = ""

    async def start(self) -> None:
        if self.mode == "inprocess":
            self._local = Fakes()
            self.pilot_url, self.telegram_url = await self._local.start()
            return
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_fakes, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self.pilot_url, self.telegram_url = await asyncio.to_thread(self._conn.recv)

    async def ask(self, command: str, *args: Any) -> Any:
        if self._local is not None:
            return self._local.run(command, *args)
        assert self._conn is not None
        await asyncio.to_thread(self._conn.send, (command, args))
        return await asyncio.to_thread(self._conn.recv)

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()
        if self._conn is not None and self._process is not None:
            await asyncio.to_thread(self._conn.send, None)
            await asyncio.to_thread(self._process.join, 10)

    async def check_clock(self) -> str:
        """perf_counter() stamps of both processes must be comparable (CLOCK_MONOTONIC)."""
        implementation = time.get_clock_info("perf_counter").implementation
        if self._local is not None:
            return f"perf_counter = {implementation}, one process"
        worst = 0.0
        for _ in range(5):
            before = time.perf_counter()
            theirs: float = await self.ask("clock")
            after = time.perf_counter()
            if not before <= theirs <= after:
                raise SystemExit(
                    f"FAIL: the fakes' perf_counter() ({theirs:.6f}) is outside our round trip "
                    f"[{before:.6f}, {after:.6f}]: timestamps are not comparable across processes"
                )
            worst = max(worst, after - before)
        return (
            f"perf_counter = {implementation}; checked: the fakes' stamp falls inside our "
            f"round trip 5/5 times (round trip <= {worst * 1000:.2f} ms)"
        )


# ------------------------------------------------------------------ the bot side


def bench_settings(
    pilot_url: str,
    telegram_url: str,
    data_dir: str,
    *,
    paced: bool = False,
    database_url: str | None = None,
    redis_url: str | None = None,
) -> Settings:
    """The app's defaults pointed at the fakes, like tests/conftest.py settings_for. Unpaced
    (the default here): Telegram's send limits off, so a reply never waits for a slot.
    `database_url` None: a SQLite file under `data_dir`."""
    limits = (
        {}
        if paced
        else {
            "telegram_sends_per_second": 0,
            "telegram_group_sends_per_minute": 0,
            "telegram_chat_sends_per_second": 0,
        }
    )
    return load_settings(
        _env_file=None,
        bot_token=TOKEN,
        telegram_api_url=telegram_url,
        pilot_status_api_key=API_KEY,
        pilot_status_base_url=pilot_url,
        pilot_status_number_type="web",  # no probe
        operator_ids=str(OPERATOR),
        data_dir=data_dir,  # a fresh SQLite database per run, unless database_url
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"callbot-bench-{os.getpid()}-{time.monotonic_ns()}:",
        # Calls are followed by webhooks (none arrive here), so no status polling competes
        # with the measured /call path.
        pilot_status_webhook_token=WEBHOOK_TOKEN,
        web_host="127.0.0.1",
        web_port=0,
        **limits,
    )


class ClientPerCallPilot(PilotStatusClient):
    """Baseline: every request builds a fresh client the way the app does, then closes it."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        super().__init__(httpx.AsyncClient())  # never used for requests
        self._settings = settings

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None,
        json: dict[str, Any] | None,
        idempotent: bool,
    ) -> tuple[int, object]:
        fresh = build_pilot_client(self._settings)
        try:
            return await fresh._request(
                operation, method, path, params=params, json=json, idempotent=idempotent
            )
        finally:
            await fresh.aclose()


PilotBuilder = Callable[[Settings], PilotStatusClient]
VARIANTS: tuple[tuple[str, PilotBuilder | None], ...] = (
    ("shared", None),  # the app as it is
    ("per-call", ClientPerCallPilot),
)


def build_app(settings: Settings, pilot: PilotBuilder | None) -> CallbotApp:
    """CallbotApp as `python -m bot` builds it; `pilot` replaces its build_pilot_client."""
    if pilot is None:
        return CallbotApp(settings)
    with mock.patch.object(bot.app, "build_pilot_client", pilot):
        return CallbotApp(settings)


class Updates:
    """Telegram-shaped `/call` updates from the operator's private chat, each to a new number."""

    def __init__(self) -> None:
        self._next = 1

    def make(self, count: int) -> list[Update]:
        updates: list[Update] = []
        for n in range(self._next, self._next + count):
            user = {"id": OPERATOR, "is_bot": False, "first_name": "Op", "language_code": "en"}
            chat = {"id": OPERATOR, "type": "private", "first_name": "Op"}
            message = {
                "message_id": n,
                "date": int(time.time()),
                "chat": chat,
                "from": user,
                "text": f"/call +55 11 9{n // 10_000:04d}-{n % 10_000:04d}",
                "entities": [{"type": "bot_command", "offset": 0, "length": 5}],
            }
            updates.append({"update_id": 700_000_000 + n, "message": message})
        self._next += count
        return updates


async def feed(app: CallbotApp, updates: Sequence[Update], concurrency: int) -> list[float]:
    """Feed every update, at most `concurrency` at once; returns when each was fed in."""
    fed_at = [math.nan] * len(updates)
    pending = iter(range(len(updates)))

    async def worker() -> None:
        for index in pending:
            fed_at[index] = time.perf_counter()
            await app.dp.feed_raw_update(app.bot, updates[index])

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(updates)))))
    return fed_at


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """Peak RSS of this process inside a `with` block: the kernel's VmHWM, reset on entry
    (`echo 5 > /proc/self/clear_refs`); where that is refused, VmRSS sampled every 2 ms."""

    method = "VmHWM, reset at the start of each measured run"

    def __enter__(self) -> PeakRss:
        self.start_kib = _status_kib("VmRSS")
        self._samples = [self.start_kib]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            PeakRss.method = "VmRSS sampled every 2 ms by a thread"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._samples.append(_status_kib("VmRSS"))

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is None:
            self.peak_kib = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_kib = max(self._samples)


# ------------------------------------------------------------------ one run, and its figures


@dataclass(frozen=True)
class Result:
    name: str
    calls: int
    seconds: float  # first update fed -> last reply received by the Telegram fake
    post_seconds: float  # first update fed -> last POST /v1/calls received by the Pilot fake
    leg_a: list[float]  # ms: update fed -> POST /v1/calls received by the fake
    leg_b: list[float]  # ms: 201 sent by the fake -> sendMessage received by the fake
    reply_latency: list[float]  # ms: update fed -> sendMessage received by the fake
    connections: int  # opened to Pilot Status during the measured run
    warmup_connections: int
    peak_rss_mib: float
    rss_growth_mib: float
    cpu_seconds: float  # this process (user + sys) while feeding the run
    sys_seconds: float  # of which in the kernel
    busy_seconds: float  # wall time of the feeding, to turn CPU seconds into a share
    fakes_cpu_seconds: float | None  # the fakes' process (None when in-process)

    @property
    def throughput(self) -> float:
        """Calls started per second: first update fed -> last POST /v1/calls."""
        return self.calls / self.post_seconds

    @property
    def reply_rate(self) -> float:
        """Replies per second: first update fed -> last reply."""
        return self.calls / self.seconds

    @property
    def bot_added(self) -> list[float]:
        return [a + b for a, b in zip(self.leg_a, self.leg_b, strict=True)]

    @property
    def connections_per_1000(self) -> float:
        return self.connections * 1000 / self.calls

    @property
    def cpu_ms_per_call(self) -> float:
        return self.cpu_seconds * 1000 / self.calls


async def run_variant(
    name: str,
    pilot: PilotBuilder | None,
    fakes: FakesHandle,
    updates: Updates,
    *,
    calls: int,
    concurrency: int,
    warmup: int,
    database: str = "sqlite",
    redis_url: str | None = None,
) -> Result:
    with tempfile.TemporaryDirectory(prefix="callbot-bench-") as data_dir:
        postgres = await fresh_database() if database == "postgres" else None
        settings = bench_settings(
            fakes.pilot_url,
            fakes.telegram_url,
            data_dir,
            database_url=postgres[0] if postgres else None,
            redis_url=redis_url,
        )
        try:
            app = build_app(settings, pilot)
            await app.start()  # migrations, webhook receiver
            try:
                return await measure(name, app, fakes, updates, calls, concurrency, warmup)
            finally:
                await app.close()
        finally:
            if postgres is not None:
                await drop_database(postgres[1])


async def measure(
    name: str,
    app: CallbotApp,
    fakes: FakesHandle,
    updates: Updates,
    calls: int,
    concurrency: int,
    warmup: int,
) -> Result:
    start: Snapshot = await fakes.ask("snapshot")
    warm = updates.make(warmup)
    await fakes.ask("register", warm)
    await feed(app, warm, 1)
    measured = updates.make(calls)
    await fakes.ask("register", measured)
    gc.collect()
    before: Snapshot = await fakes.ask("snapshot")
    with PeakRss() as rss:
        cpu_before = os.times()
        fed_at = await feed(app, measured, concurrency)
        done = time.perf_counter()
        cpu_after = os.times()
    after: Snapshot = await fakes.ask("snapshot")
    leg_a, leg_b, reply_latency, last_post, last_reply = check_and_match(
        name, measured, fed_at, before, after
    )
    sys_seconds = cpu_after.system - cpu_before.system
    return Result(
        name=name,
        calls=calls,
        seconds=last_reply - min(fed_at),
        post_seconds=last_post - min(fed_at),
        leg_a=leg_a,
        leg_b=leg_b,
        reply_latency=reply_latency,
        connections=after.connections_opened - before.connections_opened,
        warmup_connections=before.connections_opened - start.connections_opened,
        peak_rss_mib=rss.peak_kib / 1024,
        rss_growth_mib=(rss.peak_kib - rss.start_kib) / 1024,
        cpu_seconds=cpu_after.user - cpu_before.user + sys_seconds,
        sys_seconds=sys_seconds,
        busy_seconds=done - min(fed_at),
        fakes_cpu_seconds=(
            None if fakes.mode == "inprocess" else after.cpu_seconds - before.cpu_seconds
        ),
    )


def check_and_match(
    name: str,
    measured: Sequence[Update],
    fed_at: Sequence[float],
    before: Snapshot,
    after: Snapshot,
) -> tuple[list[float], list[float], list[float], float, float]:
    """Every call got exactly one POST (answered 201) and one reply naming the started call,
    and nothing else was sent; returns legs a and b and fed -> reply in ms per call, and the
    times of the last POST and of the last reply."""
    posts: dict[str | None, list[Post]] = defaultdict(list)
    for post in after.posts[len(before.posts) :]:
        posts[post.to].append(post)
    replies: dict[str | None, list[Reply]] = defaultdict(list)
    for reply in after.replies[len(before.replies) :]:
        replies[callee(reply.text)].append(reply)
    others = after.other_pilot_requests[len(before.other_pilot_requests) :]
    problems = [f"unexpected Pilot Status request {r}" for r in others]
    problems += [f"contract violation: {v}" for v in after.contract_violations]
    problems += [
        f"unexpected Telegram method {m}"
        for m in after.telegram_methods[len(before.telegram_methods) :]
        if m.lower() != "sendmessage"
    ]
    leg_a: list[float] = []
    leg_b: list[float] = []
    reply_latency: list[float] = []
    for update, fed in zip(measured, fed_at, strict=True):
        message = update["message"]
        number = callee(message["text"])
        got_posts, got_replies = posts.pop(number, []), replies.pop(number, [])
        if len(got_posts) != 1 or len(got_replies) != 1:
            problems.append(
                f"{number}: {len(got_posts)} POST /v1/calls, {len(got_replies)} replies"
            )
            continue
        post, reply = got_posts[0], got_replies[0]
        call_id = after.call_ids.get(number or "")
        if (
            post.status != 201
            or call_id is None
            or call_id not in reply.text
            or reply.reply_to != message["message_id"]
        ):
            problems.append(f"{number}: POST answered {post.status}; reply {reply.text[:80]!r}")
            continue
        leg_a.append((post.received_at - fed) * 1000)
        leg_b.append((reply.received_at - post.responded_at) * 1000)
        reply_latency.append((reply.received_at - fed) * 1000)
    problems += [f"POST for a number not in this run: {n} x{len(p)}" for n, p in posts.items()]
    problems += [f"reply not matching a call: {r[0].text[:80]!r}" for r in replies.values()]
    if problems:
        raise SystemExit(
            f"FAIL ({name} run): every call must get exactly one POST and one reply; "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:20])
        )
    last_reply = max(r.received_at for r in after.replies[len(before.replies) :])
    last_post = max(p.received_at for p in after.posts[len(before.posts) :])
    return leg_a, leg_b, reply_latency, last_post, last_reply


# ------------------------------------------------------------------ report


def pct(values: Sequence[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def code_fingerprint() -> str:
    """Short hash of the bot's sources (bot/, handlers/), to tell which code a run measured."""
    root = Path(bot.app.__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("bot/**/*.py"), *root.glob("handlers/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def print_header(args: argparse.Namespace, settings: Settings, clock: str) -> None:
    fakes = {
        "subprocess": "in a spawned process on 127.0.0.1 (this process runs only the bot)",
        "inprocess": "IN-PROCESS, on the bot's event loop: CPU and RSS figures include the fakes",
    }[args.fakes]
    print("callbot /call benchmark: shared httpx.AsyncClient vs a client per call")
    print(
        f"  Python {platform.python_version()} ({platform.python_implementation()}), "
        f"aiogram {aiogram.__version__}, httpx {httpx.__version__}, aiohttp {aiohttp.__version__}"
    )
    print(f"  machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}")
    print(f"  N = {args.calls} calls per run, concurrency = {args.concurrency} in flight")
    print(f"  warm-up: {args.warmup} sequential calls before each run, excluded")
    print("  order: shared client first, then the client-per-call baseline (same process/fakes)")
    print(f"  fakes: {fakes}")
    print(f"  clock: {clock}")
    print(
        "  bot: bot.app.CallbotApp, app defaults + pilot_status_number_type=web, "
        f"pilot_status_max_connections={settings.pilot_status_max_connections},"
    )
    database = {"sqlite": "SQLite file", "postgres": "PostgreSQL database"}[args.database]
    print(
        f"       webhooks on (calls not polled), a fresh {database} per run, "
        f"Redis {'on (a redis-server of its own)' if args.redis else 'off'}, "
        "updates fed with dp.feed_raw_update"
    )
    print("       Telegram send limits off (replies not paced)")
    print(f"  code: sha256 of bot/ + handlers/ sources = {code_fingerprint()}")
    print(f"  peak RSS: {PeakRss.method}")
    print()


def print_report(
    shared: Result, base: Result, args: argparse.Namespace, settings: Settings
) -> None:
    def row(label: str, a: float, b: float, fmt: str = "{:.1f}") -> None:
        ratio = f"{a / b:.2f}x" if b else "-"
        print(f"  {label:<46} {fmt.format(a):>10} {fmt.format(b):>10} {ratio:>12}")

    def share(seconds: float, result: Result) -> float:
        return 100 * seconds / result.busy_seconds

    print(f"  {'':<46} {'shared':>10} {'per-call':>10} {'shared/base':>12}")
    row("calls started/s (first fed -> last POST)", shared.throughput, base.throughput)
    row("replies/s (first fed -> last reply)", shared.reply_rate, base.reply_rate)
    row("wall time, first fed -> last reply (s)", shared.seconds, base.seconds, "{:.2f}")
    legs: list[tuple[str, Callable[[Result], list[float]]]] = [
        ("(a) fed -> POST received", lambda r: r.leg_a),
        ("(b) 201 sent -> reply received", lambda r: r.leg_b),
        ("(a)+(b) bot-added, per call", lambda r: r.bot_added),
        ("reply latency, fed -> reply received", lambda r: r.reply_latency),
    ]
    for label, get in legs:
        for p in (50, 99):
            row(f"{label}, p{p} (ms)", pct(get(shared), p), pct(get(base), p), "{:.2f}")
    row("TCP connections to Pilot Status", shared.connections, base.connections, "{:.0f}")
    row("  per 1,000 calls", shared.connections_per_1000, base.connections_per_1000)
    row("  (+ opened during warm-up)", shared.warmup_connections, base.warmup_connections, "{:.0f}")
    row("peak RSS (MiB)", shared.peak_rss_mib, base.peak_rss_mib)
    row("  growth during the run (MiB)", shared.rss_growth_mib, base.rss_growth_mib)
    row(
        "bot process CPU (% of one core)",
        share(shared.cpu_seconds, shared),
        share(base.cpu_seconds, base),
        "{:.0f}",
    )
    row(
        "  of which kernel (%)",
        share(shared.sys_seconds, shared),
        share(base.sys_seconds, base),
        "{:.0f}",
    )
    row("  CPU per call (ms)", shared.cpu_ms_per_call, base.cpu_ms_per_call, "{:.2f}")
    if shared.fakes_cpu_seconds is not None and base.fakes_cpu_seconds is not None:
        row(
            "fakes process CPU (% of one core)",
            share(shared.fakes_cpu_seconds, shared),
            share(base.fakes_cpu_seconds, base),
            "{:.0f}",
        )
    print()

    print("targets (from the issue; reported, not asserted):")
    p99 = pct(shared.bot_added, 99)
    where = "" if args.concurrency == 100 else f" (this run: {args.concurrency})"
    verdict(
        f"p99 bot-added latency <= {TARGET_P99_MS:g} ms at 100 concurrent{where}",
        f"{p99:.2f} ms",
        p99 <= TARGET_P99_MS,
        latency_reason(shared, args),
    )
    speedup = shared.throughput / base.throughput
    verdict(
        f">= {TARGET_SPEEDUP:g}x the baseline's calls started/s",
        f"{speedup:.2f}x",
        speedup >= TARGET_SPEEDUP,
        speedup_reason(shared, base),
    )
    per_1000 = shared.connections_per_1000
    verdict(
        f"<= {TARGET_CONNECTIONS_PER_1000:g} connections per 1,000 calls",
        f"{per_1000:.1f}",
        per_1000 <= TARGET_CONNECTIONS_PER_1000,
        connections_reason(shared, args.concurrency, settings),
    )


def verdict(target: str, value: str, ok: bool, reason: str | None) -> None:
    print(f"  {target}: {value} -> {'PASS' if ok else 'MISS'}")
    if not ok and reason:
        print(f"    likely reason: {reason}")


def latency_reason(result: Result, args: argparse.Namespace) -> str | None:
    if args.concurrency == 1:
        return None
    c, throughput = args.concurrency, result.throughput
    whose = "bot + fakes" if args.fakes == "inprocess" else "bot"
    reason = (
        f"queueing: with {c} calls in flight each spends {c} / {throughput:.0f} calls/s = "
        f"{1000 * c / throughput:.0f} ms in the system on average (Little's law); at "
        f"~{result.cpu_ms_per_call:.1f} ms of {whose} process CPU per call (all threads) it "
        f"manages ~{1000 / result.cpu_ms_per_call:.0f} calls/s on one core, and p99 <= "
        f"{TARGET_P99_MS:g} ms with {c} in flight would need >= {c / TARGET_P99_MS * 1000:,.0f} "
        "calls/s"
    )
    tail = pct(result.bot_added, 99) / pct(result.bot_added, 50)
    if tail > 10:
        reason += (
            f"; p99 is {tail:.0f}x p50, so some calls also wait on a shared lock or pool "
            "(not CPU alone)"
        )
    return reason


def speedup_reason(shared: Result, base: Result) -> str | None:
    def busy(result: Result) -> bool:
        return result.cpu_seconds / result.busy_seconds > 0.8

    if not (busy(shared) and busy(base)):
        return None
    return (
        f"both runs are bound by the bot process's CPU: {base.cpu_ms_per_call:.1f} vs "
        f"{shared.cpu_ms_per_call:.1f} ms per call caps the ratio near "
        f"{base.cpu_ms_per_call / shared.cpu_ms_per_call:.1f}x"
    )


def connections_reason(result: Result, concurrency: int, settings: Settings) -> str | None:
    limit = settings.pilot_status_max_connections
    if result.connections + result.warmup_connections > min(concurrency, limit):
        return None
    return (
        f"httpx opens a new connection whenever a request finds every open one busy (up to "
        f"pilot_status_max_connections={limit}) and keeps it alive: with {concurrency} calls in "
        f"flight, {result.connections + result.warmup_connections} were opened"
    )


# ------------------------------------------------------------------ main


async def bench(args: argparse.Namespace) -> None:
    fakes = FakesHandle(args.fakes)
    redis = OwnRedis() if args.redis else None
    await fakes.start()
    try:
        if redis is not None:
            await redis.ready()
        clock = await fakes.check_clock()
        settings = bench_settings(fakes.pilot_url, fakes.telegram_url, "<temp dir>")
        print_header(args, settings, clock)
        updates = Updates()
        results: list[Result] = []
        for name, pilot in VARIANTS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result = await run_variant(
                name,
                pilot,
                fakes,
                updates,
                calls=args.calls,
                concurrency=args.concurrency,
                warmup=args.warmup,
                database=args.database,
                redis_url=redis.url if redis else None,
            )
            results.append(result)
        print_report(results[0], results[1], args, settings)
    finally:
        await fakes.close()
        if redis is not None:
            await redis.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000, help="N /call updates per run")
    parser.add_argument("--concurrency", type=int, default=100, help="updates in flight at once")
    parser.add_argument("--warmup", type=int, default=5, help="excluded calls before each run")
    parser.add_argument("--fakes", choices=("subprocess", "inprocess"), default="subprocess")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--redis", action="store_true", help="REDIS_URL on (own redis-server)")
    args = parser.parse_args(argv)
    if args.calls < 2 or args.concurrency < 1 or args.warmup < 0:
        parser.error("need --calls >= 2, --concurrency >= 1, --warmup >= 0")
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
