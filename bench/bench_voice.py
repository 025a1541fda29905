"""Voice: `/call` → media connected, CPU per second of speech, RSS, and what aiortc costs.

Run from the repo root:  .venv/bin/python -m bench.bench_voice [--calls 20] [--concurrent 10]

The real CallbotApp (as `python -m bot` builds it; number type meta, STUN none, webhooks on) runs
in this process. Both fakes run in a second, spawned process: the fake Telegram, and the fake
Pilot Status with its aiortc stand-ins for Meta's media edge (`tests/fakes/meta_edge.py`), so the
edges' Opus decoding and RMS are never counted as the bot's CPU or memory. This process does not
import the fakes' modules either: its RSS is the bot's (plus this script and the standard library).
Each `/call` message is created in the fake Telegram (so the bot's reply finds it), then fed to the
bot with `dp.feed_raw_update` (long polling's getUpdates round trip is not included).

1. `/call` → media connected: N sequential Meta calls (each ends before the next starts), from
   just before the update is fed to the edge's peer connection reaching "connected" (stamped in
   the fakes' process; perf_counter is CLOCK_MONOTONIC, checked at start). The answer comes by
   Meta's `calls` webhook, then (a second series) only by polling `GET /v1/calls/{id}?includeSdp=1`.
   The first Meta call of the process (lazy aiortc import) is shown apart. Baseline in the same
   run: a web-number `/call` (no media), from feed to the handler's reply sent.
2. CPU per second of speech: this process's CPU (all threads) while S Meta calls speak a known
   message at once, per second of speech sent; the fakes' process the same. Baseline: S plain
   aiortc peer connections (no bot) sending a tone to the same edges for as long. Then espeak-ng:
   child CPU per second of audio synthesized, and the cache's second synthesis of the same text.
3. Memory (VmRSS / VmHWM of this process): after start with no Meta call (aiortc not imported),
   after the first Meta call ended, peak during C concurrent Meta calls, and after they ended
   (open sessions, tasks, threads and live RTCPeerConnection objects before/after), then after a
   second round of C calls (growth between rounds is the leak check; the first round also grows
   the allocator's pools).
4. Import cost, in fresh subprocesses: `import bot.app` + building CallbotApp, vs the same plus
   `import bot.voice.webrtc` (what a bot that never places a Meta call saves).
No figure is asserted; the script fails only when a call does not go as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bot.app import CallbotApp
from bot.config import Settings, load_settings
from bot.voice.speech import Speaker, Speech

TOKEN = "123456:" + "A" * 35
API_KEY = "ps_" + "a" * 48
OPERATOR = 111
HOOK = "voice-bench-" + "v" * 20
SECRET = "voice-bench-secret"
ROOT = Path(__file__).resolve().parent.parent

# What the calls say (espeak-ng, en-us, 150 words per minute; lengths are printed).
SHORT = "disk full"  # part 1
MEDIUM = "the primary database is down, please check the alerts channel"  # parts 2 and 3
SYNTH = (  # espeak-ng cost: about fifteen seconds of audio
    "this is an automated call from the monitoring system. the primary database stopped "
    "answering at ten past nine, and the replicas are lagging. please check the alerts channel, "
    "acknowledge the incident, and call the person on call for storage if it is not fixed soon."
)
SYNTH_PT = (
    "esta é uma chamada automática do sistema de monitoramento. o banco de dados principal parou "
    "de responder às nove e dez, e as réplicas estão atrasadas. por favor, verifique o canal de "
    "alertas e confirme o incidente."
)


# ------------------------------------------------------------------ the fakes' process


class VoicePeer:
    """The world outside the bot, in another process: the fake Telegram and the fake Pilot
    Status with its Meta edges. Same pattern as bench.bench_webhooks.Peer (not imported: its
    module imports the fakes, whose libraries would then count in this process's RSS)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_peer_main, args=(child,), daemon=True)
        self._process.start()
        child.close()

    async def ask(self, *command: Any) -> Any:
        self._conn.send(command)
        answer = await asyncio.to_thread(self._conn.recv)
        if isinstance(answer, _PeerError):
            raise SystemExit(f"FAIL: the fakes' process: {answer.text}")
        return answer

    async def close(self) -> None:
        with suppress(Exception):
            await self.ask("stop")
        await asyncio.to_thread(self._process.join, 10)


@dataclass(frozen=True)
class _PeerError:
    text: str


def _peer_main(conn: Connection) -> None:
    asyncio.run(_peer(conn))


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: `5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def _peer(conn: Connection) -> None:
    from tests.fakes.meta_edge import MetaEdge
    from tests.fakes.pilot_status import FakePilotStatus, MediaScenario
    from tests.fakes.telegram import FakeTelegram

    class StampingPilot(FakePilotStatus):
        """Notes when each call's edge reaches "connected" (ICE + DTLS up)."""

        def __init__(self) -> None:
            super().__init__(api_key=API_KEY, number_type="meta")
            self.connected_at: dict[str, float] = {}

        def _begin_media(self, call: dict[str, Any], sdp: str, scenario: Any) -> None:
            super()._begin_media(call, sdp, scenario)
            call_id, edge = call["id"], self.edges[call["id"]]

            def stamp() -> None:
                if edge.pc.connectionState == "connected":
                    self.connected_at.setdefault(call_id, time.perf_counter())

            edge.pc.on("connectionstatechange", stamp)

    telegram, pilot = FakeTelegram(TOKEN), StampingPilot()
    await telegram.start()
    await pilot.start()
    spare: list[MetaEdge] = []  # edges answering the plain-aiortc baseline

    async def run(command: str, *args: Any) -> Any:
        if command == "urls":
            return telegram.url, pilot.url
        if command == "clock":
            return time.perf_counter()
        if command == "setup":  # number type, MediaScenario fields (or None), webhook target
            number_type, media, webhook = args
            pilot.number_type = number_type
            pilot.media = MediaScenario(**media) if media is not None else None
            pilot.webhooks_to(*(webhook or (None, None)))
            return None
        if command == "command":  # a /call message from the operator, to be fed to the bot
            text, phone = args
            pilot.set_permission(phone, "temporary")
            update_id, _ = telegram.send_command(text, user_id=OPERATOR)
            return telegram._all_updates[update_id]
        if command == "calls":
            posted = {
                str(r.json["to"]).lstrip("+"): r.received_at
                for r in pilot.requests
                if r.operation == "start_call" and isinstance(r.json, dict)
            }
            polls: dict[str, int] = {}
            for r in pilot.requests:
                if r.operation == "get_call" and r.query.get("includeSdp") == "1":
                    ref = r.path.rstrip("/").rsplit("/", 1)[-1]
                    polls[ref] = polls.get(ref, 0) + 1
            calls = {}
            for call_id, call in pilot.calls.items():
                edge = pilot.edges.get(call_id)
                calls[call["peerNumber"]] = {
                    "status": call["status"],
                    "sdp_polls": polls.get(call_id, 0),
                    "posted_at": posted.get(call["peerNumber"]),
                    "connected_at": pilot.connected_at.get(call_id),
                    "heard": edge.seconds_of_sound() if edge is not None else None,
                    "edge_error": edge.error if edge is not None else None,
                }
            return calls
        if command == "usage":
            return time.process_time(), _status_kib("VmRSS"), _status_kib("VmHWM")
        if command == "reset_peak":
            return _reset_peak()
        if command == "edge":  # answer a plain aiortc offer with a Meta edge
            edge = MetaEdge()
            spare.append(edge)
            return await edge.answer(args[0])
        if command == "close_edges":
            heard = [edge.seconds_of_sound() for edge in spare]
            await asyncio.gather(*(edge.close() for edge in spare))
            spare.clear()
            return heard
        if command == "problems":
            return list(pilot.contract_violations) + list(pilot.background_errors)
        raise ValueError(f"unknown command {command!r}")

    try:
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "stop":
                conn.send(None)
                return
            try:
                conn.send(await run(command, *args))
            except Exception as err:
                conn.send(_PeerError(f"{command}: {type(err).__name__}: {err}"))
    finally:
        await asyncio.gather(*(edge.close() for edge in spare))
        await pilot.close()
        await telegram.close()


# ------------------------------------------------------------------ the bot side


def bench_settings(urls: tuple[str, str], data_dir: str, number_type: str, cap: int) -> Settings:
    telegram_url, pilot_url = urls
    return load_settings(
        _env_file=None,
        bot_token=TOKEN,
        telegram_api_url=telegram_url,
        pilot_status_api_key=API_KEY,
        pilot_status_base_url=pilot_url,
        pilot_status_number_type=number_type,  # configured: no probe
        operator_ids=str(OPERATOR),
        data_dir=data_dir,
        pilot_status_webhook_token=HOOK,  # statuses by webhook: no status polling
        pilot_status_webhook_secret=SECRET,
        web_host="127.0.0.1",
        web_port=0,
        stun_servers="none",  # loopback: host candidates only
        speech_repeat=1,
        media_max_calls=cap,
        telegram_edit_interval=0,  # the bot's pacing of edits is a Telegram limit, not work
    )


def hook_url(app: CallbotApp) -> str:
    return f"http://127.0.0.1:{app.web_port}/pilot-status/{HOOK}"


class Phones:
    """A different valid Brazilian mobile per call, so the fakes' records match by number."""

    def __init__(self) -> None:
        self._next = 1

    def __call__(self) -> str:
        self._next += 1
        return f"+55119{self._next:08d}"


def voice_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("voice ")]


async def settled(app: CallbotApp, timeout: float = 90.0) -> None:  # noqa: ASYNC109
    """Every voice task done and every media session closed, then the edits sent."""
    deadline = time.perf_counter() + timeout
    while voice_tasks() or app.voice.open_sessions:
        if time.perf_counter() > deadline:
            raise SystemExit(
                f"FAIL: voice still busy after {timeout:.0f} s: {len(voice_tasks())} tasks, "
                f"{app.voice.open_sessions} sessions"
            )
        await asyncio.sleep(0.02)
    await asyncio.wait_for(app.live.wait_idle(), 30)


@dataclass
class Fed:
    phone: str
    fed_at: float = math.nan  # perf_counter just before dp.feed_raw_update
    handled_at: float = math.nan  # when the handler returned (the reply was sent)


async def feed_calls(
    app: CallbotApp, peer: VoicePeer, phones: list[str], say: str | None
) -> list[Fed]:
    """Create one /call per phone in the fake Telegram, then feed them all at once."""
    updates = []
    for phone in phones:
        text = f"/call {phone}" + (f" say: {say}" if say is not None else "")
        updates.append(await peer.ask("command", text, phone))
    fed = [Fed(phone) for phone in phones]

    async def one(record: Fed, update: dict[str, Any]) -> None:
        record.fed_at = time.perf_counter()
        await app.dp.feed_raw_update(app.bot, update)
        record.handled_at = time.perf_counter()

    await asyncio.gather(*(one(r, u) for r, u in zip(fed, updates, strict=True)))
    return fed


async def checked(peer: VoicePeer, fed: list[Fed], *, media: bool) -> dict[str, dict[str, Any]]:
    """The fakes' record of each fed call; fails loudly unless each was placed (and, with media,
    connected, spoken and hung up)."""
    calls: dict[str, dict[str, Any]] = await peer.ask("calls")
    for record in fed:
        call = calls.get(record.phone.lstrip("+"))
        if call is None:
            raise SystemExit(f"FAIL: no POST /v1/calls for {record.phone}")
        if media and (
            call["connected_at"] is None or not call["heard"] or call["status"] != "COMPLETED"
        ):
            raise SystemExit(f"FAIL: the Meta call to {record.phone} went wrong: {call}")
    problems = await peer.ask("problems")
    if problems:
        raise SystemExit(f"FAIL: the fakes report: {problems[:3]}")
    return calls


@dataclass
class PlayLog:
    """When each AiortcSession.play ran (perf_counter and this process's CPU time)."""

    spans: list[tuple[float, float, float, float]] = field(default_factory=list)

    def window(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) from the first play's start to the last one's end."""
        first = min(self.spans, key=lambda s: s[0])
        last = max(self.spans, key=lambda s: s[2])
        return last[2] - first[0], last[3] - first[1]

    def all_at_once(self) -> float:
        """Seconds during which every play was running."""
        return max(0.0, min(s[2] for s in self.spans) - max(s[0] for s in self.spans))


@contextmanager
def logged_plays() -> Iterator[PlayLog]:
    """Wrap the loaded bot.voice.webrtc.AiortcSession.play (in this process only)."""
    cls = sys.modules["bot.voice.webrtc"].AiortcSession
    original = cls.play
    log = PlayLog()

    async def play(self: Any, audio: Any) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            await original(self, audio)
        finally:
            log.spans.append((start, cpu, time.perf_counter(), time.process_time()))

    cls.play = play
    try:
        yield log
    finally:
        cls.play = original


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 20 values is their maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def mib(kib: float) -> float:
    return kib / 1024


def rtc_peer_connections() -> int:
    module = sys.modules.get("aiortc")
    if module is None:
        return 0
    return sum(1 for o in gc.get_objects() if isinstance(o, module.RTCPeerConnection))


def media_tasks() -> int:
    """Tasks of the voice side, aiortc or aioice (the app's other long-lived tasks, such as the
    on-call timer and the web server's keep-alive connections, come and go on their own)."""
    count = 0
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        where = code.co_filename if code is not None else ""
        if task.get_name().startswith("voice ") or any(
            part in where for part in ("/aiortc/", "/aioice/", "/bot/voice/")
        ):
            count += 1
    return count


@dataclass
class Memory:
    rss_kib: int
    tasks: int
    media_tasks: int
    threads: int  # besides the default executor's
    executor: int  # workers of the loop's default executor (asyncio_N; it grows lazily)
    sessions: int
    peer_connections: int
    aiortc: bool
    av: bool


async def memory_now(app: CallbotApp) -> Memory:
    await asyncio.sleep(0.05)
    gc.collect()
    return Memory(
        rss_kib=_status_kib("VmRSS"),
        tasks=len(asyncio.all_tasks()),
        media_tasks=media_tasks(),
        threads=sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_")),
        executor=sum(1 for t in threading.enumerate() if t.name.startswith("asyncio_")),
        sessions=app.voice.open_sessions,
        peer_connections=rtc_peer_connections(),
        aiortc="aiortc" in sys.modules,
        av="av" in sys.modules,
    )


# ------------------------------------------------------------------ 1. /call -> media connected


@dataclass
class Series:
    name: str
    to_connected: list[float] = field(default_factory=list)  # ms
    to_post: list[float] = field(default_factory=list)  # ms: fed -> POST received by the fake
    post_to_connected: list[float] = field(default_factory=list)  # ms
    to_reply: list[float] = field(default_factory=list)  # ms: fed -> handler returned
    cpu_ms: list[float] = field(default_factory=list)  # this process, per whole call
    sdp_polls: list[int] = field(default_factory=list)  # GET /v1/calls/{id}?includeSdp=1


async def sequential(
    app: CallbotApp,
    peer: VoicePeer,
    phones: Phones,
    count: int,
    say: str | None,
    after_each: Callable[[int], Awaitable[None]] | None = None,
) -> list[tuple[Fed, dict[str, Any], float]]:
    """`count` calls, one at a time; each ends (voice settled) before the next is fed."""
    done: list[tuple[Fed, float]] = []
    for i in range(count):
        cpu = time.process_time()
        (record,) = await feed_calls(app, peer, [phones()], say)
        await settled(app)
        done.append((record, (time.process_time() - cpu) * 1000))
        if after_each is not None:
            await after_each(i)
    calls = await checked(peer, [r for r, _ in done], media=say is not None)
    return [(r, calls[r.phone.lstrip("+")], cpu) for r, cpu in done]


def add(series: Series, results: list[tuple[Fed, dict[str, Any], float]]) -> Series:
    for record, call, cpu in results:
        series.to_reply.append((record.handled_at - record.fed_at) * 1000)
        series.to_post.append((call["posted_at"] - record.fed_at) * 1000)
        series.cpu_ms.append(cpu)
        series.sdp_polls.append(call["sdp_polls"])
        if call["connected_at"] is not None:
            series.to_connected.append((call["connected_at"] - record.fed_at) * 1000)
            series.post_to_connected.append((call["connected_at"] - call["posted_at"]) * 1000)
    return series


# ------------------------------------------------------------------ 2. CPU per second of speech


async def plain_aiortc(peer: VoicePeer, count: int, seconds: float) -> dict[str, float]:
    """Baseline: `count` plain aiortc peer connections (no bot) sending a tone to Meta edges in
    the fakes' process, for `seconds` once all are connected; the far end's audio is decoded and
    dropped (MediaBlackhole), as the bot does."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
    from aiortc.contrib.media import MediaBlackhole

    from tests.fakes.meta_edge import ToneTrack

    pcs: list[Any] = []
    sinks: list[Any] = []
    connected: list[asyncio.Event] = []
    try:
        for _ in range(count):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            sink, up = MediaBlackhole(), asyncio.Event()
            pcs.append(pc)
            sinks.append(sink)
            connected.append(up)
            pc.on("track", sink.addTrack)

            def on_state(pc: Any = pc, up: asyncio.Event = up) -> None:
                if pc.connectionState == "connected":
                    up.set()

            pc.on("connectionstatechange", on_state)
            transceiver = pc.addTransceiver(ToneTrack(440.0, 0.3), direction="sendrecv")
            opus = [
                c
                for c in RTCRtpSender.getCapabilities("audio").codecs
                if c.mimeType.lower() == "audio/opus"
            ]
            transceiver.setCodecPreferences(opus)
            await pc.setLocalDescription(await pc.createOffer())
            answer = await peer.ask("edge", pc.localDescription.sdp)
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in connected)), 20)
        for sink in sinks:
            await sink.start()
        cpu, (peer_cpu, _, _) = time.process_time(), await peer.ask("usage")
        await asyncio.sleep(seconds)
        cpu, (peer_cpu2, _, _) = time.process_time() - cpu, await peer.ask("usage")
    finally:
        for sink in sinks:
            with suppress(Exception):
                await sink.stop()
        for pc in pcs:
            await pc.close()
    heard = await peer.ask("close_edges")
    if min(heard) < 0.8 * seconds:
        raise SystemExit(f"FAIL: the baseline's edges heard {heard} s of {seconds:.1f} s")
    return {"bot": cpu, "peer": peer_cpu2 - peer_cpu, "heard": sum(heard)}


async def espeak_cost() -> list[tuple[str, float, float, float, float, float]]:
    """Per text: (voice, audio s, wall s, child CPU s, this process CPU s, cached wall s)."""
    rows = []
    for text, voice in ((SYNTH, "en-us"), (SYNTH_PT, "pt-br")):
        speaker = Speaker()  # the bot's, with an empty cache
        before, cpu, wall = (
            resource.getrusage(resource.RUSAGE_CHILDREN),
            time.process_time(),
            time.perf_counter(),
        )
        audio = await speaker.speak(Speech(text, voice))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        again = time.perf_counter()
        await speaker.speak(Speech(text, voice))
        again = time.perf_counter() - again
        if speaker.syntheses != 1:
            raise SystemExit(f"FAIL: the second synthesis ran the engine ({speaker.syntheses})")
        rows.append((voice, audio.seconds, wall, child, cpu, again))
    return rows


def resample_cost(audio: Any) -> float:
    """CPU seconds to resample `audio` to 48 kHz (done on every play: MessageTrack.queue)."""
    cpu = time.process_time()
    for _ in range(5):
        audio.resampled(48_000)
    return (time.process_time() - cpu) / 5


# ------------------------------------------------------------------ 4. import cost (subprocess)

_CHILD = r"""
import json, sys, time
from pathlib import Path

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

r0, t0 = rss(), time.perf_counter()
import asyncio

async def main():
    import tempfile
    import bot.app
    from bot.config import load_settings
    r1, t1 = rss(), time.perf_counter()
    app = bot.app.CallbotApp(load_settings(
        _env_file=None, bot_token="123456:" + "A" * 35, telegram_api_url="http://127.0.0.1:9",
        pilot_status_api_key="ps_" + "a" * 48, pilot_status_base_url="http://127.0.0.1:9",
        pilot_status_number_type="meta", operator_ids="1", data_dir=tempfile.mkdtemp(),
        stun_servers="none",
    ))
    r2, t2 = rss(), time.perf_counter()
    out = {"import_ms": (t1 - t0) * 1000, "build_ms": (t2 - t1) * 1000,
           "import_kib": r1 - r0, "build_kib": r2 - r1, "total_ms": (t2 - t0) * 1000,
           "total_kib": r2 - r0, "aiortc": "aiortc" in sys.modules, "av": "av" in sys.modules}
    if sys.argv[1] == "webrtc":
        import bot.voice.webrtc
        r3, t3 = rss(), time.perf_counter()
        out |= {"webrtc_ms": (t3 - t2) * 1000, "webrtc_kib": r3 - r2,
                "total_ms": (t3 - t0) * 1000, "total_kib": r3 - r0}
    await app.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def import_cost(runs: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, Any]]] = {"bot": [], "webrtc": []}
    for _ in range(runs):
        for variant in samples:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, variant],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"FAIL: import-cost child ({variant}): {done.stderr[-2000:]}")
            samples[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        variant: {key: statistics.median(float(s[key]) for s in rows) for key in rows[0]}
        for variant, rows in samples.items()
    }


# ------------------------------------------------------------------ the run


def espeak_version() -> str:
    done = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.split("  Data")[0].strip() or "espeak-ng: not found"


def code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("bot/**/*.py"), *ROOT.glob("handlers/**/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


async def check_clock(peer: VoicePeer) -> str:
    worst = 0.0
    for _ in range(5):
        before = time.perf_counter()
        theirs = await peer.ask("clock")
        after = time.perf_counter()
        if not before <= theirs <= after:
            raise SystemExit("FAIL: the fakes' perf_counter is not comparable with ours")
        worst = max(worst, after - before)
    return f"the fakes' stamp falls inside our round trip 5/5 times (<= {worst * 1000:.2f} ms)"


def progress(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def ms_row(label: str, values: list[float], width: int = 58) -> str:
    if not values:
        return f"  {label:<{width}} n/a"
    if len(values) == 1:
        return f"  {label:<{width}} {len(values):>3} {values[0]:>9.1f}"
    return (
        f"  {label:<{width}} {len(values):>3} {statistics.median(values):>9.1f} "
        f"{pct(values, 0.99):>9.1f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="sequential calls per series (1)")
    parser.add_argument("--concurrent", type=int, default=10, help="calls at once (3)")
    parser.add_argument("--speech-calls", type=int, default=5, help="calls at once (2)")
    parser.add_argument("--import-runs", type=int, default=3, help="subprocesses per variant (4)")
    args = parser.parse_args()
    if args.calls < 2:
        parser.error("--calls must be at least 2")
    out: list[str] = []
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("aiortc", "av", "aioice", "aiogram")
    )
    out += [
        "callbot voice bench",
        f"  Python {platform.python_version()} ({platform.python_implementation()}), {versions}",
        f"  {espeak_version()}",
        f"  machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}",
        f"  code: sha256 of bot/ + handlers/ sources = {code_hash()}",
        "  bot: CallbotApp in this process, app defaults + number type meta, STUN_SERVERS=none,",
        f"       SPEECH_REPEAT=1, MEDIA_MAX_CALLS={max(10, args.concurrent, args.speech_calls)},"
        " webhooks on (statuses by webhook), TELEGRAM_EDIT_INTERVAL=0;",
        "       updates fed with dp.feed_raw_update (long polling not included)",
        "  fakes: Telegram + Pilot Status with its aiortc Meta edges, in a second process",
    ]

    progress("import cost (subprocesses)")
    imports = import_cost(args.import_runs)

    peer = VoicePeer()
    urls = await peer.ask("urls")
    out.append(f"  clock: perf_counter = CLOCK_MONOTONIC; {await check_clock(peer)}")
    phones = Phones()
    cap = max(10, args.concurrent, args.speech_calls)
    memory: dict[str, Memory] = {}
    webhook_answer = {"answer_via": "webhook"}

    with tempfile.TemporaryDirectory(prefix="callbot-voice-") as data_dir:
        app = CallbotApp(bench_settings(urls, data_dir, "meta", cap))
        await app.start()
        try:
            await peer.ask("setup", "meta", webhook_answer, (hook_url(app), SECRET))
            memory["a"] = await memory_now(app)
            lengths = {
                name: (await app.speaker.speak(Speech(text, "en-us"))).seconds
                for name, text in (("short", SHORT), ("medium", MEDIUM))
            }
            # the first synthesis of SHORT is done above: the first call pays the import only

            # 1. /call -> media connected
            progress(f"1. {args.calls} sequential Meta calls, answer by webhook")

            async def after_first(i: int) -> None:
                if i == 0:
                    memory["b"] = await memory_now(app)

            hooked = add(
                Series("webhook"),
                await sequential(app, peer, phones, args.calls, SHORT, after_first),
            )
            progress(f"1. {args.calls} sequential Meta calls, answer by polling")
            await peer.ask("setup", "meta", {"answer_via": "poll"}, (hook_url(app), SECRET))
            polled = add(Series("poll"), await sequential(app, peer, phones, args.calls, SHORT))
            await peer.ask("setup", "meta", webhook_answer, (hook_url(app), SECRET))

            # 3. memory with C concurrent calls (before part 2's baseline imports the fakes'
            # ToneTrack into this process)
            progress(f"3. {args.concurrent} concurrent Meta calls")
            memory["c0"] = await memory_now(app)
            peak_reset = _reset_peak()
            await peer.ask("reset_peak")
            _, peer_rss0, _ = await peer.ask("usage")
            sampled, most_sessions, stop = [_status_kib("VmRSS")], [0], asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    sampled.append(_status_kib("VmRSS"))
                    most_sessions[0] = max(most_sessions[0], app.voice.open_sessions)
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.005)

            sampler = asyncio.create_task(sample())
            with logged_plays() as plays:
                fed = await feed_calls(
                    app, peer, [phones() for _ in range(args.concurrent)], MEDIUM
                )
                await settled(app)
            stop.set()
            await sampler
            peak_kib = _status_kib("VmHWM") if peak_reset else max(sampled)
            _, _, peer_peak = await peer.ask("usage")
            calls = await checked(peer, fed, media=True)
            crowd = Series("crowd")
            for record in fed:
                call = calls[record.phone.lstrip("+")]
                crowd.to_connected.append((call["connected_at"] - record.fed_at) * 1000)
            crowd_overlap, crowd_plays = plays.all_at_once(), len(plays.spans)
            memory["d"] = await memory_now(app)
            progress(f"3. {args.concurrent} concurrent Meta calls, second round")
            fed = await feed_calls(app, peer, [phones() for _ in range(args.concurrent)], MEDIUM)
            await settled(app)
            await checked(peer, fed, media=True)
            memory["d2"] = await memory_now(app)

            # 2. CPU per second of speech
            progress(f"2. {args.speech_calls} Meta calls speaking at once, then the baseline")
            cpu0, (peer_cpu0, _, _), wall0 = (
                time.process_time(),
                await peer.ask("usage"),
                time.perf_counter(),
            )
            with logged_plays() as plays:
                fed = await feed_calls(
                    app, peer, [phones() for _ in range(args.speech_calls)], MEDIUM
                )
                await settled(app)
            cpu_run = time.process_time() - cpu0
            wall_run = time.perf_counter() - wall0
            peer_cpu_run = (await peer.ask("usage"))[0] - peer_cpu0
            calls = await checked(peer, fed, media=True)
            speech_s = args.speech_calls * lengths["medium"]
            heard = sum(calls[r.phone.lstrip("+")]["heard"] for r in fed)
            play_wall, play_cpu = plays.window()
            speech_overlap = plays.all_at_once()
            base = await plain_aiortc(peer, args.speech_calls, lengths["medium"])
            medium_audio = await app.speaker.speak(Speech(MEDIUM, "en-us"))
            resample_s = resample_cost(medium_audio)
            progress("2. espeak-ng")
            synth = await espeak_cost()
        finally:
            await app.close()

    # baseline of part 1: a web number, no media
    progress(f"1. {args.calls} web-number calls (baseline)")
    with tempfile.TemporaryDirectory(prefix="callbot-voice-") as data_dir:
        await peer.ask("setup", "web", None, None)
        web_app = CallbotApp(bench_settings(urls, data_dir, "web", cap))
        await web_app.start()
        try:
            web = add(Series("web"), await sequential(web_app, peer, phones, args.calls, None))
        finally:
            await web_app.close()
    await peer.close()

    # ---------------------------------------------------------------- figures
    n = args.calls
    out += [
        "",
        f"1. /call -> media connected: {n} sequential Meta calls per series, each saying "
        f'"{SHORT}" ({lengths["short"]:.2f} s) once',
        f"  {'(ms; fed = just before dp.feed_raw_update)':<58} {'n':>3} {'p50':>9} {'p99':>9}",
    ]
    out += [
        ms_row("answer by webhook: first call (imports aiortc)", hooked.to_connected[:1]),
        ms_row("  of which fed -> POST /v1/calls received", hooked.to_post[:1]),
        ms_row(f"answer by webhook: calls 2..{n}", hooked.to_connected[1:]),
        ms_row("  of which fed -> POST /v1/calls received", hooked.to_post[1:]),
        ms_row("  of which POST received -> connected", hooked.post_to_connected[1:]),
        ms_row("  (fed -> handler returned, reply sent)", hooked.to_reply[1:]),
        ms_row("answer by polling (GET includeSdp, every 1 s)", polled.to_connected),
        ms_row("  of which fed -> POST /v1/calls received", polled.to_post),
        f"    answer found by the first GET in {polled.sdp_polls.count(1)}/{n} calls "
        f"(GETs per call: max {max(polled.sdp_polls)})",
        ms_row("baseline: web number, fed -> reply sent (no media)", web.to_reply),
        ms_row("  of which fed -> POST /v1/calls received", web.to_post),
    ]
    w50, w99 = statistics.median(web.to_reply), pct(web.to_reply, 0.99)
    m50, m99 = statistics.median(hooked.to_connected[1:]), pct(hooked.to_connected[1:], 0.99)
    p50, p99 = statistics.median(polled.to_connected), pct(polled.to_connected, 0.99)
    out += [
        f"  Meta (webhook answer) / web:  p50 {m50 / w50:.2f}x, p99 {m99 / w99:.2f}x;  "
        f"first Meta call / web p50: {hooked.to_connected[0] / w50:.2f}x",
        f"  Meta (polled answer) / web:   p50 {p50 / w50:.2f}x, p99 {p99 / w99:.2f}x",
        f"  bot CPU per whole call (ms, p50): Meta {statistics.median(hooked.cpu_ms[1:]):.1f} "
        f"(incl. {lengths['short']:.2f} s of speech, hang-up, edits), web "
        f"{statistics.median(web.cpu_ms):.1f};  first Meta call {hooked.cpu_ms[0]:.1f}",
    ]

    s = args.speech_calls
    base_label = f"baseline: plain aiortc -> same edges, {s} x {lengths['medium']:.2f} s tone"
    out += [
        "",
        f'2. CPU per second of speech: {s} Meta calls at once, each saying "{MEDIUM[:28]}..." '
        f"({lengths['medium']:.2f} s) once = {speech_s:.1f} s of speech sent; the edges "
        f"heard {heard:.1f} s of sound (20 ms windows of RMS > 300: pauses are silence)",
        f"  {'(CPU seconds per second of speech; all threads)':<58} {'bot':>9} {'fakes':>9}",
        f"  {'whole calls, feed -> all ended (' + f'{wall_run:.1f} s wall)':<58} "
        f"{cpu_run / speech_s:>9.3f} {peer_cpu_run / speech_s:>9.3f}",
        f"  {'while playing, first play -> last play (' + f'{play_wall:.1f} s wall)':<58} "
        f"{play_cpu / speech_s:>9.3f}",
        f"  {base_label:<58} {base['bot'] / speech_s:>9.3f} {base['peer'] / speech_s:>9.3f}",
        f"  bot while playing / plain aiortc: {play_cpu / base['bot']:.2f}x;  "
        f"all {s} were playing at once for {speech_overlap:.2f} s of {lengths['medium']:.2f} s",
        f"  as a share of one core: {s} calls playing = {play_cpu / play_wall * 100:.0f} %, "
        f"i.e. ~{play_cpu / play_wall / s * 100:.1f} % per call",
        f"  resampling the message to 48 kHz (every play, MessageTrack.queue): "
        f"{resample_s / lengths['medium'] * 1000:.2f} ms CPU per second of audio",
        "  espeak-ng (a child process; the bot's Speaker, empty cache):",
    ]
    for voice, seconds, wall, child, cpu, again in synth:
        out.append(
            f"    {voice:<6} {seconds:5.1f} s of audio: {wall * 1000:6.0f} ms wall, child CPU "
            f"{child / seconds:.3f} s per s of audio, parent {cpu * 1000:.1f} ms; "
            f"cached 2nd time: {again * 1e6:.0f} us"
        )

    a, b, c0, d, d2 = (memory[k] for k in ("a", "b", "c0", "d", "d2"))
    c = args.concurrent
    out += [
        "",
        "3. Memory of this process (the bot; the edges live in the fakes' process)",
        f"  (a) after start, no Meta call ever:      RSS {mib(a.rss_kib):6.1f} MiB;  "
        f"'aiortc' in sys.modules: {a.aiortc}, 'av': {a.av}",
        f"  (b) after the first Meta call ended:     RSS {mib(b.rss_kib):6.1f} MiB "
        f"(+{mib(b.rss_kib - a.rss_kib):.1f});  aiortc: {b.aiortc}, av: {b.av}; "
        f"sessions {b.sessions}",
        f"      after {2 * n} sequential Meta calls:      RSS {mib(c0.rss_kib):6.1f} MiB "
        f"(+{mib(c0.rss_kib - b.rss_kib):.1f} since (b))",
        f"  (c) peak during {c} concurrent calls:     RSS {mib(peak_kib):6.1f} MiB "
        f"(+{mib(peak_kib - c0.rss_kib):.1f}, {mib(peak_kib - c0.rss_kib) / c:.1f} per call); "
        f"peak sessions {most_sessions[0]}, {crowd_plays} plays, all {c} playing at once for "
        f"{crowd_overlap:.2f} s",
        f"      /call -> connected with {c} fed at once: p50 "
        f"{statistics.median(crowd.to_connected):.0f} ms, max {max(crowd.to_connected):.0f} ms",
        f"      the fakes' process (edges): peak {mib(peer_peak):.1f} MiB "
        f"(+{mib(peer_peak - peer_rss0):.1f} during the calls)",
        f"  (d) after they ended:                    RSS {mib(d.rss_kib):6.1f} MiB "
        f"({mib(d.rss_kib - c0.rss_kib):+.1f} vs before them)",
        f"      before -> after: open sessions {c0.sessions} -> {d.sessions}, voice/aiortc/aioice "
        f"tasks {c0.media_tasks} -> {d.media_tasks}, all asyncio tasks {c0.tasks} -> {d.tasks}, "
        f"threads {c0.threads} -> {d.threads} (+ default executor {c0.executor} -> "
        f"{d.executor}), live RTCPeerConnection objects {c0.peer_connections} -> "
        f"{d.peer_connections}",
        f"      after a second round of {c}: RSS {mib(d2.rss_kib):6.1f} MiB "
        f"({mib(d2.rss_kib - d.rss_kib):+.1f} vs after the first); sessions {d2.sessions}, "
        f"voice/aiortc/aioice tasks {d2.media_tasks}, all tasks {d2.tasks}, RTCPeerConnection "
        f"objects {d2.peer_connections}",
        f"      (at (a): {a.tasks} asyncio tasks, {a.threads} threads + {a.executor} executor)",
    ]
    if not peak_reset:
        out.append("      (peak: VmRSS sampled every 5 ms; /proc/self/clear_refs was refused)")

    bot_i, rtc_i = imports["bot"], imports["webrtc"]
    out += [
        "",
        f"4. Import cost in a fresh interpreter (median of {args.import_runs} subprocesses each)",
        f"  import bot.app + build CallbotApp:        {bot_i['total_ms']:6.0f} ms, "
        f"+{mib(bot_i['total_kib']):5.1f} MiB RSS  (import {bot_i['import_ms']:.0f} ms / "
        f"+{mib(bot_i['import_kib']):.1f} MiB, build {bot_i['build_ms']:.0f} ms / "
        f"+{mib(bot_i['build_kib']):.1f} MiB); aiortc loaded: {bool(bot_i['aiortc'])}, "
        f"av: {bool(bot_i['av'])}",
        f"  the same + import bot.voice.webrtc:       {rtc_i['total_ms']:6.0f} ms, "
        f"+{mib(rtc_i['total_kib']):5.1f} MiB RSS  (the webrtc import alone: "
        f"{rtc_i['webrtc_ms']:.0f} ms, +{mib(rtc_i['webrtc_kib']):.1f} MiB)",
        f"  what the webrtc import adds to the bot's own import + build: time "
        f"+{rtc_i['webrtc_ms'] / bot_i['total_ms'] * 100:.0f} %, RSS "
        f"+{rtc_i['webrtc_kib'] / bot_i['total_kib'] * 100:.0f} %",
    ]
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
