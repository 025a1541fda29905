"""The web app's listener: aiohttp parses and answers requests; this module decides how long a
connection may take and how many the bot keeps.

aiohttp already closes a connection idle between requests (`keepalive_timeout`, handed to its
runner) and bounds request lines and headers (`max_line_size`, `max_field_size`, `max_headers`,
kept at their 8 KiB / 128 defaults). It has no deadline for a request's headers or body and no
cap on connections, so a client that opens many connections and sends a request slowly (or
never) holds them as long as it likes. Here, around aiohttp's own protocol:

- a request's headers must be complete within `header_timeout` of its first byte (of the
  connection's opening, for the first request), and its body within `body_timeout` of its headers;
  otherwise the connection is closed;
- at most `max_connections` are open. A new one past the cap closes the connection that has
  waited longest without a request in progress (a slow or idle client); a request being handled
  is never cut. Only when every connection is busy is the newcomer refused. There is no cap per
  client address: behind a reverse proxy or tunnel every client shares one, and evicting the
  longest waiter already stops one client from holding the slots others need.
- a failing `accept()` (out of descriptors) is logged once per interval instead of once per
  attempt by asyncio, and frees a descriptor by closing the longest-waiting idle connection.

aiohttp's `handler_cancellation` stays off: a client that leaves does not cancel a delivery or
an alert being stored.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)
BACKLOG = 128
# What else the process keeps open besides web connections: database, HTTP clients, files.
RESERVED_DESCRIPTORS = 128
# asyncio reports a failing accept() with this message, once per attempt (selector_events.py).
ACCEPT_FAILED = "socket.accept() out of system resource"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_connections: int = 512


class Occasional:
    """A warning logged at once, then at most once per interval with how often it recurred."""

    def __init__(self, message: str, interval: float) -> None:
        self._message = message
        self._interval = interval
        self._count = 0
        self._args: tuple[object, ...] = ()
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, *args: object) -> None:
        self._count += 1
        self._args = args
        if self._timer is None:
            self._report()

    def _report(self) -> None:
        self._timer = None
        if self._count == 0:
            return
        log.warning(
            self._message + " (%d in the last %.0f s)",
            *self._args,
            self._count,
            self._interval,
        )
        self._count = 0
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._report)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with deadlines on what the client owes."""

    def __init__(self, guard: ConnectionGuard, handler: RequestHandler) -> None:
        self.handler = handler
        self.busy = False  # a request's handler is running
        self._guard = guard
        self._limits = guard.limits
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None
        self._next_request_began = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.handler.connection_made(transport)
        self._await_headers()
        self._guard.opened(self)

    def data_received(self, data: bytes) -> None:
        # bytes after a complete body begin the next request (pipelined if one is in progress);
        # before, they are body, read by the app or, once it answered, discarded by aiohttp
        if self._payload is None or self._payload.is_eof():
            if self.busy:
                self._next_request_began = True
            elif self._deadline is None:
                self._await_headers()
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # None: the transport closes once the answer is written

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._transport = None
        self._guard.closed(self)
        self.handler.connection_lost(exc)

    def request_started(self, payload: StreamReader) -> None:
        """The headers are in and aiohttp hands the request to the app."""
        self.busy = True
        self._payload = payload
        self._next_request_began = False
        self._cancel_deadline()
        if not payload.is_eof():
            self._deadline = asyncio.get_running_loop().call_later(
                self._limits.body_timeout, self._body_due, payload
            )

    def request_done(self) -> None:
        self.busy = False
        self._cancel_deadline()
        if self._next_request_began:
            self._await_headers()

    def abort(self, why: str) -> None:
        if self._transport is not None:
            log.debug("web: connection closed: %s", why)
            self._transport.abort()
            self._transport = None

    def _await_headers(self) -> None:
        self._cancel_deadline()
        self._deadline = asyncio.get_running_loop().call_later(
            self._limits.header_timeout, self.abort, "headers too slow"
        )

    def _body_due(self, payload: StreamReader) -> None:
        self._deadline = None
        if not payload.is_eof():
            self.abort("body too slow")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class ConnectionGuard:
    """The protocol factory of the listening socket: aiohttp's, with deadlines and a cap."""

    def __init__(
        self, server: web.Server, limits: ConnectionLimits, *, log_interval: float = 60.0
    ) -> None:
        self.limits = limits
        self._server = server
        # Insertion order is the order connections began to wait (opened, or last answered):
        # the first idle one is the longest waiter.
        self._open: dict[RequestHandler, _Connection] = {}
        self._listener: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self._evicted = Occasional(
            "web: %d connections open (WEB_MAX_CONNECTIONS): closed the longest-waiting idle one",
            log_interval,
        )
        self._refused = Occasional(
            "web: %d connections open (WEB_MAX_CONNECTIONS), all busy: refused a new one",
            log_interval,
        )
        self._accept_failed = Occasional(
            "web: accept() failed (%s); closing idle connections to free descriptors "
            "(raise the open-files limit or lower WEB_MAX_CONNECTIONS)",
            log_interval,
        )
        factory, handle = server.request_factory, server.request_handler

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            connection = self._open.get(protocol)
            if connection is not None:
                connection.request_started(payload)
            return factory(message, payload, protocol, writer, task)

        async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await handle(request)
            except ConnectionResetError:
                if request.transport is not None and not request.transport.is_closing():
                    raise
                # The client left (or was cut for being slow) mid-body: there is nobody to
                # answer, and aiohttp would log a traceback for each such request.
                log.debug("web: client gone during %s %s", request.method, request.path)
                raise web.HTTPRequestTimeout() from None
            finally:
                self._answered(request.protocol)

        # read by each RequestHandler when it is made, so set before the first connection
        server.request_factory = request_factory
        server.request_handler = request_handler

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self, self._server())

    def opened(self, connection: _Connection) -> None:
        if len(self._open) >= self.limits.max_connections:
            if not self._shed():
                self._refused(len(self._open))
                connection.abort("over WEB_MAX_CONNECTIONS, all busy")
                return
            self._evicted(self.limits.max_connections)
        self._open[connection.handler] = connection

    def closed(self, connection: _Connection) -> None:
        self._open.pop(connection.handler, None)

    def _answered(self, handler: RequestHandler) -> None:
        connection = self._open.pop(handler, None)
        if connection is not None:
            connection.request_done()
            self._open[handler] = connection  # waits again, from now

    def _shed(self) -> bool:
        """Close the connection that has waited longest without a request in progress."""
        for handler, connection in self._open.items():
            if not connection.busy:
                del self._open[handler]
                connection.abort("evicted: longest idle at WEB_MAX_CONNECTIONS")
                return True
        return False

    # --- accept() failures: asyncio reports each one to the loop's exception handler

    def watch(self, loop: asyncio.AbstractEventLoop, listener: asyncio.Server) -> None:
        self._loop, self._listener = loop, listener
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if limit != resource.RLIM_INFINITY and limit < self.limits.max_connections + (
            RESERVED_DESCRIPTORS
        ):
            log.warning(
                "the open-files limit (%d) is below WEB_MAX_CONNECTIONS (%d) + %d: accept() "
                "may fail before the cap; raise it (LimitNOFILE=, ulimit -n) or lower the cap",
                limit,
                self.limits.max_connections,
                RESERVED_DESCRIPTORS,
            )

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if context.get("message") == ACCEPT_FAILED and self._ours(context.get("socket")):
            # asyncio has stopped accepting for a second (ACCEPT_RETRY_DELAY): it does not spin
            self._accept_failed(error.strerror if isinstance(error, OSError) else error)
            self._shed()
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def _ours(self, sock: object) -> bool:
        fileno: Callable[[], int] | None = getattr(sock, "fileno", None)
        sockets = self._listener.sockets if self._listener is not None else ()
        return fileno is not None and any(fileno() == s.fileno() for s in sockets)

    def stop(self) -> None:
        if self._loop is not None and self._loop.get_exception_handler() == self._loop_error:
            self._loop.set_exception_handler(self._previous_handler)
        self._loop = None
        for report in (self._evicted, self._refused, self._accept_failed):
            report.stop()


class WebServer:
    """The aiohttp app on a TCP port, behind a ConnectionGuard."""

    def __init__(self, app: web.Application, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=limits.keepalive_timeout
        )
        self._guard: ConnectionGuard | None = None
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with 0). OSError if the address cannot be bound."""
        await self._runner.setup()
        assert self._runner.server is not None
        self._guard = ConnectionGuard(self._runner.server, self.limits)
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(self._guard, host, port, backlog=BACKLOG)
        except OSError:
            await self._runner.cleanup()
            raise
        self._guard.watch(loop, self._listener)
        bound: int = self._listener.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()  # lets requests in progress finish, closes the rest
        if self._guard is not None:
            self._guard.stop()
        if self._listener is not None:
            await self._listener.wait_closed()
