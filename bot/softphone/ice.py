"""The ICE servers of the softphone's browser leg: STUN_SERVERS, plus TURN_URL when the
operator's network needs a relay. The bot's browser-leg peer and the page use the same list; the
TURN credential is handed only to a browser that may join that Meta call (it needs it for its
own leg), and never logged (its repr hides it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from bot.config import Settings


class IceServer(BaseModel):
    """One entry of RTCConfiguration.iceServers, as the browser's API spells it."""

    model_config = ConfigDict(frozen=True)

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = Field(default=None, repr=False)


def ice_servers(settings: Settings) -> tuple[IceServer, ...]:
    servers = [IceServer(urls=(url,)) for url in settings.stun_servers]
    if settings.turn_url is not None:
        password = settings.turn_password
        servers.append(
            IceServer(
                urls=(settings.turn_url,),
                username=settings.turn_username,
                credential=password.get_secret_value() if password is not None else None,
            )
        )
    return tuple(servers)
