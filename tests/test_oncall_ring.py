"""A ring is placed once: slow Pilot calls, early end events, shutdown and kills mid-ring.

Each test drives the real app (tests/conftest.py `start_bot`) against the loopback fakes and
counts the `POST /v1/calls` the fake Pilot Status received for each number.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.calls.service import CallService
from bot.oncall.engine import OnCall
from bot.storage.oncall import Incident
from tests.conftest import RunningBot, StartBot
from tests.fakes.pilot_status import FakePilotStatus, RecordedRequest
from tests.speech import espeak  # noqa: F401 (a fixture)
from tests.test_oncall import (
    ALICE,
    BOB,
    HOOK,
    INFRA_CHAT,
    ONCALL_FILE,
    Clock,
    alert,
    generic,
    post_in,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


SILENT = "no-such-tts"  # rings that speak nothing: no media to lose in a restart


async def ring_bot(
    start_bot: StartBot, tmp_path: Path, clock: Clock | None, **overrides: Any
) -> RunningBot:
    """The on-call bot of tests/test_oncall.py; the timer only runs when a tick is given."""
    config = tmp_path / "oncall.toml"
    config.write_text(ONCALL_FILE)
    overrides.setdefault("oncall_tick_seconds", 0)
    overrides.setdefault("pilot_status_read_timeout", 10.0)  # slow answers are not timeouts
    overrides.setdefault("data_dir", str(tmp_path / "data"))
    bot = await start_bot(
        oncall_file=str(config),
        pilot_status_number_type="web",
        pilot_status_webhook_token=HOOK,
        web_port=0,
        **overrides,
    )
    if clock is not None:
        bot.app.oncall.clock = clock
    return bot


def posts_to(pilot: FakePilotStatus, phone: str) -> list[RecordedRequest]:
    return [r for r in pilot.calls_started() if r.json["to"] == phone]


async def posted(pilot: FakePilotStatus, phone: str) -> RecordedRequest:
    """The first POST /v1/calls to `phone`, once the fake got it (its answer may be pending)."""
    for _ in range(500):
        if posts_to(pilot, phone):
            return posts_to(pilot, phone)[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no POST /v1/calls to {phone}")


def slow_post(pilot: FakePilotStatus, call_id: str, delay: float) -> None:
    """The next POST /v1/calls is answered (201, `call_id`) only after `delay` seconds."""
    body = {"id": call_id, "externalCallId": "ext-" + call_id, "status": "INITIATED"}
    pilot.script("start_call", status=201, body=body, delay=delay, times=1)


def created_by_pilot(
    pilot: FakePilotStatus, call_id: str, post: RecordedRequest, status: str = "RINGING"
) -> dict[str, Any]:
    """The fake stores the call of a (slow, scripted) POST as the real API would have."""
    call = pilot.add_call(
        post.json["to"],
        direction="OUTBOUND",
        status=status,
        bizOpaqueCallbackData=post.json["bizOpaqueCallbackData"],
    )
    pilot.calls[call_id] = pilot.calls.pop(call["id"])
    call["id"] = call_id
    return call


async def incident_of(bot: RunningBot, response_incident: int) -> Incident:
    incident = await bot.app.oncall_store.incident(response_incident)
    assert incident is not None
    return incident


async def settled(bot: RunningBot, incident_id: int) -> Incident:
    """The incident once its first ring is recorded (step 1, nothing in flight)."""
    for _ in range(500):
        incident = await incident_of(bot, incident_id)
        if incident.step >= 1 and incident.ring_call_id is None:
            return incident
        await asyncio.sleep(0.02)
    raise AssertionError(f"the ring of incident {incident_id} was never recorded")


async def recovered(bot: RunningBot) -> None:
    await asyncio.wait_for(bot.app.oncall.calls_recovered.wait(), 10)


async def test_a_ring_slower_than_the_lease_is_placed_once_and_the_next_person_waits(
    start_bot: StartBot, tmp_path: Path
) -> None:
    # The timer runs on the real clock every 50 ms; the lease is 0.3 s, the POST takes 1.5 s.
    bot = await ring_bot(
        start_bot, tmp_path, None, oncall_tick_seconds=0.05, oncall_lease_seconds=0.3
    )
    slow_post(bot.pilot, "call_slow", delay=1.5)
    created = await alert(bot, generic())
    post = await posted(bot.pilot, ALICE)
    await asyncio.sleep(1.0)  # the lease ran out three times over while the POST is pending
    assert len(posts_to(bot.pilot, ALICE)) == 1 and posts_to(bot.pilot, BOB) == []
    created_by_pilot(bot.pilot, "call_slow", post)
    incident = await settled(bot, created.json()["incident"])  # answered and recorded
    await asyncio.sleep(0.5)  # the timer keeps ticking
    assert incident.step == 1 and incident.ring_call_id is None
    assert incident.call_id == post.json["bizOpaqueCallbackData"]
    assert not any("call_in_flight" in note or "failed" in note for note in incident.notes)
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [ALICE]
    await bot.app.live.wait_idle()
    [shown] = bot.telegram.bot_messages(INFRA_CHAT)
    assert "calling alice" in shown.plain
    assert "call_in_flight" not in shown.plain and "calling bob" not in shown.plain
    assert "next: bob at" in shown.plain  # the post tells what comes next


async def test_an_end_event_that_outruns_the_post_answer_rings_the_next_person_at_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await ring_bot(start_bot, tmp_path, clock)
    bot.pilot.webhooks_to(f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}")
    slow_post(bot.pilot, "call_early", delay=2.0)
    await alert(bot, generic())
    step = asyncio.create_task(bot.app.oncall.run_due())
    post = await posted(bot.pilot, ALICE)
    # Pilot placed the call and it failed at once; its webhook arrives before the 201 does.
    created_by_pilot(bot.pilot, "call_early", post)
    bot.pilot.emit_status("call_early", "FAILED")
    [delivery] = await bot.pilot.wait_deliveries()
    assert delivery.status == 200 and not step.done()
    assert await step == 1
    await post_in(bot, INFRA_CHAT, "not answered (failed)")
    # No wait_seconds (300 s) pass: bob's step is due now.
    assert await bot.app.oncall.run_due() == 1
    assert len(posts_to(bot.pilot, BOB)) == 1 and len(posts_to(bot.pilot, ALICE)) == 1
    await post_in(bot, INFRA_CHAT, "calling bob")


async def test_an_end_event_after_the_ring_was_recorded_still_moves_on_at_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await ring_bot(start_bot, tmp_path, clock)
    bot.pilot.webhooks_to(f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}")
    await alert(bot, generic())
    assert await bot.app.oncall.run_due() == 1
    [post] = posts_to(bot.pilot, ALICE)
    [call] = [c for c in bot.pilot.calls.values() if c["peerNumber"] == ALICE[1:]]
    bot.pilot.emit_status(call["id"], "MISSED")
    await bot.pilot.wait_deliveries()
    await post_in(bot, INFRA_CHAT, "not answered (missed)")
    assert await bot.app.oncall.run_due() == 1
    assert len(posts_to(bot.pilot, BOB)) == 1
    assert (
        post.json["bizOpaqueCallbackData"]
        != posts_to(bot.pilot, BOB)[0].json["bizOpaqueCallbackData"]
    )


async def test_a_shutdown_mid_ring_lets_the_post_finish_and_no_restart_rings_again(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    # Silent: a spoken ring is hung up after a restart (it lost its audio), which moves the
    # escalation on; that is the spoken test below. Here the ring itself must survive.
    first = await ring_bot(
        start_bot, tmp_path, clock, oncall_tick_seconds=0.05, speech_engine=SILENT
    )
    slow_post(first.pilot, "call_term", delay=1.0)
    created = await alert(first, generic())
    post = await posted(first.pilot, ALICE)
    created_by_pilot(first.pilot, "call_term", post)
    await first.stop()  # what SIGTERM does: polling stops, then close()
    post_seen = next(r for r in first.pilot.calls_started() if r is post)
    assert post_seen.status == 201  # the drain let the POST be answered

    second = await ring_bot(start_bot, tmp_path, clock, speech_engine=SILENT)
    await recovered(second)
    record = await second.app.store.get_call("call_term")
    assert record is not None and record.status == "RINGING"  # recorded before the exit
    incident = await incident_of(second, created.json()["incident"])
    assert incident.step == 1 and incident.call_id == record.id
    clock.advance(120)  # well past any lease, not yet wait_seconds
    assert await second.app.oncall.run_due() == 0
    assert [r.json["to"] for r in second.pilot.calls_started()] == [ALICE]


async def test_a_drain_cut_off_after_the_post_was_sent_is_reconciled_and_nobody_rung_twice(
    start_bot: StartBot, tmp_path: Path, clock: Clock, db_url: str
) -> None:
    # Pilot takes 30 s to answer; the shutdown waits 0.2 s, then cuts the step off mid-POST
    # (its state is the one kill -9 leaves: the ring written ahead, the call PENDING).
    first = await ring_bot(
        start_bot,
        tmp_path,
        clock,
        oncall_tick_seconds=0.05,
        shutdown_grace_seconds=0.2,
        database_url=db_url,
        speech_engine=SILENT,
    )
    slow_post(first.pilot, "call_kill", delay=30)
    created = await alert(first, generic())
    post = await posted(first.pilot, ALICE)
    created_by_pilot(first.pilot, "call_kill", post)  # the API did place the call
    await asyncio.wait_for(first.stop(), 5)  # bounded: not the 30 s of the POST
    assert post.status is None

    second = await ring_bot(start_bot, tmp_path, clock, database_url=db_url, speech_engine=SILENT)
    await recovered(second)  # the call is looked up by its bizOpaqueCallbackData
    clock.advance(60)  # the dead worker's lease ran out
    assert await second.app.oncall.run_due() == 1
    assert posts_to(second.pilot, ALICE) == [post] and posts_to(second.pilot, BOB) == []
    await post_in(second, INFRA_CHAT, "call to alice was placed before a restart")
    incident = await incident_of(second, created.json()["incident"])
    assert incident.step == 1 and incident.ring_call_id is None
    # The escalation goes on from there: the ring's end moves it to bob, once.
    second.pilot.webhooks_to(f"http://127.0.0.1:{second.app.web_port}/pilot-status/{HOOK}")
    second.pilot.emit_status("call_kill", "MISSED")
    await second.pilot.wait_deliveries()
    await post_in(second, INFRA_CHAT, "not answered (missed)")
    # The edit is seen before its post is marked made; the timer passes over a row locked
    # meanwhile (SKIP LOCKED, on PostgreSQL), so the post is let settle first.
    for _ in range(250):
        if (await incident_of(second, incident.id)).post_status == "posted":
            break
        await asyncio.sleep(0.02)
    assert await second.app.oncall.run_due() == 1
    assert [r.json["to"] for r in second.pilot.calls_started()] == [ALICE, BOB]


@pytest.mark.usefixtures("espeak")
async def test_a_spoken_ring_cut_off_by_a_restart_is_hung_up_and_the_next_person_rung_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    """The ring says the alert; after a restart its audio is gone, so it is hung up (item 14),
    and that end moves the escalation on: alice rung once, bob once."""
    first = await ring_bot(
        start_bot, tmp_path, clock, oncall_tick_seconds=0.05, shutdown_grace_seconds=0.2
    )
    slow_post(first.pilot, "call_spoken", delay=30)
    await alert(first, generic())
    post = await posted(first.pilot, ALICE)
    created_by_pilot(first.pilot, "call_spoken", post)
    await asyncio.wait_for(first.stop(), 5)  # cut off mid-POST, like a kill

    second = await ring_bot(start_bot, tmp_path, clock)
    await recovered(second)
    await second.telegram.wait_for_message(
        lambda m: "lost its audio" in m.plain, chat_id=INFRA_CHAT
    )
    await post_in(second, INFRA_CHAT, "not answered (failed)")
    assert await second.app.oncall.run_due() == 1
    assert [r.json["to"] for r in second.pilot.calls_started()] == [ALICE, BOB]


async def test_a_ring_the_api_never_got_is_rung_after_the_restart_and_counted_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    first = await ring_bot(start_bot, tmp_path, clock)
    slow_post(first.pilot, "call_lost", delay=30)
    await alert(first, generic())
    step = asyncio.create_task(first.app.oncall.run_due())
    await posted(first.pilot, ALICE)  # ... and the API never created it
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)
    await first.crash()

    second = await ring_bot(start_bot, tmp_path, clock)
    await recovered(second)  # not in the API's list: not started
    clock.advance(61)  # lease over; the unplaced ring does not hold the throttle (1/60)
    assert await second.app.oncall.run_due() == 1
    assert len(posts_to(second.pilot, ALICE)) == 2 and posts_to(second.pilot, BOB) == []
    rings = await second.app.oncall_store.rings_since(ALICE, clock.now - timedelta(hours=1))
    assert len(rings) == 1  # the ring that was placed; the lost one no longer counts


async def test_a_ring_of_unknown_outcome_is_not_rung_again_and_counts_for_the_throttle(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await ring_bot(start_bot, tmp_path, clock, pilot_status_read_timeout=0.3)
    bot.pilot.script("start_call", status=201, body={"id": "x", "status": "INITIATED"}, delay=2)
    created = await alert(bot, generic())
    assert await bot.app.oncall.run_due() == 1
    await post_in(bot, INFRA_CHAT, "call to alice: outcome unknown (api_timeout_maybe_sent)")
    rings = await bot.app.oncall_store.rings_since(ALICE, clock.now - timedelta(hours=1))
    assert len(rings) == 1
    incident = await incident_of(bot, created.json()["incident"])
    assert incident.step == 1 and incident.ring_call_id is None
    assert await bot.app.oncall.run_due() == 1  # the next step is due at once: bob
    assert len(posts_to(bot.pilot, ALICE)) == 1 and len(posts_to(bot.pilot, BOB)) == 1


async def test_a_stale_worker_cannot_commit_over_the_attempt_that_replaced_it(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await ring_bot(start_bot, tmp_path, clock)
    app = bot.app
    # A second worker on the same database (another process), whose clock says the first
    # one's lease ran out long ago: it takes the step over while the first is still in its POST.
    later = Clock()
    later.advance(3600)
    other_calls = CallService(app.pilot, app.number_types, app.store, app.tracker)
    other = OnCall(app.oncall_store, other_calls, app.live, clock=later)
    other.calls_recovered.set()
    slow_post(bot.pilot, "call_stale", delay=2.0)
    created = await alert(bot, generic())
    stale = asyncio.create_task(app.oncall.run_due())
    await posted(bot.pilot, ALICE)
    assert await other.run_due() == 1  # alice's ring: maybe placed, never placed again
    assert await other.run_due() == 1  # so the next step goes on: bob
    assert await stale == 1  # the first worker's POST answers now; its result is refused
    incident = await incident_of(bot, created.json()["incident"])
    [bob] = posts_to(bot.pilot, BOB)
    assert incident.step == 2 and incident.call_id == bob.json["bizOpaqueCallbackData"]
    assert len(posts_to(bot.pilot, ALICE)) == 1
    assert await other.run_due() == 0 and await app.oncall.run_due() == 0
