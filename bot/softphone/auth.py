"""Who sent a Mini App request, and whether they may act on the call.

Every request of the Mini App carries Telegram's `initData` (`Authorization: tma <initData>`;
the talk WebSocket carries it in its first message). aiogram checks its HMAC with the bot token
(`safe_parse_webapp_init_data`) but not its age, so `auth_date` is checked here against
`MINIAPP_INIT_DATA_MAX_AGE`: a copied initData stops working after that. Bad, forged or expired
initData is 401; a valid user who is neither the call's caller nor an admin is 403. Nothing is
started before both checks pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiogram.utils.web_app import WebAppInitData, safe_parse_webapp_init_data

from bot.access import AccessPolicy, Role
from bot.errors import NotAllowed

SCHEME = "tma"
# A client clock a little ahead of ours is not a forgery.
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class MiniAppUser:
    id: int
    language: str  # "en" or "pt_BR", from initData's language_code
    start_param: str | None = None  # the direct link's `startapp` (groups)


class InitDataCheck:
    """Turns initData into the Telegram user who opened the Mini App, or raises NotAllowed."""

    def __init__(
        self, bot_token: str, max_age: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._token = bot_token
        self._max_age = max_age
        self._clock = clock

    def user(self, init_data: str | None) -> MiniAppUser:
        if not init_data:
            raise NotAllowed("miniapp_no_init_data")
        try:
            data: WebAppInitData = safe_parse_webapp_init_data(self._token, init_data)
        except ValueError:  # bad signature, or not initData at all
            raise NotAllowed("miniapp_bad_init_data") from None
        age = self._clock() - data.auth_date.timestamp()
        if age > self._max_age or age < -CLOCK_SKEW:
            raise NotAllowed("miniapp_init_data_expired")
        if data.user is None:
            raise NotAllowed("miniapp_bad_init_data")
        return MiniAppUser(
            id=data.user.id,
            language=language(data.user.language_code),
            start_param=data.start_param,
        )

    def from_header(self, header: str | None) -> MiniAppUser:
        """The user of an `Authorization: tma <initData>` header."""
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != SCHEME:
            raise NotAllowed("miniapp_no_init_data")
        return self.user(value.strip())


def require_joiner(policy: AccessPolicy, user_id: int, caller_id: int) -> Role:
    """Only the call's caller, or an admin, may join it, hear it or hang it up (403)."""
    role = policy.role(user_id)
    if role is Role.ADMIN or (role is not None and user_id == caller_id):
        return role
    raise NotAllowed("miniapp_not_your_call", status=403)


def language(code: str | None) -> str:
    """The bot's locale for a Telegram language_code (pt, pt-br → pt_BR; anything else en)."""
    return "pt_BR" if (code or "").lower().replace("_", "-").split("-")[0] == "pt" else "en"
