"""Property tests of every parser the web app feeds, and of the incident post they end in.

Whatever arrives — arbitrary JSON, hostile strings, shapes close to the real ones with absurd
values — a parser returns a value within its documented bounds or raises its own error type
(AlertError, WebhookError, SDPError), never anything else: anything else would be a 500.

The last test sends such bodies through the real web app: each gets a 2xx or a 4xx, never 5xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.i18n import build_i18n
from bot.oncall.alerts import (
    MAX_ITEM_CHARS,
    MAX_ITEMS,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_LINKS,
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    Alert,
    AlertError,
    parse_alertmanager,
    parse_generic,
    parse_grafana,
)
from bot.pilot_status.models import MAX_DURATION_SECONDS, Call
from bot.pilot_status.webhooks import EARLIEST, LATEST, CallEvent, WebhookError, parse_delivery
from bot.storage.oncall import Incident, Team
from bot.texts import TELEGRAM_TEXT_LIMIT, incident_text
from bot.voice.sdp import SDPError, check_answer, check_offer, offer_for_meta
from tests.conftest import RunningBot, StartBot
from tests.fakes.telegram import parse_html

SAMPLES = Path(__file__).parent / "samples"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

# Text as JSON can carry it: any code point, lone surrogates included (JSON escapes them).
hostile_text = st.text(
    st.characters(codec=None, categories=None, exclude_characters=()), max_size=40
) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "\u202e",
        "&<>\"'",
        "<b>",
        "a" * 70_000,
        "0001-01-01T00:00:00Z",
        "99999-12-31T00:00:00Z",
        "firing",
        "resolved",
        "javascript:alert(1)",
        "http://user:pw@host/",
        "https://example.com/" + "x" * 3000,
    ]
)
huge_numbers = st.sampled_from([10**20, -(10**20), 2**31, 2**63, 1e308, -1.5, 0, float("inf")])
scalars = st.none() | st.booleans() | st.integers() | huge_numbers | st.floats() | hostile_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=25,
)


def _sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


@st.composite
def mutated(draw: st.DrawFn, sample: dict[str, Any]) -> object:
    """A real payload with some of its values (at any depth) replaced by hostile ones."""
    payload = json.loads(json.dumps(sample))
    for _ in range(draw(st.integers(1, 4))):
        node: Any = payload
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            node[key] = draw(json_values)
            break
    return payload


def alert_payloads(*samples: str) -> st.SearchStrategy[object]:
    return json_values | st.one_of(*(mutated(_sample(s)) for s in samples))


def _assert_bounded(alert: Alert) -> None:
    assert 0 < len(alert.title) <= MAX_TITLE_CHARS
    assert len(alert.text) <= MAX_TEXT_CHARS
    assert len(alert.labels) <= MAX_LABELS
    assert all(
        len(k) <= MAX_LABEL_CHARS and len(v) <= MAX_LABEL_CHARS for k, v in alert.labels.items()
    )
    assert len(alert.links) <= MAX_LINKS
    assert all(u.startswith(("http://", "https://")) for u in alert.links)
    assert len(alert.items) <= MAX_ITEMS and all(len(i) <= MAX_ITEM_CHARS for i in alert.items)
    assert alert.count >= max(1, len(alert.items))
    for text in (alert.title, alert.text, alert.dedup_key, *alert.items):
        text.encode("utf-8")  # storable: no lone surrogates


# --------------------------------------------------------------------------- alert payloads


@FAST
@given(alert_payloads("alertmanager_firing.json", "alertmanager_resolved.json"))
def test_alertmanager_parser_returns_a_bounded_alert_or_an_alert_error(payload: object) -> None:
    try:
        alert = parse_alertmanager(payload)
    except AlertError as err:
        assert 0 < len(str(err)) <= 300
        return
    _assert_bounded(alert)


@FAST
@given(alert_payloads("grafana_firing.json", "grafana_resolved.json"))
def test_grafana_parser_returns_a_bounded_alert_or_an_alert_error(payload: object) -> None:
    try:
        alert = parse_grafana(payload)
    except AlertError as err:
        assert 0 < len(str(err)) <= 300
        return
    _assert_bounded(alert)


@FAST
@given(alert_payloads("generic_firing.json"))
def test_generic_parser_returns_a_bounded_alert_or_an_alert_error(payload: object) -> None:
    try:
        alert = parse_generic(payload)
    except AlertError as err:
        assert 0 < len(str(err)) <= 300
        return
    _assert_bounded(alert)


# --------------------------------------------------------------------------- webhook events

FLAT = {
    "event": "call.ended",
    "callId": "call_01HZX",
    "externalCallId": "wacid.ABGG",
    "direction": "OUTBOUND",
    "status": "COMPLETED",
    "from": "5511888888888",
    "to": "5511999999999",
    "timestamp": "2026-07-03T15:02:05.000Z",
    "duration": 120,
}
META = {
    "event": "calls",
    "data": {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "calls",
                        "value": {
                            "calls": [
                                {
                                    "id": "wacid.ABGG",
                                    "event": "connect",
                                    "to": "5511999999999",
                                    "timestamp": "1764237600",
                                    "session": {"sdp_type": "answer", "sdp": "v=0\r\n"},
                                    "duration": 12,
                                }
                            ],
                            "statuses": [
                                {
                                    "id": "wacid.ABGG",
                                    "type": "call",
                                    "status": "ACCEPTED",
                                    "timestamp": "1764237601",
                                    "recipient_id": "5511999999999",
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    },
}


def _assert_storable(event: CallEvent) -> None:
    assert event.duration is None or 0 <= event.duration <= MAX_DURATION_SECONDS
    assert EARLIEST <= event.at <= max(LATEST, datetime.now(UTC)) and event.at.tzinfo is not None
    for text in (event.event, event.call_id, event.external_call_id, event.status, event.to):
        if text is not None:
            assert "\x00" not in text
            text.encode("utf-8")


def _meta_with(field: str, value: object) -> dict[str, Any]:
    payload = json.loads(json.dumps(META))
    payload["data"]["entry"][0]["changes"][0]["value"]["calls"][0][field] = value
    return payload


absurd = huge_numbers | st.integers() | hostile_text | st.sampled_from(["9" * 30, "-1", "1e20"])
webhook_payloads = (
    json_values
    | mutated(FLAT)
    | mutated(META)
    | st.builds(lambda f, v: FLAT | {f: v}, st.sampled_from(list(FLAT)), absurd)
    | st.builds(_meta_with, st.sampled_from(["timestamp", "duration", "id", "to"]), absurd)
)


@FAST
@given(webhook_payloads)
def test_webhook_parser_returns_storable_events_or_a_webhook_error(payload: object) -> None:
    try:
        events = parse_delivery(payload)
    except WebhookError:
        return
    for event in events:
        _assert_storable(event)


@FAST
@given(st.sampled_from([10**20, 2**31, 2**63, -1, 1e300, float("nan")]) | json_values)
def test_an_absurd_polled_duration_is_dropped_and_the_status_kept(duration: object) -> None:
    body = {"id": "call_1", "status": "COMPLETED", "durationSeconds": duration}
    try:
        call = Call.model_validate(body)
    except ValueError:  # pydantic's ValidationError: the client's "unexpected body"
        return
    assert call.status.value == "COMPLETED"
    assert call.duration_seconds is None or 0 <= call.duration_seconds <= MAX_DURATION_SECONDS


# --------------------------------------------------------------------------- SDP

ANSWER = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "c=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:efghijklmnopqrstuvwxyz\r\n"
    "a=fingerprint:sha-256 AB:CD\r\na=setup:passive\r\na=rtpmap:111 opus/48000/2\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n"
)
sdp_lines = st.lists(
    st.sampled_from(ANSWER.split("\r\n")) | hostile_text | st.just("a=setup:active"),
    max_size=14,
)
separators = st.sampled_from(["\r\n", "\n", "\r", "\x85", "\u2028", "\x0b"])


@FAST
@given(sdp_lines, separators)
def test_sdp_checks_return_or_raise_sdp_error(lines: list[str], sep: str) -> None:
    sdp = sep.join(lines)
    for check in (check_answer, check_offer, offer_for_meta):
        try:
            check(sdp)
        except SDPError as err:
            assert str(err)


# --------------------------------------------------------------------------- the post


def _incident(**fields: Any) -> Incident:
    values: dict[str, Any] = {
        "id": 1,
        "team_id": 1,
        "dedup_key": "k",
        "source": "alertmanager",
        "title": "t",
        "text": "",
        "severity": None,
        "labels": {},
        "links": (),
        "status": "firing",
        "fired": 1,
        "step": 0,
        "call_id": None,
        "next_action_at": None,
        "post_message_id": None,
        "acked_by": None,
        "acked_at": None,
        "notes": (),
        "created_at": datetime(2026, 12, 1, tzinfo=UTC),
    }
    return Incident(**(values | fields))


TEAM = Team(
    id=1,
    name="infra-" + "x" * 26,
    chat_id=-1,
    token_hash="",
    members=(),
    on_call=None,
    rotation="none",
    rotation_start=datetime(2026, 1, 1, tzinfo=UTC),
    attempts_per_person=1,
    wait_seconds=60,
    max_rounds=1,
    answer_is_ack=False,
)
I18N = build_i18n()
# Worst cases for escaping and for Telegram's UTF-16 count, at each field's stored maximum.
heavy = st.text(st.sampled_from("&<>\"'a🚨 \n"), max_size=1100) | st.sampled_from(
    ["&" * 1000, '"' * 1000, "🚨" * 1000, "x" * 1000]
)


@settings(max_examples=200, deadline=None)
@given(
    title=heavy.map(lambda t: t.replace("\n", " ")[:MAX_TITLE_CHARS]),
    text=heavy.map(lambda t: t[:MAX_TEXT_CHARS]),
    severity=st.none() | heavy.map(lambda t: t[:32] or None),
    labels=st.dictionaries(heavy.map(lambda t: t[:100]), heavy.map(lambda t: t[:100]), max_size=20),
    links=st.lists(heavy.map(lambda t: "https://e.com/?" + t * 2), max_size=5).map(tuple),
    notes=st.lists(heavy, max_size=12).map(tuple),
    items=st.lists(heavy.map(lambda t: t[:MAX_ITEM_CHARS]), max_size=MAX_ITEMS).map(tuple),
    extra=st.integers(0, 10**6),
    status=st.sampled_from(["firing", "acknowledged", "resolved", "exhausted"]),
    acked_by=st.none() | heavy.map(lambda t: t[:128]),
    fired=st.integers(1, 10**9),
    locale=st.sampled_from(["en", "pt_BR"]),
)
def test_the_incident_post_always_fits_one_telegram_message(**fields: Any) -> None:
    items, extra, locale = fields.pop("items"), fields.pop("extra"), fields.pop("locale")
    incident = _incident(**fields, items=items, alert_count=len(items) + extra)
    with I18N.context(), I18N.use_locale(locale):
        text = incident_text(incident, TEAM)
    # the HTML itself fits, so surely its text does
    assert len(text.encode("utf-16-le")) // 2 <= TELEGRAM_TEXT_LIMIT
    plain, _entities = parse_html(text)  # Telegram's HTML rules: no broken entity or tag
    assert "🚨" in plain and plain.strip()
    if incident.title.strip():
        assert plain.split("\n")[0].strip() != "🚨"  # the title is always there


# --------------------------------------------------------------------------- the real web app

HOOK, SECRET, TEAM_TOKEN = "h" * 32, "whsec-property", "infra-" + "p" * 30
ONCALL = f"""
[contacts]
alice = "+5511999990001"

[teams.infra]
chat_id = -100200
token = "{TEAM_TOKEN}"
members = ["alice"]
"""
HOSTILE_BODIES = [
    b"[" * 5000 + b"]" * 5000,
    b'{"event": "calls", "data": {"entry": [{"changes": [{"field": "calls", "value": {"calls": '
    b'[{"id": "w", "timestamp": 100000000000000000000, "duration": 100000000000000000000}]}}]}]}}',
    b'{"event": "call.ended", "callId": "\\ud800", "status": "COMPLETED", "duration": 1e400}',
    b"1" * 5000,
    b'{"a": NaN}',
    b"\xff\xfe",
]
bodies = (
    json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    | st.one_of(
        *(
            mutated(_sample(name)).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
            for name in ("alertmanager_firing.json", "grafana_firing.json", "generic_firing.json")
        )
    )
    | mutated(FLAT).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    | mutated(META).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    | st.binary(max_size=200)
    | st.sampled_from(HOSTILE_BODIES)
)


@pytest.fixture
async def web_bot(start_bot: StartBot, tmp_path: Path) -> RunningBot:
    config = tmp_path / "oncall.toml"
    config.write_text(ONCALL)
    return await start_bot(
        oncall_file=str(config),
        oncall_tick_seconds=60,
        pilot_status_webhook_token=HOOK,
        pilot_status_webhook_secret=SECRET,
        pilot_status_number_type="web",
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, kind=st.sampled_from(["alertmanager", "grafana", "generic"]))
@example(body=HOSTILE_BODIES[0], kind="generic")
@example(body=HOSTILE_BODIES[1], kind="alertmanager")
@example(body=HOSTILE_BODIES[2], kind="grafana")
async def test_any_body_gets_a_2xx_or_4xx_from_the_real_web_app(
    web_bot: RunningBot, body: bytes, kind: str
) -> None:
    base = f"http://127.0.0.1:{web_bot.app.web_port}"
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with httpx.AsyncClient(base_url=base) as client:
        hook = await client.post(
            f"/pilot-status/{HOOK}", content=body, headers={"x-pilot-status-signature": signature}
        )
        intake = await client.post(
            f"/alerts/{kind}/infra", content=body, headers={"Authorization": f"Bearer {TEAM_TOKEN}"}
        )
        health = await client.get("/healthz")
    assert hook.status_code < 500, hook.text
    assert intake.status_code < 500, intake.text
    assert health.status_code == 200
