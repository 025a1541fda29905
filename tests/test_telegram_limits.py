"""Telegram's send limits: a burst into one group is paced, not refused, also across replicas.

The fake Telegram enforces the limits (429 with retry_after past them, recorded); the bot waits
for a slot before each send. So the tests take seconds, the group window is 20 messages per
2 s instead of per minute, on both sides; the other windows are Telegram's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond

from bot.telegram.pacing import SendLimits
from tests.conftest import RunningBot, StartBot
from tests.fakes.telegram import FakeTelegram, Window
from tests.redis_fixtures import OwnRedis

GROUP = -100710
TOKEN = "infra-" + "k" * 30
HOOK = "p" * 32
ALERTS = 40
GROUP_WINDOW = Window(20, 2.0)
PACED = SendLimits(
    overall=RateLimitItemPerSecond(30),
    group=RateLimitItemPerSecond(GROUP_WINDOW.count, int(GROUP_WINDOW.seconds)),
    chat=RateLimitItemPerSecond(1),
)
LIMITS_ON = {
    "telegram_sends_per_second": 30,
    "telegram_group_sends_per_minute": 20,
    "telegram_chat_sends_per_second": 1,
}


async def team_bot(start_bot: StartBot, tmp_path: Path, **overrides: Any) -> RunningBot:
    """A bot whose team `infra` posts into GROUP, with Telegram's limits on (window scaled)."""
    config = tmp_path / "oncall.toml"
    config.write_text(
        f'[contacts]\nalice = "+5511999990001"\n\n[teams.infra]\nchat_id = {GROUP}\n'
        f'token = "{TOKEN}"\nmembers = ["alice"]\n'
    )
    bot = await start_bot(
        oncall_file=str(config),
        oncall_tick_seconds=0,
        pilot_status_webhook_token=HOOK,
        pilot_status_number_type="web",
        oncall_posts_per_minute=0,  # every alert its own post: the pacing is what is tested
        **(LIMITS_ON | overrides),
    )
    bot.app.pacer.limits = PACED
    return bot


async def alerts(bot: RunningBot, keys: range) -> None:
    """One alert per key to team infra, all at once; each is accepted."""
    url = f"http://127.0.0.1:{bot.app.web_port}/alerts/generic/infra"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        answers = await asyncio.gather(
            *(
                client.post(url, json={"title": f"disk {key} full", "dedupKey": f"disk-{key}"})
                for key in keys
            )
        )
    assert [a.status_code for a in answers] == [200] * len(keys), [a.text for a in answers]


def enforce(telegram: FakeTelegram) -> None:
    telegram.enforce_limits(overall=Window(30, 1.0), group=GROUP_WINDOW, private=Window(1, 1.0))


async def posts(telegram: FakeTelegram, count: int) -> list[str]:
    """The first lines of the posts into GROUP, once there are `count` (or 20 s have passed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(sent := [m for m in telegram.sent if m.chat_id == GROUP]) < count:
        if loop.time() > deadline:
            break
        with contextlib.suppress(AssertionError):  # nothing new yet
            await telegram.wait_for_message(chat_id=GROUP, after=telegram.mark(), timeout=1)
    return sorted(m.plain.splitlines()[0] for m in sent)


def titles(keys: range) -> list[str]:
    return sorted(f"🚨 disk {key} full" for key in keys)


async def test_forty_alerts_into_one_group_are_paced_not_refused(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path
) -> None:
    enforce(telegram)
    bot = await team_bot(start_bot, tmp_path)
    await alerts(bot, range(ALERTS))
    assert await posts(telegram, ALERTS) == titles(range(ALERTS))
    assert telegram.flood_refusals == []


async def test_two_replicas_sharing_redis_share_one_budget(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path, shared_state: dict[str, str]
) -> None:
    enforce(telegram)
    first = await team_bot(start_bot, tmp_path, **shared_state)
    second = await team_bot(start_bot, tmp_path, **shared_state)
    half = ALERTS // 2
    await asyncio.gather(alerts(first, range(half)), alerts(second, range(half, ALERTS)))
    assert await posts(telegram, ALERTS) == titles(range(ALERTS))
    assert telegram.flood_refusals == []


async def test_two_replicas_without_redis_each_spend_the_whole_budget(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path
) -> None:
    """The same burst without REDIS_URL: each replica paces only itself, Telegram refuses."""
    enforce(telegram)
    first = await team_bot(start_bot, tmp_path)
    second = await team_bot(start_bot, tmp_path)
    half = ALERTS // 2
    await asyncio.gather(alerts(first, range(half)), alerts(second, range(half, ALERTS)))
    assert await posts(telegram, ALERTS) == titles(range(ALERTS))  # retried after the 429s
    assert telegram.flood_refusals
    assert {scope for _, _, scope in telegram.flood_refusals} == {f"group {GROUP}"}


async def test_a_wait_is_bounded_then_the_send_goes_out_and_a_429_is_honoured(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path
) -> None:
    """A bot that believes in 5 messages a minute, bounded to 0.1 s of waiting, against a
    Telegram that allows 10 per 2 s: past the bound it sends anyway, waits out the 429s, and
    every alert is posted all the same."""
    telegram.enforce_limits(overall=None, group=Window(10, 2.0), private=None)
    bot = await team_bot(start_bot, tmp_path)
    bot.app.pacer.limits = SendLimits(overall=None, group=RateLimitItemPerMinute(5), chat=None)
    bot.app.pacer.max_wait = 0.1
    await alerts(bot, range(ALERTS // 2))
    assert await posts(telegram, ALERTS // 2) == titles(range(ALERTS // 2))
    assert telegram.flood_refusals


async def test_sends_go_out_unpaced_while_redis_is_down(
    start_bot: StartBot, telegram: FakeTelegram, tmp_path: Path, own_redis: OwnRedis
) -> None:
    bot = await team_bot(start_bot, tmp_path, redis_url=own_redis.url)
    own_redis.stop()
    await alerts(bot, range(3))
    assert await posts(telegram, 3) == titles(range(3))
