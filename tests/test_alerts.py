"""bot.oncall.alerts: real payloads → Alert; bad bodies → short AlertError; bounded output."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.oncall.alerts import (
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

SAMPLES = Path(__file__).parent / "samples"
Parser = Callable[[object], Alert]
PARSERS: list[Parser] = [parse_alertmanager, parse_grafana, parse_generic]

AM_GROUP_KEY = '{}/{severity="critical"}:{alertname="HighErrorRate", service="checkout"}'
AM_SUMMARY = "Checkout API is returning too many 5xx responses"
AM_GENERATOR = (
    "http://prometheus.example.com:9090/graph?g0.expr=sum+by+%28instance%29+%28rate%28"
    "http_requests_total%7Bjob%3D%22checkout-api%22%2Ccode%3D~%225..%22%7D%5B5m%5D%29%29+%2F+"
    "sum+by+%28instance%29+%28rate%28http_requests_total%7Bjob%3D%22checkout-api%22%7D%5B5m"
    "%5D%29%29+%3E+0.05&g0.tab=1"
)
RUNBOOK = "https://runbooks.example.com/checkout/high-error-rate"
GRAFANA_SILENCE_1 = (
    "https://play.grafana.org/alerting/silence/new?alertmanager=grafana"
    "&matchers=alertname%3DT2%2Cteam%3Dblue%2Czone%3Dus-1"
)


def sample(name: str) -> dict[str, Any]:
    data = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def assert_bounded(alert: Alert) -> None:
    """Every output invariant the renderer and the call pipeline rely on."""
    assert alert.source in ("alertmanager", "grafana", "generic")
    assert 0 < len(alert.title) <= MAX_TITLE_CHARS
    assert alert.title == alert.title.strip()
    assert not any(ch in alert.title for ch in "\n\r\t\x00\x1b\x7f\u202e")
    assert len(alert.text) <= MAX_TEXT_CHARS
    assert not any(ch in alert.text for ch in "\r\t\x00\x1b\x7f\u202e")
    assert 0 < len(alert.dedup_key) <= 256
    assert alert.severity is None or 0 < len(alert.severity) <= 50
    assert alert.team is None or 0 < len(alert.team) <= 100
    assert len(alert.labels) <= MAX_LABELS
    for name, value in alert.labels.items():
        assert 0 < len(name) <= MAX_LABEL_CHARS
        assert 0 < len(value) <= MAX_LABEL_CHARS
        assert not name.startswith("__")
    assert len(alert.links) <= MAX_LINKS
    assert len(set(alert.links)) == len(alert.links)
    for link in alert.links:
        assert link.startswith(("http://", "https://"))
    # Nothing that would blow up when sent on as UTF-8 (lone surrogates are valid JSON input).
    strings = [alert.title, alert.text, alert.dedup_key, *alert.links]
    strings += [s for s in (alert.severity, alert.team) if s is not None]
    strings += [*alert.labels, *alert.labels.values()]
    for s in strings:
        s.encode("utf-8")


# --------------------------------------------------------------------------- real samples


def test_alertmanager_firing_sample() -> None:
    alert = parse_alertmanager(sample("alertmanager_firing.json"))

    assert alert.source == "alertmanager"
    assert alert.firing is True
    assert alert.dedup_key == AM_GROUP_KEY
    assert alert.title == f"{AM_SUMMARY} (2 alerts)"
    assert alert.text == "5xx ratio on 10.0.3.17:8080 is 7.3% over the last 5m (threshold 5%)."
    assert alert.severity == "critical"
    assert alert.labels == {
        "alertname": "HighErrorRate",
        "job": "checkout-api",
        "namespace": "shop",
        "service": "checkout",
        "severity": "critical",
    }
    # Both alerts share one generatorURL: it is listed once.
    assert alert.links == (AM_GENERATOR, RUNBOOK, "http://alertmanager.example.com:9093")
    assert alert.team is None
    assert_bounded(alert)


def test_alertmanager_resolved_sample_pairs_with_firing() -> None:
    firing = parse_alertmanager(sample("alertmanager_firing.json"))
    resolved = parse_alertmanager(sample("alertmanager_resolved.json"))

    assert resolved.firing is False
    assert resolved.dedup_key == firing.dedup_key
    assert resolved.title == AM_SUMMARY  # no "(N alerts)": nothing is firing
    assert resolved.severity == "critical"
    assert resolved.labels == firing.labels
    assert_bounded(resolved)


def test_grafana_firing_sample() -> None:
    alert = parse_grafana(sample("grafana_firing.json"))

    assert alert.source == "grafana"
    assert alert.firing is True
    assert alert.dedup_key == "{}:{}"
    # "[FIRING:2]  (blue)" without Grafana's status prefix; the count moves to the suffix.
    assert alert.title == "(blue) (2 alerts)"
    assert alert.text == "The system has high memory usage"
    assert alert.severity is None
    assert alert.labels == {"team": "blue"}
    # Empty panelURL/dashboardURL are skipped; the shared runbook is listed once; cap of 5.
    assert alert.links == (
        "https://play.grafana.org/alerting/1afz29v7z/edit",
        "https://myrunbook.com/runbook/1234",
        GRAFANA_SILENCE_1,
        "https://play.grafana.org/alerting/d1rdpdv7k/edit",
        "https://play.grafana.org/",
    )
    assert_bounded(alert)


def test_grafana_resolved_sample_pairs_with_firing() -> None:
    firing = parse_grafana(sample("grafana_firing.json"))
    resolved = parse_grafana(sample("grafana_resolved.json"))

    assert resolved.firing is False
    assert resolved.dedup_key == firing.dedup_key
    assert resolved.title == "(blue)"
    assert resolved.labels == {"team": "blue"}
    assert_bounded(resolved)


def test_generic_firing_sample() -> None:
    alert = parse_generic(sample("generic_firing.json"))

    assert alert == Alert(
        source="generic",
        dedup_key="payments-webhook-backlog",
        firing=True,
        title="Payment provider webhook backlog over 10 minutes",
        text=(
            "Queue payments.webhooks has 4,812 pending messages; the oldest is 11m old.\n"
            "Consumers look stuck since the 14:02 deploy."
        ),
        severity="critical",
        labels={},
        links=(
            "https://grafana.example.com/d/payments-queues/payments-queues?orgId=1&viewPanel=4",
            "https://runbooks.example.com/payments/webhook-backlog",
        ),
        team="payments",
    )
    assert_bounded(alert)


def test_generic_resolved_pairs_with_firing() -> None:
    body = sample("generic_firing.json")
    resolved = parse_generic(body | {"status": "resolved"})

    assert resolved.firing is False
    assert resolved.dedup_key == parse_generic(body).dedup_key


def test_alertmanager_sample_also_parses_as_grafana() -> None:
    # Grafana's payload is Alertmanager-shaped, so its parser copes with plain Alertmanager.
    alert = parse_grafana(sample("alertmanager_firing.json"))
    assert alert.dedup_key == AM_GROUP_KEY
    assert alert.title == f"{AM_SUMMARY} (2 alerts)"


def test_alert_is_hashable_despite_its_labels_dict() -> None:
    alert = parse_alertmanager(sample("alertmanager_firing.json"))
    assert hash(alert) == hash(parse_alertmanager(sample("alertmanager_firing.json")))


# --------------------------------------------------------------------------- field rules


def test_alertmanager_title_falls_back_to_first_alert_summary_then_alertname() -> None:
    body = sample("alertmanager_firing.json")
    del body["commonAnnotations"]["summary"]
    body["alerts"][0]["annotations"]["summary"] = "Instance 10.0.3.17 is failing"
    assert parse_alertmanager(body).title == "Instance 10.0.3.17 is failing (2 alerts)"

    for alert in body["alerts"]:
        del alert["annotations"]["summary"]
    assert parse_alertmanager(body).title == "HighErrorRate (2 alerts)"

    del body["commonLabels"]["alertname"]
    body["groupLabels"]["alertname"] = "FromGroupLabels"
    assert parse_alertmanager(body).title == "FromGroupLabels (2 alerts)"

    del body["groupLabels"]["alertname"]
    assert parse_alertmanager(body).title == "HighErrorRate (2 alerts)"  # the alert's own label


def test_alertmanager_title_has_a_last_resort() -> None:
    body = {"groupKey": "k", "status": "firing", "alerts": [{}]}
    assert parse_alertmanager(body).title == "Alertmanager alert"
    assert parse_grafana(body).title == "Grafana alert"


def test_single_firing_alert_has_no_count_and_truncated_alerts_count() -> None:
    body = sample("alertmanager_firing.json")
    body["alerts"] = body["alerts"][:1]
    assert parse_alertmanager(body).title == AM_SUMMARY

    body["truncatedAlerts"] = 4
    assert parse_alertmanager(body).title == f"{AM_SUMMARY} (5 alerts)"


def test_text_prefers_common_description() -> None:
    body = sample("alertmanager_firing.json")
    body["commonAnnotations"]["description"] = "Line one\r\nLine two\n\n\n\nLine three\t!"
    assert parse_alertmanager(body).text == "Line one\nLine two\n\nLine three !"

    for alert in body["alerts"]:
        del alert["annotations"]["description"]
    del body["commonAnnotations"]["description"]
    assert parse_alertmanager(body).text == AM_SUMMARY  # first alert's summary


def test_grafana_text_falls_back_to_message() -> None:
    body = sample("grafana_firing.json")
    for alert in body["alerts"]:
        alert["annotations"] = {}
    alert = parse_grafana(body)
    assert alert.text.startswith("**Firing**\n\nLabels:\n - alertname = T2")
    assert len(alert.text) <= MAX_TEXT_CHARS


def test_labels_fall_back_to_first_alert_and_severity_is_found_there() -> None:
    body = sample("alertmanager_firing.json")
    body["commonLabels"] = {}
    alert = parse_alertmanager(body)
    assert alert.labels["instance"] == "10.0.3.17:8080"
    assert alert.severity == "critical"


def test_labels_prefer_the_alert_in_the_groups_own_state() -> None:
    body = sample("alertmanager_firing.json")
    body["commonLabels"] = {}
    body["alerts"][0]["status"] = "resolved"
    assert parse_alertmanager(body).labels["instance"] == "10.0.3.42:8080"


def test_grafana_title_prefixes_are_stripped_and_custom_titles_kept() -> None:
    body = sample("grafana_firing.json")
    for title, expected in [
        ("[FIRING:1] Disk full on db-1", "Disk full on db-1 (2 alerts)"),
        ("[firing : 12]   Disk full", "Disk full (2 alerts)"),
        ("[RESOLVED] Disk full", "Disk full (2 alerts)"),
        ("Disk full [FIRING:1]", "Disk full [FIRING:1] (2 alerts)"),
    ]:
        assert parse_grafana(body | {"title": title}).title == expected


def test_grafana_without_title_is_titled_like_alertmanager() -> None:
    body = sample("grafana_firing.json")
    for no_title in ({"title": None}, {"title": "[FIRING:2]   "}):
        alert = parse_grafana(body | no_title)
        assert alert.title == "This alert was triggered for zone us-1 (2 alerts)"
    del body["title"]
    assert parse_grafana(body).title == "This alert was triggered for zone us-1 (2 alerts)"


def test_grafana_dedup_key_falls_back_to_sorted_fingerprints() -> None:
    firing = sample("grafana_firing.json")
    resolved = sample("grafana_resolved.json")
    for body in (firing, resolved):
        del body["groupKey"]
    assert parse_grafana(firing).dedup_key == "bc97ff14869b13e3,c6eadffa33fcdf37"
    assert parse_grafana(resolved).dedup_key == "bc97ff14869b13e3,c6eadffa33fcdf37"

    for body in (firing, resolved):
        body["groupKey"] = ""
        for alert in body["alerts"]:
            del alert["fingerprint"]
    key = parse_grafana(firing).dedup_key
    assert key == parse_grafana(resolved).dedup_key
    assert key.count(",") == 1  # one label-derived fingerprint per alert


def test_long_or_unprintable_group_keys_are_hashed_stably() -> None:
    body = sample("alertmanager_firing.json")
    body["groupKey"] = "{}:{" + "x" * 1000 + "}"
    key = parse_alertmanager(body).dedup_key
    assert key.startswith("sha256:")
    assert len(key) == len("sha256:") + 64
    assert parse_alertmanager(body | {"status": "resolved"}).dedup_key == key

    body["groupKey"] = "a\nb"
    assert parse_alertmanager(body).dedup_key.startswith("sha256:")


def test_generic_minimal_body_and_fallback_dedup_key() -> None:
    alert = parse_generic({"title": "Nightly backup failed"})
    assert alert.firing is True
    assert alert.text == ""
    assert alert.severity is None
    assert alert.team is None
    assert alert.links == ()
    assert alert.dedup_key.startswith("sha256:")

    same = parse_generic({"title": "Nightly backup failed", "status": "resolved"})
    assert same.dedup_key == alert.dedup_key
    other_team = parse_generic({"title": "Nightly backup failed", "team": "dba"})
    assert other_team.dedup_key != alert.dedup_key
    assert other_team.team == "dba"
    blank_key = parse_generic({"title": "Nightly backup failed", "dedupKey": "  "})
    assert blank_key.dedup_key == alert.dedup_key


def test_generic_severity_is_normalized_and_nulls_mean_absent() -> None:
    alert = parse_generic(
        {"title": "t", "severity": "  CRITICAL ", "text": None, "team": None, "links": None}
    )
    assert alert.severity == "critical"
    assert alert.text == ""
    assert alert.team is None
    assert alert.links == ()


def test_null_maps_are_empty_maps() -> None:
    # Go marshals nil maps as null.
    body = sample("alertmanager_firing.json")
    body["groupLabels"] = None
    body["commonAnnotations"] = None
    body["alerts"][0]["annotations"] = None
    alert = parse_alertmanager(body)
    assert alert.title == "HighErrorRate (2 alerts)"


def test_unknown_fields_and_versions_are_ignored() -> None:
    body = sample("alertmanager_firing.json") | {"version": "5", "somethingNew": [1, {"a": 2}]}
    assert parse_alertmanager(body).dedup_key == AM_GROUP_KEY


# --------------------------------------------------------------------------- hygiene & bounds


def test_control_characters_are_stripped() -> None:
    alert = parse_generic(
        {
            "title": "Disk\x00 full\u202e on\n\tdb-1\x1b[31m \ud800",
            "text": "first\x07 line\r\nsecond\u2028third\x00",
            "team": "\x00ops\u2066",
            "severity": "\x1bWarning",
        }
    )
    assert alert.title == "Disk full on db-1[31m"
    assert alert.text == "first line\nsecond\nthird"
    assert alert.team == "ops"
    assert alert.severity == "warning"
    assert_bounded(alert)


def test_long_strings_are_clipped() -> None:
    alert = parse_generic({"title": "T" * 5000, "text": "x" * 50_000, "team": "t" * 500})
    assert len(alert.title) == MAX_TITLE_CHARS
    assert alert.title.endswith("…")
    assert len(alert.text) == MAX_TEXT_CHARS
    assert alert.text.endswith("…")
    assert_bounded(alert)


def test_long_titles_keep_their_alert_count() -> None:
    body = sample("alertmanager_firing.json")
    body["commonAnnotations"]["summary"] = "S" * 1000
    title = parse_alertmanager(body).title
    assert len(title) == MAX_TITLE_CHARS
    assert title.endswith("… (2 alerts)")


def test_labels_are_bounded_and_prioritized() -> None:
    labels = {f"extra_{i:03}": "v" for i in range(100)}
    labels |= {
        "alertname": "A",
        "severity": "page",
        "instance": "i" * 300,
        "__alert_rule_uid__": "abc",
        "empty": "",
        "k" * 300: "long name",
    }
    body = {"groupKey": "k", "status": "firing", "commonLabels": labels, "alerts": [{}]}
    alert = parse_alertmanager(body)

    assert len(alert.labels) == MAX_LABELS
    assert alert.labels["alertname"] == "A"
    assert alert.labels["severity"] == "page"
    assert alert.labels["instance"] == "i" * (MAX_LABEL_CHARS - 1) + "…"
    assert "__alert_rule_uid__" not in alert.labels
    assert "empty" not in alert.labels
    assert_bounded(alert)


def test_non_http_links_are_dropped() -> None:
    links = [
        "javascript:alert(1)",
        "ftp://files.example.com/x",
        "mailto:oncall@example.com",
        "file:///etc/passwd",
        "//example.com/no-scheme",
        "http://",
        "https://user:secret@example.com/",
        "https://exa mple.com/",
        "https://example.com/\x00",
        "https://[::1/broken",
        "",
        "https://example.com/a",
        " https://example.com/a ",
        "HTTPS://EXAMPLE.com/b",
        "http://example.com/c",
        "https://example.com/d",
        "https://example.com/e",
        "https://example.com/f",
    ]
    alert = parse_generic({"title": "t", "links": links})
    assert alert.links == (
        "https://example.com/a",
        "HTTPS://EXAMPLE.com/b",
        "http://example.com/c",
        "https://example.com/d",
        "https://example.com/e",
    )


def test_non_http_generator_and_external_urls_are_dropped() -> None:
    body = sample("alertmanager_firing.json")
    body["externalURL"] = "alertmanager:9093"
    for alert in body["alerts"]:
        alert["generatorURL"] = "javascript:void(0)"
    body["commonAnnotations"]["runbook_url"] = "see wiki"
    for alert in body["alerts"]:
        alert["annotations"]["runbook_url"] = "see wiki"
    assert parse_alertmanager(body).links == ()


# --------------------------------------------------------------------------- bad bodies

HUGE = "A" * 1_000_000


def am_without(key: str) -> dict[str, Any]:
    body = sample("alertmanager_firing.json")
    del body[key]
    return body


BAD_BODIES: list[tuple[Parser, object, str]] = [
    (parse_alertmanager, [], "body must be a JSON object"),
    (parse_grafana, "firing", "body must be a JSON object"),
    (parse_generic, None, "body must be a JSON object"),
    (parse_generic, 42, "body must be a JSON object"),
    (parse_alertmanager, am_without("alerts"), "alerts: field required"),
    (parse_alertmanager, am_without("groupKey"), "groupKey: field required"),
    (parse_alertmanager, am_without("status"), "status: field required"),
    (parse_grafana, am_without("alerts"), "alerts: field required"),
    (parse_generic, {"text": "no title"}, "title: field required"),
    (parse_generic, {"title": " \n\x00 "}, "title: must not be empty"),
    (parse_generic, {"title": 42}, "title: must be a string"),
    (parse_generic, {"title": "t", "links": "https://x"}, "links: must be a list"),
    (parse_generic, {"title": "t", "links": [1]}, "links.0: must be a string"),
    (parse_generic, {"title": "t", "status": "on fire"}, "status: input should be 'firing'"),
    (parse_generic, {"title": HUGE}, "title: string should have at most 65536 characters"),
    (
        parse_alertmanager,
        {"groupKey": "k", "status": "firing", "alerts": []},
        "alerts: list should have at least 1 item",
    ),
    (
        parse_alertmanager,
        {"groupKey": "", "status": "firing", "alerts": [{}]},
        "groupKey: string should have at least 1 character",
    ),
    (
        parse_alertmanager,
        {"groupKey": "k", "status": "firing", "alerts": {"0": {}}},
        "alerts: must be a list",
    ),
    (
        parse_alertmanager,
        {"groupKey": "k", "status": "firing", "alerts": ["x"]},
        "alerts.0: must be an object",
    ),
    (
        parse_alertmanager,
        {"groupKey": "k", "status": "firing", "alerts": [{"labels": {"severity": 1}}]},
        "alerts.0.labels.severity: must be a string",
    ),
    (
        parse_grafana,
        {"status": "firing", "alerts": [{}], "commonAnnotations": {"d": HUGE}},
        "commonAnnotations.d: string should have at most",
    ),
    (
        parse_grafana,
        {"status": "firing", "alerts": [{}], "truncatedAlerts": -1},
        "truncatedAlerts: input should be greater than or equal to 0",
    ),
]


@pytest.mark.parametrize(("parse", "body", "reason"), BAD_BODIES)
def test_bad_bodies_raise_a_short_reason(parse: Parser, body: object, reason: str) -> None:
    with pytest.raises(AlertError) as caught:
        parse(copy.deepcopy(body))
    message = str(caught.value)
    assert message.startswith(reason)
    assert len(message) <= 200
    assert "AAAA" not in message
    assert "Traceback" not in message
    assert isinstance(caught.value, ValueError)


def test_reason_counts_further_errors_and_hides_attacker_keys() -> None:
    evil_key = "\x1b[2J" + "K" * 10_000
    body = {"groupKey": 1, "status": 2, "alerts": [{"labels": {evil_key: 3}}]}
    with pytest.raises(AlertError) as caught:
        parse_alertmanager(body)
    message = str(caught.value)
    assert message == "status: input should be 'firing' or 'resolved' (and 2 more)"

    body = {"groupKey": "k", "status": "firing", "alerts": [{"labels": {evil_key: 3}}]}
    with pytest.raises(AlertError) as caught:
        parse_alertmanager(body)
    message = str(caught.value)
    assert message.startswith("alerts.0.labels.[2JKKK")
    assert "\x1b" not in message
    assert len(message) <= 200


# --------------------------------------------------------------------------- properties

# Text with everything JSON can carry: controls, bidi marks, lone surrogates, astral planes.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=400)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
FIELD_NAMES = [
    "version",
    "groupKey",
    "truncatedAlerts",
    "status",
    "receiver",
    "groupLabels",
    "commonLabels",
    "commonAnnotations",
    "externalURL",
    "alerts",
    "labels",
    "annotations",
    "generatorURL",
    "fingerprint",
    "panelURL",
    "dashboardURL",
    "silenceURL",
    "title",
    "message",
    "text",
    "severity",
    "dedupKey",
    "team",
    "links",
    "summary",
    "description",
    "runbook_url",
    "alertname",
]
json_keys = st.sampled_from(FIELD_NAMES) | any_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(body=json_values)
def test_arbitrary_json_only_ever_raises_alert_error(body: object) -> None:
    for parse in PARSERS:
        try:
            alert = parse(body)
        except AlertError as exc:
            assert 0 < len(str(exc)) <= 200
        else:
            assert_bounded(alert)


string_maps = st.dictionaries(
    st.sampled_from(["alertname", "severity", "summary", "description", "runbook_url"]) | any_text,
    any_text,
    max_size=30,
)
url_like = any_text | st.sampled_from(
    ["https://example.com/x", "http://h:1/p?q=1", "javascript:alert(1)", "ftp://x", ""]
)
am_alerts = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["firing", "resolved"]) | any_text,
        "labels": string_maps,
        "annotations": string_maps,
        "generatorURL": url_like,
        "fingerprint": any_text,
        "panelURL": url_like,
        "dashboardURL": url_like,
        "silenceURL": url_like,
        "values": json_values,
    },
)
group_payloads = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved"]),
        "alerts": st.lists(am_alerts, min_size=1, max_size=5),
    },
    optional={
        "groupKey": any_text,
        "truncatedAlerts": st.integers(0, 10**9),
        "groupLabels": string_maps,
        "commonLabels": string_maps,
        "commonAnnotations": string_maps,
        "externalURL": url_like,
        "title": any_text,
        "message": any_text,
        "version": json_scalars,
        "orgId": json_scalars,
    },
)
generic_payloads = st.fixed_dictionaries(
    {"title": any_text},
    optional={
        "text": any_text | st.none(),
        "severity": any_text | st.none(),
        "dedupKey": any_text | st.none(),
        "status": st.sampled_from(["firing", "resolved"]),
        "team": any_text | st.none(),
        "links": st.lists(url_like, max_size=10) | st.none(),
    },
)


@settings(max_examples=300, deadline=None)
@given(body=group_payloads)
def test_well_shaped_group_payloads_yield_bounded_alerts(body: dict[str, Any]) -> None:
    for parse in (parse_alertmanager, parse_grafana):
        try:
            alert = parse(body)
        except AlertError as exc:
            # Only an empty groupKey may be refused, and only by the Alertmanager parser.
            assert parse is parse_alertmanager
            assert str(exc).startswith("groupKey:")
            continue
        assert_bounded(alert)
        assert alert.firing == (body["status"] == "firing")
        resolved = parse(body | {"status": "resolved"})
        assert resolved.dedup_key == alert.dedup_key


@settings(max_examples=300, deadline=None)
@given(body=generic_payloads)
def test_well_shaped_generic_payloads_yield_bounded_alerts(body: dict[str, Any]) -> None:
    try:
        alert = parse_generic(body)
    except AlertError as exc:
        assert str(exc) == "title: must not be empty"
        return
    assert_bounded(alert)
    assert alert.firing == (body.get("status", "firing") == "firing")
    assert parse_generic(body | {"status": "resolved"}).dedup_key == alert.dedup_key
