"""The typed Pilot Status calls client: one shared httpx.AsyncClient, pydantic in and out."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from bot.pilot_status.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    PilotStatusError,
    RateLimitError,
    ServerError,
    status_error,
)
from bot.pilot_status.models import (
    Call,
    CallAction,
    CallingSettings,
    CallList,
    CallStarted,
    PermissionProbe,
    PermissionRequested,
    RealtimeSession,
    ServiceWindow,
    StartCall,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
Observe = Callable[[str, int | None, float], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter (STYLE.md §5)."""

    max_retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delay(self, attempt: int) -> float:
        ceiling: float = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling * random.uniform(0.5, 1.0)


def build_http_client(
    *,
    base_url: str,
    api_key: SecretStr | None,
    api_key_id: SecretStr | None,
    number_id: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 20.0,
    max_connections: int = 20,
) -> httpx.AsyncClient:
    """The one httpx client of the process; the caller closes it at shutdown."""
    headers = {"user-agent": "callbot/0.1", "accept": "application/json"}
    if api_key is not None:
        headers["x-api-key"] = api_key.get_secret_value()
    elif api_key_id is not None:
        headers["x-api-key-id"] = api_key_id.get_secret_value()
    if number_id:
        headers["x-whatsapp-number-id"] = number_id
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=60,
        ),
        follow_redirects=False,
    )


class PilotStatusClient:
    """Every calls endpoint callbot uses, with the retry policy applied per method."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observe: Observe | None = None,
    ) -> None:
        self._http = http
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._observe = observe  # told of each attempt: (operation, status or None, seconds)

    async def aclose(self) -> None:
        await self._http.aclose()

    # calls

    async def start_call(self, request: StartCall) -> CallStarted:
        body = request.model_dump(by_alias=True, exclude_none=True)
        return await self._call(
            "start_call", "POST", "/v1/calls", CallStarted, json=body, idempotent=False
        )

    async def get_call(self, call_id: str, *, include_sdp: bool = False) -> Call:
        params = {"includeSdp": "1"} if include_sdp else None
        return await self._call(
            "get_call", "GET", f"/v1/calls/{_seg(call_id)}", Call, params=params
        )

    async def list_calls(self, *, limit: int = 25, before: str | None = None) -> list[Call]:
        params = {"limit": str(limit)} | ({"before": before} if before else {})
        page = await self._call("list_calls", "GET", "/v1/calls", CallList, params=params)
        return page.calls

    async def terminate(self, call_id: str) -> CallAction:
        # Ending a call twice is harmless, so a failed terminate may be retried.
        path = f"/v1/calls/{_seg(call_id)}/terminate"
        return await self._call("terminate", "POST", path, CallAction, idempotent=True)

    # media (web numbers)

    async def play(
        self, call_id: str, media_url: str, *, hangup_after_play: bool, every_name: bool = False
    ) -> CallAction:
        """`POST /v1/calls/{id}/play`. The docs name the URL field `mediaUrl` (the spec), `url` or
        `audioUrl` (API.md D4): `every_name` sends all three, for a server that refused the
        spec's; the contract allows the extra properties."""
        body: dict[str, Any] = {"mediaUrl": media_url, "hangupAfterPlay": hangup_after_play}
        if every_name:
            body |= {"url": media_url, "audioUrl": media_url}
        path = f"/v1/calls/{_seg(call_id)}/play"
        return await self._call("play", "POST", path, CallAction, json=body, idempotent=False)

    async def realtime_session(self, call_id: str, mode: str = "talk") -> RealtimeSession:
        path = f"/v1/calls/{_seg(call_id)}/realtime-session"
        return await self._call(
            "realtime_session", "POST", path, RealtimeSession, json={"mode": mode}, idempotent=False
        )

    # permissions and settings (Meta numbers)

    async def get_permission(self, to: str) -> PermissionProbe:
        params = {"to": to}
        return await self._call(
            "get_permission", "GET", "/v1/calls/permissions", PermissionProbe, params=params
        )

    async def request_permission(self, to: str, text: str | None = None) -> PermissionRequested:
        body = {"to": to} | ({"text": text} if text else {})
        path = "/v1/calls/permissions/request"
        return await self._call(
            "request_permission", "POST", path, PermissionRequested, json=body, idempotent=False
        )

    async def get_settings(self) -> CallingSettings:
        return await self._call("get_settings", "GET", "/v1/calls/settings", CallingSettings)

    async def service_window(self, to: str) -> ServiceWindow:
        params = {"destinationNumber": to}
        return await self._call(
            "service_window", "GET", "/v1/service-window", ServiceWindow, params=params
        )

    # plumbing

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        model: type[M],
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> M:
        safe = method == "GET" if idempotent is None else idempotent
        status, body = await self._request(
            operation, method, path, params=params, json=json, idempotent=safe
        )
        try:
            return model.model_validate(body)
        except ValidationError as err:
            raise APIResponseError(f"{method} {path}: unexpected body", status=status) from err

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
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                response = await self._http.request(method, path, params=params, json=json)
            except httpx.TimeoutException as err:
                self._observed(operation, None, started)
                never_sent = isinstance(err, httpx.ConnectTimeout | httpx.PoolTimeout)
                error: PilotStatusError = APITimeoutError(
                    f"{method} {path}: {type(err).__name__}", maybe_sent=not never_sent
                )
                cause: BaseException = err
            except httpx.TransportError as err:
                self._observed(operation, None, started)
                never_sent = isinstance(err, httpx.ConnectError)
                error = APIConnectionError(
                    f"{method} {path}: {type(err).__name__}", maybe_sent=not never_sent
                )
                cause = err
            else:
                self._observed(operation, response.status_code, started)
                elapsed = (time.perf_counter() - started) * 1000
                log.debug(
                    "pilot %s %s -> %s in %.1f ms", method, path, response.status_code, elapsed
                )
                body = _body(response)
                if response.is_success:
                    if isinstance(body, str):
                        raise APIResponseError(
                            f"{method} {path}: answer is not JSON", status=response.status_code
                        )
                    return response.status_code, body
                error = status_error(response.status_code, body)
                cause = error
            if attempt >= self._retry.max_retries or not _retryable(error, idempotent=idempotent):
                refused = isinstance(error, APIStatusError) and error.status < 500
                log.log(
                    logging.INFO if refused else logging.WARNING,
                    "pilot %s %s failed: %s",
                    method,
                    path,
                    error,
                )
                if cause is error:
                    raise error
                raise error from cause
            delay = self._retry.delay(attempt)
            log.info("pilot %s %s: %s, retry in %.2f s", method, path, error, delay)
            attempt += 1
            await self._sleep(delay)

    def _observed(self, operation: str, status: int | None, started: float) -> None:
        if self._observe is not None:
            self._observe(operation, status, time.perf_counter() - started)


def _retryable(error: PilotStatusError, *, idempotent: bool) -> bool:
    if isinstance(error, APIConnectionError):
        return idempotent or not error.maybe_sent
    if isinstance(error, RateLimitError):
        return True  # a refusal: nothing was started
    return idempotent and isinstance(error, ServerError)


def _body(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text


def _seg(value: str) -> str:
    """A call id as one path segment (ids come from the API or a user's /status)."""
    return quote(value, safe="")
