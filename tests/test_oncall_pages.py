"""The call itself and its post: what a ring says (in the team's language, how to acknowledge),
what comes next in the post, the post in Portuguese, and test pages end to end — over the
loopback fakes with a controllable clock."""

from __future__ import annotations

import asyncio
import stat
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import ADMIN, OPERATOR, RunningBot, StartBot
from tests.speech import espeak  # noqa: F401 (a fixture)
from tests.test_oncall import (
    ALICE,
    BOB,
    CAROL,
    INFRA_CHAT,
    ONCALL_FILE,
    WEB_CHAT,
    WEB_TOKEN,
    Clock,
    alert,
    call_event,
    calls_to,
    generic,
    oncall_bot,
    post_in,
)

# test_oncall's teams; web speaks Portuguese and has alice after carol
TEAMS = ONCALL_FILE.replace(
    'members = ["carol"]',
    'members = ["carol", "alice"]\nattempts_per_person = 1\nmax_rounds = 1\nlocale = "pt_BR"',
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def what_was_said(said: Path, lines: int) -> str:
    """The engine's record once it holds `lines` lines: speech is synthesized once the call is
    placed (it is needed only when the callee answers), so it may come after the POST."""
    for _ in range(500):
        if len((text := read(said)).splitlines()) >= lines:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"the engine was not asked {lines} times: {said}")


def recording_engine(tmp_path: Path, real: str) -> tuple[Path, Path]:
    """A speech engine that writes down what it was asked to say (voice, text), then has
    espeak-ng say it: the speech input as the bot hands it over."""
    said = tmp_path / "said.txt"
    script = tmp_path / "recording-tts"
    script.write_text(
        "#!/bin/sh\n"
        'text="$(cat)"\n'
        f'printf \'%s\\t%s\\n\' "$2" "$text" >> {said}\n'
        f'printf \'%s\' "$text" | exec {real} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, said


async def pages_bot(
    start_bot: StartBot, tmp_path: Path, clock: Clock, speech_engine: str = "no-such-tts"
) -> RunningBot:
    bot = await oncall_bot(start_bot, tmp_path, clock, speech_engine=speech_engine)
    await bot.app.oncall.load(tomllib.loads(TEAMS), region="BR")
    return bot


async def say(bot: RunningBot, text: str, user: int, chat: int) -> str:
    """The bot's reply to a command (not its posts to the same chat)."""
    mark = bot.telegram.mark()
    bot.telegram.send_command(text, user_id=user, chat_id=chat, chat_type="supergroup")
    reply = await bot.telegram.wait_for_message(
        lambda m: m.reply_to_message_id is not None, chat_id=chat, after=mark
    )
    return reply.plain


async def test_the_post_tells_what_comes_next_and_is_edited_as_steps_run(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await pages_bot(start_bot, tmp_path, clock)
    await alert(bot, generic())
    await post_in(bot, INFRA_CHAT, "⏭ next: alice at 12:00 UTC")
    await bot.app.oncall.run_due()
    await post_in(bot, INFRA_CHAT, "⏭ next: bob at 12:05 UTC")
    await call_event(bot, ALICE, "call.missed", "MISSED")
    await post_in(bot, INFRA_CHAT, "not answered (missed)")
    await bot.app.oncall.run_due()
    post = await post_in(bot, INFRA_CHAT, "⏭ next: the escalation ends at 12:05 UTC")
    assert "calling bob" in post.plain


async def test_a_portuguese_team_gets_its_post_and_notes_in_portuguese(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await pages_bot(start_bot, tmp_path, clock)
    await alert(bot, generic(), team="web", token=WEB_TOKEN)
    await bot.app.oncall.run_due()
    post = await post_in(bot, WEB_CHAT, "⏭ depois: alice às 12:05 UTC")
    assert "🔴 disparado, equipe web" in post.plain and "12:00 chamando carol" in post.plain
    await call_event(bot, CAROL, "call.missed", "MISSED")
    await post_in(bot, WEB_CHAT, "12:00 não atendida (perdida)")
    clock.advance(60)
    await bot.app.oncall.run_due()
    await call_event(bot, ALICE, "call.accepted", "ACCEPTED")
    post = await post_in(bot, WEB_CHAT, "12:01 reconhecido ao atender a chamada")
    assert "chamando alice" in post.plain and "calling" not in post.plain


async def test_what_a_ring_says_follows_the_teams_language_and_how_it_is_acknowledged(
    start_bot: StartBot,
    tmp_path: Path,
    clock: Clock,
    espeak: str,  # noqa: F811 (the fixture)
) -> None:
    engine, said = recording_engine(tmp_path, espeak)
    bot = await pages_bot(start_bot, tmp_path, clock, speech_engine=str(engine))
    await alert(bot, generic(title="disk full on db-1"))
    await alert(bot, generic(title="site down", key="site"), team="web", token=WEB_TOKEN)
    assert await bot.app.oncall.run_due() == 2
    assert {r.json["to"] for r in bot.pilot.calls_started()} == {ALICE, CAROL}
    lines = dict(line.split("\t", 1) for line in (await what_was_said(said, 2)).splitlines())
    assert lines["en-us"] == (
        "Alert for team infra: disk full on db-1 To acknowledge it, open the team's chat and "
        "press Acknowledge."
    )
    assert lines["pt-br"].startswith("Alerta para a equipe web: site down")
    assert lines["pt-br"].endswith("Este alerta agora está reconhecido por você.")


async def test_a_test_page_runs_the_plan_for_real_and_ends_at_the_first_answer(
    start_bot: StartBot,
    tmp_path: Path,
    clock: Clock,
    espeak: str,  # noqa: F811 (the fixture)
) -> None:
    engine, said = recording_engine(tmp_path, espeak)
    bot = await pages_bot(start_bot, tmp_path, clock, speech_engine=str(engine))
    assert "Only admins" in await say(bot, "/team test infra", user=OPERATOR, chat=WEB_CHAT)
    started = await say(bot, "/team test", user=OPERATOR, chat=INFRA_CHAT)
    assert "Test page 1 of team infra started" in started
    post = await post_in(bot, INFRA_CHAT, "TEST — Test page of team infra")
    assert "test page started by" in post.plain
    await bot.app.oncall.run_due()
    assert len(calls_to(bot, ALICE)) == 1
    spoken = await what_was_said(said, 1)
    assert spoken.startswith("en-us\tThis is a TEST page. Nothing is wrong. Alert for team infra")
    assert spoken.rstrip().endswith("Answering ends the test. Thank you.")
    await call_event(bot, ALICE, "call.accepted", "ACCEPTED")
    post = await post_in(bot, INFRA_CHAT, "test page ended: answered by +55 11 9****-0001")
    assert "✔️ test page ended" in post.plain
    clock.advance(3600)
    assert await bot.app.oncall.run_due() == 0
    assert calls_to(bot, BOB) == []
    audit = await bot.app.store.audit_since(clock.now - timedelta(days=1))
    [entry] = [a for a in audit if a.action == "team_test"]
    assert (entry.subject, entry.actor_id, entry.detail) == ("infra", OPERATOR, {"incident": 1})


async def test_a_test_page_acknowledged_in_chat_ends_and_never_fires_again(
    start_bot: StartBot, tmp_path: Path, clock: Clock
) -> None:
    bot = await pages_bot(start_bot, tmp_path, clock)
    assert "Test page 1" in await say(bot, "/team test web", user=ADMIN, chat=INFRA_CHAT)
    await post_in(bot, WEB_CHAT, "TEST — Chamado de teste da equipe web")
    await bot.app.oncall.run_due()
    assert len(calls_to(bot, CAROL)) == 1
    assert "Done" in await say(bot, "/ack 1", user=OPERATOR, chat=WEB_CHAT)
    await post_in(bot, WEB_CHAT, "chamado de teste encerrado: reconhecido por")
    clock.advance(5 * 3600)  # past any ack_timeout: a test does not fire again
    assert await bot.app.oncall.run_due() == 0
    assert len(bot.pilot.calls_started()) == 1
