"""The escalation engine on N replicas sharing one PostgreSQL database.

Each replica is a real `CallbotApp` (tests/conftest.py `start_bot`) with the same DATABASE_URL,
against the same fake Telegram and fake Pilot Status; what counts is what the fake Pilot Status
received: one `POST /v1/calls` per step of every incident, no more, no fewer.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from bot.calls.service import CallOutcome, CallRequest
from tests.conftest import RunningBot, StartBot
from tests.test_oncall import ALICE, BOB, CAROL, HOOK, INFRA_TOKEN, ONCALL_FILE, Clock, generic

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

SILENT = "no-such-tts"  # rings that speak nothing: no audio to lose when a replica stops
OPS_TOKEN = "ops-" + "z" * 30
# Three steps (alice, bob, carol), a second apart; nobody answers (the fake's calls ring on),
# so every step runs and the escalation ends exhausted.
OPS_FILE = f"""
[contacts]
alice = "{ALICE}"
bob = "{BOB}"
carol = "{CAROL}"

[teams.ops]
chat_id = -100700
token = "{OPS_TOKEN}"
members = ["alice", "bob", "carol"]
attempts_per_person = 1
wait_seconds = 1
max_rounds = 1
"""
INCIDENTS = 50


async def replica(
    start_bot: StartBot, tmp_path: Path, db_url: str, config: str, **overrides: Any
) -> RunningBot:
    path = tmp_path / "oncall.toml"
    path.write_text(config)
    return await start_bot(
        database_url=db_url,
        oncall_file=str(path),
        pilot_status_number_type="web",
        pilot_status_webhook_token=HOOK,  # calls are not polled: they ring on, unanswered
        speech_engine=SILENT,
        **overrides,
    )


async def raise_alert(bot: RunningBot, team: str, token: str, body: dict[str, Any]) -> int:
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/{team}"
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(url, content=json.dumps(body).encode(), headers=headers)
    assert response.status_code in (200, 201), response.text
    incident: int = response.json()["incident"]
    return incident


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 120) -> None:
    """Wait for `check` to hold (it reads the shared database or what the fake received)."""
    for _ in range(int(seconds * 20)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


async def test_fifty_incidents_on_three_replicas_and_a_restart_ring_every_step_exactly_once(
    start_bot: StartBot, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def start() -> RunningBot:
        bot = await replica(
            start_bot,
            tmp_path,
            db_url,
            OPS_FILE,
            oncall_throttle="",  # 50 incidents ring the same three people: no throttles here
            oncall_tick_seconds=0.05,
            oncall_lease_seconds=2,
            shutdown_grace_seconds=10,
        )
        # Four steps at a time per replica, not 16: the replicas of this test (and the other
        # tests running meanwhile) share one PostgreSQL server's connection limit.
        oncall = bot.app.oncall
        monkeypatch.setattr(oncall, "run_due", functools.partial(oncall.run_due, parallel=4))
        return bot

    bots = [await start() for _ in range(3)]
    pilot = bots[0].pilot
    titles = [f"disk full on db-{n}" for n in range(INCIDENTS)]
    bodies = [generic(title=title, key=f"disk-{n}") for n, title in enumerate(titles)]
    # Intake spread over the three replicas' web ports, a few at a time (connections again).
    gate = asyncio.Semaphore(6)

    async def intake(n: int, body: dict[str, Any]) -> int:
        async with gate:
            return await raise_alert(bots[n % 3], "ops", OPS_TOKEN, body)

    incidents = await asyncio.gather(*(intake(n, body) for n, body in enumerate(bodies)))
    assert len(set(incidents)) == INCIDENTS

    # Mid-escalation, one replica stops (SIGTERM's path: no new step, the ones running finish)
    # and a new one starts on the same database.
    async def rung_a_third() -> bool:
        return len(pilot.calls_started()) >= INCIDENTS

    await until(rung_a_third, "the first steps rang", 60)
    await bots[0].stop()
    bots[0] = await start()

    store = bots[1].app.oncall_store

    async def all_exhausted() -> bool:
        states = [await store.incident(i) for i in incidents]
        return all(s is not None and s.status == "exhausted" for s in states)

    await until(all_exhausted, "every escalation ran to its end")
    rung: Counter[tuple[str, str]] = Counter()
    for post in pilot.calls_started():
        assert post.status == 201
        record = await bots[1].app.store.get_call(post.json["bizOpaqueCallbackData"])
        assert record is not None and record.note is not None
        rung[(record.note, post.json["to"])] += 1
    expected = {(title, phone) for title in titles for phone in (ALICE, BOB, CAROL)}
    assert set(rung) == expected  # none missing
    assert [key for key, times in rung.items() if times != 1] == []  # none twice
    assert len(pilot.calls_started()) == 3 * INCIDENTS


async def test_two_replicas_ringing_one_person_for_two_incidents_at_once_hold_the_throttle(
    start_bot: StartBot, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    bots = [
        await replica(start_bot, tmp_path, db_url, ONCALL_FILE, oncall_tick_seconds=0)
        for _ in range(2)
    ]
    for bot in bots:
        bot.app.oncall.clock = clock
    first = await raise_alert(bots[0], "infra", INFRA_TOKEN, generic(key="disk-1"))
    second = await raise_alert(bots[1], "infra", INFRA_TOKEN, generic(title="db down", key="db"))
    # Each replica's step has looked at alice's recent rings (none) and is about to call her;
    # they go on together, so both would ring if the throttle were only looked at up front.
    both = asyncio.Barrier(2)
    for bot in bots:
        place = bot.app.calls.start

        async def start(request: CallRequest, *, _place: Any = place, **kwargs: Any) -> CallOutcome:
            async with asyncio.timeout(10):
                await both.wait()
            outcome: CallOutcome = await _place(request, **kwargs)
            return outcome

        monkeypatch.setattr(bot.app.calls, "start", start)
    # One step each: a replica claims the next only once its step is done.
    taken = await asyncio.gather(*(bot.app.oncall.run_due(parallel=1) for bot in bots))
    assert taken == [1, 1]
    monkeypatch.undo()
    to_alice = [r for r in bots[0].pilot.calls_started() if r.json["to"] == ALICE]
    assert len(to_alice) == 1  # the throttle (1 call a minute) held
    states = [await bots[0].app.oncall_store.incident(i) for i in (first, second)]
    held = [s for s in states if s is not None and s.step == 0]
    assert len(held) == 1 and "throttle held the call to alice until 12:01" in held[0].notes[-1]
    # A minute later the held incident rings her: held back, not lost.
    clock.advance(61)
    assert await bots[1].app.oncall.run_due() == 1
    assert len([r for r in bots[0].pilot.calls_started() if r.json["to"] == ALICE]) == 2


async def test_a_replica_passes_over_an_incident_another_one_holds_locked(
    start_bot: StartBot, tmp_path: Path, db_url: str
) -> None:
    clock = Clock()
    bot = await replica(start_bot, tmp_path, db_url, ONCALL_FILE, oncall_tick_seconds=0)
    bot.app.oncall.clock = clock
    locked = await raise_alert(bot, "infra", INFRA_TOKEN, generic(key="disk-1"))
    free = await raise_alert(bot, "web", "web-" + "y" * 30, generic(title="web down", key="w"))
    # Another replica is in a transaction on the first incident (e.g. committing its step).
    dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    other = await asyncpg.connect(dsn)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT id FROM incidents WHERE id = $1 FOR UPDATE", locked)
        # The tick does not queue behind that lock: it takes the other due step and returns.
        async with asyncio.timeout(10):
            assert await bot.app.oncall.run_due() == 1
        [carol] = bot.pilot.calls_started()
        assert carol.json["to"] == CAROL
        await transaction.rollback()
    finally:
        await other.close()
    assert await bot.app.oncall.run_due() == 1  # free again: its step is taken now
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [CAROL, ALICE]
    incident = await bot.app.oncall_store.incident(free)
    assert incident is not None and incident.step == 1
