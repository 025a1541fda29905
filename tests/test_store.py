"""Storage: what the Store keeps and gives back, on SQLite and on PostgreSQL (see db_fixtures)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import states
from bot.storage.db import alembic_config, create_engine, database_url, migrate, sessionmaker
from bot.storage.store import CallRecord, NewCall, StatusUpdate, Store
from bot.storage.tables import Base

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "calls",
    "call_status",
    "permission_requests",
    "audit",
    "webhook_deliveries",
    "contacts",
    "teams",
    "incidents",
    "heartbeats",
    "silences",
    "rings",
}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_call(call_id: str = "c1", *, chat_id: int = 500, **overrides: Any) -> NewCall:
    values: dict[str, Any] = {
        "id": call_id,
        "operator_id": 111,
        "operator_name": "Ana Souza",
        "chat_id": chat_id,
        "number_type": "web",
        "phone": "+5511912345678",
        "phone_display": "+55 11 91234-5678",
        "masked": False,
        "locale": "pt_BR",
        "note": "ligar",
    }
    return NewCall(**(values | overrides))


async def started_call(
    store: Store, call_id: str = "c1", pilot_id: str = "pc1", *, seconds: float = 0, **kw: Any
) -> CallRecord:
    await store.create_call(new_call(call_id, **kw), at=at(seconds))
    return await store.call_started(
        call_id,
        pilot_call_id=pilot_id,
        external_call_id=f"wacid.{pilot_id}",
        status="INITIATED",
        at=at(seconds + 1),
    )


async def reread(store: Store, record: CallRecord) -> CallRecord:
    """Records from writes carry no history; reading the call loads it."""
    stored = await store.get_call(record.id)
    assert stored is not None
    return stored


def statuses(record: CallRecord) -> list[str]:
    return [change.status for change in record.history]


# write ahead and the happy path


async def test_write_ahead_then_a_call_that_rings_connects_and_completes(store: Store) -> None:
    created = await store.create_call(new_call(), at=at(0))
    assert created.status == states.PENDING
    assert not created.terminal
    assert created.pilot_call_id is None
    assert (created.operator_id, created.operator_name, created.chat_id) == (111, "Ana Souza", 500)
    assert (created.phone, created.phone_display, created.masked, created.note) == (
        "+5511912345678",
        "+55 11 91234-5678",
        False,
        "ligar",
    )
    assert (created.number_type, created.locale, created.message_id) == ("web", "pt_BR", None)
    assert [(c.status, c.at, c.source) for c in created.history] == [("PENDING", at(0), "bot")]
    assert await store.get_call("c1") == created

    started = await store.call_started(
        "c1", pilot_call_id="pc1", external_call_id="wacid.1", status="INITIATED", at=at(1)
    )
    assert started.status == "INITIATED"
    assert started.pilot_call_id == "pc1"
    assert started.external_call_id == "wacid.1"

    ringing, changed = await store.apply_status("pc1", "RINGING", at=at(2), source="webhook")
    assert changed
    assert ringing is not None and ringing.status == "RINGING"
    assert ringing.connected_at is None

    accepted, changed = await store.apply_status("wacid.1", "ACCEPTED", at=at(5), source="poll")
    assert changed
    assert accepted is not None and accepted.status == "ACCEPTED"
    assert accepted.connected_at == at(5)
    assert accepted.ended_at is None

    done, changed = await store.apply_status(
        "pc1", "COMPLETED", at=at(47), source="webhook", duration_seconds=42
    )
    assert changed
    assert done is not None
    assert done.status == "COMPLETED"
    assert done.terminal
    assert done.duration_seconds == 42
    assert done.connected_at == at(5)
    assert done.ended_at == at(47)
    assert done.updated_at == at(47)
    assert done.created_at == at(0)
    assert [(c.status, c.at, c.source) for c in (await reread(store, done)).history] == [
        ("PENDING", at(0), "bot"),
        ("INITIATED", at(1), "api"),
        ("RINGING", at(2), "webhook"),
        ("ACCEPTED", at(5), "poll"),
        ("COMPLETED", at(47), "webhook"),
    ]

    # the same call, whichever id we are given; what was stored is what comes back
    stored = await reread(store, done)
    assert replace(stored, history=()) == done
    assert await store.get_call("c1") == stored
    assert await store.get_call("pc1") == stored
    assert await store.get_call("wacid.1") == stored
    assert await store.get_call("nope") is None


async def test_call_found_by_its_telegram_message(store: Store) -> None:
    await store.create_call(new_call("c1", chat_id=500), at=at(0))
    await store.create_call(new_call("c2", chat_id=600), at=at(1))
    assert await store.call_by_message(500, 77) is None

    await store.set_message("c1", 77)
    await store.set_message("c2", 77)
    await store.set_message("missing", 78)  # no such call: nothing happens

    in_500 = await store.call_by_message(500, 77)
    assert in_500 is not None and (in_500.id, in_500.message_id) == ("c1", 77)
    in_600 = await store.call_by_message(600, 77)
    assert in_600 is not None and in_600.id == "c2"
    assert await store.call_by_message(500, 78) is None


async def test_call_started_when_the_api_already_reports_ringing(store: Store) -> None:
    await store.create_call(new_call(), at=at(0))
    record = await store.call_started(
        "c1", pilot_call_id="pc1", external_call_id=None, status="RINGING", at=at(1)
    )
    assert record.status == "RINGING"
    assert statuses(await reread(store, record)) == ["PENDING", "RINGING"]


# out of order


async def test_events_arriving_out_of_order_never_move_a_call_backwards(store: Store) -> None:
    await started_call(store)

    done, changed = await store.apply_status(
        "pc1", "COMPLETED", at=at(50), source="webhook", duration_seconds=42
    )
    assert changed
    assert done is not None and done.status == "COMPLETED"

    for late in ("ACCEPTED", "RINGING"):
        record, changed = await store.apply_status("pc1", late, at=at(10), source="webhook")
        assert not changed, late
        assert record is not None
        assert record.status == "COMPLETED"
        assert record.duration_seconds == 42
        assert record.ended_at == at(50)
        assert record.connected_at is None

    stored = await store.get_call("pc1")
    assert stored is not None
    assert stored.status == "COMPLETED"
    assert stored.duration_seconds == 42
    assert statuses(stored) == ["PENDING", "INITIATED", "COMPLETED"]


async def test_a_late_duration_fills_in_on_an_ended_call(store: Store) -> None:
    await started_call(store)
    await store.apply_status("pc1", "ACCEPTED", at=at(5), source="webhook")
    await store.apply_status("pc1", "COMPLETED", at=at(50), source="webhook")
    ended = await store.get_call("pc1")
    assert ended is not None and ended.duration_seconds is None

    record, changed = await store.apply_status(
        "pc1", "COMPLETED", at=at(60), source="poll", duration_seconds=45
    )
    assert changed
    assert record is not None
    assert (record.status, record.duration_seconds) == ("COMPLETED", 45)
    assert record.ended_at == at(50)  # the end is when it ended, not when we learnt the duration
    assert statuses(await reread(store, record)) == [
        "PENDING",
        "INITIATED",
        "ACCEPTED",
        "COMPLETED",
    ]

    # the same event again is not news
    record, changed = await store.apply_status(
        "pc1", "COMPLETED", at=at(61), source="webhook", duration_seconds=45
    )
    assert not changed
    stored = await store.get_call("c1")
    assert stored is not None and stored.duration_seconds == 45


async def test_an_event_for_an_unknown_call_is_reported_as_such(store: Store) -> None:
    await started_call(store)
    assert await store.apply_status("pc-unknown", "RINGING", at=at(2), source="webhook") == (
        None,
        False,
    )
    stored = await store.get_call("c1")
    assert stored is not None and stored.status == "INITIATED"


async def test_an_error_code_is_kept_with_the_failure_that_brought_it(store: Store) -> None:
    await started_call(store)
    record, changed = await store.apply_status(
        "pc1", "FAILED", at=at(3), source="webhook", error_code="recipient_unreachable"
    )
    assert changed
    assert record is not None
    assert (record.status, record.error_code) == ("FAILED", "recipient_unreachable")

    record, changed = await store.apply_status(
        "pc1", "MISSED", at=at(4), source="webhook", error_code="other"
    )
    assert not changed
    assert record is not None
    assert (record.status, record.error_code) == ("FAILED", "recipient_unreachable")


# refused by the API


async def test_a_refused_call_is_final(store: Store) -> None:
    await store.create_call(new_call(), at=at(0))
    failed = await store.call_failed("c1", error_code="invalid_number", at=at(1))
    assert failed.status == states.NOT_STARTED
    assert failed.terminal
    assert failed.error_code == "invalid_number"
    assert failed.ended_at == at(1)
    assert [(c.status, c.source) for c in (await reread(store, failed)).history] == [
        ("PENDING", "bot"),
        ("NOT_STARTED", "api"),
    ]

    # a late answer of the API and events after it do not bring it back
    late = await store.call_started(
        "c1", pilot_call_id="pc1", external_call_id=None, status="INITIATED", at=at(2)
    )
    assert late.status == states.NOT_STARTED
    for status in ("RINGING", "ACCEPTED", "COMPLETED"):
        record, changed = await store.apply_status("pc1", status, at=at(3), source="webhook")
        assert not changed
        assert record is not None and record.status == states.NOT_STARTED

    stored = await store.get_call("c1")
    assert stored is not None
    assert stored.status == states.NOT_STARTED
    assert stored.error_code == "invalid_number"
    assert stored.ended_at == at(1)
    assert stored.connected_at is None
    assert statuses(stored) == ["PENDING", "NOT_STARTED"]


async def test_an_unknown_outcome_is_not_final(store: Store) -> None:
    await store.create_call(new_call(), at=at(0))
    unknown = await store.call_failed(
        "c1", error_code="timeout", status=states.UNKNOWN_OUTCOME, at=at(1)
    )
    assert unknown.status == states.UNKNOWN_OUTCOME
    assert not unknown.terminal
    assert unknown.ended_at is None

    recovered = await store.call_started(
        "c1", pilot_call_id="pc1", external_call_id=None, status="INITIATED", at=at(2)
    )
    assert recovered.status == "INITIATED"
    assert statuses(await reread(store, recovered)) == ["PENDING", "UNKNOWN", "INITIATED"]


async def test_starting_or_failing_a_call_that_was_never_stored_raises(store: Store) -> None:
    with pytest.raises(KeyError):
        await store.call_started(
            "nope", pilot_call_id="p", external_call_id=None, status="INITIATED"
        )
    with pytest.raises(KeyError):
        await store.call_failed("nope", error_code="x")
    assert await store.get_call("p") is None


# concurrency


async def test_concurrent_events_for_one_call_never_move_it_backwards(store: Store) -> None:
    # On SQLite this holds because every transaction begins IMMEDIATE (bot/storage/db.py).
    rng = random.Random(20260301)
    for attempt in range(3):
        call_id, pilot_id = f"c{attempt}", f"pc{attempt}"
        await started_call(store, call_id, pilot_id)
        events = ["RINGING"] * 7 + ["ACCEPTED"] * 7 + ["COMPLETED"] * 6
        rng.shuffle(events)

        results = await asyncio.gather(
            *(
                store.apply_status(
                    pilot_id,
                    status,
                    at=at(10 + i),
                    source="webhook",
                    duration_seconds=30 if status == "COMPLETED" else None,
                )
                for i, status in enumerate(events)
            )
        )

        stored = await store.get_call(call_id)
        assert stored is not None
        history = statuses(stored)
        assert stored.status == "COMPLETED", history
        assert stored.duration_seconds == 30
        assert history[:2] == ["PENDING", "INITIATED"]
        assert history[-1] == "COMPLETED"
        assert len(history) == len(set(history)), f"duplicate statuses: {history}"
        ranks = [states.rank(s) for s in history]
        assert ranks == sorted(ranks), f"history goes backwards: {history}"
        # each change reported was a real change, and each is in the history once
        assert sum(changed for _, changed in results) == len(history) - 2
        assert all(record is not None for record, _ in results)


# webhook deliveries


async def test_a_delivery_key_is_applied_once(store: Store) -> None:
    await started_call(store, "c1", "p1")
    ringing = [StatusUpdate("p1", "RINGING", at(5), "webhook")]
    [(record, changed)] = await store.apply_delivery("key-1", ringing, at=at(5)) or []
    assert changed and record is not None and record.status == "RINGING"
    assert await store.apply_delivery("key-1", ringing, at=at(6)) is None
    assert await store.apply_delivery("key-2", []) == []
    assert await store.apply_delivery("key-2", []) is None
    call = await store.get_call("p1")
    assert call is not None and [h.status for h in call.history].count("RINGING") == 1


async def test_concurrent_replays_of_one_delivery_let_exactly_one_through(store: Store) -> None:
    await started_call(store, "c1", "p1")
    ended = [StatusUpdate("p1", "COMPLETED", at(9), "webhook", duration_seconds=3)]
    results = await asyncio.gather(*(store.apply_delivery("dup", ended) for _ in range(10)))
    assert sum(r is not None for r in results) == 1
    assert await store.apply_delivery("dup", ended) is None
    assert await store.apply_delivery("other", []) == []
    call = await store.get_call("p1")
    assert call is not None and call.status == "COMPLETED" and call.duration_seconds == 3


async def test_a_batch_of_deliveries_takes_the_same_statements_as_one(
    store: Store, engine: AsyncEngine
) -> None:
    """Group commit shares more than the commit: a batch's key check, locking query, UPDATE and
    history INSERT are one statement each however many deliveries and calls it holds."""
    for i in range(6):
        await started_call(store, f"c{i}", f"p{i}")
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split(None, 1)[0])

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        batch = [(f"k{i}", [StatusUpdate(f"p{i}", "RINGING", at(5), "webhook")]) for i in range(6)]
        batch.append(("k0", batch[0][1]))  # the same key twice in one batch: applied once
        results = await store.apply_deliveries(batch)
        one = await store.apply_deliveries(
            [("k9", [StatusUpdate("p0", "ACCEPTED", at(6), "webhook", duration_seconds=1)])]
        )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert [r is not None for r in results] == [True] * 6 + [False]
    assert all(r and r[0][1] for r in one)
    assert sorted(statements) == sorted(["INSERT", "SELECT", "UPDATE", "INSERT"] * 2)
    for i in range(6):
        call = await store.get_call(f"p{i}")
        assert call is not None and [h.status for h in call.history].count("RINGING") == 1


# listing calls


async def test_recent_calls_pages_newest_first_within_one_chat(store: Store) -> None:
    for i in range(7):
        await store.create_call(new_call(f"a{i}", chat_id=500), at=at(i * 10))
    for i in range(3):
        await store.create_call(new_call(f"b{i}", chat_id=600), at=at(i * 10 + 5))

    assert await store.count_calls(500) == 7
    assert await store.count_calls(600) == 3
    assert await store.count_calls(700) == 0

    first = await store.recent_calls(500, limit=3)
    second = await store.recent_calls(500, limit=3, offset=3)
    last = await store.recent_calls(500, limit=3, offset=6)
    assert [r.id for r in first] == ["a6", "a5", "a4"]
    assert [r.id for r in second] == ["a3", "a2", "a1"]
    assert [r.id for r in last] == ["a0"]
    assert await store.recent_calls(500, limit=3, offset=9) == []
    assert [r.id for r in await store.recent_calls(600, limit=10)] == ["b2", "b1", "b0"]
    assert await store.recent_calls(700, limit=10) == []
    assert all(r.chat_id == 500 for r in first + second + last)


async def test_recent_calls_created_at_the_same_instant_keep_a_stable_order(store: Store) -> None:
    for call_id in ("x1", "x3", "x2"):
        await store.create_call(new_call(call_id), at=at(0))
    assert [r.id for r in await store.recent_calls(500, limit=2)] == ["x3", "x2"]
    assert [r.id for r in await store.recent_calls(500, limit=2, offset=2)] == ["x1"]


async def test_live_and_open_calls_after_a_mix_of_states(store: Store) -> None:
    await store.create_call(new_call("pending"), at=at(0))
    await store.create_call(new_call("unknown"), at=at(1))
    await store.call_failed("unknown", error_code="timeout", status=states.UNKNOWN_OUTCOME)
    await store.create_call(new_call("refused"), at=at(2))
    await store.call_failed("refused", error_code="invalid_number")
    await started_call(store, "initiated", "p-init", seconds=3)
    await started_call(store, "ringing", "p-ring", seconds=4)
    await store.apply_status("p-ring", "RINGING", at=at(20), source="webhook")
    await started_call(store, "accepted", "p-acc", seconds=5)
    await store.apply_status("p-acc", "ACCEPTED", at=at(20), source="webhook")
    await started_call(store, "completed", "p-done", seconds=6)
    await store.apply_status("p-done", "COMPLETED", at=at(20), source="webhook")
    await started_call(store, "missed", "p-miss", seconds=7)
    await store.apply_status("p-miss", "MISSED", at=at(20), source="webhook")
    await store.create_call(new_call("pending2"), at=at(8))

    assert [r.id for r in await store.live_calls()] == ["initiated", "ringing", "accepted"]
    assert [r.id for r in await store.calls_in(states.PENDING)] == ["pending", "pending2"]
    assert [r.id for r in await store.calls_in(states.PENDING, states.UNKNOWN_OUTCOME)] == [
        "pending",
        "unknown",
        "pending2",
    ]
    assert [r.id for r in await store.calls_in("COMPLETED", "MISSED", "NOT_STARTED")] == [
        "refused",
        "completed",
        "missed",
    ]
    assert await store.calls_in("REJECTED") == []


# permission requests


async def test_answering_a_permission_request_closes_it_in_every_chat(store: Store) -> None:
    phone = "+5511912345678"
    for operator_id, chat_id, second in ((111, 500, 0), (112, 600, 1)):
        await store.add_permission_request(
            phone=phone,
            phone_display="+55 11 91234-5678",
            masked=True,
            operator_id=operator_id,
            chat_id=chat_id,
            locale="pt_BR",
            message_id=f"wamid.{chat_id}",
            at=at(second),
        )
    await store.add_permission_request(
        phone="+5511900000000",
        phone_display="+55 11 90000-0000",
        masked=False,
        operator_id=111,
        chat_id=500,
        locale="en",
        message_id=None,
        at=at(2),
    )

    answered = await store.answer_permission_requests(phone, "granted", at=at(30))
    assert sorted((r.chat_id, r.operator_id, r.status) for r in answered) == [
        (500, 111, "granted"),
        (600, 112, "granted"),
    ]
    assert all(r.phone == phone and r.masked and r.locale == "pt_BR" for r in answered)
    assert sorted(r.requested_at for r in answered) == [at(0), at(1)]
    assert len({r.id for r in answered}) == 2

    assert await store.answer_permission_requests(phone, "denied", at=at(31)) == []
    # the other number's request is still open
    other = await store.answer_permission_requests("+5511900000000", "denied")
    assert [(r.chat_id, r.status, r.masked, r.locale) for r in other] == [
        (500, "denied", False, "en")
    ]


# audit


async def test_audit_is_listed_in_the_order_written_from_a_point_in_time(store: Store) -> None:
    detail = {"phone": "+5511912345678", "n": 3, "ok": True, "list": [1, "x"], "sub": {"a": None}}
    await store.audit("call", actor_id=111, chat_id=500, subject="c1", detail=detail, at=at(0))
    await store.audit("grant", actor_id=222, at=at(20))
    await store.audit("deny", actor_id=222, chat_id=600, subject="+55", at=at(10))
    await store.audit("revoke", at=at(30), detail={})

    everything = await store.audit_since(at(0))
    assert [r.action for r in everything] == ["call", "grant", "deny", "revoke"]
    first = everything[0]
    assert (first.at, first.actor_id, first.chat_id, first.subject) == (at(0), 111, 500, "c1")
    assert first.detail == detail
    assert everything[1].detail is None
    assert (everything[1].chat_id, everything[1].subject) == (None, None)
    assert everything[3].detail == {}

    assert [r.action for r in await store.audit_since(at(10))] == ["grant", "deny", "revoke"]
    assert [r.action for r in await store.audit_since(at(10.5))] == ["grant", "revoke"]
    assert await store.audit_since(at(31)) == []
    # a since in another zone is the same instant
    since = at(20).astimezone(timezone(timedelta(hours=-3)))
    assert [r.action for r in await store.audit_since(since)] == ["grant", "revoke"]


async def test_audit_without_a_time_is_stamped_now(store: Store) -> None:
    before = datetime.now(UTC)
    await store.audit("start")
    after = datetime.now(UTC)
    [record] = await store.audit_since(before - timedelta(seconds=1))
    assert before <= record.at <= after


# datetimes


async def test_datetimes_come_back_aware_and_in_utc(store: Store) -> None:
    sao_paulo = timezone(timedelta(hours=-3))
    local = datetime(2026, 3, 1, 9, 0, 0, 123456, tzinfo=sao_paulo)
    await store.create_call(new_call(), at=local)
    await store.call_started(
        "c1", pilot_call_id="pc1", external_call_id=None, status="INITIATED", at=local
    )
    await store.apply_status("pc1", "ACCEPTED", at=local + timedelta(seconds=3), source="webhook")
    await store.apply_status("pc1", "COMPLETED", at=local + timedelta(seconds=9), source="webhook")
    await store.audit("x", at=local)
    await store.add_permission_request(
        phone="+1",
        phone_display="+1",
        masked=False,
        operator_id=1,
        chat_id=1,
        locale="en",
        message_id=None,
        at=local,
    )

    record = await store.get_call("c1")
    assert record is not None
    [audit] = await store.audit_since(local)
    [request] = await store.answer_permission_requests("+1", "granted")
    moments = [
        record.created_at,
        record.updated_at,
        record.connected_at,
        record.ended_at,
        *(c.at for c in record.history),
        audit.at,
        request.requested_at,
    ]
    for moment in moments:
        assert moment is not None
        assert moment.utcoffset() == timedelta(0), moment
        assert moment.tzinfo == UTC, moment
    assert record.created_at == local
    assert record.created_at.hour == 12
    assert record.created_at.microsecond == 123456
    assert record.ended_at == datetime(2026, 3, 1, 12, 0, 9, 123456, tzinfo=UTC)
    assert audit.at == request.requested_at == local


async def test_a_naive_datetime_is_refused(store: Store) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        await store.create_call(new_call(), at=datetime(2026, 3, 1, 12, 0))
    assert await store.get_call("c1") is None


# migrations


def _schema_diff(connection: Connection) -> list[Any]:
    diff: list[Any] = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    return diff


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def test_migrations_build_exactly_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(lambda c: set(inspect(c).get_table_names())) == set()
        await migrate(engine)
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert tables == TABLES | {"alembic_version"}
            assert await connection.run_sync(_schema_diff) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert head is not None
            assert await connection.run_sync(_current_revision) == head

            # the comparison does see a schema that drifted from the models
            await connection.execute(text("DROP INDEX ix_calls_status"))
            drift = await connection.run_sync(_schema_diff)
            assert [(d[0], d[1].name) for d in drift] == [("add_index", "ix_calls_status")]
            await connection.rollback()
    finally:
        await engine.dispose()


async def test_migrate_again_changes_nothing(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrate(engine)
        await Store(sessionmaker(engine)).create_call(new_call(), at=at(0))

        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        try:
            await migrate(engine)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record)
        writes = [
            s
            for s in statements
            if s.lstrip().split(None, 1)[0].upper()
            in {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE"}
        ]
        assert statements, "the listener saw nothing: the check would be vacuous"
        assert writes == []

        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
            count = (await connection.execute(text("SELECT count(*) FROM calls"))).scalar_one()
            assert count == 1
        stored = await Store(sessionmaker(engine)).get_call("c1")
        assert stored is not None and stored.status == states.PENDING
    finally:
        await engine.dispose()


# DATABASE_URL


def test_database_url_defaults_to_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    url = database_url(None, tmp_path / "data")
    assert url == f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'callbot.db').resolve()}"
    assert database_url("", tmp_path) == f"sqlite+aiosqlite:///{tmp_path.resolve()}/callbot.db"


def test_database_url_picks_the_async_drivers(tmp_path: Path) -> None:
    assert database_url("postgresql://u:p@h/db", tmp_path) == "postgresql+asyncpg://u:p@h/db"
    assert (
        database_url("postgres://u:p@h:5433/db", tmp_path) == "postgresql+asyncpg://u:p@h:5433/db"
    )
    assert database_url("sqlite:///x.db", tmp_path) == "sqlite+aiosqlite:///x.db"
    assert database_url("sqlite+aiosqlite:///x.db", tmp_path) == "sqlite+aiosqlite:///x.db"
    assert (
        database_url("postgresql+asyncpg://u:p%40ss@h/db", tmp_path)
        == "postgresql+asyncpg://u:p%40ss@h/db"
    )


async def test_the_default_database_url_works(tmp_path: Path) -> None:
    engine = create_engine(database_url(None, tmp_path / "fresh" / "dir"))
    try:
        await migrate(engine)
        store = Store(sessionmaker(engine))
        await store.create_call(new_call(), at=at(0))
        assert (await store.get_call("c1")) is not None
    finally:
        await engine.dispose()
    assert (tmp_path / "fresh" / "dir" / "callbot.db").is_file()


async def test_engine_fixture_is_migrated(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
