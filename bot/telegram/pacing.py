"""Pacing: wait for a free slot under Telegram's send limits before each send or edit.

Telegram allows a bot about 30 messages a second overall, 20 a minute into one group and about
one a second into one private chat; past that it answers 429 and the message waits anyway. The
pacer counts every message-sending or editing request in moving windows (the `limits`
library) and makes a request wait until each window it falls in has room, so a burst is spread
instead of refused. With REDIS_URL the windows live in Redis and every replica draws from one
budget; without it they live in this process. A wait is bounded (`max_wait`): past it the
request is sent anyway, and a 429 is still honoured by RetryAfterMiddleware. When Redis fails,
requests go out unpaced rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiogram import Bot
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)
MAX_WAIT = 60.0  # seconds a request waits for a slot, at most; then it is sent anyway
EXPIRE_EVERY = 1.0  # seconds between two passes dropping expired entries (memory windows)
# Methods that put or change a message in a chat: what Telegram's limits count.
# (answerCallbackQuery, getMe, setMyCommands, sendChatAction … are not limited this way.)
PACED = frozenset(
    {
        "sendMessage",
        "sendDocument",
        "sendVoice",
        "sendAudio",
        "sendPhoto",
        "sendVideo",
        "sendVideoNote",
        "sendAnimation",
        "sendSticker",
        "sendMediaGroup",
        "sendLocation",
        "sendVenue",
        "sendContact",
        "sendPoll",
        "sendDice",
        "copyMessage",
        "copyMessages",
        "forwardMessage",
        "forwardMessages",
        "editMessageText",
        "editMessageCaption",
        "editMessageMedia",
        "editMessageReplyMarkup",
        "editMessageLiveLocation",
        "stopPoll",
    }
)


@dataclass(frozen=True)
class SendLimits:
    """The windows a message falls in; None turns one off."""

    overall: RateLimitItem | None  # every chat together
    group: RateLimitItem | None  # one group, supergroup or channel
    chat: RateLimitItem | None  # one private chat

    @classmethod
    def of(cls, *, per_second: int, group_per_minute: int, chat_per_second: int) -> SendLimits:
        return cls(
            overall=RateLimitItemPerSecond(per_second) if per_second else None,
            group=RateLimitItemPerMinute(group_per_minute) if group_per_minute else None,
            chat=RateLimitItemPerSecond(chat_per_second) if chat_per_second else None,
        )

    def windows(self, chat_id: int | str | None) -> list[tuple[RateLimitItem, str]]:
        """(limit, identity) pairs a message to `chat_id` counts in, narrowest first."""
        found: list[tuple[RateLimitItem, str]] = []
        if chat_id is not None:
            # private chats have positive ids; groups and channels negative ids or @names
            private = isinstance(chat_id, int) and chat_id > 0
            item = self.chat if private else self.group
            if item is not None:
                found.append((item, f"{'chat' if private else 'group'}:{chat_id}"))
        if self.overall is not None:
            found.append((self.overall, "all"))
        return found


class WindowsInMemory(MemoryStorage):
    """limits' memory storage, its expired entries dropped at most once a second.

    limits (5.8) starts a pass over every key after each hit, and hands each key's search to a
    thread (asyncio.to_thread): with a window per team chat, hundreds of thread hops per
    Telegram send (bench/README.md, stop 19). A window counts only its entries newer than its
    length, so an entry that lingers a second longer changes no count."""

    def __init__(self) -> None:
        super().__init__()
        self._expired_at = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # limits' private hook
        if (now := time.monotonic()) - self._expired_at >= EXPIRE_EVERY:
            self._expired_at = now
            await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


def build_storage(redis: Redis | None, key_prefix: str) -> Storage:
    """Redis storage on the app's own connection pool, or this process's memory."""
    if redis is None:
        return WindowsInMemory()
    return RedisStorage(
        "async+redis://",
        implementation="redispy",
        key_prefix=key_prefix,
        wrap_exceptions=True,
        connection_pool=redis.connection_pool,
    )


class SendPacer(BaseRequestMiddleware):
    """A request middleware: each paced method waits for a slot in every window it counts in."""

    def __init__(
        self, limits: SendLimits, *, redis: Redis | None = None, key_prefix: str = "callbot:limits"
    ) -> None:
        self.limits = limits
        self.max_wait = MAX_WAIT
        self._redis = redis
        self._key_prefix = key_prefix
        self._limiter: MovingWindowRateLimiter | None = None  # made on first use, on the loop
        self._storage_failing = False

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        if method.__api_method__ in PACED:
            windows = self.limits.windows(getattr(method, "chat_id", None))
            if windows:
                await self.take(windows, method.__api_method__)
        return await make_request(bot, method)

    async def take(self, windows: list[tuple[RateLimitItem, str]], what: str = "send") -> None:
        """Return once a slot is taken in every window, or after `max_wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while True:
            try:
                wait = await self._try_take(windows)
            except StorageError as err:
                if not self._storage_failing:
                    log.warning("send limits unavailable (%s): sending unpaced", err)
                self._storage_failing = True
                return
            self._storage_failing = False
            if wait is None:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning(
                    "%s waited %.0f s for Telegram's send limits; sent", what, self.max_wait
                )
                return
            # a little jitter: waiters of one window do not all try again at the same instant
            await asyncio.sleep(min(remaining, wait + random.uniform(0, 0.05)))

    async def _try_take(self, windows: list[tuple[RateLimitItem, str]]) -> float | None:
        """None when a slot was taken in every window; else the seconds until one may free."""
        limiter = self._limiter
        if limiter is None:
            limiter = self._limiter = MovingWindowRateLimiter(
                build_storage(self._redis, self._key_prefix)
            )
        wait: float | None = None
        for item, identity in windows:  # first see that all have room: no slot is taken in vain
            if not await limiter.test(item, identity):
                stats = await limiter.get_window_stats(item, identity)
                wait = max(wait or 0.0, stats.reset_time - time.time(), 0.01)
        if wait is not None:
            return wait
        for item, identity in windows:
            if not await limiter.hit(item, identity):  # another replica took it meanwhile
                return 0.01
        return None
