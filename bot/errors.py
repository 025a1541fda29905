"""Domain errors: each carries a catalogue code; `describe` maps any error to one."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.phones import PhoneError
from bot.pilot_status import errors as pe
from bot.shared.redis import redis_error

# Pilot `code` → catalogue code (API.md §1.3, §4).
_BY_PILOT_CODE = {
    "MISSING_TO": "api_missing_to",
    "VALIDATION": "api_validation",
    "VALIDATION_ERROR": "api_validation",
    "INVALID_LIMIT": "api_validation",
    "INVALID_BEFORE": "api_validation",
    "INVALID_DESTINATION": "api_validation",
    "FEATURE_NOT_SUPPORTED": "api_feature_not_supported",
    "NUMBER_NOT_FOUND": "api_number_not_found",
    "TENANT_SCOPE_NOT_ALLOWED": "api_tenant_scope",
    "NUMBER_SCOPE_NOT_ALLOWED": "api_tenant_scope",
    "CALL_NOT_FOUND": "api_call_not_found",
    "WHATSAPP_INSTANCE_NOT_CONNECTED": "api_not_connected",
    "BILLING_SUSPENDED": "api_billing_suspended",
    "META_CALL_PERMISSION_REQUIRED": "api_permission_required",
    "META_CALL_PERMISSION_REQUEST_LIMIT": "api_permission_request_limit",
    "META_CALLING_PAYMENT_REQUIRED": "api_payment_required",
    "META_OUTSIDE_24H_WINDOW": "api_outside_window",
    "META_RATE_LIMITED": "api_rate_limited",
}

# Meta error numbers forwarded by Pilot (API.md §4.2); their Pilot codes are partly undocumented.
_BY_META_CODE = {
    138000: "api_calling_disabled",
    138006: "api_permission_required",
    138007: "api_answer_too_late",
    138009: "api_permission_request_limit",
    138012: "api_call_limit",
    138015: "api_tier_too_low",
    138018: "api_calling_prerequisites",
    131044: "api_payment_required",
    131047: "api_outside_window",
}

_BY_STATUS = {
    400: "api_validation",
    401: "api_unauthorized",
    403: "api_tenant_scope",
    404: "api_call_not_found",
    409: "api_not_connected",
    422: "api_billing_suspended",
    429: "api_rate_limited",
}


@dataclass
class CallbotError(Exception):
    """An error a person can act on: `code` picks the text, `params` fill it in."""

    code: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.code


@dataclass
class NotAllowed(CallbotError):
    """A Mini App request refused before anything starts: bad, forged or expired initData
    (401), or a user who may not act on that call (403)."""

    status: int = 401


def describe(error: BaseException) -> CallbotError:
    """Any error from the services or the client as a catalogue entry."""
    if isinstance(error, CallbotError):
        return error
    if isinstance(error, PhoneError):
        return CallbotError(error.problem.value, {"text": error.text[:64], "region": error.region})
    if isinstance(error, redis_error()):  # REDIS_URL's server is down or stuck: nothing was done
        return CallbotError("shared_state_unavailable")
    if isinstance(error, pe.APITimeoutError):
        return CallbotError("api_timeout_maybe_sent" if error.maybe_sent else "api_unreachable")
    if isinstance(error, pe.APIConnectionError):
        return CallbotError("api_dropped" if error.maybe_sent else "api_unreachable")
    if isinstance(error, pe.APIResponseError):
        return CallbotError("api_bad_response", {"status": str(error.status)})
    if isinstance(error, pe.APIStatusError):
        return _describe_status(error)
    return CallbotError("internal")


def _describe_status(error: pe.APIStatusError) -> CallbotError:
    status = {"status": str(error.status)}
    if error.code in _BY_PILOT_CODE:
        return CallbotError(_BY_PILOT_CODE[error.code], status)
    if error.meta_code in _BY_META_CODE:
        return CallbotError(_BY_META_CODE[error.meta_code], status)
    if error.status >= 500:
        return CallbotError("api_server_error", status)
    if error.code:
        return CallbotError(
            "api_unknown_code", status | {"code": error.code, "message": error.message or "-"}
        )
    if error.status in _BY_STATUS:
        return CallbotError(_BY_STATUS[error.status], status)
    return CallbotError("api_unknown_code", status | {"code": "-", "message": error.message or "-"})


@dataclass
class TalkRefused(Exception):
    """The softphone's answer to a browser it will not connect (bot.softphone): an HTTP status
    and a short reason for the page; nothing was started."""

    status: int
    reason: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"
