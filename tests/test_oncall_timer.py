"""The timer's claims: due steps taken together, a slot held only until the ring is on its way,
the timer's steps going on by themselves, and the wait for an acknowledgement from the ring.

The real app (tests/conftest.py `start_bot`) on the loopback fakes, with the timer off
(ONCALL_TICK_SECONDS=0): each test runs the timer by hand (`run_due`).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.calls.service import CallOutcome, CallRequest
from bot.storage.oncall import Claimed
from tests.conftest import RunningBot, StartBot
from tests.test_oncall import ALICE, CAROL, INFRA_CHAT, WEB_TOKEN, Clock, alert, generic, post_in
from tests.test_oncall_ring import posted, ring_bot, settled, slow_post


async def two_due(bot: RunningBot) -> tuple[int, int]:
    """An incident of infra (rings alice) and one of web (rings carol), both due now."""
    infra = (await alert(bot, generic())).json()["incident"]
    web = (await alert(bot, generic(key="w"), team="web", token=WEB_TOKEN)).json()["incident"]
    return infra, web


async def test_due_steps_are_claimed_together_in_one_claim(
    start_bot: StartBot, tmp_path: Path, monkeypatch: Any
) -> None:
    bot = await ring_bot(start_bot, tmp_path, Clock())
    await two_due(bot)
    store = bot.app.oncall_store
    claims: list[int] = []
    claim = store.claim_due

    async def counted(*args: Any, **kwargs: Any) -> Claimed:
        claimed = await claim(*args, **kwargs)
        claims.append(len(claimed.incidents))
        return claimed

    monkeypatch.setattr(store, "claim_due", counted)
    assert await bot.app.oncall.run_due() == 2
    assert claims == [2, 0]  # both in one transaction, then a look that finds nothing more
    assert sorted(r.json["to"] for r in bot.pilot.calls_started()) == sorted([ALICE, CAROL])


async def test_a_step_frees_its_slot_once_its_ring_is_on_its_way(
    start_bot: StartBot, tmp_path: Path
) -> None:
    # One slot; alice's POST is answered only after 5 s. Carol's step is taken while alice's
    # POST still waits for its answer (before: only once alice's step had ended).
    bot = await ring_bot(start_bot, tmp_path, None)
    infra, web = await two_due(bot)
    slow_post(bot.pilot, "call_slow", delay=5)
    running = asyncio.create_task(bot.app.oncall.run_due(parallel=1))
    await posted(bot.pilot, ALICE)
    await posted(bot.pilot, CAROL)
    alice = await bot.app.oncall_store.incident(infra)
    assert alice is not None and alice.ring_call_id is not None  # her POST is unanswered yet
    assert await running == 2
    assert (await settled(bot, web)).step == 1


async def test_the_timer_returns_while_its_steps_ring_and_they_finish_by_themselves(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await ring_bot(start_bot, tmp_path, None)
    infra = (await alert(bot, generic())).json()["incident"]
    slow_post(bot.pilot, "call_slow", delay=5)
    # The timer's run takes the step and returns: it does not wait for the POST's answer, so
    # a step falling due meanwhile is taken by its next run, not after this ring.
    assert await bot.app.oncall.run_due(wait_for_steps=False) == 1
    await posted(bot.pilot, ALICE)
    incident = await bot.app.oncall_store.incident(infra)
    assert incident is not None and incident.ring_call_id is not None
    web = (await alert(bot, generic(key="w"), team="web", token=WEB_TOKEN)).json()["incident"]
    assert await bot.app.oncall.run_due(wait_for_steps=False) == 1
    await posted(bot.pilot, CAROL)
    assert (await settled(bot, infra)).step == 1  # the slow ring settled by itself
    assert (await settled(bot, web)).step == 1


async def test_the_wait_for_an_acknowledgement_runs_from_the_ring_not_from_the_claim(
    start_bot: StartBot, tmp_path: Path, monkeypatch: Any
) -> None:
    clock = Clock()
    bot = await ring_bot(start_bot, tmp_path, clock)
    infra = (await alert(bot, generic())).json()["incident"]
    place = bot.app.calls.start

    async def slow_start(request: CallRequest, **kwargs: Any) -> CallOutcome:
        outcome: CallOutcome = await place(request, **kwargs)
        clock.advance(40)  # the POST took 40 s to be answered
        return outcome

    monkeypatch.setattr(bot.app.calls, "start", slow_start)
    claimed_at = clock()
    assert await bot.app.oncall.run_due() == 1
    incident = await settled(bot, infra)
    # infra waits 300 s for an acknowledgement after ringing alice
    assert incident.next_action_at == claimed_at + timedelta(seconds=40 + 300)


async def test_a_refresh_waiting_for_its_turn_shows_later_changes_too(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await ring_bot(start_bot, tmp_path, Clock())
    infra = (await alert(bot, generic())).json()["incident"]
    oncall = bot.app.oncall
    before = len(oncall._post_tasks)
    oncall._publish_soon(infra)
    oncall._publish_soon(infra)  # the first has not claimed the post yet: it shows this too
    assert len(oncall._post_tasks) == before + 1
    await asyncio.gather(*oncall._post_tasks)
    oncall._publish_soon(infra)  # that one is done: a new change gets a refresh of its own
    assert len(oncall._post_tasks) == 1
    await asyncio.gather(*oncall._post_tasks)


async def test_the_ring_goes_out_before_the_teams_post(start_bot: StartBot, tmp_path: Path) -> None:
    # The timer runs, so intake rings at once. Pilot Status answers the POST after 0.5 s: the
    # post waits for the ring's step (under a burst, every ring goes out before the posts).
    bot = await ring_bot(start_bot, tmp_path, None, oncall_tick_seconds=1)
    slow_post(bot.pilot, "call_slow", delay=0.5)
    sending = asyncio.create_task(alert(bot, generic()))
    await posted(bot.pilot, ALICE)
    await asyncio.sleep(0.3)
    assert bot.telegram.bot_messages(INFRA_CHAT) == []  # the ring's answer is still due
    assert (await sending).status_code == 200
    await post_in(bot, INFRA_CHAT, "calling alice")


async def test_a_ring_stuck_on_a_slow_api_holds_the_post_back_a_second_at_most(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await ring_bot(start_bot, tmp_path, None, oncall_tick_seconds=1)
    slow_post(bot.pilot, "call_slow", delay=8)
    sending = asyncio.create_task(alert(bot, generic()))
    await posted(bot.pilot, ALICE)
    await post_in(bot, INFRA_CHAT, "calling alice")  # in 5 s, while the POST waits 8
    assert (await sending).status_code == 200  # the alert's sender does not wait for it either
    incident = await bot.app.oncall_store.incident((await sending).json()["incident"])
    assert incident is not None and incident.step == 0 and incident.ring_call_id is not None
