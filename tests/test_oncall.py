"""On-call escalation over the loopback fakes, with a controllable clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN, OPERATOR, STRANGER, RunningBot, StartBot
from tests.fakes.telegram import SentMessage

INFRA_CHAT, WEB_CHAT = -100200, -100300
INFRA_TOKEN, WEB_TOKEN = "infra-" + "x" * 30, "web-" + "y" * 30
HOOK = "h" * 32
ALICE, BOB, CAROL = "+5511999990001", "+5511999990002", "+5511999990003"
ONCALL_FILE = f"""
[contacts]
alice = "{ALICE}"
bob = "{BOB}"
carol = "{CAROL}"

[teams.infra]
chat_id = {INFRA_CHAT}
token = "{INFRA_TOKEN}"
members = ["alice", "bob"]
attempts_per_person = 1
wait_seconds = 300
max_rounds = 1

[teams.web]
chat_id = {WEB_CHAT}
token = "{WEB_TOKEN}"
members = ["carol"]
answer_is_ack = true
"""


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def oncall_bot(
    start_bot: StartBot,
    tmp_path: Path,
    clock: Clock,
    oncall_file: str | None = None,
    **overrides: Any,
) -> RunningBot:
    config = tmp_path / "oncall.toml"
    config.write_text(oncall_file or ONCALL_FILE)
    overrides.setdefault("pilot_status_number_type", "web")
    overrides.setdefault("data_dir", str(tmp_path / "data"))
    bot = await start_bot(
        oncall_file=str(config),
        oncall_tick_seconds=0,
        pilot_status_webhook_token=HOOK,
        web_port=0,
        **overrides,
    )
    bot.app.oncall.clock = clock
    return bot


async def alert(
    bot: RunningBot,
    body: Any,
    *,
    team: str = "infra",
    kind: str = "generic",
    token: str | None = INFRA_TOKEN,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/{kind}/{team}"
    async with httpx.AsyncClient() as client:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(url, content=data, headers=headers)


def generic(title: str = "disk full on db-1", key: str = "disk-db-1", **extra: Any) -> dict:
    return {"title": title, "text": "92% used", "severity": "critical", "dedupKey": key} | extra


def calls_to(bot: RunningBot, phone: str) -> list[Any]:
    return [r for r in bot.pilot.calls_started() if r.json["to"] == phone]


async def post_in(bot: RunningBot, chat: int, text: str) -> SentMessage:
    return await bot.telegram.wait_for_message(lambda m: text in m.plain, chat_id=chat)


async def call_event(bot: RunningBot, phone: str, name: str, status: str) -> None:
    """Pilot Status tells the bot how the newest call to `phone` went."""
    tag = calls_to(bot, phone)[-1].json["bizOpaqueCallbackData"]
    pilot_id = next(c["id"] for c in bot.pilot.calls.values() if c["bizOpaqueCallbackData"] == tag)
    body = {
        "event": name,
        "callId": pilot_id,
        "status": status,
        "to": phone[1:],
        "timestamp": bot.app.oncall.clock().isoformat(),
    }
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}"
    async with httpx.AsyncClient() as client:
        assert (await client.post(url, json=body)).status_code == 200


async def test_an_alert_is_posted_and_rings_the_person_on_call(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    response = await alert(bot, generic())
    assert response.status_code == 200 and response.json()["result"] == "created"
    post = await post_in(bot, INFRA_CHAT, "disk full on db-1")
    assert "[CRITICAL]" in post.plain and "firing" in post.plain
    assert [label for label, _ in post.buttons()] == ["✋ Acknowledge"]
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, ALICE)) == 1 and calls_to(bot, BOB) == []
    await post_in(bot, INFRA_CHAT, "calling alice")


async def test_bad_tokens_and_bodies_are_refused_and_nothing_is_stored(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    assert (await alert(bot, generic(), token="wrong")).status_code == 401
    assert (await alert(bot, generic(), token=None)).status_code == 401
    assert (await alert(bot, generic(), token=WEB_TOKEN)).status_code == 401  # another team's
    assert (await alert(bot, generic(), team="nobody")).status_code == 401
    bad = await alert(bot, {"text": "no title"})
    assert bad.status_code == 400 and bad.json()["error"]
    assert (await alert(bot, b"{not json")).status_code == 400
    assert (await alert(bot, generic(), kind="nagios")).status_code == 404
    assert await bot.app.oncall_store.due(clock.now + timedelta(days=1)) == []
    assert bot.telegram.bot_messages(INFRA_CHAT) == []


async def test_repeated_firings_update_one_incident_and_ring_once(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    first = await alert(bot, generic())
    await bot.app.oncall.run_due()
    again = await alert(bot, generic())
    assert again.json() == {"result": "updated", "incident": first.json()["incident"]}
    await post_in(bot, INFRA_CHAT, "fired 2 times")
    await bot.app.oncall.run_due()
    assert len(bot.pilot.calls_started()) == 1
    assert len(bot.telegram.bot_messages(INFRA_CHAT)) == 1


async def test_a_missed_call_goes_to_the_next_person(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    clock.advance(30)
    await call_event(bot, ALICE, "call.ended", "FAILED")
    await post_in(bot, INFRA_CHAT, "not answered (failed)")
    await bot.app.oncall.run_due()
    assert len(calls_to(bot, BOB)) == 1
    await post_in(bot, INFRA_CHAT, "calling bob")


async def test_answered_but_not_acknowledged_escalates_after_the_wait(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    await call_event(bot, ALICE, "call.connected", "ACCEPTED")
    await post_in(bot, INFRA_CHAT, "answered; waiting for Acknowledge")
    clock.advance(299)
    assert await bot.app.oncall.run_due() == 0
    clock.advance(2)
    assert await bot.app.oncall.run_due() == 1
    assert len(calls_to(bot, BOB)) == 1


async def test_acknowledge_stops_everything(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "calling alice")
    [(_, data)] = post.buttons()
    _, stranger = bot.telegram.press_button(
        user_id=STRANGER,
        chat_id=INFRA_CHAT,
        message_id=post.message_id,
        data=data,
        chat_type="supergroup",
    )
    assert "not allowed" in (await bot.telegram.wait_for_callback_answer(stranger))["text"]
    _, query = bot.telegram.press_button(
        user_id=OPERATOR,
        chat_id=INFRA_CHAT,
        message_id=post.message_id,
        data=data,
        chat_type="supergroup",
    )
    await bot.telegram.wait_for_callback_answer(query)
    acked = await post_in(bot, INFRA_CHAT, "acknowledged by Op at 12:00 UTC")
    assert acked.buttons() == []
    for _ in range(5):
        clock.advance(600)
        assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 1


async def test_resolved_alert_stops_the_escalation(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    resolved = await alert(bot, generic(status="resolved"))
    assert resolved.json()["result"] == "resolved"
    await post_in(bot, INFRA_CHAT, "✔️ resolved")
    clock.advance(3600)
    assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 1
    assert (await alert(bot, generic(status="resolved"))).json()["result"] == "ignored"


async def test_answer_counts_as_acknowledgement_when_the_team_says_so(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic(key="web-down", title="site down"), team="web", token=WEB_TOKEN)
    await bot.app.oncall.run_due()
    await call_event(bot, CAROL, "call.connected", "ACCEPTED")
    await post_in(bot, WEB_CHAT, "acknowledged by +55 11 9****-0003 (answered)")
    clock.advance(3600)
    assert await bot.app.oncall.run_due() == 0


async def test_the_throttle_holds_a_second_ring_of_the_same_phone(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic(key="one", title="first alert"))
    await bot.app.oncall.run_due()
    clock.advance(10)
    await alert(bot, generic(key="two", title="second alert"))
    await bot.app.oncall.run_due()
    held = await post_in(bot, INFRA_CHAT, "throttle held the call to alice until 12:01")
    assert "second alert" in held.plain
    assert len(calls_to(bot, ALICE)) == 1
    clock.advance(51)
    await bot.app.oncall.run_due()
    assert len(calls_to(bot, ALICE)) == 2


async def test_missing_permission_on_meta_asks_for_it_and_moves_on(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    bot.pilot.set_permission(BOB, "temporary")
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "alice has not allowed WhatsApp calls: permission request sent")
    requests = [r for r in bot.pilot.requests if r.operation == "request_permission"]
    assert [r.json["to"] for r in requests] == [ALICE]
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "calling bob")
    [ring] = bot.pilot.calls_started()
    assert ring.json["to"] == BOB and "a=setup:active" in ring.json["sdp"]


async def test_nobody_acknowledging_ends_the_escalation(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    for _ in range(3):
        await bot.app.oncall.run_due()
        clock.advance(301)
    final = await post_in(bot, INFRA_CHAT, "escalation ended")
    assert final.buttons() == []
    assert [r.json["to"] for r in bot.pilot.calls_started()] == [ALICE, BOB]


async def test_timers_survive_a_restart(start_bot: StartBot, tmp_path: Path, clock: Clock) -> None:
    first = await oncall_bot(start_bot, tmp_path, clock)
    await alert(first, generic())
    await first.app.oncall.run_due()
    await first.stop()
    clock.advance(301)
    second = await oncall_bot(start_bot, tmp_path, clock)
    assert await second.app.oncall.run_due() == 1
    assert [r.json["to"] for r in second.pilot.calls_started()] == [ALICE, BOB]


async def test_two_teams_alerted_at_once_each_ring_their_own(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    await asyncio.gather(
        alert(bot, generic()),
        alert(bot, generic(key="web", title="site down"), team="web", token=WEB_TOKEN),
    )
    assert await bot.app.oncall.run_due() == 2
    await post_in(bot, INFRA_CHAT, "calling alice")
    await post_in(bot, WEB_CHAT, "calling carol")
    assert sorted(r.json["to"] for r in bot.pilot.calls_started()) == [ALICE, CAROL]


async def test_contacts_teams_and_on_call_from_chat(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)

    async def say(text: str, user: int = ADMIN, chat: int | None = None) -> str:
        mark = bot.telegram.mark()
        kwargs: dict[str, Any] = {"user_id": user}
        if chat is not None:
            kwargs |= {"chat_id": chat, "chat_type": "supergroup"}
        bot.telegram.send_command(text, **kwargs)
        reply = await bot.telegram.wait_for_message(
            lambda m: not m.method.startswith("edit"), chat_id=chat or user, after=mark
        )
        return reply.plain

    assert "Only admins" in await say("/contact add dave +5511999990004", user=OPERATOR)
    assert "Done" in await say("/contact add dave 11 99999-0004")
    assert "dave +55 11 99999-0004" in await say("/contact list", user=OPERATOR)
    assert "cannot be a name" in await say("/contact add 9lives +5511999990005")
    assert "On call for infra: alice" in await say("/oncall", chat=INFRA_CHAT)
    assert "not on team" in await say("/oncall set dave infra")
    assert "Done" in await say("/team members infra alice bob dave")
    assert "On call for infra: dave" in await say("/oncall set dave", chat=INFRA_CHAT)
    assert "calls only its members" in await say("/call carol", user=OPERATOR, chat=INFRA_CHAT)
    confirm = await say("/call dave db down", user=OPERATOR, chat=INFRA_CHAT)
    assert "Call +55 11 9****-0004?" in confirm
    mark = bot.telegram.mark()
    created = await say("/team add ops", chat=-100400)
    assert "sent its intake token to you privately" in created
    private = await bot.telegram.wait_for_message(chat_id=ADMIN, after=mark)
    token = private.plain.split("(shown once):")[1].split()[0]
    response = await alert(bot, generic(), team="ops", token=token)
    assert response.status_code == 200
    await bot.app.oncall.run_due()
    await post_in(bot, -100400, "team ops has nobody on its list")
    assert "Done" in await say("/contact remove dave")
    assert "I know no contact" in await say("/call dave", user=OPERATOR)


@pytest.mark.parametrize("kind", ["alertmanager", "grafana"])
async def test_real_monitoring_payloads_open_and_resolve_an_incident(
    start_bot: StartBot, tmp_path: Path, clock: Clock, kind: str
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock)
    samples = Path(__file__).parent / "samples"
    firing = (samples / f"{kind}_firing.json").read_bytes()
    created = await alert(bot, firing, kind=kind)
    assert created.status_code == 200 and created.json()["result"] == "created"
    again = await alert(bot, firing, kind=kind)
    assert again.json() == {"result": "updated", "incident": created.json()["incident"]}
    await bot.app.oncall.run_due()
    assert len(calls_to(bot, ALICE)) == 1
    resolved = await alert(bot, (samples / f"{kind}_resolved.json").read_bytes(), kind=kind)
    assert resolved.json()["result"] == "resolved"
    post = await post_in(bot, INFRA_CHAT, "✔️ resolved")
    assert post.plain.startswith("🚨")


async def test_a_permission_granted_after_the_escalation_asked_can_be_used_by_any_operator(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await oncall_bot(start_bot, tmp_path, clock, pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    await alert(bot, generic())
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "permission request sent")
    granted = {
        "event": "call.permission_updated",
        "callId": None,
        "status": "PERMANENT",
        "to": ALICE[1:],
        "timestamp": clock.now.isoformat(),
    }
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}"
    async with httpx.AsyncClient() as client:
        assert (await client.post(url, json=granted)).status_code == 200
    told = await post_in(bot, INFRA_CHAT, "now allows WhatsApp calls")
    [(_, data)] = told.buttons()
    bot.pilot.set_permission(ALICE, "permanent")
    bot.telegram.press_button(
        user_id=ADMIN,
        chat_id=INFRA_CHAT,
        message_id=told.message_id,
        data=data,
        chat_type="supergroup",
    )
    final = await post_in(bot, INFRA_CHAT, ": started")
    assert final.message_id == told.message_id  # the pressed message follows the call
    assert "Started by Op" in final.plain
