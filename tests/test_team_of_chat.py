"""The team of a chat, asked on every `/call` in it (only its members may be called there)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.storage.db import sessionmaker
from bot.storage.oncall import OnCallStore

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CHAT = -1001


async def test_a_chat_s_team_is_read_whole_and_as_it_is_now(engine: AsyncEngine) -> None:
    store = OnCallStore(sessionmaker(engine))
    assert await store.team_of_chat(CHAT) is None
    layers = [{"rotation": "weekly", "members": ["ana"]}]
    saved = await store.save_team(
        "infra", chat_id=CHAT, token_hash="h", at=AT, members=["ana", "bo"], layers=layers
    )
    await store.save_team("ops", chat_id=CHAT, token_hash=None, at=AT)  # a later team, same chat

    found = await store.team_of_chat(CHAT)
    assert found == saved  # the oldest team of the chat, every field as save_team gave it
    assert found is not None and found.rotation_start == AT and found.layers == tuple(layers)

    # not cached: a team moved away (here, or by another replica) is seen at the next /call
    await store.save_team("infra", chat_id=-2002, token_hash="h", at=AT)
    moved = await store.team_of_chat(CHAT)
    assert moved is not None and moved.name == "ops"
