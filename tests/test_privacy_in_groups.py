"""What group chats may see: no intake token ever, no full phone number, and lists that fit.

Each test drives the real bot against the loopback fakes and reads every message a group got.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from bot.storage.oncall import Contact
from bot.storage.store import utcnow
from tests.conftest import ADMIN, OPERATOR, RunningBot, StartBot
from tests.fakes.telegram import SentMessage

TEAM_CHAT, OTHER_CHAT = -100610, -100620
TOKEN = "infra-" + "k" * 30
HOOK = "p" * 32
ALICE = "+5511999990001"
FORBIDDEN = "Forbidden: bot can't initiate conversation with a user"


async def team_bot(start_bot: StartBot, tmp_path: Path, **overrides: Any) -> RunningBot:
    config = tmp_path / "oncall.toml"
    config.write_text(
        f'[contacts]\nalice = "{ALICE}"\n\n[teams.infra]\nchat_id = {TEAM_CHAT}\n'
        f'token = "{TOKEN}"\nmembers = ["alice"]\nanswer_is_ack = true\n'
    )
    overrides.setdefault("pilot_status_number_type", "web")
    return await start_bot(
        oncall_file=str(config),
        oncall_tick_seconds=0,
        pilot_status_webhook_token=HOOK,
        web_port=0,
        allowed_chat_ids=f"{TEAM_CHAT},{OTHER_CHAT}",
        **overrides,
    )


async def say(
    bot: RunningBot, line: str, *, user: int = ADMIN, chat: int | None = None
) -> SentMessage:
    """A command from `user` in `chat` (a group; their private chat if None); the reply."""
    mark = bot.telegram.mark()
    kwargs: dict[str, Any] = {"user_id": user}
    if chat is not None:
        kwargs |= {"chat_id": chat, "chat_type": "supergroup"}
    bot.telegram.send_command(line, **kwargs)
    return await bot.telegram.wait_for_message(
        lambda m: not m.method.startswith("edit"), chat_id=chat or user, after=mark
    )


async def alert(bot: RunningBot, token: str, team: str = "infra", **extra: Any) -> int:
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/{team}"
    body = {"title": "disk full on db-1", "dedupKey": "disk", "severity": "critical"} | extra
    async with httpx.AsyncClient() as client:
        response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def seen_in(bot: RunningBot, chat: int) -> str:
    """Everything the bot ever showed in a chat, sent or edited."""
    return "\n".join(
        m.plain for m in [*bot.telegram.sent, *bot.telegram.edits] if m.chat_id == chat
    )


def token_in(private: SentMessage) -> str:
    return private.plain.split("(shown once):")[1].split()[0]


# item 16: no secrets in group chats


async def test_team_add_in_a_group_sends_the_token_only_privately(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    mark = bot.telegram.mark()
    reply = await say(bot, "/team add ops", chat=OTHER_CHAT)
    assert "sent its intake token to you privately" in reply.plain
    private = await bot.telegram.wait_for_message(chat_id=ADMIN, after=mark)
    token = token_in(private)
    assert f"chat {OTHER_CHAT}" in private.plain
    assert token not in seen_in(bot, OTHER_CHAT)
    assert await alert(bot, token, team="ops") == 200
    await bot.telegram.wait_for_message(lambda m: "disk full" in m.plain, chat_id=OTHER_CHAT)


async def test_a_new_token_is_not_made_when_the_admin_cannot_be_messaged(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    bot.telegram.fail_next("sendMessage", error_code=403, description=FORBIDDEN, chat_id=ADMIN)
    reply = await say(bot, "/team token infra", chat=TEAM_CHAT)
    assert "cannot message you privately" in reply.plain
    assert "@callbot_test_bot" in reply.plain and "(shown once)" not in reply.plain
    assert await alert(bot, TOKEN) == 200  # the old token still works
    bot.telegram.fail_next("sendMessage", error_code=403, description=FORBIDDEN, chat_id=ADMIN)
    refused = await say(bot, "/team add ops", chat=OTHER_CHAT)
    assert "cannot message you privately" in refused.plain
    assert "I know no team" in (await say(bot, "/team token ops", chat=OTHER_CHAT)).plain


async def test_a_second_team_add_elsewhere_is_refused_and_team_move_moves_it(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    refused = await say(bot, "/team add infra", chat=OTHER_CHAT)
    assert "already posts alerts to another chat" in refused.plain
    assert "/team move infra" in refused.plain
    assert await alert(bot, TOKEN) == 200  # token kept, alerts still go to the team's chat
    await bot.telegram.wait_for_message(lambda m: "disk full" in m.plain, chat_id=TEAM_CHAT)
    assert (
        "Only admins" in (await say(bot, "/team move infra", user=OPERATOR, chat=OTHER_CHAT)).plain
    )
    busy = await say(bot, "/team move infra", chat=OTHER_CHAT)
    assert "has open incidents" in busy.plain
    assert await alert(bot, TOKEN, status="resolved") == 200
    moved = await say(bot, "/team move infra", chat=OTHER_CHAT)
    assert "now posts alerts to this chat" in moved.plain
    assert await alert(bot, TOKEN, dedupKey="cpu", title="cpu hot") == 200
    await bot.telegram.wait_for_message(lambda m: "cpu hot" in m.plain, chat_id=OTHER_CHAT)
    assert (
        "already posts alerts to this chat"
        in (await say(bot, "/team add infra", chat=OTHER_CHAT)).plain
    )


# item 17: numbers masked in groups everywhere, lists that page


async def test_contact_list_masks_numbers_in_groups_and_pages_past_the_limit(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    for i in range(150):
        number = f"+55119{i:08d}"
        display = f"+55 11 9{i:04d}-{i:04d}"
        await bot.app.oncall_store.save_contact(Contact(f"c{i:03d}", number, display), at=utcnow())
    private = await say(bot, "/contact list", user=OPERATOR)
    assert private.plain.startswith("Contacts 1-20 of 151:")
    assert "alice +55 11 99999-0001" in private.plain
    [(label, data)] = private.buttons()
    assert label == "Older ▶️"
    _, query = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=private.message_id, data=data
    )
    await bot.telegram.wait_for_callback_answer(query)
    page = await bot.telegram.wait_for_message(
        lambda m: m.message_id == private.message_id and "Contacts 21-40 of 151:" in m.plain,
        chat_id=OPERATOR,
    )
    assert [label for label, _ in page.buttons()] == ["◀️ Newer", "Older ▶️"]
    group = await say(bot, "/contact list", user=OPERATOR, chat=TEAM_CHAT)
    assert "alice +55 11 9****-0001" in group.plain
    assert "99999-0001" not in seen_in(bot, TEAM_CHAT)
    assert "went wrong" not in seen_in(bot, TEAM_CHAT) + seen_in(bot, OPERATOR)


async def test_team_list_pages_instead_of_failing(start_bot: StartBot, tmp_path: Path) -> None:
    bot = await team_bot(start_bot, tmp_path)
    members = [f"person-{i}" for i in range(6)]
    for i in range(40):
        await bot.app.oncall_store.save_team(
            f"team-{i:02d}", chat_id=-100900 - i, token_hash="x", at=utcnow(), members=members
        )
    listing = await say(bot, "/team list", user=OPERATOR)
    assert listing.plain.startswith("Teams 1-10 of 41:")
    [(_, data)] = listing.buttons()
    bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=listing.message_id, data=data
    )
    await bot.telegram.wait_for_message(
        lambda m: m.message_id == listing.message_id and "Teams 11-20 of 41:" in m.plain,
        chat_id=OPERATOR,
    )


async def test_status_and_calls_in_a_group_mask_the_number(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    started = await say(bot, "/call +5511988887777 db down", user=OPERATOR)
    assert "+55 11 98888-7777" in started.plain  # a private chat sees it
    [call] = bot.pilot.calls.values()
    status = await say(bot, f"/status {call['id']}", user=OPERATOR, chat=OTHER_CHAT)
    assert "+55 11 9****-7777" in status.plain
    await say(bot, "/calls", user=OPERATOR, chat=OTHER_CHAT)
    assert "98888-7777" not in seen_in(bot, OTHER_CHAT)


async def test_the_answered_note_of_an_escalation_is_masked(
    start_bot: StartBot, tmp_path: Path
) -> None:
    bot = await team_bot(start_bot, tmp_path)
    assert await alert(bot, TOKEN) == 200
    await bot.app.oncall.run_due()
    [call] = bot.pilot.calls.values()
    body = {
        "event": "call.connected",
        "callId": call["id"],
        "status": "ACCEPTED",
        "to": ALICE[1:],
        "timestamp": utcnow().isoformat(),
    }
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{HOOK}"
    async with httpx.AsyncClient() as client:
        assert (await client.post(url, json=body)).status_code == 200
    await bot.telegram.wait_for_message(
        lambda m: "acknowledged by +55 11 9****-0001 (answered)" in m.plain, chat_id=TEAM_CHAT
    )
    await asyncio.sleep(0.1)
    assert "99999-0001" not in seen_in(bot, TEAM_CHAT)
