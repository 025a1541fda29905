"""Calls whose end the bot will never learn, and calls whose voice died with the process.

Over the loopback fakes: Pilot Status forgetting a call (404 CALL_NOT_FOUND), calls left live
across restarts, web-number calls the bot was speaking on when it was killed.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

import bot.app
from bot import states
from bot.storage.db import sessionmaker
from bot.storage.store import NewCall, Store, utcnow
from bot.storage.tables import CallRow
from tests.conftest import OPERATOR, RunningBot, StartBot
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram, SentMessage
from tests.speech import espeak
from tests.test_lifecycle import PHONE, SECRET, TOKEN, command, shown, start_call
from tests.test_voice import MESSAGE, OTHER, hung_up, pilot_id_of, terminated, web_bot

__all__ = ["espeak"]
LOST_TEXT = "Pilot Status no longer knows this call"
UNFOLLOWED_TEXT = "not seen ending in time"


def gets(bot: RunningBot, pilot_id: str) -> int:
    """GET /v1/calls/{id} the fake received for this call."""
    return sum(
        1 for r in bot.pilot.requests if r.operation == "get_call" and r.path.endswith(pilot_id)
    )


async def attached(bot: RunningBot, pilot_id: str, reply: SentMessage) -> None:
    """The reply is stored as the call's message (so a restart edits it)."""
    for _ in range(250):
        record = await bot.app.store.get_call(pilot_id)
        if record is not None and record.message_id == reply.message_id:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the reply was never attached to the call")


async def age(engine: AsyncEngine, pilot_id: str, by: timedelta) -> None:
    """Make a stored call older, as if it had been started `by` ago."""
    async with engine.begin() as connection:
        await connection.execute(
            update(CallRow)
            .where(CallRow.pilot_call_id == pilot_id)
            .values(created_at=utcnow() - by, updated_at=utcnow() - by)
        )


async def webhook_bot(start_bot: StartBot, data_dir: Path, **overrides: Any) -> RunningBot:
    return await start_bot(
        pilot_status_webhook_token=TOKEN,
        pilot_status_webhook_secret=SECRET,
        pilot_status_number_type="web",
        data_dir=str(data_dir),
        **overrides,
    )


async def orphan_of_a_dead_replica(
    store: Store, shared_state: dict[str, str], *, lease_ms: int
) -> None:
    """An attempt "cb_orphan" written by a replica that died holding its number's guard, whose
    lease runs out after `lease_ms`."""
    new = NewCall("cb_orphan", OPERATOR, "Op", OPERATOR, "web", PHONE, PHONE, False, "en")
    await store.create_call(new)
    redis = Redis.from_url(shared_state["redis_url"])
    key = f"{shared_state['redis_key_prefix']}lock:call:{PHONE}"
    assert await redis.set(key, "dead-replica", px=lease_ms)
    await redis.aclose()


async def assert_settled_once_as_interrupted(telegram: FakeTelegram, store: Store) -> None:
    told = await telegram.wait_for_message(
        lambda m: "no call was placed" in m.plain, chat_id=OPERATOR, timeout=30
    )
    assert told.plain.count("no call was placed") == 1
    record = await store.get_call("cb_orphan")
    assert record is not None and (record.status, record.error_code) == (
        states.NOT_STARTED,
        "interrupted",
    )


async def assert_lost(store: Store, pilot_id: str, reason: str) -> None:
    record = await store.get_call(pilot_id)
    assert record is not None
    assert (record.status, record.error_code) == (states.LOST, reason)


async def test_a_call_pilot_no_longer_knows_is_shown_lost_and_no_longer_polled(
    start_bot: StartBot,
) -> None:
    bot = await start_bot(pilot_status_number_type="web")  # no webhooks: the call is polled
    reply, pilot_id = await start_call(bot)
    await attached(bot, pilot_id, reply)
    del bot.pilot.calls[pilot_id]  # Pilot Status forgot it: 404 CALL_NOT_FOUND from now on
    final = await shown(bot, reply, ": lost")
    assert LOST_TEXT in final.plain and final.buttons() == []  # no Hang up on a lost call
    assert "Ended at" not in final.plain  # its end is not known
    await assert_lost(bot.app.store, pilot_id, "call_lost")
    polled = gets(bot, pilot_id)
    await asyncio.sleep(0.6)  # a dozen poll intervals
    assert gets(bot, pilot_id) == polled


async def test_one_call_not_found_is_asked_again_before_the_call_is_given_up(
    start_bot: StartBot,
) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    reply, pilot_id = await start_call(bot)
    await attached(bot, pilot_id, reply)
    bot.pilot.error("get_call", "CALL_NOT_FOUND", status=404, times=1)
    polled = gets(bot, pilot_id)
    for _ in range(100):  # the 404, then the confirming GET that finds the call
        if gets(bot, pilot_id) >= polled + 3:
            break
        await asyncio.sleep(0.02)
    bot.pilot.emit_status(pilot_id, "COMPLETED")
    final = await shown(bot, reply, ": ended")
    assert LOST_TEXT not in final.plain


async def test_after_a_restart_a_forgotten_call_is_settled_lost_once_and_never_asked_again(
    start_bot: StartBot, tmp_path: Path
) -> None:
    first = await webhook_bot(start_bot, tmp_path)
    reply, pilot_id = await start_call(first)
    await attached(first, pilot_id, reply)
    await first.crash()
    del first.pilot.calls[pilot_id]
    before = gets(first, pilot_id)
    second = await webhook_bot(start_bot, tmp_path)
    final = await shown(second, reply, ": lost")
    assert LOST_TEXT in final.plain and final.buttons() == []
    assert gets(second, pilot_id) - before == 2  # the 404 and the one that confirms it
    await assert_lost(second.app.store, pilot_id, "call_lost")
    await second.stop()
    third = await webhook_bot(start_bot, tmp_path)
    await asyncio.sleep(0.5)  # its recovery has run
    assert gets(third, pilot_id) - before == 2


async def test_calls_older_than_the_poll_timeout_are_asked_once_at_start_then_settled(
    start_bot: StartBot, tmp_path: Path
) -> None:
    first = await start_bot(pilot_status_number_type="web", data_dir=str(tmp_path))
    still_on, still_id = await start_call(first)  # Pilot says it is still ringing
    forgotten, forgotten_id = await start_call(first, OTHER)  # Pilot has no record of it
    for reply, pilot_id in ((still_on, still_id), (forgotten, forgotten_id)):
        await attached(first, pilot_id, reply)
        await age(first.app.engine, pilot_id, timedelta(days=1))
    await first.crash()
    del first.pilot.calls[forgotten_id]
    before = {p: gets(first, p) for p in (still_id, forgotten_id)}
    second = await start_bot(pilot_status_number_type="web", data_dir=str(tmp_path))
    final = await shown(second, still_on, ": lost")
    assert UNFOLLOWED_TEXT in final.plain and final.buttons() == []
    final = await shown(second, forgotten, ": lost")
    assert LOST_TEXT in final.plain and final.buttons() == []
    await asyncio.sleep(0.6)  # a dozen poll intervals: no polling follows
    assert {p: gets(second, p) - before[p] for p in before} == {still_id: 1, forgotten_id: 1}
    await assert_lost(second.app.store, still_id, "call_unfollowed")
    await assert_lost(second.app.store, forgotten_id, "call_lost")


async def test_a_call_polled_past_the_poll_timeout_is_settled_not_left_live(
    start_bot: StartBot,
) -> None:
    bot = await start_bot(pilot_status_number_type="web", call_poll_timeout=0.5)
    reply, _ = await start_call(bot)
    final = await shown(bot, reply, ": lost")
    assert UNFOLLOWED_TEXT in final.plain and final.buttons() == []


# Web-number calls the bot was speaking on (item 14)


async def test_a_web_call_being_spoken_on_is_hung_up_after_a_restart(
    start_bot: StartBot, tmp_path: Path, espeak: str
) -> None:
    first = await web_bot(start_bot, data_dir=str(tmp_path))  # realtime: no PUBLIC_BASE_URL
    spoken = await command(first, f"/call {PHONE} say: {MESSAGE}")
    spoken_id = pilot_id_of(first, PHONE)
    plain = await command(first, f"/call {OTHER} just a note")
    plain_id = pilot_id_of(first, OTHER)
    await attached(first, spoken_id, spoken)
    await attached(first, plain_id, plain)
    await first.crash()  # ringing: the bot was waiting to speak on it
    assert not terminated(first, spoken_id)
    second = await web_bot(start_bot, data_dir=str(tmp_path))
    final = await shown(second, spoken, "restarted during this call")
    assert ": failed" in final.plain and final.buttons() == []
    assert await hung_up(second, spoken_id)
    assert not terminated(second, plain_id)  # nobody spoke on it: it goes on
    record = await second.app.store.get_call(plain_id)
    assert record is not None and record.status == "INITIATED"


# The reply's message id and a webhook stored at the same moment (PostgreSQL)


async def test_attaching_the_message_sees_a_status_stored_meanwhile(
    engine: AsyncEngine, store: Store
) -> None:
    """A webhook's transaction and `set_message` overlap: the webhook read no message id, so
    `set_message` must return the webhook's status for its caller to show it (else the message
    stays "started" for good; seen flaky on PostgreSQL)."""
    new = NewCall("cb_race", OPERATOR, "Op", OPERATOR, "web", PHONE, PHONE, False, "en")
    await store.create_call(new)
    await store.call_started(
        "cb_race", pilot_call_id="p1", external_call_id=None, status="INITIATED"
    )
    async with sessionmaker(engine).begin() as session:
        query = select(CallRow).where(CallRow.id == "cb_race").with_for_update()
        row = (await session.execute(query)).scalar_one()
        row.status = "ACCEPTED"  # the webhook, stored but not committed yet
        await session.flush()
        attaching = asyncio.create_task(store.set_message("cb_race", 42))
        await asyncio.sleep(0.3)
    current = await attaching
    assert current is not None and (current.status, current.message_id) == ("ACCEPTED", 42)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_replica_starting_leaves_alone_the_call_another_is_starting(
    start_bot: StartBot,
    telegram: FakeTelegram,
    pilot: FakePilotStatus,
    db_url: str,
    shared_state: dict[str, str],
    tmp_path: Path,
) -> None:
    """At start, recovery settles attempts a crash left half done; one whose number's guard a
    live replica holds (its POST on the way) is that replica's to finish, not "not placed"."""
    shared = {"database_url": db_url, "pilot_status_read_timeout": 10.0, **shared_state}
    first = await webhook_bot(start_bot, tmp_path / "a", webhook=True, **shared)
    pilot.script("start_call", status=201, body={"id": "call_slow", "status": "INITIATED"}, delay=2)
    mark = telegram.mark()
    telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    for _ in range(250):  # written ahead, its POST on the way
        if await first.app.store.calls_in(states.PENDING) and pilot.calls_started():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the call was never started")

    second = await webhook_bot(start_bot, tmp_path / "b", webhook=True, **shared)
    await asyncio.wait_for(second.app.oncall.calls_recovered.wait(), 10)
    reply = await telegram.wait_for_message(
        lambda m: "call_slow" in m.plain, chat_id=OPERATOR, after=mark, timeout=10
    )
    assert reply.reply_to_message_id is not None
    [record] = await first.app.store.calls_in("INITIATED")
    assert record.pilot_call_id == "call_slow"
    assert await first.app.store.calls_in(states.NOT_STARTED) == []
    told = [m.plain for m in telegram.sent + telegram.edits if m.chat_id == OPERATOR]
    assert not any("no call was placed" in text.lower() for text in told), told
    assert len(pilot.calls_started()) == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_attempt_whose_holder_died_is_settled_once_its_guard_lease_runs_out(
    start_bot: StartBot,
    telegram: FakeTelegram,
    db_url: str,
    shared_state: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bot.app, "ATTEMPT_RECHECK_SECONDS", 0.5)  # within the lease: held, freed
    shared = {"database_url": db_url, **shared_state}
    first = await webhook_bot(start_bot, tmp_path / "a", webhook=True, **shared)
    # the replica that wrote it died holding the number's guard: a lease that just runs out
    await orphan_of_a_dead_replica(first.app.store, shared_state, lease_ms=1500)

    second = await webhook_bot(start_bot, tmp_path / "b", webhook=True, **shared)
    await asyncio.wait_for(second.app.oncall.calls_recovered.wait(), 10)
    [left] = await second.app.store.calls_in(states.PENDING)  # held: not settled at once
    assert left.id == "cb_orphan"
    await assert_settled_once_as_interrupted(telegram, second.app.store)


async def test_an_attempt_left_by_a_replica_that_died_after_the_others_started_is_swept(
    start_bot: StartBot,
    telegram: FakeTelegram,
    db_url: str,
    shared_state: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No replica restarts, so no `recover` runs: the live one's sweep settles the attempt."""
    monkeypatch.setattr(bot.app, "ATTEMPT_SWEEP_SECONDS", 0.2)
    monkeypatch.setattr(bot.app, "ATTEMPT_SWEEP_AGE", timedelta(seconds=1))
    shared = {"database_url": db_url, **shared_state}
    live = await webhook_bot(start_bot, tmp_path / "a", webhook=True, **shared)
    await asyncio.wait_for(live.app.oncall.calls_recovered.wait(), 10)
    # after it started, another replica wrote an attempt, took the number's guard and died
    await orphan_of_a_dead_replica(live.app.store, shared_state, lease_ms=2000)

    await assert_settled_once_as_interrupted(telegram, live.app.store)
    assert live.pilot.calls_started() == []  # settled, never dialled
