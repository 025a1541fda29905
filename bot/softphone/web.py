"""The Mini App softphone on the bot's web app: the page at `/app/` and its JSON API.

- `GET /app/` and `/app/<file>`: the static Mini App (bot/softphone/static/).
- `GET /app/api/calls/{id}`: the call as the page shows it (callee masked as in its chat,
  status, kind `realtime` for web numbers or `webrtc` for Meta numbers, `ice_servers`).
- `POST /app/api/calls/{id}/hangup`: hangs the call up, as the chat's button does.
- `GET /app/api/calls/{id}/talk` (WebSocket): web numbers. The first message is
  `{"initData": …}`; once it is checked the bot asks Pilot for `/realtime-session {mode: talk}`,
  connects to the returned socket itself (its token never reaches the browser) and relays
  PCM16 frames both ways as they come. Any replica can serve it: what it needs is in the
  database, and how many talk sockets a call has open is in Redis (bot/softphone/presence.py).

HTTP calls carry `Authorization: tma <initData>`; bad/forged/expired initData is 401, a user who
is neither the call's caller nor an admin 403 (bot/softphone/auth.py), and nothing is started.
Closing the page (or losing it) hangs up after `close_grace` seconds unless a talk socket for
the call is open again by then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot.access import AccessPolicy, Role
from bot.calls.service import CallService
from bot.errors import CallbotError, NotAllowed, describe
from bot.phones import mask
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.errors import PilotStatusError
from bot.softphone.auth import InitDataCheck, MiniAppUser, require_joiner
from bot.softphone.presence import LocalPresence, Presence
from bot.storage.store import CallRecord

log = logging.getLogger(__name__)
STATIC = Path(str(resources.files("bot.softphone") / "static"))
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds for the page to send its initData on the talk socket
WATCH_INTERVAL = 1.0  # how often a talk relay looks whether the call ended (any replica's news)
MAX_FRAME = 64 * 1024  # bytes of one PCM16 frame from the page (20 ms at 48 kHz is 1,920)
KINDS = {"web": "realtime", "meta": "webrtc"}
# close codes of the talk socket (4000-4999 are the application's)
CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN, CLOSE_ENDED, CLOSE_UNAVAILABLE = 4401, 4403, 4000, 4503


@dataclass
class Softphone:
    check: InitDataCheck
    access: AccessPolicy
    calls: CallService
    pilot: PilotStatusClient
    sample_rate: int
    presence: Presence = field(default_factory=LocalPresence)
    close_grace: float = 10.0  # seconds between the page closing and the hang-up
    # STUN/TURN for the page's own WebRTC leg (Meta numbers; filled by the Meta path)
    ice_servers: Callable[[MiniAppUser, CallRecord], list[dict[str, Any]]] = field(
        default=lambda _user, _record: []
    )
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def install(self, app: web.Application) -> None:
        app.router.add_get("/app/api/calls/{call}", self._session)
        app.router.add_post("/app/api/calls/{call}/hangup", self._hang_up)
        app.router.add_get("/app/api/calls/{call}/talk", self._talk)
        app.router.add_get("/app", self._index)
        app.router.add_get("/app/", self._index)
        app.router.add_static("/app/", STATIC, append_version=False)
        app.on_shutdown.append(self._shutdown)

    # --- HTTP

    async def _index(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/app":  # the page's relative URLs need the slash
            raise web.HTTPFound(request.rel_url.with_path("/app/"))
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _session(self, request: web.Request) -> web.StreamResponse:
        try:
            user, record, _role = await self._allowed(
                request.headers.get("Authorization"), request.match_info["call"]
            )
        except CallbotError as err:
            return _refusal(err)
        return web.json_response(self.describe(user, record))

    async def _hang_up(self, request: web.Request) -> web.StreamResponse:
        try:
            user, record, role = await self._allowed(
                request.headers.get("Authorization"), request.match_info["call"]
            )
            record = await self.calls.hang_up(
                record.id, actor_id=user.id, is_admin=role is Role.ADMIN
            )
        except (CallbotError, PilotStatusError) as err:
            return _refusal(describe(err))
        log.info("softphone: call %s hung up from the Mini App by %s", record.id, user.id)
        return web.json_response(self.describe(user, record))

    def describe(self, user: MiniAppUser, record: CallRecord) -> dict[str, Any]:
        callee = record.phone_display or ""
        return {
            "id": record.id,
            "callee_masked": mask(callee) if record.masked and callee else callee,
            "status": record.status,
            "ended": record.terminal,
            "kind": KINDS.get(record.number_type, record.number_type),
            "connected_at": record.connected_at.isoformat() if record.connected_at else None,
            "ended_at": record.ended_at.isoformat() if record.ended_at else None,
            "duration_seconds": record.duration_seconds,
            "sample_rate": self.sample_rate,
            "language": user.language,
            "ice_servers": self.ice_servers(user, record),
        }

    async def _allowed(
        self, header_or_init_data: str | None, ref: str, *, raw: bool = False
    ) -> tuple[MiniAppUser, CallRecord, Role]:
        user = (
            self.check.user(header_or_init_data)
            if raw
            else self.check.from_header(header_or_init_data)
        )
        try:
            record = await self.calls.find(ref)
        except CallbotError:
            # the same answer as another operator's call: no probing for call ids
            raise NotAllowed("miniapp_not_your_call", status=403) from None
        role = require_joiner(self.access, user.id, record.operator_id)
        return user, record, role

    # --- the talk socket (web numbers)

    async def _talk(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_FRAME)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=FIRST_MESSAGE_TIMEOUT)
            init_data = _init_data_of(first)
            user, record, _role = await self._allowed(
                init_data, request.match_info["call"], raw=True
            )
        except (TimeoutError, CallbotError) as err:
            refused = err if isinstance(err, CallbotError) else NotAllowed("miniapp_no_init_data")
            await _close(ws, refused)
            return ws
        if record.terminal or record.pilot_call_id is None:
            await _close(ws, CallbotError("call_already_ended"))
            return ws
        if record.number_type != "web":
            await _close(ws, CallbotError("miniapp_not_realtime"))
            return ws
        await self.presence.joined(record.id)
        try:
            await self._relay(ws, user, record)
        finally:
            await self.presence.left(record.id)
            if not ws.closed:
                await ws.close()
            self._spawn(self._hang_up_unless_back(record, user))
        return ws

    async def _relay(
        self, ws: web.WebSocketResponse, user: MiniAppUser, record: CallRecord
    ) -> None:
        assert record.pilot_call_id is not None
        try:
            session = await self.pilot.realtime_session(record.pilot_call_id, "talk")
        except Exception as err:
            log.warning("softphone: no realtime session for %s: %s", record.id, describe(err).code)
            await _close(ws, describe(err), code=CLOSE_UNAVAILABLE)
            return
        timeout = aiohttp.ClientTimeout(total=None, connect=10.0)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.ws_connect(session.url, heartbeat=20.0, max_msg_size=MAX_FRAME) as far,
        ):
            log.info("softphone: %s talks on call %s", user.id, record.id)
            await ws.send_json({"type": "ready", "rate": self.sample_rate})
            legs = [
                asyncio.create_task(_pump(ws, far), name=f"softphone up {record.id}"),
                asyncio.create_task(_pump(far, ws), name=f"softphone down {record.id}"),
                asyncio.create_task(self._until_ended(record.id), name=f"softphone {record.id}"),
            ]
            try:
                await asyncio.wait(legs, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for leg in legs:
                    leg.cancel()
                await asyncio.gather(*legs, return_exceptions=True)
            ended = legs[2].done() and not legs[2].cancelled()
            if ended and not ws.closed:
                await ws.send_json({"type": "ended"})
                await ws.close(code=CLOSE_ENDED, message=b"call ended")

    async def _until_ended(self, call_id: str) -> None:
        """Returns once the call is over, whichever replica heard of it."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            record = await self.calls.find(call_id)
            if record.terminal:
                return

    async def _hang_up_unless_back(self, record: CallRecord, user: MiniAppUser) -> None:
        await asyncio.sleep(self.close_grace)
        if await self.presence.present(record.id):
            return  # the page is back (here or on another replica)
        role = self.access.role(user.id)
        try:
            await self.calls.hang_up(record.id, actor_id=user.id, is_admin=role is Role.ADMIN)
        except CallbotError:
            return  # ended already, or no longer this user's to end
        except PilotStatusError as err:
            log.warning("softphone: call %s not hung up: %s", record.id, describe(err).code)
            return
        log.info("softphone: call %s hung up, its Mini App closed", record.id)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: Socket, sink: Socket) -> None:
    """Binary frames from one socket to the other, as they come, until `source` closes."""
    async for message in source:
        if message.type == aiohttp.WSMsgType.BINARY:
            if sink.closed:
                return
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.ERROR:
            return


def _init_data_of(message: aiohttp.WSMessage) -> str | None:
    if message.type != aiohttp.WSMsgType.TEXT:
        return None
    try:
        body = json.loads(message.data)
    except ValueError:
        return None
    value = body.get("initData") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


async def _close(
    ws: web.WebSocketResponse, error: CallbotError, *, code: int | None = None
) -> None:
    status = error.status if isinstance(error, NotAllowed) else 409
    if code is None:
        code = {401: CLOSE_UNAUTHORIZED, 403: CLOSE_FORBIDDEN}.get(status, CLOSE_ENDED)
    if not ws.closed:
        await ws.send_json({"type": "error", "error": error.code, "status": status})
        await ws.close(code=code, message=error.code.encode()[:120])


def _refusal(error: CallbotError) -> web.Response:
    if isinstance(error, NotAllowed):
        status = error.status
    elif error.code == "call_already_ended":
        status = 409
    else:
        status = 502 if error.code.startswith("api_") else 400
    return web.json_response({"error": error.code}, status=status)
