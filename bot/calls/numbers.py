"""What the business number is (Meta Cloud API or web), configured or probed once and cached."""

from __future__ import annotations

import asyncio
import logging

from bot.errors import CallbotError
from bot.pilot_status.client import PilotStatusClient
from bot.pilot_status.errors import BadRequestError, ConflictError
from bot.pilot_status.models import NumberType

log = logging.getLogger(__name__)


class NumberTypes:
    """`auto` probes with read-only calls (API.md §3.2) and remembers the answer."""

    def __init__(self, client: PilotStatusClient, configured: str = "auto") -> None:
        self._client = client
        self._known = None if configured == "auto" else NumberType(configured)
        self.detected = configured == "auto"
        self._lock = asyncio.Lock()

    @property
    def known(self) -> NumberType | None:
        return self._known

    async def get(self) -> NumberType:
        if self._known is not None:
            return self._known
        async with self._lock:
            if self._known is None:
                self._known = await self._probe()
                log.info("business number type detected: %s", self._known.value)
            return self._known

    async def _probe(self) -> NumberType:
        # Settings exist only on Meta numbers; web numbers answer FEATURE_NOT_SUPPORTED.
        try:
            await self._client.get_settings()
            return NumberType.META
        except BadRequestError as err:
            if err.code != "FEATURE_NOT_SUPPORTED":
                raise
        # Listing calls works on both; FEATURE_NOT_SUPPORTED here means no calling at all.
        try:
            await self._client.list_calls(limit=1)
        except ConflictError:
            return NumberType.WEB  # a web number that is not connected right now
        except BadRequestError as err:
            if err.code == "FEATURE_NOT_SUPPORTED":
                raise CallbotError("number_unsupported") from err
            raise
        return NumberType.WEB
