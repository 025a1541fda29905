"""A second, independent stand-in for Meta's media edge: GStreamer's webrtcbin (libnice ICE,
OpenSSL DTLS with an RSA certificate, libsrtp) in its own process.

`GstEdge` (used by the fake Pilot Status, `MediaScenario(edge="gstreamer")`) has the interface
of `tests.fakes.meta_edge.MetaEdge`; it runs this file as a script under the system Python
(`/usr/bin/python3`, which has Debian's `python3-gi`; the project's venv does not) and talks to
it in JSON lines:

- parent → child (stdin): `{"offer": sdp}`, then `{"stop": true}` (or EOF);
- child → parent (stdout): `{"answer": sdp}`, `{"state": name}` (webrtcbin's connection
  state: "connected", "failed", ...), `{"rms": [...]}` (one RMS value per 20 ms window of
  what it hears, in batches), `{"error": text}`, and last `{"done": true}`.
- GStreamer's own errors (e.g. DTLS's "no shared cipher") go to stderr, kept in `GstEdge.log`.

It answers the business's offer as Meta does (meta-webrtc.md §1.2): `a=setup:passive` (the
edge is the DTLS server), sha-256 fingerprint only, Opus on the offer's payload type, every
candidate in the answer (no trickle). Unlike Meta's ICE-lite edge, libnice is a full ICE
agent, and the answer says so. It sends a quiet 880 Hz tone (peak 0.01 of full scale) back.

Install: `sh scripts/install-test-peers.sh`. `gstreamer_missing()` says what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"
RATE = 48000
WINDOW = 960  # samples per 20 ms at 48 kHz
ELEMENTS = ("webrtcbin", "nicesrc", "dtlssrtpenc", "opusenc", "opusdec", "rtpopuspay")


def gstreamer_missing() -> str | None:
    """None when the system Python can run this edge, else what is missing."""
    probe = (
        "import gi\n"
        "gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0')\n"
        "gi.require_version('GstSdp', '1.0')\n"
        "from gi.repository import Gst, GstSdp, GstWebRTC\n"
        "Gst.init(None)\n"
        f"missing = [e for e in {ELEMENTS!r} if Gst.ElementFactory.find(e) is None]\n"
        "print(' '.join(missing))\n"
    )
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} does not exist"
    try:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{SYSTEM_PYTHON} cannot run: {err}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"python3-gi or GStreamer's typelibs are missing ({last})"
    if done.stdout.strip():
        return f"GStreamer elements missing: {done.stdout.strip()}"
    return None


class GstEdge:
    """The parent's side of one GStreamer edge process (one call); see the module docstring.

    Attributes as `MetaEdge`'s: `offer_sdp`, `answer_sdp`, `rms`, `connected`/`closed`
    (asyncio events), `error`, `connection_state`; plus `log` (the child's stderr lines).
    """

    def __init__(
        self,
        offer_sdp: str | None = None,
        *,
        tone_hz: float | None = 880.0,
        amplitude: float = 0.01,
    ) -> None:
        self.offer_sdp = offer_sdp
        self.answer_sdp: str | None = None
        self.offer_problems: list[str] = []
        self.rms: list[float] = []
        self.frames_received = 0
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.connection_state = "new"
        self.log: list[str] = []
        self._tone = (tone_hz, amplitude)
        self._process: asyncio.subprocess.Process | None = None
        self._answer: asyncio.Future[str] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._closing = False

    async def answer(self, offer_sdp: str) -> str:
        if self._closing:
            raise RuntimeError("the edge is closed")
        if self._process is not None:
            raise RuntimeError("an edge answers one offer only")
        from tests.fakes.meta_edge import offer_problems

        self.offer_sdp = offer_sdp
        self.offer_problems = offer_problems(offer_sdp)
        tone_hz, amplitude = self._tone
        env = dict(os.environ, GST_DEBUG="dtlsconnection:1,webrtcbin:1", GST_DEBUG_NO_COLOR="1")
        self._process = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            __file__,
            json.dumps({"tone_hz": tone_hz, "amplitude": amplitude}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._answer = asyncio.get_running_loop().create_future()
        self._readers = [
            asyncio.create_task(self._read_events()),
            asyncio.create_task(self._read_log()),
        ]
        await self._send({"offer": offer_sdp})
        self.answer_sdp = await asyncio.wait_for(self._answer, 15)
        return self.answer_sdp

    def seconds_of_sound(self, threshold: float = 300.0) -> float:
        return sum(1 for value in self.rms if value > threshold) * WINDOW / RATE

    async def close(self) -> None:
        """Stop the process (it reports what it still heard first); idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        try:
            process = self._process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ConnectionError):
                    await self._send({"stop": True})
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            if self._readers:
                await asyncio.wait(self._readers, timeout=2)
            for reader in self._readers:
                reader.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
        finally:
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(RuntimeError(self.error or "the edge ended"))
                self._answer.exception()  # retrieved: nobody may wait on it any more
            self.closed.set()

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(message).encode() + b"\n")
        await self._process.stdin.drain()

    async def _read_events(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            event = json.loads(line)
            if "answer" in event and self._answer is not None and not self._answer.done():
                self._answer.set_result(event["answer"])
            if "state" in event:
                self.connection_state = event["state"]
                if event["state"] == "connected":
                    self.connected.set()
            if "rms" in event:
                self.rms.extend(event["rms"])
                self.frames_received += len(event["rms"])
            if "error" in event:
                self.error = self.error or event["error"]
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(
                RuntimeError(f"the GStreamer edge ended: {self.error or self.log[-3:]}")
            )

    async def _read_log(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for line in self._process.stderr:
            if len(self.log) < 200:
                self.log.append(line.decode(errors="replace").rstrip())


# -- the child process: runs under the system Python with python3-gi --------------------------


def _child(options: dict[str, Any]) -> None:  # pragma: no cover - runs in the subprocess
    import threading

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstWebRTC", "1.0")
    gi.require_version("GstSdp", "1.0")
    from gi.repository import GLib, Gst, GstSdp, GstWebRTC

    Gst.init(None)
    out_lock = threading.Lock()

    def emit(**event: Any) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    loop = GLib.MainLoop()
    pipeline = Gst.Pipeline.new("edge")
    webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
    webrtc.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
    pipeline.add(webrtc)
    candidates: list[tuple[int, str]] = []
    pending = array("h")
    batch: list[float] = []
    state = {"payload": 111, "stopping": False}

    def on_candidate(_element: Any, mline: int, candidate: str) -> None:
        candidates.append((mline, candidate))

    def on_state(element: Any, _param: Any) -> None:
        value = element.get_property("connection-state")
        emit(state=value.value_nick)

    def flush() -> bool:
        if batch:
            emit(rms=list(batch))
            batch.clear()
        return not state["stopping"]

    def on_sample(sink: Any) -> Any:
        sample = sink.emit("pull-sample")
        buffer = sample.get_buffer()
        ok, info = buffer.map(Gst.MapFlags.READ)
        if ok:
            pending.frombytes(bytes(info.data)[: len(info.data) // 2 * 2])
            buffer.unmap(info)
        while len(pending) >= WINDOW:
            window = pending[:WINDOW]
            del pending[:WINDOW]
            batch.append(math.sqrt(sum(s * s for s in window) / WINDOW))
        return Gst.FlowReturn.OK

    def on_pad(_element: Any, pad: Any) -> None:
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        chain = Gst.parse_bin_from_description(
            "rtpopusdepay ! opusdec ! audioconvert ! audioresample ! "
            f"audio/x-raw,format=S16LE,channels=1,rate={RATE} ! "
            "appsink name=ears emit-signals=true sync=false",
            True,
        )
        pipeline.add(chain)
        chain.get_by_name("ears").connect("new-sample", on_sample)
        chain.sync_state_with_parent()
        pad.link(chain.get_static_pad("sink"))

    def add_sender(payload: int) -> None:
        tone_hz = options.get("tone_hz")
        wave = f"wave=sine freq={tone_hz}" if tone_hz else "wave=silence"
        volume = float(options.get("amplitude") or 0.0)
        sender = Gst.parse_bin_from_description(
            f"audiotestsrc is-live=true {wave} volume={volume} ! audioconvert ! audioresample ! "
            f"opusenc ! rtpopuspay pt={payload} ! capsfilter caps=application/x-rtp,media=audio,"
            f"encoding-name=OPUS,payload={payload},clock-rate=48000",
            True,
        )
        pipeline.add(sender)
        sender.get_static_pad("src").link(webrtc.request_pad_simple("sink_%u"))
        sender.sync_state_with_parent()

    def answer_when_gathered() -> bool:
        gathering = webrtc.get_property("ice-gathering-state")
        if gathering != GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            return True  # look again
        sdp = webrtc.get_property("local-description").sdp.as_text()
        lines = [line for line in sdp.splitlines() if line]
        present = {line for line in lines if line.startswith("a=candidate:")}
        missing = [f"a={c}" for _m, c in candidates if f"a={c}" not in present]
        at = max(i for i, line in enumerate(lines) if line.startswith(("a=", "m=", "c="))) + 1
        lines[at:at] = [*missing, "a=end-of-candidates"]
        lines = [
            line
            for line in lines
            if not line.startswith("a=fingerprint:") or line.startswith("a=fingerprint:sha-256 ")
        ]
        setups = [line for line in lines if line.startswith("a=setup:")]
        if setups != ["a=setup:passive"] * len(setups) or not setups:
            emit(error=f"webrtcbin answered {setups}, Meta's edge answers a=setup:passive")
        emit(answer="\r\n".join(lines) + "\r\n")
        return False

    def on_answer_made(promise: Any, _data: Any) -> None:
        reply = promise.get_reply()
        answer = reply.get_value("answer")
        webrtc.emit("set-local-description", answer, Gst.Promise.new())
        GLib.timeout_add(20, answer_when_gathered)

    def on_offer_set(_promise: Any, _data: Any) -> None:
        webrtc.emit("create-answer", None, Gst.Promise.new_with_change_func(on_answer_made, None))

    def take_offer(sdp_text: str) -> bool:
        for line in sdp_text.splitlines():
            if line.startswith("a=rtpmap:") and "opus/48000" in line.lower():
                state["payload"] = int(line.split(":", 1)[1].split()[0])
                break
        add_sender(int(state["payload"]))
        pipeline.set_state(Gst.State.PLAYING)
        ok, message = GstSdp.SDPMessage.new_from_text(sdp_text)
        if ok != GstSdp.SDPResult.OK:
            emit(error="the offer does not parse")
            return False
        offer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.OFFER, message)
        promise = Gst.Promise.new_with_change_func(on_offer_set, None)
        webrtc.emit("set-remote-description", offer, promise)
        return False

    def stop() -> bool:
        state["stopping"] = True
        pipeline.set_state(Gst.State.NULL)
        flush()
        emit(done=True)
        loop.quit()
        return False

    def on_bus(_bus: Any, message: Any) -> None:
        if message.type == Gst.MessageType.ERROR:
            err, _debug = message.parse_error()
            emit(error=f"{message.src.get_name()}: {err.message}")

    def read_stdin() -> None:
        for line in sys.stdin:
            command = json.loads(line)
            if "offer" in command:
                GLib.idle_add(take_offer, command["offer"])
            if command.get("stop"):
                break
        GLib.idle_add(stop)

    webrtc.connect("on-ice-candidate", on_candidate)
    webrtc.connect("notify::connection-state", on_state)
    webrtc.connect("pad-added", on_pad)
    bus = pipeline.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_bus)
    GLib.timeout_add(100, flush)
    threading.Thread(target=read_stdin, daemon=True).start()
    loop.run()


if __name__ == "__main__":  # pragma: no cover - the subprocess
    _child(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
