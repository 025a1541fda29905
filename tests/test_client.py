"""The Pilot Status client through httpx.MockTransport: status → exception, and retries."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from bot.errors import describe
from bot.pilot_status import PilotStatusClient, RetryPolicy, build_http_client
from bot.pilot_status import errors as pe
from bot.pilot_status.models import CallStatus, PermissionStatus, StartCall

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(handler: Handler, *, retries: int = 2) -> PilotStatusClient:
    http = build_http_client(
        base_url="https://pilot.test", api_key=SecretStr("ps_" + "a" * 48), api_key_id=None
    )
    http._transport = httpx.MockTransport(handler)  # the real client, a fake wire
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    client = PilotStatusClient(http, retry=RetryPolicy(max_retries=retries), sleep=sleep)
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def err(status: int, code: str | None = None, message: str = "x") -> httpx.Response:
    body: dict[str, str] = {"error": message}
    if code:
        body["code"] = code
    return httpx.Response(status, json=body)


CALL = StartCall(to="+5511999999999", bizOpaqueCallbackData="cb_1")

# Every documented answer of API.md §1.3 and §4, and what a person is told.
TABLE = [
    (err(400, None, "Validation error"), pe.BadRequestError, None, "api_validation"),
    (err(400, "MISSING_TO"), pe.BadRequestError, "MISSING_TO", "api_missing_to"),
    (
        err(400, "FEATURE_NOT_SUPPORTED"),
        pe.BadRequestError,
        "FEATURE_NOT_SUPPORTED",
        "api_feature_not_supported",
    ),
    (err(400, "NUMBER_NOT_FOUND"), pe.BadRequestError, "NUMBER_NOT_FOUND", "api_number_not_found"),
    (err(401, None, "Unauthorized"), pe.AuthenticationError, None, "api_unauthorized"),
    (
        err(403, "TENANT_SCOPE_NOT_ALLOWED"),
        pe.PermissionDeniedError,
        "TENANT_SCOPE_NOT_ALLOWED",
        "api_tenant_scope",
    ),
    (err(404, "CALL_NOT_FOUND"), pe.NotFoundError, "CALL_NOT_FOUND", "api_call_not_found"),
    (
        err(409, "WHATSAPP_INSTANCE_NOT_CONNECTED"),
        pe.ConflictError,
        "WHATSAPP_INSTANCE_NOT_CONNECTED",
        "api_not_connected",
    ),
    (
        err(422, "BILLING_SUSPENDED"),
        pe.UnprocessableError,
        "BILLING_SUSPENDED",
        "api_billing_suspended",
    ),
    (err(429, None, "Too many requests"), pe.RateLimitError, None, "api_rate_limited"),
    (
        err(400, "META_CALL_PERMISSION_REQUIRED"),
        pe.BadRequestError,
        "META_CALL_PERMISSION_REQUIRED",
        "api_permission_required",
    ),
    (
        err(400, "META_CALL_PERMISSION_REQUEST_LIMIT"),
        pe.BadRequestError,
        "META_CALL_PERMISSION_REQUEST_LIMIT",
        "api_permission_request_limit",
    ),
    (
        err(400, "META_CALLING_PAYMENT_REQUIRED"),
        pe.BadRequestError,
        "META_CALLING_PAYMENT_REQUIRED",
        "api_payment_required",
    ),
    (
        err(400, None, "(#138000) Calling is not enabled"),
        pe.BadRequestError,
        None,
        "api_calling_disabled",
    ),
    (err(400, "138012"), pe.BadRequestError, "138012", "api_call_limit"),
    (err(400, None, "Meta error 138015"), pe.BadRequestError, None, "api_tier_too_low"),
    (err(400, None, "Meta error 138018"), pe.BadRequestError, None, "api_calling_prerequisites"),
    (err(502, None, "Bad gateway"), pe.ServerError, None, "api_server_error"),
    (httpx.Response(502, text="error code: 502"), pe.ServerError, None, "api_server_error"),
    (httpx.Response(503, html="<html>down</html>"), pe.ServerError, None, "api_server_error"),
    (
        err(418, "SOMETHING_NEW", "brand new"),
        pe.APIStatusError,
        "SOMETHING_NEW",
        "api_unknown_code",
    ),
]


@pytest.mark.parametrize(("answer", "exc", "code", "catalogue"), TABLE)
async def test_status_to_exception_table(
    answer: httpx.Response, exc: type[pe.APIStatusError], code: str | None, catalogue: str
) -> None:
    client = make_client(Recorder(answer), retries=0)
    with pytest.raises(exc) as caught:
        await client.start_call(CALL)
    assert type(caught.value) is exc
    assert caught.value.status == answer.status_code
    assert caught.value.code == code
    assert describe(caught.value).code == catalogue
    await client.aclose()


async def test_start_call_sends_the_contract_body_and_key() -> None:
    recorder = Recorder(
        httpx.Response(201, json={"id": "call_1", "externalCallId": "wacid.1", "status": "RINGING"})
    )
    client = make_client(recorder)
    started = await client.start_call(CALL)
    assert started.id == "call_1" and started.status is CallStatus.RINGING
    sent = recorder.requests[0]
    assert sent.method == "POST" and sent.url.path == "/v1/calls"
    assert json.loads(sent.content) == {"to": "+5511999999999", "bizOpaqueCallbackData": "cb_1"}
    assert sent.headers["x-api-key"] == "ps_" + "a" * 48
    await client.aclose()


async def test_permission_probe_encodes_plus_and_parses_limits() -> None:
    probe_body = {
        "permission": {"status": "temporary", "expiration_time": 1768550400},
        "actions": [
            {
                "action_name": "start_call",
                "can_perform_action": True,
                "limits": [{"time_period": "PT24H", "max_allowed": 5, "current_usage": 2}],
            }
        ],
    }
    recorder = Recorder(httpx.Response(200, json=probe_body))
    client = make_client(recorder)
    probe = await client.get_permission("+5511999999999")
    assert b"to=%2B5511999999999" in recorder.requests[0].url.query
    assert probe.permission.status is PermissionStatus.TEMPORARY and probe.may_call
    assert probe.action("start_call").limits[0].current_usage == 2  # type: ignore[union-attr]
    await client.aclose()


async def test_2xx_that_is_not_json_is_a_response_error() -> None:
    client = make_client(Recorder(httpx.Response(200, text="<html>ok</html>")))
    with pytest.raises(pe.APIResponseError):
        await client.get_call("call_1")
    await client.aclose()


async def test_get_is_retried_on_5xx_then_succeeds() -> None:
    ok = httpx.Response(200, json={"calls": []})
    recorder = Recorder(err(503), httpx.ReadTimeout("slow"), ok)
    client = make_client(recorder, retries=2)
    assert await client.list_calls(limit=1) == []
    assert len(recorder.requests) == 3
    assert len(client.sleeps) == 2  # type: ignore[attr-defined]
    assert client.sleeps[1] > 0  # type: ignore[attr-defined]
    await client.aclose()


async def test_get_retries_are_bounded() -> None:
    recorder = Recorder(err(500))
    client = make_client(recorder, retries=2)
    with pytest.raises(pe.ServerError):
        await client.get_call("call_1")
    assert len(recorder.requests) == 3
    await client.aclose()


async def test_get_is_not_retried_on_4xx() -> None:
    recorder = Recorder(err(404, "CALL_NOT_FOUND"))
    client = make_client(recorder)
    with pytest.raises(pe.NotFoundError):
        await client.get_call("call_1")
    assert len(recorder.requests) == 1
    await client.aclose()


async def test_post_call_not_retried_after_read_timeout() -> None:
    recorder = Recorder(httpx.ReadTimeout("no answer"))
    client = make_client(recorder)
    with pytest.raises(pe.APITimeoutError) as caught:
        await client.start_call(CALL)
    assert caught.value.maybe_sent
    assert describe(caught.value).code == "api_timeout_maybe_sent"
    assert len(recorder.requests) == 1
    await client.aclose()


@pytest.mark.parametrize(
    "failure", [httpx.RemoteProtocolError("dropped"), httpx.ReadError("reset"), err(502)]
)
async def test_post_call_not_retried_once_it_may_have_arrived(
    failure: httpx.Response | Exception,
) -> None:
    recorder = Recorder(failure)
    client = make_client(recorder)
    with pytest.raises(pe.PilotStatusError):
        await client.start_call(CALL)
    assert len(recorder.requests) == 1
    await client.aclose()


@pytest.mark.parametrize(
    "refusal", [httpx.ConnectError("refused"), httpx.ConnectTimeout("syn"), err(429)]
)
async def test_post_call_retried_when_it_provably_never_started(
    refusal: httpx.Response | Exception,
) -> None:
    created = httpx.Response(201, json={"id": "call_2", "status": "INITIATED"})
    recorder = Recorder(refusal, created)
    client = make_client(recorder)
    assert (await client.start_call(CALL)).id == "call_2"
    assert len(recorder.requests) == 2
    await client.aclose()


async def test_refused_connection_reports_nothing_sent() -> None:
    client = make_client(Recorder(httpx.ConnectError("refused")), retries=1)
    with pytest.raises(pe.APIConnectionError) as caught:
        await client.start_call(CALL)
    assert not caught.value.maybe_sent
    assert describe(caught.value).code == "api_unreachable"
    await client.aclose()


async def test_key_id_header_when_only_the_id_is_configured() -> None:
    http = build_http_client(
        base_url="https://pilot.test", api_key=None, api_key_id=SecretStr("ck_1"), number_id="n1"
    )
    assert http.headers["x-api-key-id"] == "ck_1"
    assert http.headers["x-whatsapp-number-id"] == "n1"
    assert "x-api-key" not in http.headers
    assert http.timeout.read is not None and http.timeout.connect is not None
    await http.aclose()
