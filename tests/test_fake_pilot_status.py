"""Tests of the Pilot Status fake itself, through a plain httpx client over loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from openapi_core.testing import MockRequest, MockResponse

from tests.fakes.pilot_status import FakePilotStatus, _contract

KEY = "ps_" + "a" * 48
PHONE = "+5511999999999"
OTHER_PHONE = "+5511977776666"
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=setup:active\r\n"


@pytest.fixture
async def fake() -> AsyncIterator[FakePilotStatus]:
    async with FakePilotStatus() as server:
        yield server


@pytest.fixture
async def client(fake: FakePilotStatus) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, headers={"x-api-key": KEY}) as http:
        yield http


async def test_web_number_happy_path(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    started = await client.post("/v1/calls", json={"to": PHONE, "bizOpaqueCallbackData": "o-42"})
    assert started.status_code == 201
    body = started.json()
    assert body["id"].startswith("call_") and body["status"] == "INITIATED"
    assert body["externalCallId"] and not body["externalCallId"].startswith("wacid.")
    call_id = body["id"]

    stored = fake.calls[call_id]
    assert stored["direction"] == "OUTBOUND" and stored["peerNumber"] == PHONE[1:]
    assert stored["bizOpaqueCallbackData"] == "o-42" and stored["createdAt"].endswith("Z")

    listed = (await client.get("/v1/calls")).json()["calls"]
    assert [c["id"] for c in listed] == [call_id] and "sdpOffer" not in listed[0]
    by_external = await client.get(f"/v1/calls/{body['externalCallId']}", params={"includeSdp": 1})
    assert by_external.json()["id"] == call_id and by_external.json()["sdpOffer"] is None

    play = await client.post(f"/v1/calls/{call_id}/play", json={"mediaUrl": "https://x/a.mp3"})
    assert play.json() == {"success": True, "id": call_id, "status": "ACCEPTED"}
    session = await client.post(f"/v1/calls/{call_id}/realtime-session", json={"mode": "talk"})
    assert session.json()["wsUrl"].startswith(f"ws://127.0.0.1:{fake.url.rsplit(':', 1)[1]}/ws/")
    ended = await client.post(f"/v1/calls/{call_id}/terminate")
    assert ended.json() == {"success": True, "id": call_id, "status": "COMPLETED"}
    assert fake.calls[call_id]["status"] == "COMPLETED"

    with_sdp = await client.post("/v1/calls", json={"to": PHONE, "sdp": SDP})
    assert with_sdp.status_code == 400 and with_sdp.json()["error"] == "Validation error"
    settings = await client.get("/v1/calls/settings")
    assert settings.status_code == 400 and settings.json()["code"] == "FEATURE_NOT_SUPPORTED"
    window = await client.get("/v1/service-window", params={"destinationNumber": PHONE})
    assert window.json()["windowType"] == "NONE" and window.json()["open"] is True

    assert len(fake.calls_started()) == 2
    assert fake.contract_violations == []


async def test_meta_number_happy_path(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    fake.number_type = "meta"
    refused = await client.post("/v1/calls", json={"to": PHONE, "sdp": SDP})
    assert refused.status_code == 400
    assert refused.json()["code"] == "META_CALL_PERMISSION_REQUIRED"
    probe = (await client.get("/v1/calls/permissions", params={"to": PHONE})).json()
    assert probe["permission"]["status"] == "no_permission"
    assert probe["actions"][1]["can_perform_action"] is False

    fake.set_permission(PHONE, "temporary", expiration_time=2_000_000_000)
    probe = (await client.get("/v1/calls/permissions", params={"to": PHONE})).json()
    assert probe["permission"] == {"status": "temporary", "expiration_time": 2_000_000_000}
    assert probe["actions"][1]["action_name"] == "start_call"
    assert probe["actions"][1]["can_perform_action"] is True

    no_sdp = await client.post("/v1/calls", json={"to": PHONE})
    assert no_sdp.status_code == 400 and no_sdp.json()["error"] == "Validation error"
    started = await client.post("/v1/calls", json={"to": PHONE, "sdp": SDP})
    assert started.status_code == 201 and started.json()["externalCallId"].startswith("wacid.")
    call_id = started.json()["id"]
    got = (await client.get(f"/v1/calls/{call_id}", params={"includeSdp": "1"})).json()
    assert got["sdpOffer"] == SDP and got["sdpAnswer"] is None
    assert "sdpOffer" not in (await client.get(f"/v1/calls/{call_id}")).json()

    play = await client.post(f"/v1/calls/{call_id}/play", json={"mediaUrl": "https://x/a.mp3"})
    assert play.status_code == 400 and play.json()["code"] == "FEATURE_NOT_SUPPORTED"
    settings = await client.get("/v1/calls/settings")
    assert settings.json()["calling"]["status"] == "ENABLED"
    asked = await client.post("/v1/calls/permissions/request", json={"to": OTHER_PHONE})
    assert asked.status_code == 201 and asked.json()["messageId"].startswith("wamid.")
    window = await client.get("/v1/service-window", params={"destinationNumber": PHONE})
    assert window.json()["windowType"] == "META_24H"
    assert fake.contract_violations == []


async def test_other_provider_and_unknowns(
    fake: FakePilotStatus, client: httpx.AsyncClient
) -> None:
    missing = await client.get("/v1/calls/call_nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Call not found", "code": "CALL_NOT_FOUND"}
    fake.number_type = "other"
    listed = await client.get("/v1/calls")
    assert listed.status_code == 400 and listed.json()["code"] == "FEATURE_NOT_SUPPORTED"
    assert fake.contract_violations == []

    unknown = await client.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not found"}
    assert fake.requests[-1].operation is None
    assert len(fake.contract_violations) == 1  # not in the contract either


async def test_list_parameters_and_order(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    old = fake.add_call(PHONE, createdAt="2026-07-01T10:00:00.000Z")
    new = fake.add_call(OTHER_PHONE, createdAt="2026-07-02T10:00:00.000Z")
    listed = (await client.get("/v1/calls")).json()["calls"]
    assert [c["id"] for c in listed] == [new["id"], old["id"]]
    page = await client.get("/v1/calls", params={"limit": "1", "before": new["createdAt"]})
    assert [c["id"] for c in page.json()["calls"]] == [old["id"]]
    bad_limit = await client.get("/v1/calls", params={"limit": "0"})
    assert bad_limit.status_code == 400 and bad_limit.json()["code"] == "INVALID_LIMIT"
    bad_before = await client.get("/v1/calls", params={"before": "yesterday"})
    assert bad_before.status_code == 400 and bad_before.json()["code"] == "INVALID_BEFORE"

    fake.emit_status(old["id"], "ACCEPTED")
    assert fake.calls[old["id"]]["connectedAt"] is not None
    fake.emit_status(old["externalCallId"], "FAILED", errorCode="X")
    got = (await client.get(f"/v1/calls/{old['id']}")).json()
    assert got["status"] == "FAILED" and got["errorCode"] == "X" and got["endedAt"]
    assert fake.contract_violations == []


async def test_contract_violations_are_recorded(
    fake: FakePilotStatus, client: httpx.AsyncClient
) -> None:
    wrong_type = await client.post("/v1/calls", json={"to": 5511999999999})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"] == "Validation error" and wrong_type.json()["details"]
    fake.number_type = "meta"
    no_to = await client.get("/v1/calls/permissions")
    assert no_to.status_code == 400
    no_body = await client.post("/v1/calls")
    assert no_body.status_code == 400 and no_body.json()["code"] == "MISSING_TO"

    assert len(fake.contract_violations) == 3
    assert "5511999999999 is not of type 'string'" in fake.contract_violations[0]
    assert "to" in fake.contract_violations[1]
    assert fake.calls == {} and len(fake.calls_started()) == 2


async def test_auth(fake: FakePilotStatus) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get("/v1/calls")).json() == {"error": "Unauthorized"}
        wrong = await http.get("/v1/calls", headers={"x-api-key": "ps_" + "b" * 48})
        assert wrong.status_code == 401
        bearer = await http.get("/v1/calls", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 401
        fake.api_key_id = "ck_123"
        by_id = await http.get("/v1/calls", headers={"x-api-key-id": "ck_123"})
        assert by_id.status_code == 200
    assert [r.status for r in fake.requests] == [401, 401, 401, 200]
    assert fake.contract_violations == []


async def test_scripts_with_to_and_times(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    fake.error("start_call", "WHATSAPP_INSTANCE_NOT_CONNECTED", status=409, to=PHONE, times=1)
    first = await client.post("/v1/calls", json={"to": PHONE})
    assert first.status_code == 409
    assert first.json() == {
        "error": "WhatsApp instance not connected",
        "code": "WHATSAPP_INSTANCE_NOT_CONNECTED",
    }
    assert (await client.post("/v1/calls", json={"to": OTHER_PHONE})).status_code == 201
    assert (await client.post("/v1/calls", json={"to": PHONE})).status_code == 201

    fake.error("get_call", None, status=429)  # forever
    fake.script("get_call", status=200, body={"id": "x"}, times=1)  # most recent wins
    assert (await client.get("/v1/calls/anything")).json() == {"id": "x"}
    limited = await client.get("/v1/calls/anything")
    assert limited.status_code == 429 and limited.json() == {"error": "Too many requests"}
    with pytest.raises(ValueError, match="unknown operation"):
        fake.script("start-call")
    assert [r.status for r in fake.calls_started()] == [409, 201, 201]
    assert fake.contract_violations == []


async def test_raw_non_json_502(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    fake.script("list_calls", status=502, raw=b"error code: 502", content_type="text/plain")
    answer = await client.get("/v1/calls")
    assert answer.status_code == 502 and answer.text == "error code: 502"
    assert answer.headers["content-type"].startswith("text/plain")


async def test_drop_closes_connection(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    fake.script("start_call", drop=True, times=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post("/v1/calls", json={"to": PHONE})
    dropped = fake.requests[-1]
    assert dropped.json == {"to": PHONE} and dropped.status is None
    assert dropped.responded_at is not None
    assert (await client.post("/v1/calls", json={"to": PHONE})).status_code == 201


async def test_delay(fake: FakePilotStatus, client: httpx.AsyncClient) -> None:
    fake.script("list_calls", body={"calls": []}, delay=0.2, times=1)
    begin = time.perf_counter()
    assert (await client.get("/v1/calls")).json() == {"calls": []}
    assert time.perf_counter() - begin >= 0.2
    record = fake.requests[-1]
    assert record.responded_at is not None and record.responded_at - record.received_at >= 0.2

    fake.script("list_calls", delay=5.0, times=1)  # close() must not wait for it
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/v1/calls", timeout=0.1)


async def test_connections_opened(fake: FakePilotStatus) -> None:
    headers = {"x-api-key": KEY}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
        for _ in range(3):
            assert (await http.get("/v1/calls")).status_code == 200
    assert fake.connections_opened == 1
    for _ in range(2):
        async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
            await http.get("/v1/calls")
    assert fake.connections_opened == 3


def _response_errors(response: httpx.Response) -> list[str]:
    """openapi-core's verdict on one answer of the fake (request and response)."""
    api, server_url = _contract()
    request = response.request
    mock_request = MockRequest(
        server_url,
        request.method,
        request.url.path,
        args=dict(request.url.params),
        headers=dict(request.headers),
        data=request.content or None,
        content_type=request.headers.get("content-type", ""),
    )
    mock_response = MockResponse(
        response.content,
        status_code=response.status_code,
        headers=dict(response.headers),
        content_type=response.headers.get("content-type", ""),
    )
    errors = api.iter_response_errors(mock_request, mock_response)
    where = f"{request.method} {request.url.path} {response.status_code}"
    return [f"{where}: {error!r} {error.__cause__ or ''}" for error in errors]


async def test_default_answers_conform_to_the_contract(
    fake: FakePilotStatus, client: httpx.AsyncClient
) -> None:
    answers: list[httpx.Response] = []
    for number_type in ("web", "meta", "other"):
        fake.number_type = number_type
        fake.set_permission(PHONE, "permanent")
        body = {"to": PHONE, "sdp": SDP} if number_type == "meta" else {"to": PHONE}
        started = await client.post("/v1/calls", json=body)
        call_id = started.json().get("id", "call_unknown")
        answers += [
            started,
            await client.get("/v1/calls", params={"limit": "5"}),
            await client.get("/v1/calls", params={"limit": "500"}),
            await client.get(f"/v1/calls/{call_id}", params={"includeSdp": "1"}),
            await client.get("/v1/calls/call_unknown"),
            await client.post(f"/v1/calls/{call_id}/play", json={"mediaUrl": "https://x/a.mp3"}),
            await client.post(f"/v1/calls/{call_id}/realtime-session", json={"mode": "listen"}),
            await client.post(f"/v1/calls/{call_id}/accept", json={"sdp": SDP}),
            await client.post(f"/v1/calls/{call_id}/reject"),
            await client.post(f"/v1/calls/{call_id}/terminate"),
            await client.get("/v1/calls/settings"),
            await client.put("/v1/calls/settings", json={"status": "ENABLED"}),
            await client.get("/v1/calls/permissions", params={"to": PHONE}),
            await client.post("/v1/calls/permissions/request", json={"to": PHONE}),
            await client.get("/v1/service-window", params={"destinationNumber": PHONE}),
            await client.get("/v1/service-window", params={"destinationNumber": "abc"}),
        ]
    answers.append(await client.get("/v1/calls", headers={"x-api-key": "wrong"}))
    assert {a.status_code for a in answers} >= {200, 201, 400, 401, 404}
    assert [error for answer in answers for error in _response_errors(answer)] == []
    assert fake.contract_violations == []
