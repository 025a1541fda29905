"""Tests of the Pilot Status fake's media behaviour: Meta edge, webhooks, realtime WS, /play.

A tiny aiortc "business" peer plays the bot's part for Meta numbers; everything is loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from bot.voice.sdp import offer_for_meta
from tests.fakes.meta_edge import MetaEdge, ToneTrack
from tests.fakes.pilot_status import GARBAGE_SDP, FakePilotStatus, MediaScenario

KEY = "ps_" + "a" * 48
PHONE = "+5511999999999"
SECRET = "whsec_test"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28)


class Business:
    """The bot's side of a Meta call: one aiortc peer sending a 440 Hz tone, Opus only."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = ToneTrack(440.0, amplitude=0.3)
        transceiver = self.pc.addTransceiver(self.track, direction="sendrecv")
        opus = [
            codec
            for codec in RTCRtpSender.getCapabilities("audio").codecs
            if codec.mimeType.lower() == "audio/opus"
        ]
        transceiver.setCodecPreferences(opus)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return offer_for_meta(self.pc.localDescription.sdp)

    async def apply(self, answer: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def close(self) -> None:
        await self.pc.close()
        self.track.stop()


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 that checks signatures and keeps every delivery."""

    secret: str | None
    url: str = ""
    deliveries: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        if self.secret is not None:
            expected = hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, headers.get("x-pilot-status-signature", "")):
                self.bad_signatures += 1
                return web.json_response({"error": "bad signature"}, status=401)
        self.deliveries.append((headers, json.loads(raw)))
        return web.json_response({"ok": True})

    def names(self) -> list[str]:
        return [p.get("event") or p.get("object", "?") for _, p in self.deliveries]

    async def wait_for(self, predicate: Callable[[Any], bool], within: float = 2.5) -> Any:
        async with asyncio.timeout(within):
            while True:
                for _, payload in self.deliveries:
                    if predicate(payload):
                        return payload
                await asyncio.sleep(0.01)

    async def wait_event(self, name: str, within: float = 2.5) -> Any:
        return await self.wait_for(lambda payload: payload.get("event") == name, within)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def meta() -> AsyncIterator[FakePilotStatus]:
    fake = FakePilotStatus(api_key=KEY, number_type="meta")
    fake.set_permission(PHONE, "temporary")
    await fake.start()
    yield fake
    await fake.close()
    assert all(edge.closed.is_set() for edge in fake.edges.values())
    assert fake.background_errors == []
    assert fake.contract_violations == []


@pytest.fixture
async def web_fake() -> AsyncIterator[FakePilotStatus]:
    fake = FakePilotStatus(api_key=KEY, number_type="web")
    await fake.start()
    yield fake
    await fake.close()
    assert fake.background_errors == []


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    name = "meta" if "meta" in request.fixturenames else "web_fake"
    fake: FakePilotStatus = request.getfixturevalue(name)
    async with httpx.AsyncClient(base_url=fake.url, headers={"x-api-key": KEY}) as http:
        yield http


@pytest.fixture
async def business() -> AsyncIterator[Business]:
    peer = Business()
    yield peer
    await peer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver(secret=SECRET)
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner, base = await _serve(app)
    hook.url = base + "/hook"
    yield hook
    await runner.cleanup()


@pytest.fixture
async def audio_host() -> AsyncIterator[str]:
    async def wav(_request: web.Request) -> web.Response:
        return web.Response(body=WAV, content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/alert.wav", wav)
    runner, base = await _serve(app)
    yield base
    await runner.cleanup()


async def _start(client: httpx.AsyncClient, sdp: str) -> str:
    started = await client.post("/v1/calls", json={"to": PHONE, "sdp": sdp})
    assert started.status_code == 201, started.text
    assert started.json()["status"] == "INITIATED"
    return str(started.json()["id"])


async def _poll_answer(client: httpx.AsyncClient, call_id: str, within: float = 2.0) -> str:
    async with asyncio.timeout(within):
        while True:
            got = (await client.get(f"/v1/calls/{call_id}", params={"includeSdp": "1"})).json()
            if got["sdpAnswer"] is not None:
                return str(got["sdpAnswer"])
            await asyncio.sleep(0.02)


async def _until(predicate: Callable[[], bool], within: float = 2.5) -> None:
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


# -- Meta numbers -------------------------------------------------------------------------


async def test_poll_answer_connects_and_carries_audio(
    meta: FakePilotStatus, client: httpx.AsyncClient, business: Business
) -> None:
    meta.media = MediaScenario()
    offer = await business.offer()
    call_id = await _start(client, offer)
    assert meta.calls[call_id]["status"] == "RINGING"
    edge = meta.edges[call_id]
    assert edge.offer_sdp == offer and edge.offer_problems == []

    answer = await _poll_answer(client, call_id)
    assert answer == edge.answer_sdp
    lines = answer.splitlines()
    assert "a=setup:passive" in lines and "a=setup:active" not in lines
    first_m = next(i for i, line in enumerate(lines) if line.startswith("m="))
    assert lines.index("a=ice-lite") < first_m
    assert [line.split()[0] for line in lines if line.startswith("a=fingerprint:")] == [
        "a=fingerprint:sha-256"
    ]

    await business.apply(answer)
    await meta.wait_status(call_id, "ACCEPTED", timeout=2.0)
    assert edge.connected.is_set() and edge.connection_state == "connected"
    await _until(lambda: business.pc.connectionState == "connected")
    await _until(lambda: edge.seconds_of_sound() > 0.5)
    assert edge.frames_received > 25 and max(edge.rms) > 1000

    ended = await client.post(f"/v1/calls/{call_id}/terminate")
    assert ended.json()["status"] == "COMPLETED"
    await asyncio.wait_for(edge.closed.wait(), 2.0)
    got = (await client.get(f"/v1/calls/{call_id}")).json()
    assert got["status"] == "COMPLETED" and got["connectedAt"] and got["durationSeconds"] in (0, 1)


async def test_webhook_answer_and_status_events(
    meta: FakePilotStatus, client: httpx.AsyncClient, business: Business, receiver: Receiver
) -> None:
    meta.webhooks_to(receiver.url, SECRET)
    meta.media = MediaScenario(answer_via="webhook", answer_delay=0.05)
    call_id = await _start(client, await business.offer())
    ext = meta.calls[call_id]["externalCallId"]

    envelope = await receiver.wait_for(lambda p: p.get("object") == "whatsapp_business_account")
    change = envelope["entry"][0]["changes"][0]
    assert change["field"] == "calls"
    connect = change["value"]["calls"][0]
    assert connect["id"] == ext and connect["event"] == "connect"
    assert connect["direction"] == "BUSINESS_INITIATED" and connect["timestamp"].isdigit()
    assert connect["session"]["sdp_type"] == "answer"
    assert connect["session"]["sdp"] == meta.calls[call_id]["sdpAnswer"]

    await business.apply(connect["session"]["sdp"])
    connected = await receiver.wait_event("call.connected")
    assert connected["status"] == "ACCEPTED"
    await client.post(f"/v1/calls/{call_id}/terminate")
    ended = await receiver.wait_event("call.ended")
    assert ended["status"] == "COMPLETED" and ended["durationSeconds"] in (0, 1)
    assert ended["callId"] == call_id and ended["externalCallId"] == ext
    assert ended["direction"] == "OUTBOUND" and ended["from"] == meta.business_number
    assert ended["to"] == PHONE[1:] and ended["timestamp"].endswith("Z")

    assert receiver.names() == [
        "call.ringing",
        "whatsapp_business_account",
        "call.connected",
        "call.ended",
    ]
    assert receiver.bad_signatures == 0
    keys = [headers["idempotency-key"] for headers, _ in receiver.deliveries]
    assert len(set(keys)) == 4
    assert all(d.status == 200 and d.done for d in await meta.wait_deliveries())


async def test_callee_rejects(
    meta: FakePilotStatus, client: httpx.AsyncClient, business: Business, receiver: Receiver
) -> None:
    receiver.secret = None
    meta.webhooks_to(receiver.url)
    meta.media = MediaScenario(callee="reject", ring_delay=0.1)
    call_id = await _start(client, await business.offer())
    await meta.wait_status(call_id, "REJECTED", timeout=2.0)
    ended = await receiver.wait_event("call.ended")
    assert ended["status"] == "REJECTED" and "durationSeconds" not in ended
    assert all("x-pilot-status-signature" not in h for h, _ in receiver.deliveries)
    await asyncio.wait_for(meta.edges[call_id].closed.wait(), 2.0)
    assert not meta.edges[call_id].connected.is_set()


@pytest.mark.parametrize("answer", ["none", "garbage"])
async def test_no_usable_answer(
    meta: FakePilotStatus,
    client: httpx.AsyncClient,
    business: Business,
    receiver: Receiver,
    answer: Any,
) -> None:
    meta.webhooks_to(receiver.url, SECRET)
    meta.media = MediaScenario(answer=answer, answer_via="webhook")
    call_id = await _start(client, await business.offer())
    if answer == "garbage":
        assert await _poll_answer(client, call_id) == GARBAGE_SDP
        await receiver.wait_for(lambda p: "entry" in p)
    else:
        await asyncio.sleep(0.3)
        got = (await client.get(f"/v1/calls/{call_id}", params={"includeSdp": "1"})).json()
        assert got["sdpAnswer"] is None and got["status"] == "RINGING"
        await meta.wait_deliveries()
        assert receiver.names() == ["call.ringing"]
    await client.post(f"/v1/calls/{call_id}/terminate")
    await asyncio.wait_for(meta.edges[call_id].closed.wait(), 2.0)
    assert (await receiver.wait_event("call.ended"))["status"] == "COMPLETED"


async def test_blackhole_answer_never_connects(
    meta: FakePilotStatus, client: httpx.AsyncClient, business: Business
) -> None:
    meta.media = MediaScenario(answer="blackhole")
    call_id = await _start(client, await business.offer())
    answer = await _poll_answer(client, call_id)
    m_port = next(line for line in answer.splitlines() if line.startswith("m=")).split()[1]
    candidates = [line.split() for line in answer.splitlines() if line.startswith("a=candidate:")]
    assert candidates and all(c[4] == "127.0.0.1" and c[5] == m_port for c in candidates)
    assert (
        m_port
        != next(
            line for line in (meta.edges[call_id].answer_sdp or "").splitlines() if line[:2] == "m="
        ).split()[1]
    )
    assert meta.edges[call_id].closed.is_set()

    await business.apply(answer)
    await asyncio.sleep(0.5)
    assert business.pc.connectionState != "connected"
    assert meta.calls[call_id]["status"] == "RINGING"


async def test_bad_offer_fails_the_call(meta: FakePilotStatus, client: httpx.AsyncClient) -> None:
    meta.media = MediaScenario()
    call_id = await _start(client, "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n")
    failed = await meta.wait_status(call_id, "FAILED", timeout=2.0)
    assert failed["errorCode"] == "FAKE_EDGE_ERROR"
    edge = meta.edges[call_id]
    assert edge.error and "no m=audio line" in edge.offer_problems
    await asyncio.wait_for(edge.closed.wait(), 2.0)


async def test_media_is_opt_in(meta: FakePilotStatus, client: httpx.AsyncClient) -> None:
    call_id = await _start(client, "v=0\r\na=setup:active\r\n")
    assert meta.edges == {} and meta.calls[call_id]["status"] == "INITIATED"
    assert meta.deliveries == []


# -- web numbers --------------------------------------------------------------------------


async def test_realtime_websocket(web_fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    call_id = (await client.post("/v1/calls", json={"to": PHONE})).json()["id"]
    session = await client.post(f"/v1/calls/{call_id}/realtime-session", json={"mode": "talk"})
    ws_url = session.json()["wsUrl"]
    frames = [bytes([n]) * 640 for n in range(3)]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url) as ws:
            for frame in frames:
                await ws.send_bytes(frame)
            await ws.send_str("hello")
            record = web_fake.realtime[call_id]
            await record.send_bytes(b"\x00\x01")
            assert (await ws.receive_bytes(timeout=1.0)) == b"\x00\x01"
        await asyncio.wait_for(record.closed.wait(), 2.0)
        assert record.frames == frames and record.texts == ["hello"]
        assert record.mode == "talk" and record.closed_at and record.closed_at >= record.opened_at

        for url in (ws_url, ws_url.replace(call_id, "call_other"), ws_url + "x"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 401

        fresh = (
            await client.post(f"/v1/calls/{call_id}/realtime-session", json={"mode": "listen"})
        ).json()["wsUrl"]
        async with http.get(fresh) as plain:  # no upgrade: refused, token kept
            assert plain.status == 400
        web_fake.realtime_ttl = 0.0
        expired = (
            await client.post(f"/v1/calls/{call_id}/realtime-session", json={"mode": "listen"})
        ).json()["wsUrl"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(expired)
        assert refused.value.status == 401

        async with http.ws_connect(fresh) as ws:  # still open when the fake closes
            await ws.send_bytes(b"\x01\x02")
            record = web_fake.realtime[call_id]
            await _until(lambda: bool(record.frames), within=1.0)
            assert record.mode == "listen" and record.frames == [b"\x01\x02"]
            await web_fake.close()
            assert record.closed.is_set()
            assert (await ws.receive(timeout=1.0)).type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            )
    assert not any(r.path.startswith("/ws/") for r in web_fake.requests)
    assert web_fake.contract_violations == []


async def test_play_downloads_and_hangs_up(
    web_fake: FakePilotStatus, client: httpx.AsyncClient, receiver: Receiver, audio_host: str
) -> None:
    web_fake.webhooks_to(receiver.url, SECRET)
    call_id = (await client.post("/v1/calls", json={"to": PHONE})).json()["id"]
    body = {"mediaUrl": f"{audio_host}/alert.wav", "hangupAfterPlay": True}
    played = await client.post(f"/v1/calls/{call_id}/play", json=body)
    assert played.json() == {"success": True, "id": call_id, "status": "ACCEPTED"}
    record = await web_fake.wait_played(call_id)
    assert record.json == body and record.url == body["mediaUrl"]
    assert record.status == 200 and record.content_type == "audio/wav" and record.body == WAV
    assert web_fake.calls[call_id]["status"] == "COMPLETED"
    ended = await receiver.wait_event("call.ended")
    assert ended["status"] == "COMPLETED" and ended["callId"] == call_id

    other = (await client.post("/v1/calls", json={"to": PHONE})).json()["id"]
    await client.post(f"/v1/calls/{other}/play", json={"mediaUrl": "https://cdn.example/a.mp3"})
    remote = await web_fake.wait_played(other)
    assert remote.status is None and remote.error and "loopback" in remote.error
    assert web_fake.calls[other]["status"] == "INITIATED"
    assert [p.call_id for p in web_fake.plays] == [call_id, other]
    assert web_fake.contract_violations == []


async def test_play_field_url(
    web_fake: FakePilotStatus, client: httpx.AsyncClient, audio_host: str
) -> None:
    web_fake.play_field = "url"
    call_id = (await client.post("/v1/calls", json={"to": PHONE})).json()["id"]
    refused = await client.post(f"/v1/calls/{call_id}/play", json={"mediaUrl": "http://x/a"})
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "Validation error",
        "code": "VALIDATION",
        "details": ["url is required"],
    }
    assert web_fake.contract_violations == [] and web_fake.plays == []

    both = {"mediaUrl": "http://127.0.0.1:9/nothing", "url": f"{audio_host}/alert.wav"}
    assert (await client.post(f"/v1/calls/{call_id}/play", json=both)).status_code == 200
    record = await web_fake.wait_played(call_id)
    assert record.url == both["url"] and record.body == WAV
    assert web_fake.calls[call_id]["status"] == "INITIATED"  # no hangupAfterPlay


async def test_meta_edge_alone(business: Business) -> None:
    await business.pc.setLocalDescription(await business.pc.createOffer())
    stock = business.pc.localDescription.sdp  # actpass, three fingerprints
    edge = MetaEdge(tone_hz=None)
    try:
        answer = await edge.answer(stock)
        assert "a=setup:passive" in answer.splitlines() and "a=ice-lite" in answer
        assert edge.offer_sdp == stock
        assert any("actpass" in problem for problem in edge.offer_problems)
        assert any("sha-384" in problem for problem in edge.offer_problems)
        with pytest.raises(RuntimeError):
            await edge.answer(stock)
    finally:
        await edge.close()
        await edge.close()  # idempotent
    assert edge.closed.is_set() and edge.rms == [] and edge.seconds_of_sound() == 0.0

    passive = MetaEdge()
    with pytest.raises(ValueError, match="passive"):
        await passive.answer(offer_for_meta(stock).replace("a=setup:active", "a=setup:passive"))
    await passive.close()
