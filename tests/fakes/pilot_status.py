"""Loopback fake of the Pilot Status REST API (WhatsApp voice calls) for tests.

`FakePilotStatus` speaks real HTTP on 127.0.0.1 (random free port) so the production
httpx client is exercised end to end: connection handling, timeouts, status codes and
bodies. Facts about the API come from /work/shared/pilot-status/API.md (section numbers
below refer to it).

Every request goes through the same pipeline:

1. it is recorded in `fake.requests` (even when rejected later);
2. auth (§1): `x-api-key` equal to `api_key` or `x-api-key-id` equal to `api_key_id`,
   else 401 `{"error": "Unauthorized"}` (documented, so NOT a contract violation);
3. contract: the request is validated with openapi-core against
   `tests/contract/pilot-status-openapi.json`; a violation is answered 400
   `{"error": "Validation error", "details": [...]}` and appended to
   `fake.contract_violations` (a path/method absent from the contract is answered
   404 `{"error": "Not found"}` and also counts as a violation);
4. the most recent matching `script()` entry, if any, decides the answer;
5. otherwise the default behaviour for `fake.number_type` ("meta", "web", "other").

`GET /ws/{callId}?token=...` (the realtime media WebSocket of web numbers, §2.6) is not part
of the REST contract: it is served before the pipeline, not recorded in `fake.requests` and
never a contract violation (see `RealtimeRecord`).

Opt-in behaviour beyond the REST answers:

- `fake.webhooks_to(url, secret)`: every call status change (`call.ringing`,
  `call.connected`, `call.ended`, `call.missed`, §6.3) is POSTed there as Pilot's flat event,
  signed with `x-pilot-status-signature` when a secret is set, with a unique
  `Idempotency-Key`, in order, by one background sender (`fake.deliveries`,
  `await fake.wait_deliveries()`).
- `fake.media = MediaScenario(...)` on a Meta number: each `POST /v1/calls` gets a real
  peer standing in for Meta's media edge (`fake.edges[call_id]`: an aiortc
  `tests.fakes.meta_edge.MetaEdge`, or with `edge="gstreamer"` GStreamer's webrtcbin in a
  subprocess, `tests.fakes.gst_edge.GstEdge`) that answers the business's offer; the answer is
  exposed as `sdpAnswer` (and, with `answer_via="webhook"`, in Meta's raw `calls`
  envelope); the callee answers when DTLS connects, rejects, or ignores the call.
- `fake.hold["start_call"] = event`: the answer to `POST /v1/calls` (made as usual, the call and
  its media already begun) is sent only once `event` is set: a webhook can outrun it.
- `POST /v1/calls/{id}/play` (web) downloads the audio like Pilot would (`fake.plays`,
  `await fake.wait_played(call_id)`) and hangs up after it when `hangupAfterPlay` is true.

Usage::

    async with FakePilotStatus(number_type="meta") as fake:
        fake.set_permission("+5511999999999", "temporary")
        fake.error("start_call", "META_CALL_PERMISSION_REQUIRED", status=400, times=1)
        ...  # point the client at fake.url
        assert fake.contract_violations == []

`close()` ends everything the fake started: open WebSockets, background tasks (webhook
sender, downloads, media flows), every `MetaEdge`, and its HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.exceptions import PathError
from werkzeug.datastructures import Headers, ImmutableMultiDict

if TYPE_CHECKING:  # aiortc/av are imported only when a MediaScenario is used
    from tests.fakes.gst_edge import GstEdge
    from tests.fakes.meta_edge import MetaEdge

__all__ = [
    "CONTRACT_PATH",
    "GARBAGE_SDP",
    "OPERATIONS",
    "FakePilotStatus",
    "MediaScenario",
    "PlayRecord",
    "RealtimeRecord",
    "RecordedRequest",
    "WebhookDelivery",
]

CONTRACT_PATH = Path(__file__).resolve().parents[1] / "contract" / "pilot-status-openapi.json"

NumberType = Literal["meta", "web", "other"]
PermissionStatus = Literal["no_permission", "temporary", "permanent"]

# (method, path regex, operation name). Concrete paths come before `{callId}` templates.
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern), operation)
    for method, pattern, operation in (
        ("GET", r"/v1/calls", "list_calls"),
        ("POST", r"/v1/calls", "start_call"),
        ("GET", r"/v1/calls/settings", "get_settings"),
        ("PUT", r"/v1/calls/settings", "update_settings"),
        ("GET", r"/v1/calls/permissions", "get_permission"),
        ("POST", r"/v1/calls/permissions/request", "request_permission"),
        ("GET", r"/v1/service-window", "service_window"),
        ("GET", r"/v1/calls/(?P<call>[^/]+)", "get_call"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/pre-accept", "pre_accept"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/accept", "accept"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/reject", "reject"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/terminate", "terminate"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/play", "play"),
        ("POST", r"/v1/calls/(?P<call>[^/]+)/realtime-session", "realtime_session"),
    )
)
OPERATIONS: frozenset[str] = frozenset(operation for _, _, operation in _ROUTES)
_META_ONLY = frozenset(
    {"get_settings", "update_settings", "get_permission", "request_permission", "pre_accept"}
)
_WEB_ONLY = frozenset({"play", "realtime_session"})
_CALL_STATUSES = frozenset(
    {"INITIATED", "RINGING", "ACCEPTED", "REJECTED", "COMPLETED", "FAILED", "MISSED"}
)
_TERMINAL = frozenset({"REJECTED", "COMPLETED", "FAILED", "MISSED"})
# Status -> normalized webhook event (§6.3); INITIATED has none.
_STATUS_EVENTS = {
    "RINGING": "call.ringing",
    "ACCEPTED": "call.connected",
    "REJECTED": "call.ended",
    "COMPLETED": "call.ended",
    "FAILED": "call.ended",
    "MISSED": "call.missed",
}
GARBAGE_SDP = "v=0\r\nthis is not sdp\r\n"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_HTTP_TIMEOUT = 5.0

_NOT_CALLING = "Calling is only supported for Meta Cloud API and Pilot Status (web) numbers."
_META_ONLY_MSG = "This endpoint is only available for Meta Cloud API numbers"
_WEB_ONLY_MSG = "This endpoint is only available for Pilot Status (web) numbers"
# Documented `error` texts (§1.3, §4.1), used by `error()` when no message is given.
_MESSAGES: dict[str | None, str] = {
    "CALL_NOT_FOUND": "Call not found",
    "WHATSAPP_INSTANCE_NOT_CONNECTED": "WhatsApp instance not connected",
    "TENANT_SCOPE_NOT_ALLOWED": "Tenant-scoped keys cannot call number endpoints",
    "FEATURE_NOT_SUPPORTED": _NOT_CALLING,
    "NUMBER_NOT_FOUND": "WhatsApp number not found",
    "META_CALL_PERMISSION_REQUIRED": "The user has not granted permission to be called",
    "META_CALL_PERMISSION_REQUEST_LIMIT": "Call permission request limit reached",
    "META_CALLING_PAYMENT_REQUIRED": "A payment method is required for calling",
}
_STATUS_MESSAGES = {401: "Unauthorized", 404: "Not found", 429: "Too many requests"}

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_BUSINESS_NUMBER = "5511888888888"
_SETTINGS_EXAMPLE: dict[str, Any] = {  # §2.7
    "status": "ENABLED",
    "call_icon_visibility": "DEFAULT",
    "callback_permission_status": "ENABLED",
    "call_hours": {"status": "DISABLED"},
}


@dataclass
class RecordedRequest:
    """One request as the fake received it (header names are lower-cased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any  # parsed body, None when empty or not JSON
    raw: bytes
    operation: str | None  # a name from OPERATIONS, None for anything else
    received_at: float  # time.perf_counter() when the handler got the request
    responded_at: float | None = None  # perf_counter() right before answering (or dropping)
    status: int | None = None  # status we answered; None when dropped or never answered


@dataclass
class MediaScenario:
    """How Meta's side behaves for `POST /v1/calls` with an SDP offer (Meta numbers only).

    - `answer_via`: "poll" = the answer is only in `GET /v1/calls/{id}?includeSdp=1`
      (`sdpAnswer`); "webhook" = also POSTed as Meta's raw `calls` envelope (`event:
      "connect"`) to the `webhooks_to()` target.
    - `answer`: "ok" = the edge's real answer; "none" = never any answer; "garbage" =
      `GARBAGE_SDP`; "blackhole" = a valid answer whose candidates (and `m=` port) all
      point at a closed UDP port on 127.0.0.1, the edge itself being closed (ICE never
      connects); "wrong_fingerprint" = the real answer with another certificate's sha-256
      fingerprint (ICE connects, the business's DTLS check refuses the edge).
    - `answer_delay`: seconds between the edge's answer and its publication.
    - `answer_in_api`: False = `GET /v1/calls/{id}?includeSdp=1` never shows the answer (with
      `answer_via="webhook"`, the webhook is the only way it comes).
    - `callee`: "answer" = ACCEPTED (`call.connected`) when the edge's ICE+DTLS connects;
      "reject" = REJECTED (`call.ended`) `ring_delay` seconds after the POST, edge closed;
      "ignore" = stays RINGING.
    - `edge_tone_hz`/`edge_amplitude`: what the edge sends back (None = silence).
    - `edge_sends`: False = the edge negotiates sendrecv but never sends a single RTP packet.
    - `edge`: "aiortc" = `MetaEdge` in this process; "gstreamer" = `GstEdge`, webrtcbin in a
      subprocess (an RSA certificate, OpenSSL's DTLS server, libnice; needs
      scripts/install-test-peers.sh).
    """

    answer_via: Literal["poll", "webhook"] = "poll"
    answer: Literal["ok", "none", "garbage", "blackhole", "wrong_fingerprint"] = "ok"
    answer_delay: float = 0.0
    answer_in_api: bool = True
    callee: Literal["answer", "reject", "ignore"] = "answer"
    ring_delay: float = 0.05
    edge_tone_hz: float | None = 880.0
    edge_amplitude: float = 0.01
    edge_sends: bool = True
    edge: Literal["aiortc", "gstreamer"] = "aiortc"


@dataclass
class WebhookDelivery:
    """One POST the fake made (or is about to make) to the webhook target."""

    url: str
    payload: Any  # the JSON object sent
    raw: bytes  # the exact body (what the signature covers)
    headers: dict[str, str]
    status: int | None = None  # receiver's HTTP status once delivered
    error: str | None = None  # transport error, if any
    done: bool = False


@dataclass
class PlayRecord:
    """One accepted `POST /v1/calls/{id}/play` and the fake's download of its audio.

    Only loopback URLs (127.0.0.1, localhost, ::1) are fetched; any other host is recorded
    as `error` without network access. `finished` is set after the download (and the
    hang-up, when `hangupAfterPlay` is true and the download gave a 2xx).
    """

    call_id: str
    json: dict[str, Any]  # the request body
    url: str | None  # the URL the fake fetched (see FakePilotStatus.play_field)
    status: int | None = None
    content_type: str | None = None
    body: bytes = b""
    error: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)


@dataclass
class RealtimeRecord:
    """One realtime media WebSocket (§2.6) accepted by the fake.

    `opened_at`/`closed_at` are `time.perf_counter()` values; `closed` is set when the
    socket ends. The fake sends nothing by itself; `send_bytes()` lets a test talk back.
    """

    call_id: str
    mode: str | None
    token: str
    opened_at: float
    frames: list[bytes] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.time() of each frame
    texts: list[str] = field(default_factory=list)
    closed_at: float | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    ws: web.WebSocketResponse | None = field(default=None, repr=False, compare=False)

    async def send_bytes(self, data: bytes) -> None:
        if self.ws is None or self.ws.closed:
            raise RuntimeError("the realtime WebSocket is not open")
        await self.ws.send_bytes(data)


@dataclass
class _WsGrant:
    call_id: str
    mode: str | None
    expires_at: float  # time.monotonic()
    used: bool = False


@dataclass
class _Script:
    operation: str
    to: str | None  # callee digits
    status: int
    body: Any
    raw: bytes | None
    content_type: str
    delay: float
    drop: bool
    remaining: int | None

    def response(self) -> web.Response:
        if self.raw is not None:
            payload = self.raw
        elif self.body is not None:
            payload = json.dumps(self.body).encode()
        else:
            payload = b""
        return web.Response(
            status=self.status, body=payload, headers={"Content-Type": self.content_type}
        )


@dataclass
class _Permission:
    status: PermissionStatus
    expiration_time: int | None
    can_start: bool | None
    usage: int
    max_allowed: int


class _ContractRequest:
    """openapi-core `Request` protocol view of an aiohttp request.

    The request is presented as addressed to the contract's server URL, because
    openapi-core matches host and path against `servers` (the loopback host/port never
    match); openapi-core's own aiohttp adapter would also drop the port.
    """

    def __init__(self, host_url: str, request: web.BaseRequest, body: bytes) -> None:
        self.host_url = host_url
        self.path = request.path
        self.method = request.method.lower()
        self.body: bytes | None = body or None
        self.content_type = request.headers.get("Content-Type", "").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(request.query.items())),
            header=Headers(list(request.headers.items())),
            cookie=ImmutableMultiDict(list(request.cookies.items())),
        )


@cache
def _contract() -> tuple[OpenAPI, str]:
    """The contract and its server URL, loaded once per process.

    openapi-core's own check of the spec document is skipped (`spec_validator_cls=None`):
    it costs ~0.7 s per process and the contract file is not this fake's to police.
    """
    server_url: str = json.loads(CONTRACT_PATH.read_text())["servers"][0]["url"]
    config = Config(spec_validator_cls=None)
    return OpenAPI.from_file_path(str(CONTRACT_PATH), config=config), server_url.rstrip("/")


def _describe(error: Exception) -> list[str]:
    """Readable lines for one openapi-core error, schema errors included."""
    cause = error.__cause__
    schema_errors = getattr(cause, "schema_errors", None)
    if not schema_errors:
        return [f"{type(error).__name__}: {error}"]
    lines = []
    for schema_error in schema_errors:
        where = "/".join(str(part) for part in schema_error.absolute_path) or "<root>"
        lines.append(f"{type(error).__name__}: {where}: {schema_error.message}")
    return lines


class _CountingServer(web.Server):
    """Low-level aiohttp server that reports every accepted TCP connection."""

    def __init__(self, handler: Any, *, on_connection: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._on_connection = on_connection

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._on_connection()
        super().connection_made(handler, transport)


def _route(method: str, path: str) -> tuple[str | None, str | None]:
    """(operation name, call reference from the path) or (None, None)."""
    for route_method, pattern, operation in _ROUTES:
        match = pattern.fullmatch(path)
        if match and route_method == method:
            return operation, match.groupdict().get("call")
    return None, None


def _digits(phone: object) -> str:
    return re.sub(r"[^0-9]", "", phone) if isinstance(phone, str) else ""


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _ulid() -> str:
    """26 Crockford base32 chars: 48-bit millisecond time + 80 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _json(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status)


def _error(status: int, code: str | None, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if code is not None:
        body["code"] = code
    body.update(extra)
    return _json(status, body)


def _validation_error(*details: str) -> web.Response:
    return _error(400, None, "Validation error", details=list(details))


def _dead_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _other_fingerprint(sdp: str) -> str:
    """`sdp` whose sha-256 fingerprint is another (random) certificate's."""
    other = ":".join(f"{byte:02X}" for byte in secrets.token_bytes(32))
    return re.sub(r"(?m)^a=fingerprint:sha-256 \S+", f"a=fingerprint:sha-256 {other}", sdp)


def _blackhole(sdp: str, port: int) -> str:
    """`sdp` with the `m=` port, `c=` address and every candidate at 127.0.0.1:`port`."""
    out: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for line in sdp.splitlines():
        if line.startswith("m="):
            parts = line.split(" ")
            parts[1] = str(port)
            line = " ".join(parts)
        elif line.startswith("c=IN "):
            line = "c=IN IP4 127.0.0.1"
        elif line.startswith("a=candidate:"):
            parts = line.split(" ")
            parts[4], parts[5] = "127.0.0.1", str(port)
            key = (parts[1], parts[2].lower())
            if key in seen:
                continue
            seen.add(key)
            line = " ".join(parts)
        out.append(line)
    return "\r\n".join(out) + "\r\n"


class FakePilotStatus:
    """Pilot Status on 127.0.0.1; see the module docstring for the request pipeline."""

    business_number = _BUSINESS_NUMBER  # digits, used as `fromNumber` of outbound calls
    # Name of the duration field of `call.ended` webhooks (API.md D10: docs also say "duration").
    duration_field: Literal["durationSeconds", "duration"] = "durationSeconds"
    # Seconds a realtime token stays valid (the answer always says expiresInSeconds: 120).
    realtime_ttl: float = 120.0

    def __init__(
        self,
        *,
        api_key: str = "ps_" + "a" * 48,
        api_key_id: str | None = None,
        number_type: NumberType = "web",
    ) -> None:
        self.api_key = api_key
        self.api_key_id = api_key_id
        self.number_type: str = number_type
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.contract_violations: list[str] = []
        self.connections_opened = 0
        self.calls: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] = json.loads(json.dumps(_SETTINGS_EXAMPLE))
        self._permissions: dict[str, _Permission] = {}
        self._scripts: list[_Script] = []
        self._runner: web.ServerRunner | None = None
        self._port = 0
        # Meta media (opt-in), webhooks, web media.
        self.media: MediaScenario | None = None
        self.edges: dict[str, MetaEdge | GstEdge] = {}
        self.webhook_url: str | None = None
        self.webhook_secret: str | None = None
        self.deliveries: list[WebhookDelivery] = []
        self._delivered = asyncio.Condition()  # notified after each delivery
        self.hold: dict[str, asyncio.Event] = {}  # operation → answered once the event is set
        self.play_field: Literal["mediaUrl", "url", "audioUrl"] = "mediaUrl"
        self.plays: list[PlayRecord] = []
        self.realtime: dict[str, RealtimeRecord] = {}
        self.background_errors: list[str] = []  # failures of the fake's own background tasks
        self._ws_grants: dict[str, _WsGrant] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._call_tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._outbox: asyncio.Queue[WebhookDelivery] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = False
        server = _CountingServer(
            self._handle, on_connection=self._count_connection, access_log=None
        )
        # A short shutdown timeout: close() must not wait for delayed (scripted) handlers.
        self._runner = web.ServerRunner(server, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self._port}"

    async def close(self) -> None:
        """Stop serving, then end WebSockets, background tasks, edges and the HTTP client."""
        self._closing = True
        for record in list(self.realtime.values()):
            if record.ws is not None and not record.ws.closed:
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(record.ws.close(), 1.0)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._sender, self._outbox = None, None
        await asyncio.gather(*(edge.close() for edge in self.edges.values()))
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _count_connection(self) -> None:
        self.connections_opened += 1

    # -- test controls --------------------------------------------------------------------

    def calls_started(self) -> list[RecordedRequest]:
        """Every POST /v1/calls received, whatever the answer."""
        return [r for r in self.requests if r.operation == "start_call"]

    def script(
        self,
        operation: str,
        *,
        to: str | None = None,
        status: int = 200,
        body: Any = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
        delay: float = 0.0,
        drop: bool = False,
        times: int | None = None,
    ) -> None:
        """Override the answer to `operation` (optionally only for callee `to`).

        `raw` bytes win over `body` (JSON); neither gives an empty body. After `delay`
        seconds the fake answers, or with `drop=True` closes the connection without a
        response. `times=None` means forever. The most recent matching script wins.
        Auth and contract checks still run first.
        """
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        self._scripts.append(
            _Script(
                operation,
                _digits(to) if to is not None else None,
                status,
                body,
                raw,
                content_type,
                delay,
                drop,
                times,
            )
        )

    def error(
        self,
        operation: str,
        code: str | None,
        *,
        status: int,
        message: str | None = None,
        to: str | None = None,
        times: int | None = None,
    ) -> None:
        """Script a documented error body `{"error": message, "code": code}`.

        `code=None` omits `code`; `message=None` uses the documented text for the code or
        status (e.g. "Call not found", "Too many requests"), else "Error".
        """
        text = message or _MESSAGES.get(code) or _STATUS_MESSAGES.get(status) or "Error"
        body: dict[str, Any] = {"error": text}
        if code is not None:
            body["code"] = code
        self.script(operation, to=to, status=status, body=body, times=times)

    def set_permission(
        self,
        to: str,
        status: PermissionStatus = "temporary",
        *,
        expiration_time: int | None = None,
        can_start: bool | None = None,
        usage: int = 0,
        max_allowed: int = 100,
    ) -> None:
        """Meta call permission of callee `to` (§2.8). A temporary one expires in 7 days
        unless `expiration_time` (unix seconds) is given; `can_start=None` derives
        `start_call.can_perform_action` from the status and usage < max_allowed."""
        if expiration_time is None and status == "temporary":
            expiration_time = int(time.time()) + 7 * 86400
        self._permissions[_digits(to)] = _Permission(
            status, expiration_time, can_start, usage, max_allowed
        )

    def add_call(
        self,
        to: str,
        *,
        direction: Literal["INBOUND", "OUTBOUND"] = "INBOUND",
        status: str = "RINGING",
        **fields: Any,
    ) -> dict[str, Any]:
        """Store a call as if it already existed (e.g. an inbound one); returns the DTO."""
        call = self._new_call(_digits(to), direction=direction, status=status)
        call.update(fields)
        return call

    def emit_status(self, call_id: str, status: str, **fields: Any) -> None:
        """Move a stored call (by id or externalCallId) to `status`; `fields` override DTO
        fields. Fills connectedAt on ACCEPTED, endedAt/durationSeconds on terminal states.
        A real change of status is sent to the `webhooks_to()` target, if any, and a
        terminal one closes the call's Meta edge and its realtime WebSocket."""
        call = self._find_call(call_id)
        if call is None:
            raise KeyError(call_id)
        if status not in _CALL_STATUSES:
            raise ValueError(f"unknown call status {status!r}")
        self._transition(call, status, **fields)

    def webhooks_to(self, url: str | None, secret: str | None = None) -> None:
        """Deliver webhooks to `url` (None stops), signed with `secret` when given."""
        self.webhook_url = url
        self.webhook_secret = secret

    async def wait_deliveries(self, timeout: float = 5.0) -> list[WebhookDelivery]:  # noqa: ASYNC109
        """Wait until every queued webhook was POSTed; returns `deliveries`."""
        if self._outbox is not None:
            await asyncio.wait_for(self._outbox.join(), timeout)
        return self.deliveries

    async def wait_delivery(
        self,
        match: Callable[[WebhookDelivery], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> WebhookDelivery:
        """The first finished delivery that `match`es, once there is one."""

        def found() -> WebhookDelivery | None:
            return next((d for d in self.deliveries if d.done and match(d)), None)

        async with asyncio.timeout(timeout), self._delivered:
            await self._delivered.wait_for(lambda: found() is not None)
        delivery = found()
        assert delivery is not None
        return delivery

    async def wait_played(self, call_id: str, timeout: float = 5.0) -> PlayRecord:  # noqa: ASYNC109
        """The latest play of `call_id` (id or externalCallId) once its download finished;
        waits for the play request itself when none was received yet."""
        async with asyncio.timeout(timeout):
            while True:
                call = self._find_call(call_id)
                wanted = call["id"] if call else call_id
                records = [r for r in self.plays if r.call_id == wanted]
                if records:
                    await records[-1].finished.wait()
                    return records[-1]
                await asyncio.sleep(0.01)

    async def wait_status(
        self,
        call_id: str,
        status: str,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Wait until the stored call (id or externalCallId) has `status`; returns it."""
        async with asyncio.timeout(timeout):
            while True:
                call = self._find_call(call_id)
                if call is not None and call["status"] == status:
                    return call
                await asyncio.sleep(0.01)

    # -- request pipeline -----------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path.startswith("/ws/"):
            return await self._realtime_ws(request)  # not REST: no recording, no contract
        received_at = time.perf_counter()
        raw = await request.read()
        operation, call_ref = _route(request.method, request.path)
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={name.lower(): value for name, value in request.headers.items()},
            json=_parse_json(raw),
            raw=raw,
            operation=operation,
            received_at=received_at,
        )
        self.requests.append(record)

        response = self._check(request, raw, record)
        script = None
        if response is None and operation is not None:
            script = self._take_script(operation, self._callee(record, call_ref))
        if script is not None:
            if script.delay > 0:
                await asyncio.sleep(script.delay)
            if script.drop:
                record.responded_at = time.perf_counter()
                if request.transport is not None:
                    request.transport.close()
                # aiohttp fails to write this to the closing transport and treats it as a
                # client disconnect: the client sees the connection close with no response.
                return web.Response()
            response = script.response()
        if response is None:
            response = self._default(operation, call_ref, record)
        gate = self.hold.get(operation or "")
        if gate is not None:
            await gate.wait()
        record.status = response.status
        record.responded_at = time.perf_counter()
        return response

    def _check(
        self, request: web.BaseRequest, raw: bytes, record: RecordedRequest
    ) -> web.Response | None:
        """Auth, then the contract: an error response, or None when the request is fine."""
        key, key_id = record.headers.get("x-api-key"), record.headers.get("x-api-key-id")
        if key != self.api_key and (self.api_key_id is None or key_id != self.api_key_id):
            return _error(401, None, "Unauthorized")
        api, server_url = _contract()
        errors = list(api.iter_request_errors(_ContractRequest(server_url, request, raw)))
        if not errors:
            return None
        details = [line for error in errors for line in _describe(error)]
        where = f"{record.method} {record.path}"
        self.contract_violations.extend(f"{where}: {line}" for line in details)
        if any(isinstance(error, PathError) for error in errors):
            return _error(404, None, "Not found")
        body = record.json if isinstance(record.json, dict) else {}
        if record.operation in ("start_call", "request_permission") and "to" not in body:
            return _error(400, "MISSING_TO", "Validation error", details=details)
        return _error(400, None, "Validation error", details=details)

    def _callee(self, record: RecordedRequest, call_ref: str | None) -> str | None:
        """Callee digits from the body `to`, the query (`to`/`destinationNumber`) or the
        stored call named in the path."""
        body = record.json
        if isinstance(body, dict) and isinstance(body.get("to"), str):
            return _digits(body["to"])
        for name in ("to", "destinationNumber"):
            if name in record.query:
                return _digits(record.query[name])
        call = self._find_call(call_ref) if call_ref else None
        return call.get("peerNumber") if call else None

    def _take_script(self, operation: str, callee: str | None) -> _Script | None:
        for script in reversed(self._scripts):
            if script.operation != operation or script.to not in (None, callee):
                continue
            if script.remaining is not None:
                script.remaining -= 1
                if script.remaining == 0:
                    self._scripts.remove(script)
            return script
        return None

    # -- default behaviour ----------------------------------------------------------------

    def _default(
        self, operation: str | None, call_ref: str | None, record: RecordedRequest
    ) -> web.Response:
        if operation is None:
            return _error(404, None, "Not found")
        if operation == "service_window":
            return self._service_window(record)
        if self.number_type not in ("meta", "web"):
            return _error(400, "FEATURE_NOT_SUPPORTED", _NOT_CALLING)
        if operation in _META_ONLY and self.number_type != "meta":
            return _error(400, "FEATURE_NOT_SUPPORTED", _META_ONLY_MSG)
        if operation in _WEB_ONLY and self.number_type != "web":
            return _error(400, "FEATURE_NOT_SUPPORTED", _WEB_ONLY_MSG)
        body = record.json if isinstance(record.json, dict) else {}
        if call_ref is None:
            handler = {
                "start_call": self._start_call,
                "list_calls": self._list_calls,
                "get_settings": self._get_settings,
                "update_settings": self._update_settings,
                "get_permission": self._get_permission,
                "request_permission": self._request_permission,
            }[operation]
            return handler(body, record.query)
        call = self._find_call(call_ref)
        if call is None:
            return _error(404, "CALL_NOT_FOUND", "Call not found")
        return self._call_action(operation, call, body, record.query)

    def _start_call(self, body: Mapping[str, Any], query: Mapping[str, str]) -> web.Response:
        to = _digits(body.get("to"))
        if not to:
            return _error(400, "MISSING_TO", "Missing required field: to")
        sdp = body.get("sdp")
        if self.number_type == "web":
            if "sdp" in body or "sdpType" in body:
                return _validation_error("sdp/sdpType must be omitted on web numbers")
        else:
            if not sdp:
                return _validation_error("sdp (the SDP offer) is required on Meta numbers")
            if body.get("sdpType", "offer") != "offer":
                return _validation_error("sdpType must be 'offer'")
            permission = self._permissions.get(to)
            if permission is None or permission.status == "no_permission":
                return _error(
                    400, "META_CALL_PERMISSION_REQUIRED", _MESSAGES["META_CALL_PERMISSION_REQUIRED"]
                )
            permission.usage += 1
        call = self._new_call(to, direction="OUTBOUND", status="INITIATED")
        call["bizOpaqueCallbackData"] = body.get("bizOpaqueCallbackData")
        if self.number_type == "meta":
            call["sdpOffer"] = sdp
        response = _json(201, {k: call[k] for k in ("id", "externalCallId", "status")})
        if self.number_type == "meta" and self.media is not None and isinstance(sdp, str):
            self._begin_media(call, sdp, dataclasses.replace(self.media))
        return response

    def _list_calls(self, body: Mapping[str, Any], query: Mapping[str, str]) -> web.Response:
        limit_text = query.get("limit", "25")
        if not re.fullmatch(r"[0-9]{1,3}", limit_text) or not 1 <= int(limit_text) <= 100:
            return _error(400, "INVALID_LIMIT", "limit must be a number between 1 and 100")
        before = None
        if "before" in query:
            before = _parse_iso(query["before"])
            if before is None:
                return _error(400, "INVALID_BEFORE", "before must be an ISO 8601 date")
        newest_first = sorted(
            reversed(self.calls.values()),
            key=lambda call: _parse_iso(call["createdAt"]) or datetime.min.replace(tzinfo=UTC),
            reverse=True,
        )
        if before is not None:
            newest_first = [
                call
                for call in newest_first
                if (created := _parse_iso(call["createdAt"])) is not None and created < before
            ]
        return _json(200, {"calls": [self._public(c) for c in newest_first[: int(limit_text)]]})

    def _get_settings(self, body: Mapping[str, Any], query: Mapping[str, str]) -> web.Response:
        return _json(200, {"calling": self.settings})

    def _update_settings(self, body: Mapping[str, Any], query: Mapping[str, str]) -> web.Response:
        if "sip" in body:
            return _validation_error("sip settings cannot be changed through the API")
        self.settings.update(body)  # call_hours replaces the stored object entirely
        return _json(200, {"success": True})

    def _get_permission(self, body: Mapping[str, Any], query: Mapping[str, str]) -> web.Response:
        permission = self._permissions.get(_digits(query.get("to"))) or _Permission(
            "no_permission", None, None, 0, 100
        )
        can_start = permission.can_start
        if can_start is None:
            can_start = (
                permission.status != "no_permission" and permission.usage < permission.max_allowed
            )
        state: dict[str, Any] = {"status": permission.status}
        if permission.expiration_time is not None:
            state["expiration_time"] = permission.expiration_time
        return _json(
            200,
            {
                "permission": state,
                "actions": [
                    {
                        "action_name": "send_call_permission_request",
                        "can_perform_action": True,
                        "limits": [{"time_period": "PT24H", "max_allowed": 1, "current_usage": 0}],
                    },
                    {
                        "action_name": "start_call",
                        "can_perform_action": can_start,
                        "limits": [
                            {
                                "time_period": "PT24H",
                                "max_allowed": permission.max_allowed,
                                "current_usage": permission.usage,
                            }
                        ],
                    },
                ],
            },
        )

    def _request_permission(
        self, body: Mapping[str, Any], query: Mapping[str, str]
    ) -> web.Response:
        if not _digits(body.get("to")):
            return _error(400, "MISSING_TO", "Missing required field: to")
        return _json(201, {"messageId": "wamid." + secrets.token_urlsafe(24)})

    def _service_window(self, record: RecordedRequest) -> web.Response:
        destination = record.query.get("destinationNumber", "").strip()
        if not re.fullmatch(r"\+?[0-9]{8,15}", destination):
            return _error(
                400,
                "INVALID_DESTINATION",
                "destinationNumber must be a valid phone (E.164, with or without +)",
            )
        if self.number_type == "meta":
            last_inbound = datetime.now(UTC) - timedelta(hours=1)
            return _json(
                200,
                {
                    "open": True,
                    "windowType": "META_24H",
                    "lastInboundAt": _iso(last_inbound),
                    "expiresAt": _iso(last_inbound + timedelta(hours=24)),
                },
            )
        return _json(
            200, {"open": True, "windowType": "NONE", "lastInboundAt": None, "expiresAt": None}
        )

    def _call_action(
        self,
        operation: str,
        call: dict[str, Any],
        body: Mapping[str, Any],
        query: Mapping[str, str],
    ) -> web.Response:
        if operation == "get_call":
            return _json(200, self._public(call, include_sdp=query.get("includeSdp") == "1"))
        if operation == "realtime_session":
            token = secrets.token_urlsafe(12)
            mode = body.get("mode")
            self._ws_grants[token] = _WsGrant(
                call["id"],
                mode if isinstance(mode, str) else None,
                time.monotonic() + self.realtime_ttl,
            )
            return _json(
                200,
                {
                    "wsUrl": f"ws://127.0.0.1:{self._port}/ws/{call['id']}?token={token}",
                    "token": token,
                    "expiresInSeconds": 120,
                },
            )
        if operation == "play":  # §2.6: queued until the call connects; status not persisted
            if self.play_field != "mediaUrl" and self.play_field not in body:
                missing = f"{self.play_field} is required"
                return _error(400, "VALIDATION", "Validation error", details=[missing])
            record = PlayRecord(call["id"], dict(body), self._play_url(body))
            self.plays.append(record)
            self._spawn(self._play(call, record))
            return self._action_result(call, "ACCEPTED")
        if operation in ("pre_accept", "accept") and self.number_type == "meta":
            if not body.get("sdp"):
                return _validation_error("sdp (the SDP answer) is required on Meta numbers")
            call["sdpAnswer"] = body["sdp"]
        new_status = {
            "pre_accept": "RINGING",
            "accept": "ACCEPTED",
            "reject": "REJECTED",
            "terminate": "COMPLETED",
        }[operation]
        self._transition(call, new_status)
        return self._action_result(call, new_status)

    # -- call store -----------------------------------------------------------------------

    def _new_call(self, to: str, *, direction: str, status: str) -> dict[str, Any]:
        now = _iso(datetime.now(UTC))
        meta = self.number_type == "meta"
        external = "wacid." + secrets.token_urlsafe(24) if meta else secrets.token_hex(16).upper()
        call: dict[str, Any] = {
            "id": "call_" + _ulid(),
            "externalCallId": external,
            "direction": direction,
            "status": status,
            "peerNumber": to,
            "fromNumber": self.business_number if direction == "OUTBOUND" else to,
            "conversationId": None,
            "bizOpaqueCallbackData": None,
            "startedAt": now,
            "connectedAt": None,
            "endedAt": None,
            "durationSeconds": None,
            "errorCode": None,
            "errorMessage": None,
            "sdpOffer": None,
            "sdpAnswer": None,
            "createdAt": now,
            "updatedAt": now,
        }
        self.calls[call["id"]] = call
        return call

    def _find_call(self, ref: str) -> dict[str, Any] | None:
        if ref in self.calls:
            return self.calls[ref]
        return next((c for c in self.calls.values() if c.get("externalCallId") == ref), None)

    def _set_status(self, call: dict[str, Any], status: str) -> None:
        now = datetime.now(UTC)
        call["status"] = status
        call["updatedAt"] = _iso(now)
        if status == "ACCEPTED" and call.get("connectedAt") is None:
            call["connectedAt"] = _iso(now)
        if status in _TERMINAL and call.get("endedAt") is None:
            call["endedAt"] = _iso(now)
            connected = _parse_iso(call["connectedAt"]) if call.get("connectedAt") else None
            if connected is not None and call.get("durationSeconds") is None:
                call["durationSeconds"] = int((now - connected).total_seconds())

    def _public(self, call: Mapping[str, Any], *, include_sdp: bool = False) -> dict[str, Any]:
        dto = {k: v for k, v in call.items() if k not in ("sdpOffer", "sdpAnswer")}
        if include_sdp:
            web_number = self.number_type != "meta"
            dto["sdpOffer"] = None if web_number else call.get("sdpOffer")
            dto["sdpAnswer"] = None if web_number else call.get("sdpAnswer")
        return dto

    @staticmethod
    def _action_result(call: Mapping[str, Any], status: str) -> web.Response:
        return _json(200, {"success": True, "id": call["id"], "status": status})

    # -- status changes and webhooks ------------------------------------------------------

    def _transition(self, call: dict[str, Any], status: str, **fields: Any) -> None:
        """Set `status` (and `fields`); on a real change notify the webhook target, and on a
        terminal status close the call's Meta edge and end its media tasks."""
        before = call["status"]
        self._set_status(call, status)
        call.update(fields)
        if status == before:
            return
        self._send_status_event(call)
        if status in _TERMINAL and call["id"] in self.edges:
            self._spawn(self._stop_media(call["id"]))
        realtime = self.realtime.get(call["id"])
        if status in _TERMINAL and realtime is not None and realtime.ws is not None:
            self._spawn(realtime.ws.close())  # the call's media session ends with it

    def _send_status_event(self, call: Mapping[str, Any]) -> None:
        event = _STATUS_EVENTS.get(call["status"])
        if event is None:
            return
        inbound = call["direction"] == "INBOUND"
        payload: dict[str, Any] = {
            "event": event,
            "callId": call["id"],
            "externalCallId": call["externalCallId"],
            "direction": call["direction"],
            "from": call["peerNumber"] if inbound else call["fromNumber"],
            "to": self.business_number if inbound else call["peerNumber"],
            "status": call["status"],
            "timestamp": _iso(datetime.now(UTC)),
        }
        if event == "call.ended" and call.get("durationSeconds") is not None:
            payload[self.duration_field] = call["durationSeconds"]
        self._send_webhook(payload)

    def _connect_envelope(self, call: Mapping[str, Any], sdp: str) -> dict[str, Any]:
        """Meta's raw `calls` webhook carrying the SDP answer (§1.1 step 3, §6.2)."""
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": self.business_number, "phone_number_id": "1"},
            "calls": [
                {
                    "id": call["externalCallId"],
                    "to": call["peerNumber"],
                    "from": self.business_number,
                    "event": "connect",
                    "direction": "BUSINESS_INITIATED",
                    "timestamp": str(int(time.time())),
                    "session": {"sdp_type": "answer", "sdp": sdp},
                }
            ],
        }
        return {
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "calls", "value": value}]}],
        }

    def _send_webhook(self, payload: dict[str, Any]) -> None:
        """Queue one delivery to the webhook target (nothing when there is none)."""
        if self.webhook_url is None or self._closing:
            return
        raw = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": "evt_" + _ulid()}
        if self.webhook_secret:
            digest = hmac.new(self.webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
            headers["x-pilot-status-signature"] = digest
        delivery = WebhookDelivery(self.webhook_url, payload, raw, headers)
        self.deliveries.append(delivery)
        if self._outbox is None:
            self._outbox = asyncio.Queue()
        self._outbox.put_nowait(delivery)
        if self._sender is None or self._sender.done():
            self._sender = self._spawn(self._deliver(self._outbox))

    async def _deliver(self, outbox: asyncio.Queue[WebhookDelivery]) -> None:
        """The one sender: POST queued deliveries in order, without retries."""
        while True:
            delivery = await outbox.get()
            try:
                async with self._client().post(
                    delivery.url, data=delivery.raw, headers=delivery.headers
                ) as answer:
                    delivery.status = answer.status
                    await answer.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                delivery.error = f"{type(exc).__name__}: {exc}"
            finally:
                delivery.done = True
                outbox.task_done()
                async with self._delivered:
                    self._delivered.notify_all()

    # -- Meta media -----------------------------------------------------------------------

    def _begin_media(self, call: dict[str, Any], sdp: str, scenario: MediaScenario) -> None:
        edge: MetaEdge | GstEdge
        if scenario.edge == "gstreamer":
            from tests.fakes.gst_edge import GstEdge

            if not scenario.edge_sends:
                raise ValueError("the GStreamer edge always sends")
            edge = GstEdge(sdp, tone_hz=scenario.edge_tone_hz, amplitude=scenario.edge_amplitude)
        else:
            from tests.fakes.meta_edge import MetaEdge

            edge = MetaEdge(
                sdp,
                tone_hz=scenario.edge_tone_hz,
                amplitude=scenario.edge_amplitude,
                sends=scenario.edge_sends,
            )
        self.edges[call["id"]] = edge
        if scenario.answer_via == "webhook" and self.webhook_url is None:
            self.background_errors.append(
                f"{call['id']}: answer_via='webhook' but no webhooks_to() target"
            )
        self._transition(call, "RINGING")
        self._spawn(self._media_flow(call, edge, scenario), call_id=call["id"])
        if scenario.callee == "reject":
            self._spawn(self._reject_after(call, scenario.ring_delay), call_id=call["id"])

    async def _media_flow(
        self, call: dict[str, Any], edge: MetaEdge | GstEdge, scenario: MediaScenario
    ) -> None:
        if scenario.answer == "none":
            return
        if scenario.answer == "garbage":
            published = GARBAGE_SDP
        else:
            try:
                published = await edge.answer(call["sdpOffer"])
            except Exception as exc:  # a bad offer: the call fails, as with Meta's error 100
                edge.error = f"{type(exc).__name__}: {exc}"
                if call["status"] not in _TERMINAL:
                    message = f"fake Meta edge could not answer: {edge.error}"
                    self._transition(
                        call, "FAILED", errorCode="FAKE_EDGE_ERROR", errorMessage=message
                    )
                return
            if scenario.answer == "blackhole":
                published = _blackhole(published, _dead_udp_port())
                await edge.close()
            elif scenario.answer == "wrong_fingerprint":
                published = _other_fingerprint(published)
        if scenario.answer_delay > 0:
            await asyncio.sleep(scenario.answer_delay)
        if call["status"] in _TERMINAL:
            return
        if scenario.answer_in_api:
            call["sdpAnswer"] = published
        call["updatedAt"] = _iso(datetime.now(UTC))
        if scenario.answer_via == "webhook":
            self._send_webhook(self._connect_envelope(call, published))
        if scenario.callee == "answer" and scenario.answer in ("ok", "wrong_fingerprint"):
            await edge.connected.wait()
            if call["status"] not in _TERMINAL:
                self._transition(call, "ACCEPTED")

    async def _reject_after(self, call: dict[str, Any], delay: float) -> None:
        await asyncio.sleep(delay)
        if call["status"] not in _TERMINAL:
            self._transition(call, "REJECTED")

    async def _stop_media(self, call_id: str) -> None:
        current = asyncio.current_task()
        for task in self._call_tasks.pop(call_id, set()):
            if task is not current:
                task.cancel()
        edge = self.edges.get(call_id)
        if edge is not None:
            await edge.close()

    # -- web media: /play and the realtime WebSocket --------------------------------------

    def _play_url(self, body: Mapping[str, Any]) -> str | None:
        for name in (self.play_field, "mediaUrl", "url", "audioUrl"):
            if isinstance(body.get(name), str):
                return str(body[name])
        return None

    async def _play(self, call: dict[str, Any], record: PlayRecord) -> None:
        try:
            host = urlsplit(record.url).hostname if record.url else None
            if record.url is None:
                record.error = "no URL in the body"
            elif host not in _LOOPBACK_HOSTS:
                record.error = f"not downloaded: {host!r} is not a loopback host"
            else:
                try:
                    async with self._client().get(record.url) as answer:
                        record.status = answer.status
                        record.content_type = answer.headers.get("Content-Type")
                        record.body = await answer.read()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    record.error = f"{type(exc).__name__}: {exc}"
            downloaded = record.status is not None and 200 <= record.status < 300
            hang_up = record.json.get("hangupAfterPlay") is True
            if downloaded and hang_up and call["status"] not in _TERMINAL:
                self._transition(call, "COMPLETED")
        finally:
            record.finished.set()

    async def _realtime_ws(self, request: web.BaseRequest) -> web.StreamResponse:
        call_id = request.path[len("/ws/") :]
        token = request.query.get("token", "")
        grant = self._ws_grants.get(token)
        ws = web.WebSocketResponse(timeout=1.0)
        valid = (
            grant is not None
            and not grant.used
            and grant.call_id == call_id
            and time.monotonic() <= grant.expires_at
        )
        if grant is None or not valid:
            return _error(401, None, "Unauthorized")
        if not ws.can_prepare(request).ok:  # the token stays usable
            return _error(400, None, "WebSocket upgrade required")
        grant.used = True
        await ws.prepare(request)
        record = RealtimeRecord(call_id, grant.mode, token, time.perf_counter(), ws=ws)
        self.realtime[call_id] = record
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    record.frames.append(message.data)
                    record.arrived.append(time.time())
                elif message.type == aiohttp.WSMsgType.TEXT:
                    record.texts.append(message.data)
        finally:
            record.closed_at = time.perf_counter()
            record.closed.set()
        return ws

    # -- background work ------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT))
        return self._http

    def _spawn(
        self, coro: Coroutine[Any, Any, None], *, call_id: str | None = None
    ) -> asyncio.Task[None] | None:
        """Run `coro` as a task that close() ends; `call_id` ties it to a call's media."""
        if self._closing:
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        if call_id is not None:
            self._call_tasks.setdefault(call_id, set()).add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        for tasks in self._call_tasks.values():
            tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.background_errors.append(f"{type(exc).__name__}: {exc}")
