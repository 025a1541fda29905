"""The Mini App's signalling for Meta numbers, on the bot's web app.

- `POST /app/api/calls/{id}/webrtc` `{sdp}` → `{type: "answer", sdp}`: the page's offer (every
  candidate gathered: there is no trickle endpoint) and the bot's answer for the browser leg.
- `POST /app/api/calls/{id}/webrtc/mute` `{muted}`: stop (or start again) forwarding the
  operator's microphone to the callee.

Both carry `Authorization: tma <initData>` (bot.softphone.auth): bad, forged or expired initData
is 401, a user who may not join that call 403, a call that cannot take a browser now 409; nothing
is started before the checks pass. Any replica answers: bot.softphone.meta forwards the request
to the one holding the call's media.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.errors import NotAllowed, TalkRefused
from bot.softphone.auth import InitDataCheck
from bot.softphone.meta import MetaTalk
from bot.web.bodies import refuse

log = logging.getLogger(__name__)
MAX_SDP = 32 * 1024  # a browser's audio offer is a few KiB


class OfferBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sdp: str = Field(min_length=1, max_length=MAX_SDP)


class MuteBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    muted: bool


Body = TypeVar("Body", bound=BaseModel)


def install_webrtc(app: web.Application, check: InitDataCheck, talk: MetaTalk) -> None:
    async def offer(user_id: int, call: str, body: OfferBody) -> dict[str, object]:
        return {"type": "answer", "sdp": await talk.join(call, user_id, body.sdp)}

    async def mute(user_id: int, call: str, body: MuteBody) -> dict[str, object]:
        await talk.mute(call, user_id, body.muted)
        return {"muted": body.muted}

    app.router.add_post("/app/api/calls/{call}/webrtc", _endpoint(check, OfferBody, offer))
    app.router.add_post("/app/api/calls/{call}/webrtc/mute", _endpoint(check, MuteBody, mute))


def _endpoint(
    check: InitDataCheck,
    body_type: type[Body],
    act: Callable[[int, str, Body], Awaitable[dict[str, object]]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A JSON endpoint: initData checked first, then the body, then `act`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            user = check.from_header(request.headers.get("Authorization"))
            body = body_type.model_validate_json(await request.read())
            result = await act(user.id, request.match_info["call"], body)
        except NotAllowed as err:
            return refuse(err.status, err.code)
        except TalkRefused as err:
            return refuse(err.status, err.reason)
        except ValidationError as err:
            return refuse(400, f"bad body: {err.errors()[0]['msg']}"[:200])
        return web.json_response(result)

    return handle
