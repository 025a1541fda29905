"""Schedules and overrides: hand-offs at a local time across a DST change, `/oncall take` and
`/oncall set … until`, their expiry, all over the loopback fakes with a controllable clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.oncall.schedules import Schedule, parse_rotation
from tests.conftest import ADMIN, OPERATOR, RunningBot, StartBot
from tests.test_oncall import ALICE, BOB, CAROL, INFRA_CHAT, INFRA_TOKEN, Clock, generic
from tests.test_oncall import alert as send_alert

# Europe/Berlin leaves summer time on Sunday 2026-10-25 at 03:00 (01:00 UTC): a 09:00 hand-off
# is 07:00 UTC before that day and 08:00 UTC from it on.
SCHEDULED = f"""
[contacts]
alice = "{ALICE}"
bob = {{ phone = "{BOB}", telegram = {OPERATOR} }}
carol = "{CAROL}"

[teams.infra]
chat_id = {INFRA_CHAT}
token = "{INFRA_TOKEN}"
members = ["alice", "bob", "carol"]
rotation = "daily 09:00 Europe/Berlin"
rotation_start = 2026-10-23T12:00:00Z
attempts_per_person = 1
wait_seconds = 300
max_rounds = 1
"""


@pytest.fixture
def clock() -> Clock:
    return Clock()


def utc(day: int, hour: int, minute: int = 0, month: int = 10) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


async def scheduled_bot(start_bot: StartBot, tmp_path: Path, clock: Clock) -> RunningBot:
    config = tmp_path / "oncall.toml"
    config.write_text(SCHEDULED)
    bot = await start_bot(
        oncall_file=str(config),
        oncall_tick_seconds=0,
        pilot_status_number_type="web",
        data_dir=str(tmp_path / "data"),
        web_port=0,
    )
    bot.app.oncall.clock = clock
    return bot


async def say(bot: RunningBot, text: str, user: int = ADMIN, chat: int = INFRA_CHAT) -> str:
    mark = bot.telegram.mark()
    bot.telegram.send_command(text, user_id=user, chat_id=chat, chat_type="supergroup")
    reply = await bot.telegram.wait_for_message(
        lambda m: not m.method.startswith("edit"), chat_id=chat, after=mark
    )
    return reply.plain


async def rung_for(bot: RunningBot, key: str) -> str:
    """Fire an alert now and return whom its first step rang."""
    before = len(bot.pilot.calls_started())
    response = await send_alert(bot, generic(title=f"alert {key}", key=key))
    assert response.status_code == 200
    await bot.app.oncall.run_due()
    started = bot.pilot.calls_started()
    assert len(started) == before + 1
    to: str = started[-1].json["to"]
    await send_alert(bot, generic(title=f"alert {key}", key=key, status="resolved"))
    return to


def test_a_daily_hand_off_keeps_its_local_time_across_a_dst_change() -> None:
    layer = parse_rotation("daily 09:00 Europe/Berlin", ["alice", "bob"], utc(23, 12))
    schedule = Schedule((layer,))
    summer = schedule.now(utc(24, 6, 59))  # 08:59 CEST
    assert (summer.who, summer.until, summer.next) == ("alice", utc(24, 7), "bob")
    winter = schedule.now(utc(25, 7, 30))  # 08:30 CET: bob's shift runs to 09:00 CET
    assert (winter.who, winter.until, winter.next) == ("bob", utc(25, 8), "alice")


@pytest.mark.parametrize(
    ("rotation", "reason"),
    [
        ("daily 25:00 Europe/Berlin", "not a time of day"),
        ("daily 09:00 Mars/Olympus", "not a time zone"),
        ("weekly 09:00 UTC", "names its hand-off day"),
        ("fortnightly", "not a rotation"),
    ],
)
def test_a_wrong_rotation_says_what_is_wrong(rotation: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_rotation(rotation, ["alice"], utc(23, 12))


async def test_the_shift_hands_off_at_nine_local_time_across_the_dst_change(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await scheduled_bot(start_bot, tmp_path, clock)
    clock.now = utc(24, 7, 30)  # Saturday 09:30 CEST: bob's shift (alice had Friday's)
    shown = await say(bot, "/oncall", user=OPERATOR)
    assert "On call for infra: bob" in shown
    assert "until 2026-10-25 09:00 Europe/Berlin; next: carol" in shown
    assert await rung_for(bot, "sat") == BOB

    # Sunday 07:30 UTC is 08:30 CET (summer time ended at 01:00 UTC): still bob's shift
    clock.now = utc(25, 7, 30)
    assert "On call for infra: bob" in await say(bot, "/oncall", user=OPERATOR)
    assert await rung_for(bot, "sun-early") == BOB

    clock.now = utc(25, 8, 0)  # 09:00 CET: carol
    shown = await say(bot, "/oncall", user=OPERATOR)
    assert "On call for infra: carol" in shown
    assert "until 2026-10-26 09:00 Europe/Berlin; next: alice" in shown
    assert await rung_for(bot, "sun-late") == CAROL


async def test_take_covers_for_four_hours_then_the_schedule_is_back(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await scheduled_bot(start_bot, tmp_path, clock)
    clock.now = utc(26, 10, 0)  # Monday 11:00 CET: alice's shift
    assert "On call for infra: alice" in await say(bot, "/oncall", user=OPERATOR)

    taken = await say(bot, "/oncall take", user=OPERATOR)  # OPERATOR is bob
    assert "Override saved." in taken
    assert "On call for infra: bob" in taken
    assert "covering (override by" in taken
    assert "until 2026-10-26 15:00 Europe/Berlin; next: alice" in taken
    assert "bob from 2026-10-26 11:00 Europe/Berlin to 2026-10-26 15:00 Europe/Berlin" in taken
    assert await rung_for(bot, "covered") == BOB
    audit = await bot.app.store.audit_since(clock.now - timedelta(minutes=1))
    [entry] = [a for a in audit if a.action == "oncall_override"]
    assert entry.subject == "infra" and entry.actor_id == OPERATOR
    assert entry.detail == {
        "alias": "bob",
        "start": "2026-10-26T10:00:00+00:00",
        "end": "2026-10-26T14:00:00+00:00",
    }

    clock.advance(4 * 3600)  # the override has run out
    shown = await say(bot, "/oncall", user=OPERATOR)
    assert "On call for infra: alice" in shown and "Overrides" not in shown
    assert await rung_for(bot, "after") == ALICE


async def test_an_admin_sets_who_covers_until_a_time_and_it_survives_a_restart(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await scheduled_bot(start_bot, tmp_path, clock)
    clock.now = utc(26, 10, 0)  # 11:00 CET, alice's shift
    assert "Only admins" in await say(bot, "/oncall set carol until 18:00", user=OPERATOR)
    assert "Until when?" in await say(bot, "/oncall set carol until yesterday")
    assert "not on team" in await say(bot, "/oncall set dave until 18:00")
    shown = await say(bot, "/oncall set carol until 18:00")
    assert "On call for infra: carol" in shown
    assert "until 2026-10-26 18:00 Europe/Berlin; next: alice" in shown
    await bot.stop()

    again = await start_bot(
        oncall_file=str(tmp_path / "oncall.toml"),
        oncall_tick_seconds=0,
        pilot_status_number_type="web",
        data_dir=str(tmp_path / "data"),
        web_port=0,
    )
    again.app.oncall.clock = clock
    assert "On call for infra: carol" in await say(again, "/oncall", user=OPERATOR)
    assert await rung_for(again, "evening") == CAROL
    clock.now = utc(26, 17, 0)  # 18:00 CET: the override is over
    assert "On call for infra: alice" in await say(again, "/oncall", user=OPERATOR)


async def test_take_needs_to_know_who_you_are_and_rotations_are_checked(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await scheduled_bot(start_bot, tmp_path, clock)
    assert "which contact you are" in await say(bot, "/oncall take 2h")  # ADMIN is no contact
    assert "Done" in await say(bot, f"/contact link alice {ADMIN}")
    clock.now = utc(25, 10, 0)  # 11:00 CET, carol's shift
    assert "until 2026-10-25 13:00 Europe/Berlin; next: carol" in await say(bot, "/oncall take 2h")
    assert "That is not a rotation" in await say(bot, "/team rotation infra daily 9am")
    assert "Done" in await say(bot, "/team rotation infra weekly mon 09:00 America/Sao_Paulo")
    shown = await say(bot, "/oncall", user=OPERATOR)
    assert "On call for infra: alice" in shown  # the override still holds


def test_a_later_layer_wins_during_its_shift_and_the_one_below_covers_the_rest() -> None:
    week = parse_rotation("weekly mon 09:00 America/Sao_Paulo", ["alice", "bob"], utc(2, 12, 0, 11))
    office = parse_rotation("daily 09:00 America/Sao_Paulo for 9h", ["carol"], utc(2, 12, 0, 11))
    schedule = Schedule((week, office))
    morning = schedule.now(utc(4, 13, 0, 11))  # Wednesday 10:00 in São Paulo
    assert (morning.who, morning.until, morning.next) == ("carol", utc(4, 21, 0, 11), "alice")
    night = schedule.now(utc(4, 22, 0, 11))  # 19:00 there: the weekly layer
    assert (night.who, night.until, night.next) == ("alice", utc(5, 12, 0, 11), "carol")
