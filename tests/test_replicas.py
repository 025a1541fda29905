"""Three replicas of `python -m bot` behind a real HAProxy (deploy/haproxy.cfg), on one
PostgreSQL database and one Redis prefix, fed by a fake Telegram that delivers updates by webhook
through HAProxy (tests/replicas.py).

One bed serves the whole module (starting three bots is most of the cost); each test starts with
all three running and in the pool, and checks only its own /call commands (numbers of their own).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis
from sqlalchemy.engine import URL, make_url

from bot import states
from tests.conftest import API_KEY, TOKEN
from tests.db_fixtures import DEFAULT_POSTGRES_URL, _execute
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram, SentMessage
from tests.replicas import Command, TestBed, haproxy_binary, start_testbed, until

pytestmark = [pytest.mark.postgresql, pytest.mark.asyncio(loop_scope="module")]

CHATS = tuple(800_001 + n for n in range(200))  # 200 operators, each in their private chat
CALLS = 1000
BED_SETTINGS = {
    "OPERATOR_IDS": ",".join(map(str, CHATS)),
    # the burst is not paced by Telegram's send limits here (tests/test_telegram_limits.py is)
    "TELEGRAM_SENDS_PER_SECOND": "0",
    "TELEGRAM_GROUP_SENDS_PER_MINUTE": "0",
    "TELEGRAM_CHAT_SENDS_PER_SECOND": "0",
}
TEAMS = 50  # one incident each, two members each: two steps, one ring per member
RING_WAIT = 4  # seconds between steps


def team_phone(team: int, member: int) -> str:
    return f"+5511970{team:02d}000{member}"


def oncall_file() -> str:
    """ONCALL_FILE of every replica: TEAMS teams of two members, one attempt each, one round."""
    lines = ["[contacts]"]
    for team in range(TEAMS):
        lines += [f'm{team}a = "{team_phone(team, 1)}"', f'm{team}b = "{team_phone(team, 2)}"']
    for team in range(TEAMS):
        lines += [
            f"[teams.t{team}]",
            f"chat_id = {-100_900_000 - team}",
            f'token = "team-token-{team:02d}-{"x" * 24}"',
            f'members = ["m{team}a", "m{team}b"]',
            "attempts_per_person = 1",
            f"wait_seconds = {RING_WAIT}",
            "max_rounds = 1",
        ]
    return "\n".join(lines) + "\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bed(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_database: URL,
    redis_url: str,
) -> AsyncIterator[TestBed]:
    haproxy_binary()  # skipped (or failed, CALLBOT_REQUIRE_HAPROXY=1) before anything starts
    server = make_url(os.environ.get("TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    database = f"callbot_replicas_{uuid.uuid4().hex}"
    prefix = f"callbot-test-{uuid.uuid4().hex[:10]}:"
    # Telegram redelivers an unanswered update after a while, not at once
    telegram = FakeTelegram(TOKEN, webhook_retry_delay=0.5, webhook_timeout=60)
    pilot = FakePilotStatus(api_key=API_KEY, number_type="web")
    await _execute(server, f'CREATE DATABASE "{database}"')
    try:
        await telegram.start()
        await pilot.start()
        url = server.set(database=database, drivername="postgresql+asyncpg")
        folder = tmp_path_factory.mktemp("replicas")
        (folder / "oncall.toml").write_text(oncall_file())
        async with start_testbed(
            folder,
            telegram=telegram,
            pilot=pilot,
            database_url=url.render_as_string(hide_password=False),
            shared_state={"redis_url": redis_url, "redis_key_prefix": prefix},
            replicas=3,
            settings={**BED_SETTINGS, "ONCALL_FILE": str(folder / "oncall.toml")},
        ) as running:
            yield running
        assert pilot.contract_violations == [], "the client broke the OpenAPI contract"
    finally:
        await pilot.close()
        await telegram.close()
        await _execute(server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest_asyncio.fixture(loop_scope="module")
async def ready_bed(bed: TestBed) -> TestBed:
    """The bed with all three replicas running and in HAProxy's pool."""
    await bed.ready()
    return bed


async def through_balancer(bed: TestBed, path: str, count: int) -> list[int]:
    """`count` concurrent GETs of `path` through HAProxy: their statuses."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> int:
            async with session.get(bed.haproxy.url + path) as response:
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


def replies_by_command(telegram: FakeTelegram) -> dict[tuple[int, int], list[SentMessage]]:
    """The bot's messages answering a user's message: (chat, message replied to) → messages."""
    replies: dict[tuple[int, int], list[SentMessage]] = defaultdict(list)
    for message in telegram.sent:
        if message.reply_to_message_id is not None:
            replies[(message.chat_id, message.reply_to_message_id)].append(message)
    return replies


async def database_rows(bed: TestBed, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(bed.database_url)
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


async def until_rows_gone(bed: TestBed, query: str, timeout: float = 60) -> None:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while rows := await database_rows(bed, query):
        if loop.time() > deadline:
            raise AssertionError(f"still there: {rows}\n{bed.logs()[-20000:]}")
        await asyncio.sleep(0.2)


def messages_in(telegram: FakeTelegram, chat_id: int) -> list[str]:
    return [m.plain for m in telegram.sent + telegram.edits if m.chat_id == chat_id]


async def assert_each_call_once(
    bed: TestBed, commands: list[Command], *, cut: Iterable[int] = ()
) -> None:
    """Every /call handled once: started once, replied to once, its audit trail complete.

    `cut`: updates a killed replica was handling when it died. Such a /call may have been
    answered to the user by it and once more by whoever took Telegram's redelivery; and if it
    died before its POST, the call was not placed (never twice): the attempt is settled as not
    placed and the chat is told so.
    """
    telegram, pilot = bed.telegram, bed.pilot
    phones = {c.phone for c in commands}
    cut_phones = {c.phone for c in commands if c.update_id in set(cut)}
    # Telegram stopped delivering each (a 2xx; a duplicate delivery is answered 2xx too, as
    # handled already: what the user sees below is what shows it was handled once)
    assert {c.update_id for c in commands} <= bed.answered()

    # one POST /v1/calls per /call, to its own number: none twice, none missing
    posts = [r for r in pilot.calls_started() if r.json["to"] in phones]
    assert {r.status for r in posts} == {201}
    posted = Counter(r.json["to"] for r in posts)
    replies = replies_by_command(telegram)
    wrong_count = {p for p in phones if posted[p] > 1 or (posted[p] == 0 and p not in cut_phones)}
    if wrong_count:
        told = {c.phone: [m.plain for m in replies[(c.chat_id, c.message_id)]] for c in commands}
        ids = {str(c.update_id) for c in commands if c.phone in wrong_count}
        lines = [line for line in bed.logs().splitlines() if any(i in line for i in ids)]
        tried = [d for d in telegram.deliveries if str(d.update_id) in ids]
        report = {p: (posted[p], told[p]) for p in wrong_count}
        raise AssertionError(f"{report}\n{tried}\n" + "\n".join(lines))
    call_for = {
        "+" + call["peerNumber"]: call_id
        for call_id, call in pilot.calls.items()
        if "+" + call["peerNumber"] in phones
    }
    unplaced = phones - set(call_for)

    # every operator got an answer; a placed call is named in their chat, in the reply as a rule
    assert [c for c in commands if not replies[(c.chat_id, c.message_id)]] == []
    wrong = [
        (c, [m.plain for m in replies[(c.chat_id, c.message_id)]])
        for c in commands
        if c.phone in call_for
        and not any(
            call_for[c.phone] in text
            for text in (
                messages_in(telegram, c.chat_id)
                if c.phone in cut_phones
                else [m.plain for m in replies[(c.chat_id, c.message_id)]]
            )
        )
    ]
    assert wrong == []
    twice = {c.update_id for c in commands if len(replies[(c.chat_id, c.message_id)]) > 1}
    assert twice <= set(cut)

    # PostgreSQL: one attempt per /call, settled, and its audit rows: none lost, none doubled
    rows = await database_rows(
        bed, "SELECT id, phone, pilot_call_id, status, error_code FROM calls"
    )
    calls = [r for r in rows if r["phone"] in phones]
    assert sorted(r["phone"] for r in calls) == sorted(phones)
    placed = [r for r in calls if r["phone"] in call_for]
    assert {r["pilot_call_id"] for r in placed} == set(call_for.values())
    assert {r["status"] for r in placed} == {"INITIATED"}
    not_placed = [r for r in calls if r["phone"] in unplaced]
    assert [(r["status"], r["error_code"]) for r in not_placed] == [
        (states.NOT_STARTED, "interrupted")
    ] * len(not_placed)
    audit = await database_rows(bed, "SELECT action, subject, detail FROM audit")
    ours = {r["id"] for r in calls}
    requested = Counter(
        r["subject"] for r in audit if r["action"] == "call.requested" and r["subject"] in ours
    )
    assert requested == Counter(ours)
    started = Counter(
        json.loads(r["detail"])["call"]
        for r in audit
        if r["action"] in ("call.started", "call.recovered")
        and json.loads(r["detail"])["call"] in call_for.values()
    )
    assert started == Counter(call_for.values())
    settled = Counter(
        r["subject"]
        for r in audit
        if r["action"] == "call.not_started" and r["subject"] in {c["id"] for c in not_placed}
    )
    assert settled == Counter(r["id"] for r in not_placed)


async def served_by(bed: TestBed) -> dict[str, int]:
    """2xx answers HAProxy got from each replica so far."""
    lines = (await bed.haproxy.command("show stat")).splitlines()
    header = lines[0].lstrip("# ").split(",")
    proxy, server, ok = (header.index(k) for k in ("pxname", "svname", "hrsp_2xx"))
    rows = [line.split(",") for line in lines[1:] if line]
    return {r[server]: int(r[ok] or 0) for r in rows if r[proxy] == "replicas"}


async def progress(bed: TestBed, commands: list[Command], share: float) -> None:
    """Until `share` of the burst has been answered: mid-burst, whatever the machine's speed."""
    wanted = {c.update_id for c in commands}
    await until(
        lambda: len(wanted & bed.answered()) >= share * len(wanted),
        lambda: f"the burst did not get going:\n{bed.logs()[-20000:]}",
        timeout=120,
    )


async def test_a_thousand_calls_from_200_chats_through_three_replicas(
    ready_bed: TestBed,
) -> None:
    bed = ready_bed
    before = await served_by(bed)
    commands = bed.push_calls(CALLS, CHATS)
    await bed.all_answered(commands)

    await assert_each_call_once(bed, commands)
    after = await served_by(bed)
    assert all(after[r.name] > before.get(r.name, 0) for r in bed.replicas), after


async def test_a_replica_killed_mid_burst_loses_and_doubles_nothing(ready_bed: TestBed) -> None:
    bed = ready_bed
    victim = bed.replicas[1]
    commands = bed.push_calls(CALLS, CHATS)
    await progress(bed, commands, 1 / 3)
    answered_before = bed.answered()
    await victim.kill()
    # until the health check notices, requests that meet the dead replica go to another one
    assert await through_balancer(bed, "/healthz", 60) == [200] * 60
    await bed.haproxy.wait_for({victim.name: "DOWN"})
    await bed.all_answered(commands)
    # what the dead replica was handling: not answered when it died, delivered more than once
    attempts = Counter(d.update_id for d in bed.telegram.deliveries)
    cut = {
        c.update_id
        for c in commands
        if c.update_id not in answered_before and attempts[c.update_id] > 1
    }

    # back in the pool, its recovery settles any attempt it left half done
    await bed.restart(victim)
    await until_rows_gone(
        bed,
        f"SELECT id FROM calls WHERE status IN ('{states.PENDING}', '{states.UNKNOWN_OUTCOME}')",
    )
    await assert_each_call_once(bed, commands, cut=cut)


async def test_a_rolling_restart_mid_burst_loses_and_doubles_nothing(ready_bed: TestBed) -> None:
    bed = ready_bed
    restarted = bed.replicas[0]
    commands = bed.push_calls(CALLS // 2, CHATS)
    await progress(bed, commands, 1 / 2)
    restarted.sigterm()
    # draining: its /readyz answers 503, and HAProxy retries that on a replica that is ready
    assert await through_balancer(bed, "/readyz", 20) == [200] * 20
    assert await restarted.exited() == 0  # what it had taken, it finished
    # it starts again while the others are busy with the rest of the burst
    commands += bed.push_calls(CALLS // 2, CHATS)
    await bed.restart(restarted)
    await bed.all_answered(commands)

    await assert_each_call_once(bed, commands)


async def post_alert(session: aiohttp.ClientSession, bed: TestBed, team: int) -> int:
    url = f"{bed.haproxy.url}/alerts/generic/t{team}"
    body = {"title": f"disk full on db-{team}", "severity": "critical", "dedupKey": f"db-{team}"}
    headers = {"Authorization": f"Bearer team-token-{team:02d}-{'x' * 24}"}
    async with session.post(url, json=body, headers=headers) as response:
        return response.status


async def test_fifty_incidents_escalate_once_while_replicas_race_and_one_restarts(
    ready_bed: TestBed,
) -> None:
    bed = ready_bed
    phones = {team_phone(t, m) for t in range(TEAMS) for m in (1, 2)}

    def rings() -> Counter[str]:
        return Counter(r.json["to"] for r in bed.pilot.calls_started() if r.json["to"] in phones)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        statuses = await asyncio.gather(*(post_alert(session, bed, t) for t in range(TEAMS)))
    assert {s // 100 for s in statuses} == {2}, statuses
    # the three replicas' timers race for the due steps; one restarts while they ring
    await until(
        lambda: len(rings()) >= TEAMS // 2,
        lambda: f"the escalations did not start: {rings()}\n{bed.logs()[-20000:]}",
        timeout=60,
    )
    restarted = bed.replicas[2]
    assert await restarted.terminate() == 0
    await bed.restart(restarted)

    exhausted = "SELECT id FROM incidents WHERE status <> 'exhausted'"
    await until_rows_gone(bed, exhausted, timeout=120)
    assert rings() == Counter(dict.fromkeys(phones, 1))  # every step rung once, none twice
    stored = await database_rows(bed, "SELECT phone FROM rings")
    assert Counter(r["phone"] for r in stored if r["phone"] in phones) == Counter(
        dict.fromkeys(phones, 1)
    )
