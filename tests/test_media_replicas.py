"""Calls the bot speaks on, across replicas: two apps on one PostgreSQL database and one Redis,
the call placed by A (its peer connection or its stream lives there), every Pilot webhook
delivered to B's web port only.

The fake's API never shows the SDP answer (`answer_in_api=False`): the `calls` webhook B receives
is the only way it comes, so A hears of it through Redis or not at all.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from bot.app import CallbotApp
from bot.shared.redis import Keys
from tests.conftest import RunningBot, StartBot, settings_for
from tests.fakes.pilot_status import MediaScenario
from tests.fakes.telegram import SentMessage
from tests.redis_fixtures import OwnRedis
from tests.speech import espeak
from tests.test_lifecycle import PHONE, SECRET, TOKEN, command
from tests.test_voice import MESSAGE, hung_up, loud, pilot_id_of, settled, spoken_seconds

__all__ = ["espeak"]
# replicas share one PostgreSQL database
ON_POSTGRESQL = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)
SCENARIO = MediaScenario(answer_via="webhook", answer_in_api=False)
WAIT = 20.0  # seconds a step may take on a loaded machine (not a speed assertion)


@dataclass
class Replicas:
    a: RunningBot  # polls Telegram and places the calls
    b: CallbotApp  # only its web app: Pilot's webhooks land here
    another: Callable[[str], Awaitable[CallbotApp]]  # one more replica, web app only

    @property
    def hook_url(self) -> str:
        return f"http://127.0.0.1:{self.b.web_port}/pilot-status/{TOKEN}"


Start = Callable[..., Awaitable[Replicas]]


@pytest.fixture
async def replicas(
    start_bot: StartBot, db_url: str, tmp_path: Path, espeak: str
) -> AsyncIterator[Start]:
    started: list[CallbotApp] = []

    async def start(shared: dict[str, str], **overrides: Any) -> Replicas:
        """A and B on `shared` Redis state; `overrides` are settings of both."""
        settings: dict[str, Any] = {
            "database_url": db_url,
            "pilot_status_number_type": "meta",
            "pilot_status_webhook_token": TOKEN,
            "pilot_status_webhook_secret": SECRET,
            "pilot_status_read_timeout": 10.0,  # a held POST reply is not a timeout
            "speech_repeat": 1,
            "media_answer_timeout": WAIT,
            "oncall_tick_seconds": 0,
            "retention_interval_seconds": 0,
            **shared,
            **overrides,
        }
        a = await start_bot(**settings)

        async def another(name: str) -> CallbotApp:
            app = CallbotApp(
                settings_for(
                    a.telegram,
                    a.pilot,
                    data_dir=str(tmp_path / name),
                    telegram_edit_interval=0.05,
                    **settings,
                )
            )
            await app.start()
            started.append(app)
            return app

        b = await another("b")
        pilot = a.pilot
        pilot.number_type = "meta"
        pilot.media = SCENARIO
        pilot.set_permission(PHONE, "temporary")
        pilot.webhooks_to(f"http://127.0.0.1:{b.web_port}/pilot-status/{TOKEN}", SECRET)
        await subscribed(shared, 2)
        return Replicas(a, b, another)

    yield start
    for app in started:
        await app.close()


async def subscribed(shared: dict[str, str], count: int) -> None:
    """Until `count` subscribers listen on the media channel (every replica's one)."""
    channel = Keys(shared["redis_key_prefix"])("meta-media")
    client = aioredis.Redis.from_url(shared["redis_url"], socket_connect_timeout=1)
    try:
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    found = dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)
                except (aioredis.ConnectionError, OSError):
                    found = 0
                if found >= count:
                    return
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def shown(bot: RunningBot, reply: SentMessage, text: str) -> SentMessage:
    return await bot.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id and text in m.plain,
        chat_id=reply.chat_id,
        timeout=WAIT,
    )


async def spoken_across(replicas: Replicas) -> None:
    """/call on A; the answer and the statuses reach B only: A's peer connects and speaks, and
    the call's message follows it to its end."""
    a = replicas.a
    reply = await command(a, f"/call {PHONE} say: {MESSAGE}")
    assert ": started" in reply.plain
    await shown(a, reply, ": answered")
    final = await shown(a, reply, "Duration:")
    assert ": ended" in final.plain
    pilot_id = pilot_id_of(a)
    assert a.pilot.edges[pilot_id].seconds_of_sound() >= 0.7 * await loud(MESSAGE)
    deliveries = await a.pilot.wait_deliveries()
    assert deliveries and {d.url for d in deliveries} == {replicas.hook_url}
    assert all(d.status == 200 for d in deliveries)
    assert replicas.b.voice.open_sessions == 0  # B never held media
    await settled(a)
    assert a.pilot.contract_violations == []


@ON_POSTGRESQL
async def test_a_meta_call_placed_by_a_speaks_when_its_answer_lands_on_b(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    await spoken_across(await replicas(shared_state))


@ON_POSTGRESQL
async def test_an_answer_on_b_before_the_reply_to_a_s_post_still_connects(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    pair = await replicas(shared_state)
    pilot = pair.a.pilot
    answered = asyncio.Event()
    pilot.hold["start_call"] = answered  # A learns its call id only after B had the answer

    async def release_after_the_answer() -> None:
        answer = await pilot.wait_delivery(lambda d: "entry" in d.payload, timeout=WAIT)
        assert answer.status == 200  # B took it (kept it in Redis) before A knows its call
        answered.set()

    release = asyncio.create_task(release_after_the_answer())
    try:
        await spoken_across(pair)
    finally:
        release.cancel()
    assert answered.is_set()


def restart(server: OwnRedis) -> None:
    """Kill the server and start a new one on the same port (nothing of the old one kept)."""
    server.stop()
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    binary = shutil.which("redis-server")
    assert binary is not None
    server.process = subprocess.Popen(
        [binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )


@ON_POSTGRESQL
async def test_after_redis_restarts_the_subscribers_are_back_and_the_next_call_speaks(
    own_redis: OwnRedis, replicas: Start
) -> None:
    shared = {"redis_url": own_redis.url, "redis_key_prefix": f"t-{uuid.uuid4().hex[:8]}:"}
    pair = await replicas(shared)
    restart(own_redis)
    await subscribed(shared, 2)  # both replicas subscribed again by themselves
    await spoken_across(pair)


@ON_POSTGRESQL
async def test_a_call_rejected_while_a_waits_for_its_answer_ends_on_a_as_rejected(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    pair = await replicas(shared_state)
    # no answer ever comes and the callee declines: only B hears it
    pair.a.pilot.media = MediaScenario(
        answer_via="webhook", answer_in_api=False, answer="none", callee="reject", ring_delay=0.2
    )
    since = datetime.now(UTC)
    reply = await command(pair.a, f"/call {PHONE} say: {MESSAGE}")
    await shown(pair.a, reply, ": rejected")
    await settled(pair.a)  # A's peer connection closed, its media slot free again
    # A saw the call end: no hang-up of an ended call, no media failure on record
    assert not any(r.operation == "terminate" for r in pair.a.pilot.requests)
    actions = [a.action for a in await pair.a.app.store.audit_since(since)]
    assert "call.started" in actions and "call.media_failed" not in actions


async def media_sessions(app: CallbotApp) -> dict[str, float]:
    """`callbot_media_sessions` by kind, as the replica's /metrics says."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{app.web_port}/metrics")
    assert response.status_code == 200
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "callbot_media_sessions"
    }


async def started_up(app: CallbotApp) -> None:
    """What a replica does once it serves Telegram (by polling or webhook): its startup, with
    the recovery after a restart, to its end."""
    data = app.dp.workflow_data
    await app.dp.emit_startup(bot=app.bot, dispatcher=app.dp, bots=[app.bot], **data)
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t.get_name() == "recover"))


@ON_POSTGRESQL
async def test_a_replica_starting_up_leaves_a_meta_call_whose_media_lives_on_a(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    pair = await replicas(shared_state)
    pilot = pair.a.pilot
    pilot.media = MediaScenario(answer_via="webhook", answer_in_api=False, callee="ignore")
    reply = await command(pair.a, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(pair.a)
    await asyncio.wait_for(pilot.edges[pilot_id].connected.wait(), WAIT)  # A's media is up
    c = await pair.another("c")
    await started_up(c)  # a rolling restart brings up replica C
    # each replica counts the media it holds
    assert await media_sessions(pair.a.app) == {"meta": 1, "realtime": 0}
    assert await media_sessions(pair.b) == await media_sessions(c) == {"meta": 0, "realtime": 0}
    assert not any(r.operation == "terminate" for r in pilot.requests)
    record = await pair.a.app.store.get_call(pilot_id)
    assert record is not None and not record.terminal
    pilot.emit_status(pilot_id, "ACCEPTED")  # the callee picks up: A still speaks
    final = await shown(pair.a, reply, "Duration:")
    assert ": ended" in final.plain
    assert pilot.edges[pilot_id].seconds_of_sound() >= 0.7 * await loud(MESSAGE)
    await settled(pair.a)


@ON_POSTGRESQL
async def test_a_meta_call_whose_replica_died_is_hung_up_once_its_claim_lapses(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    pair = await replicas(shared_state)
    pilot = pair.a.pilot
    pilot.media = MediaScenario(answer_via="webhook", answer_in_api=False, callee="ignore")
    reply = await command(pair.a, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(pair.a)
    await asyncio.wait_for(pilot.edges[pilot_id].connected.wait(), WAIT)
    record = await pair.a.app.store.get_call(pilot_id)
    assert record is not None
    await pair.a.stop()  # A goes, its peer connection with it...
    # ...and, killed, it leaves its claim behind until the claim expires
    client = aioredis.Redis.from_url(shared_state["redis_url"])
    key = Keys(shared_state["redis_key_prefix"])("meta-owner", record.id)
    await client.set(key, "a-killed-replica", px=1500)
    await client.aclose()
    c = await pair.another("c")
    c.voice.policy = replace(c.voice.policy, claim_lapse=0.5)
    await started_up(c)
    assert not any(r.operation == "terminate" for r in pilot.requests)  # left while claimed
    final = await shown(pair.a, reply, "lost its audio")  # then hung up, with the reason
    assert ": failed" in final.plain
    assert await hung_up(pair.a, pilot_id)


async def test_media_sessions_count_the_realtime_streams_being_sent(
    start_bot: StartBot, espeak: str
) -> None:
    # said once, the note thrice over is seconds of stream: long enough to see it counted
    bot = await start_bot(pilot_status_number_type="web", speech_repeat=1)
    reply = await command(bot, f"/call {PHONE} say: {MESSAGE}, {MESSAGE}, {MESSAGE}")
    pilot_id = pilot_id_of(bot)
    bot.pilot.emit_status(pilot_id, "ACCEPTED")
    await bot.telegram.wait_for_message(lambda m: ": answered" in m.plain, timeout=WAIT)
    async with asyncio.timeout(WAIT):
        # until the stream flows (seconds of it are left); the fake has no event for a frame
        while not (pilot_id in bot.pilot.realtime and bot.pilot.realtime[pilot_id].frames):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert await media_sessions(bot.app) == {"meta": 0, "realtime": 1}
    await shown(bot, reply, ": ended")
    await settled(bot)
    assert await media_sessions(bot.app) == {"meta": 0, "realtime": 0}


@ON_POSTGRESQL
async def test_a_web_call_spoken_by_a_streams_when_b_hears_that_it_was_answered(
    replicas: Start, shared_state: dict[str, str]
) -> None:
    pair = await replicas(shared_state, pilot_status_number_type="web")
    pilot = pair.a.pilot
    pilot.number_type = "web"
    reply = await command(pair.a, f"/call {PHONE} say: {MESSAGE}")
    pilot_id = pilot_id_of(pair.a)
    pilot.emit_status(pilot_id, "ACCEPTED")  # delivered to B only
    final = await shown(pair.a, reply, "Duration:")
    assert ": ended" in final.plain
    frames = pilot.realtime[pilot_id].frames  # A streamed the note once B heard the pick-up
    assert len(frames) * 0.02 >= 0.9 * await spoken_seconds(MESSAGE)
    assert await hung_up(pair.a, pilot_id)
    await settled(pair.a)
