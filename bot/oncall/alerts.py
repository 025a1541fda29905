"""Monitoring alert payloads → one normalized `Alert`.

Three shapes are understood:

* Prometheus Alertmanager `webhook_configs` payloads (version "4"),
* Grafana unified alerting webhook contact point payloads (Alertmanager-shaped plus `title`,
  `message`, `state`, and per-alert `panelURL` / `dashboardURL` / `silenceURL`),
* our own small generic JSON (`title`, `text`, `severity`, `dedupKey`, `status`, `team`, `links`).

Pure: no I/O, no web framework. Every user-controlled string comes out as plain text (escaping is
the renderer's job) with control characters removed and its length bounded. Anything malformed
raises `AlertError`, whose message is a short reason that is safe to return in a 400 body. A group
of several alerts also comes out as one short line per alert (`items`, the first `MAX_ITEMS`) and
its size (`count`, truncated alerts included), so that its post can list the first ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import ErrorDetails

__all__ = [
    "MAX_ITEMS",
    "MAX_ITEM_CHARS",
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_LINKS",
    "MAX_TEXT_CHARS",
    "MAX_TITLE_CHARS",
    "Alert",
    "AlertError",
    "parse_alertmanager",
    "parse_generic",
    "parse_grafana",
]

# Output bounds.
MAX_TITLE_CHARS = 200
MAX_TEXT_CHARS = 1000
MAX_LABELS = 20
MAX_LABEL_CHARS = 100  # label names and values
MAX_LINKS = 5
MAX_SEVERITY_CHARS = 50
MAX_TEAM_CHARS = 100
MAX_KEY_CHARS = 256  # longer dedup keys are replaced by their sha256
MAX_URL_CHARS = 2048
MAX_ITEMS = 10  # alerts of a group described one per line; the rest are counted
MAX_ITEM_CHARS = 200
MAX_ITEM_LABELS = 4

# Input bounds: beyond these a body is nonsense, not an alert, and is refused.
MAX_INPUT_CHARS = 65_536  # any single string
MAX_MESSAGE_CHARS = 1_048_576  # Grafana's pre-rendered `message` grows with the alert count
MAX_MAP_ITEMS = 1_000  # labels / annotations per object
MAX_INPUT_LINKS = 100  # generic `links`
MAX_TRUNCATED = 1_000_000_000

_REASON_CHARS = 200


class AlertError(ValueError):
    """The body is not an alert we understand; `str(err)` is a short, payload-free reason."""


@dataclass(frozen=True)
class Alert:
    """One incident notification, whatever system sent it."""

    source: Literal["alertmanager", "grafana", "generic", "heartbeat"]
    dedup_key: str  # stable per incident; the resolved notification carries the same key
    firing: bool  # False = resolved
    title: str  # one line, <= MAX_TITLE_CHARS
    text: str  # details, <= MAX_TEXT_CHARS, may be ""
    severity: str | None  # lower-cased, e.g. "critical", "warning"
    labels: dict[str, str] = field(hash=False)  # <= MAX_LABELS, names/values <= MAX_LABEL_CHARS
    links: tuple[str, ...]  # http(s) only, deduplicated, <= MAX_LINKS
    team: str | None = None
    items: tuple[str, ...] = ()  # a group's alerts, one line each (<= MAX_ITEMS); () for one
    count: int = 1  # alerts in the group in its state, truncated ones included


# --------------------------------------------------------------------------- incoming shapes


def _none_to_empty(value: object) -> object:
    # Go marshals a nil map as `null`; treat it as the empty map it means.
    return {} if value is None else value


_SURROGATES = re.compile("[\ud800-\udfff]")


def _drop_surrogates(value: object) -> object:
    # JSON may escape lone surrogates (`"\ud800"`); they are not text, and pydantic refuses them.
    return _SURROGATES.sub("", value) if isinstance(value, str) else value


_Str = Annotated[
    str, StringConstraints(max_length=MAX_INPUT_CHARS), BeforeValidator(_drop_surrogates)
]
_LongStr = Annotated[
    str, StringConstraints(max_length=MAX_MESSAGE_CHARS), BeforeValidator(_drop_surrogates)
]
_Map = Annotated[dict[_Str, _Str], BeforeValidator(_none_to_empty), Field(max_length=MAX_MAP_ITEMS)]

# Alertmanager's "not set" (Go's zero time) is year 1; anything else must be a real moment.
_ZERO_TIME_BEFORE = datetime(1900, 1, 1, tzinfo=UTC)
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2100, 1, 1, tzinfo=UTC)


def _moment(value: datetime) -> datetime | None:
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    if when < _ZERO_TIME_BEFORE:
        return None
    if not _EARLIEST <= when <= _LATEST:
        raise ValueError("timestamp out of range (2000 to 2100)")
    return when


_Time = Annotated[datetime, AfterValidator(_moment)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)


class _AlertmanagerAlert(_Model):
    status: _Str | None = None
    labels: _Map = Field(default_factory=dict)
    annotations: _Map = Field(default_factory=dict)
    generator_url: _Str | None = Field(None, alias="generatorURL")
    fingerprint: _Str | None = None
    starts_at: _Time | None = Field(None, alias="startsAt")
    ends_at: _Time | None = Field(None, alias="endsAt")


class _GrafanaAlert(_AlertmanagerAlert):
    dashboard_url: _Str | None = Field(None, alias="dashboardURL")
    panel_url: _Str | None = Field(None, alias="panelURL")
    silence_url: _Str | None = Field(None, alias="silenceURL")


class _GroupPayload(_Model):
    status: Literal["firing", "resolved"]
    truncated_alerts: int = Field(0, alias="truncatedAlerts", ge=0, le=MAX_TRUNCATED)
    receiver: _Str | None = None
    group_labels: _Map = Field(default_factory=dict, alias="groupLabels")
    common_labels: _Map = Field(default_factory=dict, alias="commonLabels")
    common_annotations: _Map = Field(default_factory=dict, alias="commonAnnotations")
    external_url: _Str | None = Field(None, alias="externalURL")


class _AlertmanagerPayload(_GroupPayload):
    group_key: _Str = Field(alias="groupKey", min_length=1)
    alerts: list[_AlertmanagerAlert] = Field(min_length=1)


class _GrafanaPayload(_GroupPayload):
    group_key: _Str | None = Field(None, alias="groupKey")
    alerts: list[_GrafanaAlert] = Field(min_length=1)
    title: _Str | None = None
    message: _LongStr | None = None


class _GenericPayload(_Model):
    title: _Str
    text: _Str | None = None
    severity: _Str | None = None
    dedup_key: _Str | None = Field(None, alias="dedupKey")
    status: Literal["firing", "resolved"] = "firing"
    team: _Str | None = None
    links: Annotated[list[_Str], Field(max_length=MAX_INPUT_LINKS)] | None = None


# --------------------------------------------------------------------------- public parsers


def parse_alertmanager(payload: object) -> Alert:
    """Normalize a Prometheus Alertmanager webhook payload (`version` is not checked)."""
    body = _validate(_AlertmanagerPayload, payload)
    primary = _primary(body.alerts, body.status)
    suffix = _count_suffix(body, body.alerts)
    title = _title(_am_title_candidates(body, primary), suffix) or _title(
        ["Alertmanager alert"], suffix
    )
    return Alert(
        source="alertmanager",
        dedup_key=_key(body.group_key),
        firing=body.status == "firing",
        title=title,
        text=_am_text(body, primary),
        severity=_severity(body, primary),
        labels=_labels(body.common_labels or primary.labels),
        links=_links(_link_candidates(body, primary, body.alerts)),
        items=_items(body, body.alerts),
        count=_count(body, body.alerts),
    )


def parse_grafana(payload: object) -> Alert:
    """Normalize a Grafana unified alerting webhook contact point payload."""
    body = _validate(_GrafanaPayload, payload)
    primary = _primary(body.alerts, body.status)
    suffix = _count_suffix(body, body.alerts)
    own_title = _GRAFANA_PREFIX.sub("", body.title or "", count=1)
    title = (
        _title([own_title], suffix)
        or _title(_am_title_candidates(body, primary), suffix)
        or _title(["Grafana alert"], suffix)
    )
    text = _am_text(body, primary) or _para(body.message, MAX_TEXT_CHARS)
    return Alert(
        source="grafana",
        dedup_key=_grafana_key(body),
        firing=body.status == "firing",
        title=title,
        text=text,
        severity=_severity(body, primary),
        labels=_labels(body.common_labels or primary.labels),
        links=_links(_link_candidates(body, primary, body.alerts)),
        items=_items(body, body.alerts),
        count=_count(body, body.alerts),
    )


def parse_generic(payload: object) -> Alert:
    """Normalize our documented generic JSON: `{"title": ..., "status": "firing", ...}`."""
    body = _validate(_GenericPayload, payload)
    title = _line(body.title, MAX_TITLE_CHARS)
    if not title:
        raise AlertError("title: must not be empty")
    team = _line(body.team, MAX_TEAM_CHARS) or None
    dedup_key = _key(body.dedup_key) if body.dedup_key and body.dedup_key.strip() else None
    if dedup_key is None:
        # Unclipped title: two long titles that differ only in their tails stay distinct.
        seed = f"{team or ''}\x1f{_line(body.title, MAX_INPUT_CHARS)}"
        dedup_key = "sha256:" + _sha256(seed)
    return Alert(
        source="generic",
        dedup_key=dedup_key,
        firing=body.status == "firing",
        title=title,
        text=_para(body.text, MAX_TEXT_CHARS),
        severity=_clean_severity(body.severity),
        labels={},
        links=_links(body.links or ()),
        team=team,
    )


# --------------------------------------------------------------------------- validation

_M = TypeVar("_M", bound=_Model)

_FRIENDLY_ERRORS = {
    "missing": "field required",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a string",
}


def _validate(model: type[_M], payload: object) -> _M:
    if not isinstance(payload, dict):
        raise AlertError("body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise AlertError(_reason(exc)) from exc


def _reason(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return "invalid body"
    reason = _describe(errors[0])
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more)"
    return _clip(reason, _REASON_CHARS)


def _describe(error: ErrorDetails) -> str:
    # Locations can hold attacker-chosen dict keys: clean and shorten each part.
    where = ".".join(_line(str(part), 40) for part in error["loc"])
    msg = _FRIENDLY_ERRORS.get(error["type"]) or error["msg"]
    msg = msg[:1].lower() + msg[1:]
    return f"{where}: {msg}" if where else msg


# --------------------------------------------------------------------------- field derivation

_GRAFANA_PREFIX = re.compile(r"^\s*\[\s*(?:FIRING|RESOLVED)(?:\s*:\s*\d+)?\s*\]\s*", re.IGNORECASE)

_AlertT = TypeVar("_AlertT", bound=_AlertmanagerAlert)


def _primary(alerts: list[_AlertT], status: str) -> _AlertT:
    """The alert to describe the group by: the first one in the group's own state."""
    return next((a for a in alerts if a.status == status), alerts[0])


def _count_suffix(body: _GroupPayload, alerts: Iterable[_AlertmanagerAlert]) -> str:
    if body.status != "firing":
        return ""
    firing = sum(1 for a in alerts if a.status == "firing") + body.truncated_alerts
    return f" ({firing} alerts)" if firing > 1 else ""


def _in_state(body: _GroupPayload, alerts: Iterable[_AlertT]) -> list[_AlertT]:
    return [a for a in alerts if (a.status or body.status) == body.status]


def _count(body: _GroupPayload, alerts: list[_AlertT]) -> int:
    return max(1, len(_in_state(body, alerts)) + body.truncated_alerts)


def _items(body: _GroupPayload, alerts: list[_AlertT]) -> tuple[str, ...]:
    """The first alerts of a group in its state, one line each: what tells them apart (their
    own labels, then their own summary or description). Nothing for a single alert."""
    if _count(body, alerts) < 2:
        return ()
    lines = []
    for alert in _in_state(body, alerts)[:MAX_ITEMS]:
        own = {k: v for k, v in alert.labels.items() if body.common_labels.get(k) != v}
        labels = ", ".join(f"{k}={v}" for k, v in list(_labels(own).items())[:MAX_ITEM_LABELS])
        about = next(
            (
                text
                for name in ("summary", "description")
                if (text := alert.annotations.get(name))
                and text != body.common_annotations.get(name)
            ),
            None,
        )
        line = _line(" — ".join(filter(None, (labels, about))), MAX_ITEM_CHARS)
        lines.append(line or _line(alert.labels.get("alertname"), MAX_ITEM_CHARS) or "?")
    return tuple(lines)


def _am_title_candidates(body: _GroupPayload, primary: _AlertmanagerAlert) -> list[str | None]:
    return [
        body.common_annotations.get("summary"),
        primary.annotations.get("summary"),
        body.common_labels.get("alertname"),
        body.group_labels.get("alertname"),
        primary.labels.get("alertname"),
    ]


def _title(candidates: Iterable[str | None], suffix: str) -> str:
    for candidate in candidates:
        base = _line(candidate, MAX_TITLE_CHARS - len(suffix))
        if base:
            return base + suffix
    return ""


def _am_text(body: _GroupPayload, primary: _AlertmanagerAlert) -> str:
    for candidate in (
        body.common_annotations.get("description"),
        primary.annotations.get("description"),
        primary.annotations.get("summary"),
    ):
        text = _para(candidate, MAX_TEXT_CHARS)
        if text:
            return text
    return ""


def _severity(body: _GroupPayload, primary: _AlertmanagerAlert) -> str | None:
    for labels in (body.common_labels, body.group_labels, primary.labels):
        severity = _clean_severity(labels.get("severity"))
        if severity:
            return severity
    return None


def _clean_severity(value: str | None) -> str | None:
    return _line(value, MAX_SEVERITY_CHARS).lower() or None


# Shown first when more than MAX_LABELS are available; the rest follow by name.
_LABEL_PRIORITY = {
    name: rank
    for rank, name in enumerate(
        (
            "alertname",
            "severity",
            "team",
            "service",
            "job",
            "instance",
            "namespace",
            "cluster",
            "env",
            "environment",
        )
    )
}


def _labels(source: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name in sorted(source, key=lambda n: (_LABEL_PRIORITY.get(n, len(_LABEL_PRIORITY)), n)):
        name = _line(raw_name, MAX_LABEL_CHARS)
        value = _line(source[raw_name], MAX_LABEL_CHARS)
        # `__`-prefixed labels are internal by Prometheus convention; empty means absent.
        if not name or name.startswith("__") or not value or name in out:
            continue
        out[name] = value
        if len(out) == MAX_LABELS:
            break
    return out


def _link_candidates(
    body: _GroupPayload, primary: _AlertmanagerAlert, alerts: Iterable[_AlertmanagerAlert]
) -> Iterator[str | None]:
    yield primary.generator_url
    yield body.common_annotations.get("runbook_url")
    yield primary.annotations.get("runbook_url")
    if isinstance(primary, _GrafanaAlert):
        yield primary.panel_url
        yield primary.dashboard_url
        yield primary.silence_url
    for alert in alerts:
        yield alert.generator_url
    yield body.external_url


def _key(raw: str) -> str:
    """A dedup key as sent when short and printable, else its sha256 (stable either way)."""
    if len(raw) <= MAX_KEY_CHARS and not _UNPRINTABLE.search(raw) and raw.strip() == raw:
        return raw
    return "sha256:" + _sha256(raw)


def _grafana_key(body: _GrafanaPayload) -> str:
    if body.group_key and body.group_key.strip():
        return _key(body.group_key)
    fingerprints = sorted({a.fingerprint or _labels_fingerprint(a.labels) for a in body.alerts})
    return _key(",".join(fingerprints))


def _labels_fingerprint(labels: Mapping[str, str]) -> str:
    canonical = json.dumps(sorted(labels.items()), ensure_ascii=True, separators=(",", ":"))
    return _sha256(canonical)[:16]


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- text hygiene

# C0/C1 controls other than tab and line breaks, lone surrogates (unencodable as UTF-8),
# bidirectional overrides/isolates (they can visually reorder a message) and the BOM.
_UNPRINTABLE_CLASS = (
    "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f"
    "\ud800-\udfff"
    "\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff"
)
_STRIP = re.compile(f"[{_UNPRINTABLE_CLASS}]")
_UNPRINTABLE = re.compile(f"[{_UNPRINTABLE_CLASS}\t\n\r\x85\u2028\u2029]")
_LINE_BREAKS = re.compile("\r\n|[\r\x85\u2028\u2029]")
_BLANK_RUN = re.compile(r"\n{3,}")
_URL_UNSAFE = re.compile(rf"[\s{_UNPRINTABLE_CLASS}]")


def _line(value: str | None, limit: int) -> str:
    """One line of plain text: controls dropped, whitespace collapsed, at most `limit` chars."""
    if not value:
        return ""
    return _clip(" ".join(_STRIP.sub("", value).split()), limit)


def _para(value: str | None, limit: int) -> str:
    """Multi-line plain text: controls dropped, line breaks normalized, at most `limit` chars."""
    if not value:
        return ""
    text = _STRIP.sub("", _LINE_BREAKS.sub("\n", value)).replace("\t", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _clip(_BLANK_RUN.sub("\n\n", text).strip(), limit)


def _clip(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    if limit <= 1:
        return value[:limit]
    return value[: limit - 1].rstrip() + "…"


def _links(candidates: Iterable[str | None]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for candidate in candidates:
        url = _http_url(candidate)
        if url is not None and url not in seen:
            seen[url] = None
            if len(seen) == MAX_LINKS:
                break
    return tuple(seen)


def _http_url(value: str | None) -> str | None:
    """`value` if it is a plain absolute http(s) URL with a host and no credentials."""
    if not value:
        return None
    url = value.strip()
    if not url or len(url) > MAX_URL_CHARS or _URL_UNSAFE.search(url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        has_credentials = parts.username is not None or parts.password is not None
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host or has_credentials:
        return None
    return url
