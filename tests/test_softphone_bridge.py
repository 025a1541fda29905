"""The softphone on Meta numbers, server side: an aiortc peer stands in for the operator's
browser, the fake Pilot Status's media edge for Meta. The bot bridges the two (bot.softphone).

Each test asks what a person would notice: what the callee (the edge) hears and when, what the
operator (the browser peer) hears, and how the call ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import httpx
import pytest

from bot.calls.service import CallRequest, Started
from bot.config import ConfigError, load_settings
from bot.errors import NotAllowed, TalkRefused
from bot.phones import Phone
from tests.conftest import ADMIN, OPERATOR, TOKEN, RunningBot, StartBot
from tests.fakes.meta_edge import MetaEdge
from tests.fakes.pilot_status import MediaScenario
from tests.miniapp import init_data
from tests.softphone_peer import LOUD, BrowserPeer
from tests.speech import espeak
from tests.test_lifecycle import PHONE, command, shown
from tests.test_media_replicas import ON_POSTGRESQL, Start, replicas
from tests.test_voice import hung_up, meta_bot, pilot_id_of, settled

__all__ = ["espeak", "replicas"]
# the callee speaks up (a 0.3 tone): the operator must hear it
SCENARIO = MediaScenario(edge_tone_hz=660.0, edge_amplitude=0.3)
WAIT = 10.0  # seconds a step may take on a loaded machine (not a speed assertion)
LONG = "the database is down " * 12  # a message that would play for many seconds


async def until(check: Callable[[], bool], within: float = WAIT) -> None:
    """Until `check()` holds, looked at every 5 ms (so a measured delay is within 5 ms)."""
    for _ in range(int(within / 0.005)):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not within {within} s")


@pytest.fixture
async def peers() -> AsyncIterator[Callable[[], BrowserPeer]]:
    made: list[BrowserPeer] = []

    def make() -> BrowserPeer:
        made.append(BrowserPeer())
        return made[-1]

    yield make
    for peer in made:
        await peer.close()


async def talk_call(bot: RunningBot) -> str:
    """A Meta call placed to talk on (`talk=True`: no message); its Pilot id once answered."""
    outcome = await bot.app.calls.start(
        CallRequest(operator_id=OPERATOR, chat_id=OPERATOR, phone=Phone(PHONE, PHONE), talk=True)
    )
    assert isinstance(outcome, Started)
    pilot_id = pilot_id_of(bot)
    await until(lambda: bot.app.voice.line(outcome.record.id) is not None)
    return pilot_id


async def join(bot: RunningBot, call: str, peer: BrowserPeer, user: int = OPERATOR) -> None:
    answer = await bot.app.meta_talk.join(call, user, await peer.offer())
    await peer.accept(answer)


def edge_of(bot: RunningBot, pilot_id: str) -> MetaEdge:
    edge = bot.pilot.edges[pilot_id]
    assert isinstance(edge, MetaEdge)
    return edge


async def first_loud(edge: MetaEdge, after: int) -> float:
    """Loop time the edge hears the first loud 20 ms at or after window `after`."""
    await until(lambda: any(r > LOUD for r in edge.rms[after:]))
    return asyncio.get_running_loop().time()


async def silent_from_now(edge: MetaEdge, loud: float = LOUD) -> int:
    """Once what was on its way has arrived (10 quiet windows in a row): the window from which
    the edge should hear nothing loud."""
    await until(lambda: len(edge.rms) >= 10 and not any(r > loud for r in edge.rms[-10:]))
    return len(edge.rms)


Joined = Callable[[], Awaitable[tuple[RunningBot, str, BrowserPeer]]]


@pytest.fixture
async def talking(start_bot: StartBot, peers: Callable[[], BrowserPeer]) -> Joined:
    async def start() -> tuple[RunningBot, str, BrowserPeer]:
        bot = await meta_bot(start_bot, SCENARIO)
        pilot_id = await talk_call(bot)
        peer = peers()
        await join(bot, pilot_id, peer)
        await until(lambda: len(peer.heard) > 0)
        return bot, pilot_id, peer

    return start


async def test_the_operator_and_the_callee_hear_each_other(talking: Joined) -> None:
    bot, pilot_id, peer = await talking()
    edge = edge_of(bot, pilot_id)
    # the operator hears the callee (the edge's tone), through the bot
    await until(lambda: peer.loud_seconds() >= 1.0)
    # silence from the operator's microphone is silence at the callee's end
    await asyncio.sleep(0.3)
    assert not any(r > LOUD for r in edge.rms), max(edge.rms, default=0)
    # the operator speaks: the callee hears it from then on, and only then
    start = len(edge.rms)
    peer.mic.speak()
    heard_at = await first_loud(edge, start)
    assert peer.mic.turned_on_at is not None
    delay = heard_at - peer.mic.turned_on_at
    print(f"\nmouth-to-ear, operator to callee, loopback through the bridge: {delay * 1000:.0f} ms")
    await asyncio.sleep(1.0)
    peer.mic.speak(False)
    stop = len(edge.rms)
    await asyncio.sleep(0.5)
    loud = [i for i, r in enumerate(edge.rms) if r > LOUD]
    assert loud[0] >= start, (loud[:5], start)  # nothing before the operator spoke
    # about what was spoken (a loaded loop may keep the microphone on past the second):
    # most of its 20 ms frames heard, nothing heard that was not spoken
    spoken = peer.mic.sent_loud
    assert 0.7 * spoken <= len(loud) <= spoken + 2, (len(loud), spoken, start, stop)
    assert not [i for i in loud if i > stop + 25], (loud[-5:], stop)  # 500 ms slack
    assert delay < 1.0, delay  # live, not queued (a loose bound; the figure is printed)


async def test_mute_silences_the_far_end(talking: Joined) -> None:
    bot, pilot_id, peer = await talking()
    edge = edge_of(bot, pilot_id)
    peer.mic.speak()
    await first_loud(edge, 0)
    await bot.app.meta_talk.mute(pilot_id, OPERATOR, True)
    muted = await silent_from_now(edge)
    await asyncio.sleep(1.0)
    assert len(edge.rms) - muted >= 25  # the call goes on: the callee gets (silent) audio
    assert not any(r > LOUD for r in edge.rms[muted:])
    await bot.app.meta_talk.mute(pilot_id, OPERATOR, False)
    await first_loud(edge, len(edge.rms))


async def test_the_callee_hanging_up_ends_the_operators_leg(talking: Joined) -> None:
    bot, pilot_id, peer = await talking()
    bot.pilot.emit_status(pilot_id, "COMPLETED")
    await until(peer.ended.is_set)
    await settled(bot)
    await until(lambda: bot.app.meta_talk.talking == 0)


async def test_the_operators_browser_leaving_hangs_up_after_the_grace(talking: Joined) -> None:
    bot, pilot_id, peer = await talking()
    bot.app.meta_talk.grace = 0.5
    await peer.close()  # the Mini App closed: its peer connection goes
    assert await hung_up(bot, pilot_id)
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.status == "COMPLETED"
    await settled(bot)
    await until(lambda: bot.app.meta_talk.talking == 0)


async def test_the_operator_coming_back_within_the_grace_keeps_the_call(
    talking: Joined, peers: Callable[[], BrowserPeer]
) -> None:
    bot, pilot_id, peer = await talking()
    bot.app.meta_talk.grace = 1.0
    await peer.close()
    again = peers()  # the page reloaded: a new offer from the same operator
    await join(bot, pilot_id, again)
    await until(lambda: again.loud_seconds() >= 0.5)
    await asyncio.sleep(1.2)
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.status == "ACCEPTED"
    again.mic.speak()
    await first_loud(edge_of(bot, pilot_id), 0)


async def test_only_the_caller_or_an_admin_may_join(
    start_bot: StartBot, peers: Callable[[], BrowserPeer]
) -> None:
    bot = await meta_bot(start_bot, SCENARIO)
    pilot_id = await talk_call(bot)
    with pytest.raises(NotAllowed) as refused:
        await bot.app.meta_talk.join(pilot_id, 999, await peers().offer())
    assert refused.value.status == 403
    with pytest.raises(NotAllowed) as refused:
        await bot.app.meta_talk.ice_servers(pilot_id, 999)
    assert refused.value.status == 403
    assert bot.app.meta_talk.talking == 0
    # the admin may; then a second operator is refused while one talks
    admin = peers()
    await join(bot, pilot_id, admin, ADMIN)
    await until(lambda: admin.loud_seconds() > 0.2)
    with pytest.raises(TalkRefused) as refused:
        await bot.app.meta_talk.join(pilot_id, OPERATOR, await peers().offer())
    assert refused.value.status == 409
    with pytest.raises(NotAllowed) as refused:
        await bot.app.meta_talk.join("no-such-call", OPERATOR, await peers().offer())
    assert refused.value.status == 403  # as another's call: no probing for call ids


async def test_joining_a_call_that_speaks_a_message_cuts_it_short(
    start_bot: StartBot, espeak: str, peers: Callable[[], BrowserPeer]
) -> None:
    """🎧 Talk on a live call: the message stops, the operator's voice goes on, and the call
    does not end when the message would have."""
    bot = await meta_bot(start_bot, SCENARIO)
    reply = await command(bot, f"/call {PHONE} say: {LONG}")
    pilot_id = pilot_id_of(bot)
    await until(lambda: pilot_id in bot.pilot.edges)
    edge = edge_of(bot, pilot_id)
    await first_loud(edge, 0)  # the message is playing
    peer = peers()
    await join(bot, pilot_id, peer)
    await until(lambda: peer.loud_seconds() > 0.2)
    await asyncio.sleep(0.5)
    joined = len(edge.rms)
    await asyncio.sleep(1.0)
    assert not any(r > LOUD for r in edge.rms[joined:])  # the message stopped
    peer.mic.speak()
    await first_loud(edge, joined)
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.status == "ACCEPTED"
    await bot.app.meta_talk.mute(pilot_id, OPERATOR, True)
    bot.pilot.emit_status(pilot_id, "COMPLETED")
    await shown(bot, reply, ": ended")
    await until(peer.ended.is_set)


# several replicas: the browser's requests land on B, the call's media lives in A


@ON_POSTGRESQL
async def test_a_browser_on_another_replica_talks_through_the_one_holding_the_call(
    replicas: Start, shared_state: dict[str, str], peers: Callable[[], BrowserPeer]
) -> None:
    pair = await replicas(shared_state)
    a, b = pair.a, pair.b
    a.pilot.media = replace(a.pilot.media or SCENARIO, edge_tone_hz=660.0, edge_amplitude=0.3)
    for app in (a.app, b):
        signals = app.meta_talk.signals
        assert signals is not None
        await asyncio.wait_for(signals.subscribed.wait(), WAIT)
    pilot_id = await talk_call(a)
    assert b.voice.open_sessions == 0  # B holds no media
    # another operator's request is refused by B itself: nothing reaches A
    with pytest.raises(NotAllowed) as refused:
        await b.meta_talk.join(pilot_id, 999, await peers().offer())
    assert refused.value.status == 403
    peer = peers()
    answer = await b.meta_talk.join(pilot_id, OPERATOR, await peer.offer())
    await peer.accept(answer)
    assert (a.app.meta_talk.talking, b.meta_talk.talking) == (1, 0)
    await until(lambda: peer.loud_seconds() >= 0.5)  # the callee, heard through A
    edge = edge_of(a, pilot_id)
    peer.mic.speak()
    await first_loud(edge, 0)
    await b.meta_talk.mute(pilot_id, OPERATOR, True)  # the Mute press, through B too
    muted = await silent_from_now(edge)
    await asyncio.sleep(0.6)
    assert not any(r > LOUD for r in edge.rms[muted:])
    a.pilot.emit_status(pilot_id, "COMPLETED")
    await until(peer.ended.is_set)
    await settled(a)


# the Mini App's HTTP signalling


async def test_the_page_s_offer_over_http_is_answered_only_for_good_init_data(
    start_bot: StartBot, peers: Callable[[], BrowserPeer]
) -> None:
    bot = await meta_bot(start_bot, SCENARIO, web_port=0)
    pilot_id = await talk_call(bot)
    url = f"http://127.0.0.1:{bot.app.web_port}/app/api/calls/{pilot_id}/webrtc"
    offer = await peers().offer()
    expired = init_data(TOKEN, OPERATOR, auth_date=time.time() - 7200)
    refusals = {
        "forged": (init_data(TOKEN, OPERATOR, forge=True), 401),
        "expired": (expired, 401),
        "another operator's": (init_data(TOKEN, 999), 403),
    }
    async with httpx.AsyncClient(timeout=WAIT) as http:
        for name, (data, status) in refusals.items():
            header = {"Authorization": f"tma {data}"}
            answer = await http.post(url, json={"sdp": offer}, headers=header)
            assert answer.status_code == status, name
            assert "sdp" not in answer.json()
        assert bot.app.meta_talk.talking == 0  # nothing started
        peer = peers()
        mine = {"Authorization": f"tma {init_data(TOKEN, OPERATOR)}"}
        answer = await http.post(url, json={"sdp": await peer.offer()}, headers=mine)
        assert answer.status_code == 200
        await peer.accept(answer.json()["sdp"])
        await until(lambda: peer.loud_seconds() >= 0.3)
        peer.mic.speak()
        edge = edge_of(bot, pilot_id)
        await first_loud(edge, 0)
        muted = await http.post(f"{url}/mute", json={"muted": True}, headers=mine)
        assert muted.status_code == 200 and muted.json() == {"muted": True}
        since = await silent_from_now(edge)
        await asyncio.sleep(0.5)
        assert not any(r > LOUD for r in edge.rms[since:])
        assert (await http.post(url, json={}, headers=mine)).status_code == 400


async def test_the_turn_credential_goes_only_to_a_page_that_may_join_the_meta_call(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await meta_bot(
        start_bot,
        SCENARIO,
        web_port=0,
        turn_url="turn:turn.example.net:3478",
        turn_username="callbot",
        turn_password="s3cret-turn-pass",
        log_level="DEBUG",
    )
    pilot_id = await talk_call(bot)
    url = f"http://127.0.0.1:{bot.app.web_port}/app/api/calls/{pilot_id}"
    async with httpx.AsyncClient(timeout=WAIT) as http:
        mine = await http.get(url, headers={"Authorization": f"tma {init_data(TOKEN, OPERATOR)}"})
        other = await http.get(url, headers={"Authorization": f"tma {init_data(TOKEN, 999)}"})
    assert mine.status_code == 200
    assert mine.json()["ice_servers"] == [
        {
            "urls": ["turn:turn.example.net:3478"],
            "username": "callbot",
            "credential": "s3cret-turn-pass",
        }
    ]
    assert other.status_code == 403 and "s3cret-turn-pass" not in other.text
    bot.pilot.emit_status(pilot_id, "COMPLETED")
    await settled(bot)
    async with httpx.AsyncClient(timeout=WAIT) as http:
        ended = await http.get(url, headers={"Authorization": f"tma {init_data(TOKEN, OPERATOR)}"})
    assert ended.json()["ice_servers"] == []  # nothing to join any more
    assert "s3cret-turn-pass" not in caplog.text
    assert "s3cret-turn-pass" not in repr(bot.app.settings) + repr(bot.app.meta_talk.__dict__)


def test_turn_url_needs_a_username_and_password_and_a_turn_scheme() -> None:
    base = {"_env_file": None, "bot_token": TOKEN, "pilot_status_api_key": "k", "admin_ids": "1"}
    creds = {"turn_username": "u", "turn_password": "p"}
    with pytest.raises(ConfigError) as missing:
        load_settings(**base, turn_url="turn:turn.example.net:3478")
    assert "TURN_PASSWORD: TURN_URL needs TURN_USERNAME and TURN_PASSWORD" in str(missing.value)
    with pytest.raises(ConfigError) as scheme:
        load_settings(**base, turn_url="https://turn.example.net", **creds)
    assert "TURN_URL: not a TURN URL" in str(scheme.value)
    good = load_settings(**base, turn_url="turns:turn.example.net:5349?transport=tcp", **creds)
    assert good.turn_url == "turns:turn.example.net:5349?transport=tcp"


async def test_call_talk_on_a_meta_number_plays_nothing_and_waits_for_the_operator(
    start_bot: StartBot, espeak: str, peers: Callable[[], BrowserPeer]
) -> None:
    bot = await meta_bot(start_bot, SCENARIO, public_base_url="https://bot.example.com")
    reply = await command(bot, f"/call {PHONE} talk")
    assert ": started" in reply.plain
    pilot_id = pilot_id_of(bot)
    await shown(bot, reply, ": answered")
    edge = edge_of(bot, pilot_id)
    await until(lambda: len(edge.rms) >= 75)  # 1.5 s of the call: no message, no beeps
    assert not any(r > LOUD for r in edge.rms)
    peer = peers()
    await join(bot, pilot_id, peer)
    peer.mic.speak()
    await first_loud(edge, 0)
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None and record.status == "ACCEPTED"
