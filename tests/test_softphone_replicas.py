"""The softphone across two replicas (one PostgreSQL database, one Redis): the Mini App's socket
may come back through the other replica within the grace (no hang-up), and a relay learns that
the call ended from the database even when the webhook reached the other replica."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import OPERATOR, RunningBot, StartBot
from tests.conftest import TOKEN as BOT_TOKEN
from tests.miniapp import init_data
from tests.test_lifecycle import deliver, event, shown, start_call, webhook_bot

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]


async def talk(
    http: aiohttp.ClientSession, bot: RunningBot, call_id: str
) -> aiohttp.ClientWebSocketResponse:
    url = f"http://127.0.0.1:{bot.app.web_port}/app/api/calls/{call_id}/talk"
    ws = await http.ws_connect(url)
    await ws.send_json({"initData": init_data(BOT_TOKEN, OPERATOR)})
    assert (await ws.receive_json(timeout=5))["type"] == "ready"
    return ws


def hung_up(bot: RunningBot) -> bool:
    return any(r.operation == "terminate" for r in bot.pilot.requests)


async def test_the_mini_app_comes_back_through_the_other_replica_and_hears_the_end_there(
    start_bot: StartBot, db_url: str, shared_state: dict[str, str]
) -> None:
    settings: dict[str, Any] = {"database_url": db_url, **shared_state}
    first = await webhook_bot(start_bot, **settings)
    reply, pilot_id = await start_call(first)
    await first.app.live.wait_idle()
    second = await webhook_bot(start_bot, **settings)
    for bot in (first, second):
        bot.app.softphone.close_grace = 0.5
    assert (await deliver(first, event("call.connected", pilot_id, status="ACCEPTED"))).is_success
    record = await first.app.store.get_call(pilot_id)
    assert record is not None
    async with aiohttp.ClientSession() as http:
        ws = await talk(http, first, record.id)
        await ws.close()  # the connection drops; the page reconnects, through the other replica
        ws = await talk(http, second, record.id)
        await asyncio.sleep(1.0)
        assert not hung_up(first), "the first replica hung up a call whose Mini App was back"
        # the callee hangs up; Pilot's webhook reaches the first replica
        ended = event("call.ended", pilot_id, status="COMPLETED", durationSeconds=3)
        assert (await deliver(first, ended)).is_success
        assert (await ws.receive_json(timeout=5)) == {"type": "ended"}
        await ws.receive(timeout=5)
        assert ws.close_code == 4000
    await shown(first, reply, ": ended")
    await asyncio.sleep(0.7)  # past the grace: a call that ended is not hung up again
    assert not hung_up(first)
