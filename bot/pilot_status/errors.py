"""One error tree for everything the Pilot Status client can raise.

Transport failures are split by whether the request may have reached the server, because
`POST /v1/calls` starts a billed call: only a request that provably never left may be retried.
"""

from __future__ import annotations

import re

_META_CODE = re.compile(r"\b(13[0-9]{4})\b")


class PilotStatusError(Exception):
    """Base of every error raised by the client."""


class APIConnectionError(PilotStatusError):
    """The request failed on the way; `maybe_sent` says whether the server may have got it."""

    def __init__(self, message: str, *, maybe_sent: bool) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class APITimeoutError(APIConnectionError):
    """No answer in time."""


class APIResponseError(PilotStatusError):
    """A 2xx answer whose body is not what the contract promises."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class APIStatusError(PilotStatusError):
    """A non-2xx answer. `code` is Pilot's stable code when the body carries one."""

    def __init__(
        self, status: int, code: str | None, message: str, *, meta_code: int | None
    ) -> None:
        super().__init__(f"HTTP {status} {code or '-'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.meta_code = meta_code


class BadRequestError(APIStatusError):
    """400: validation, wrong provider, forwarded Meta refusals."""


class AuthenticationError(APIStatusError):
    """401: the key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: the key's scope does not allow this endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown call or number."""


class ConflictError(APIStatusError):
    """409: the web number is not connected."""


class UnprocessableError(APIStatusError):
    """422: e.g. billing suspended."""


class RateLimitError(APIStatusError):
    """429: too many requests."""


class ServerError(APIStatusError):
    """5xx, including the edge's non-JSON pages."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableError,
    429: RateLimitError,
}


def status_error(status: int, body: object) -> APIStatusError:
    """Build the error for a non-2xx answer from whatever body came back (JSON or not)."""
    code: str | None = None
    message = ""
    if isinstance(body, dict):
        raw_code = body.get("code")
        code = str(raw_code) if raw_code not in (None, "") else None
        message = str(body.get("error") or body.get("message") or "")
    elif isinstance(body, str):
        message = body.strip()[:200]
    meta_code = _meta_code(code, message, body)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    return cls(status, code, message, meta_code=meta_code)


def _meta_code(code: str | None, message: str, body: object) -> int | None:
    # The HTTP status and Pilot code of forwarded Meta errors are undocumented (API.md §9.1-2):
    # accept the number in `code`, in the message, or in `details`.
    details = body.get("details") if isinstance(body, dict) else None
    for text in (code or "", message, str(details or "")):
        found = _META_CODE.search(text)
        if found:
            return int(found.group(1))
    return None
