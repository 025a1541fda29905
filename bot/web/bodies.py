"""Reading request bodies with a limit, and short refusals: shared by every route."""

from __future__ import annotations

import json

from aiohttp import web

BODY = web.RequestKey("body", bytes)  # the raw body, once read (for the error middleware)


def refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason[:300]}, status=status)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` (header or stream)."""
    too_large = web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=request.content_length or limit + 1,
        text=json.dumps({"error": f"body over {limit} bytes"}),
        content_type="application/json",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    request[BODY] = raw = bytes(body)
    return raw


def parse_json(raw: bytes) -> object:
    """The parsed body; ValueError with a short reason when it is not JSON we can hold."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("body is nested too deeply") from None
    except ValueError:  # UnicodeDecodeError too; also integers too long to convert
        raise ValueError("body is not JSON") from None
