"""Following calls to their end over the loopback fakes: webhooks, polling, hang-up, history."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
from pathlib import Path
from typing import Any

import httpx

from bot.storage.db import create_engine, database_url, sessionmaker
from bot.storage.store import Store
from tests.conftest import ADMIN, OPERATOR, STRANGER, RunningBot, StartBot
from tests.fakes.pilot_status import RecordedRequest
from tests.fakes.telegram import SentMessage

PHONE = "+5511999999999"
TOKEN = "t" * 32
SECRET = "whsec-test"


async def command(bot: RunningBot, text: str, **kwargs: Any) -> SentMessage:
    mark = bot.telegram.mark()
    kwargs.setdefault("user_id", OPERATOR)
    chat_id = kwargs.get("chat_id") or kwargs["user_id"]
    bot.telegram.send_command(text, **kwargs)
    return await bot.telegram.wait_for_message(
        lambda m: not m.method.startswith("edit"), chat_id=chat_id, after=mark
    )


async def start_call(bot: RunningBot, phone: str = PHONE) -> tuple[SentMessage, str]:
    reply = await command(bot, f"/call {phone} db down")
    call_id = bot.pilot.calls_started()[-1]
    pilot_id = next(
        c["id"]
        for c in reversed(bot.pilot.calls.values())
        if c["bizOpaqueCallbackData"] == call_id.json["bizOpaqueCallbackData"]
    )
    return reply, pilot_id


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def deliver(
    bot: RunningBot,
    payload: Any,
    *,
    key: str | None = None,
    secret: str | None = SECRET,
    raw: bytes | None = None,
    signature: str | None = None,
) -> httpx.Response:
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    if signature is not None:
        headers["x-pilot-status-signature"] = signature
    elif secret:
        headers["x-pilot-status-signature"] = sign(body, secret)
    url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{TOKEN}"
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=body, headers=headers)


def event(name: str, pilot_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "event": name,
        "callId": pilot_id,
        "direction": "OUTBOUND",
        "from": "5511888888888",
        "to": PHONE[1:],
        "timestamp": "2026-11-27T10:00:00.000Z",
    } | fields


async def webhook_bot(start_bot: StartBot, **overrides: Any) -> RunningBot:
    overrides.setdefault("pilot_status_webhook_secret", SECRET)
    overrides.setdefault("pilot_status_number_type", "web")
    return await start_bot(pilot_status_webhook_token=TOKEN, web_port=0, **overrides)


async def shown(bot: RunningBot, reply: SentMessage, text: str) -> SentMessage:
    return await bot.telegram.wait_for_message(
        lambda m: m.message_id == reply.message_id and text in m.plain, chat_id=reply.chat_id
    )


async def history(bot: RunningBot, pilot_id: str) -> list[str]:
    record = await bot.app.store.get_call(pilot_id)
    assert record is not None
    return [h.status for h in record.history]


async def test_call_message_follows_webhooks_to_the_end(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    assert "Hang up" in reply.buttons()[0][0]
    for name, label in (("call.ringing", "ringing"), ("call.connected", "answered")):
        status = {"call.ringing": "RINGING", "call.connected": "ACCEPTED"}[name]
        assert (await deliver(bot, event(name, pilot_id, status=status))).status_code == 200
        await shown(bot, reply, f": {label}")
    ended = event("call.ended", pilot_id, status="COMPLETED", duration=125)
    assert (await deliver(bot, ended)).status_code == 200
    final = await shown(bot, reply, ": ended")
    assert "Duration: 2:05" in final.plain and final.buttons() == []
    assert await history(bot, pilot_id) == [
        "PENDING",
        "INITIATED",
        "RINGING",
        "ACCEPTED",
        "COMPLETED",
    ]
    assert [r.operation for r in bot.pilot.requests if r.operation == "get_call"] == []


async def test_signature_is_required_when_a_secret_is_set(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    payload = event("call.ringing", pilot_id, status="RINGING")
    assert (await deliver(bot, payload, secret=None)).status_code == 401
    assert (await deliver(bot, payload, signature="00" * 32)).status_code == 401
    assert (await deliver(bot, payload, secret="other-secret")).status_code == 401
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
    assert (await deliver(bot, payload)).status_code == 200
    await shown(bot, reply, ": ringing")


async def test_unsigned_deliveries_are_taken_when_no_secret_is_set(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot, pilot_status_webhook_secret=None)
    reply, pilot_id = await start_call(bot)
    response = await deliver(bot, event("call.ringing", pilot_id, status="ringing"), secret=None)
    assert response.status_code == 200
    await shown(bot, reply, ": ringing")


async def test_wrong_path_token_is_not_found(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    async with httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{bot.app.web_port}/pilot-status/{'x' * 32}"
        assert (await client.post(url, content=b"{}")).status_code == 404
        health = await client.get(f"http://127.0.0.1:{bot.app.web_port}/healthz")
        assert health.json() == {"ok": True}


async def test_a_replayed_delivery_is_applied_once(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    _, pilot_id = await start_call(bot)
    payload = event("call.ended", pilot_id, status="COMPLETED", duration=10)
    first = await deliver(bot, payload, key="evt-1")
    again = await deliver(bot, payload, key="evt-1")
    assert first.json().get("duplicate") is None and again.json()["duplicate"] is True
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED", "COMPLETED"]


async def test_bad_bodies_are_refused_without_a_state_change(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot, webhook_max_body=2048)
    reply, pilot_id = await start_call(bot)
    big = json.dumps(event("call.ringing", pilot_id, pad="x" * 4096)).encode()
    assert (await deliver(bot, None, raw=big)).status_code == 413
    assert (await deliver(bot, None, raw=b"{not json")).status_code == 400
    assert (await deliver(bot, None, raw=b"[1, 2]")).status_code == 400
    assert (await deliver(bot, {"callId": pilot_id})).status_code == 400
    assert (
        await deliver(bot, {"event": "call.ended", "callId": 5, "duration": "x"})
    ).status_code == 400
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED"]
    assert bot.telegram.message(reply.chat_id, reply.message_id).text == reply.text


async def test_events_for_unknown_calls_change_nothing(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    edits = len(bot.telegram.edits)
    response = await deliver(bot, event("call.ended", "call_nobody", status="COMPLETED"))
    assert response.status_code == 200
    await asyncio.sleep(0.2)
    assert len(bot.telegram.edits) == edits


async def test_out_of_order_events_never_undo_an_ended_call(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    await deliver(bot, event("call.ended", pilot_id, status="COMPLETED", durationSeconds=42))
    await shown(bot, reply, ": ended")
    await deliver(bot, event("call.connected", pilot_id, status="ACCEPTED"))
    await deliver(bot, event("call.ringing", pilot_id, status="RINGING"))
    await asyncio.sleep(0.2)
    final = bot.telegram.message(reply.chat_id, reply.message_id)
    assert ": ended" in final.plain and "Duration: 0:42" in final.plain
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED", "COMPLETED"]


async def test_meta_raw_calls_envelope_is_understood(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    external = bot.pilot.calls[pilot_id]["externalCallId"]
    envelope = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "calls",
                        "value": {
                            "calls": [
                                {
                                    "id": external,
                                    "event": "terminate",
                                    "status": "FAILED",
                                    "timestamp": "1764237600",
                                }
                            ]
                        },
                    }
                ],
            }
        ],
    }
    assert (await deliver(bot, envelope)).status_code == 200
    await shown(bot, reply, ": failed")


async def test_without_webhooks_the_call_is_polled_until_it_ends(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    reply, pilot_id = await start_call(bot)
    bot.pilot.emit_status(pilot_id, "RINGING")
    await shown(bot, reply, ": ringing")
    bot.pilot.emit_status(pilot_id, "ACCEPTED")
    await shown(bot, reply, ": answered")
    bot.pilot.emit_status(pilot_id, "COMPLETED", durationSeconds=61)
    final = await shown(bot, reply, ": ended")
    assert "Duration: 1:01" in final.plain
    polls = len([r for r in bot.pilot.requests if r.operation == "get_call"])
    await asyncio.sleep(0.5)
    assert len([r for r in bot.pilot.requests if r.operation == "get_call"]) == polls


async def test_hang_up_button_works_for_the_caller_and_refuses_a_stranger(
    start_bot: StartBot,
) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    [(_, data)] = reply.buttons()
    _, stranger = bot.telegram.press_button(
        user_id=STRANGER, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    answer = await bot.telegram.wait_for_callback_answer(stranger)
    assert answer["show_alert"] and "not allowed" in answer["text"]
    assert [r for r in bot.pilot.requests if r.operation == "terminate"] == []
    _, mine = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    await bot.telegram.wait_for_callback_answer(mine)
    final = await shown(bot, reply, ": ended")
    assert final.buttons() == []
    [terminate] = [r for r in bot.pilot.requests if r.operation == "terminate"]
    assert terminate.path == f"/v1/calls/{pilot_id}/terminate"


async def test_only_the_caller_or_an_admin_may_hang_up(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web", operator_ids=f"{OPERATOR},444")
    _, pilot_id = await start_call(bot)
    refusal = await command(bot, f"/hangup {pilot_id}", user_id=444)
    assert "Only the operator who started this call" in refusal.plain
    done = await command(bot, f"/hangup {pilot_id}", user_id=ADMIN)
    assert ": ended" in done.plain
    again = await command(bot, f"/hangup {pilot_id}", user_id=ADMIN)
    assert "already ended" in again.plain
    assert len([r for r in bot.pilot.requests if r.operation == "terminate"]) == 1


async def test_status_gives_the_fresh_state_from_the_api(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot)
    reply, pilot_id = await start_call(bot)
    bot.pilot.emit_status(pilot_id, "ACCEPTED")
    status = await command(bot, f"/status {pilot_id}")
    assert ": answered" in status.plain
    bot.pilot.emit_status(pilot_id, "COMPLETED", durationSeconds=5)
    status = await command(bot, "/status", reply_to_message_id=reply.message_id)
    assert ": ended" in status.plain and "Duration: 0:05" in status.plain
    unknown = await command(bot, "/status call_nope")
    assert "I know no call" in unknown.plain
    usage = await command(bot, "/status")
    assert "Usage" in usage.plain


async def test_calls_lists_the_chats_calls_newest_first_in_pages(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    phones = [f"+55119999900{i:02}" for i in range(7)]
    for phone in phones:
        await start_call(bot, phone)
    await command(bot, f"/call {PHONE}", user_id=ADMIN)  # another chat: not listed
    page = await command(bot, "/calls 3")
    assert "Calls 1-3 of 7" in page.plain
    assert page.plain.index("0006") < page.plain.index("0005") < page.plain.index("0004")
    [(label, data)] = page.buttons()
    assert "Older" in label
    _, query = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=page.message_id, data=data
    )
    await bot.telegram.wait_for_callback_answer(query)
    second = await bot.telegram.wait_for_message(
        lambda m: "Calls 4-6 of 7" in m.plain, chat_id=OPERATOR
    )
    assert second.message_id == page.message_id
    assert [label for label, _ in second.buttons()] == ["◀️ Newer", "Older ▶️"]


async def test_permission_command_explains_the_probe(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    web = await command(bot, f"/permission {PHONE}")
    assert "no permission is needed" in web.plain


async def test_permission_command_on_meta_shows_status_and_limits(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    bot.pilot.set_permission(PHONE, "temporary", usage=1, max_allowed=5)
    reply = await command(bot, f"/permission {PHONE}")
    assert "temporary permission" in reply.plain
    assert "Calls: allowed now" in reply.plain and "1 of 5 used per 24 h" in reply.plain


async def test_granted_permission_tells_the_chat_with_call_now(start_bot: StartBot) -> None:
    bot = await webhook_bot(start_bot, pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    reply = await command(bot, f"/call {PHONE}")
    [(_, data)] = reply.buttons()
    bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    await shown(bot, reply, "Permission request sent")
    update = {
        "event": "call.permission_updated",
        "callId": None,
        "direction": None,
        "status": "TEMPORARY",
        "from": "5511888888888",
        "to": PHONE[1:],
        "timestamp": "2026-11-27T10:00:00.000Z",
    }
    mark = bot.telegram.mark()
    assert (await deliver(bot, update)).status_code == 200
    told = await bot.telegram.wait_for_message(chat_id=OPERATOR, after=mark)
    assert "now allows WhatsApp calls" in told.plain
    [(label, call_now)] = told.buttons()
    assert "Call now" in label
    bot.pilot.set_permission(PHONE, "temporary")
    bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=told.message_id, data=call_now
    )
    await shown(bot, told, ": started")
    [post] = bot.pilot.calls_started()
    assert post.json["to"] == PHONE and "a=setup:active" in post.json["sdp"]


async def test_export_gives_admins_the_audit_as_csv(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    await start_call(bot)
    refused = await command(bot, "/export")
    assert "Only admins" in refused.plain
    document = await command(bot, "/export 7", user_id=ADMIN)
    assert document.document is not None
    name, content = document.document
    assert name.endswith("7d.csv")
    rows = list(csv.DictReader(io.StringIO(content.decode())))
    actions = [row["action"] for row in rows]
    assert actions[:2] == ["call.requested", "call.started"]
    assert rows[0]["actor_id"] == str(OPERATOR)
    assert PHONE not in content.decode() and "9****-9999" in content.decode()


async def die_while_posting(
    start_bot: StartBot, data_dir: Path, text: str
) -> tuple[RunningBot, RecordedRequest]:
    """Start a bot, send /call, and kill it once the API got the POST but before it answers."""
    slow = {"id": "call_never", "status": "INITIATED"}
    first = await start_bot(pilot_status_number_type="web", data_dir=str(data_dir))
    first.pilot.script("start_call", status=201, body=slow, delay=30, times=1)
    first.telegram.send_command(text, user_id=OPERATOR)
    for _ in range(100):
        if first.pilot.calls_started():
            break
        await asyncio.sleep(0.02)
    [post] = first.pilot.calls_started()
    return first, post


async def test_a_crash_between_post_and_reply_is_settled_on_the_next_start(
    start_bot: StartBot, tmp_path: Path
) -> None:
    first, post = await die_while_posting(start_bot, tmp_path, f"/call {PHONE} crash test")
    tag = post.json["bizOpaqueCallbackData"]
    # The API did create the call; our process dies before its answer arrives.
    created = first.pilot.add_call(
        PHONE, direction="OUTBOUND", status="RINGING", bizOpaqueCallbackData=tag
    )
    await first.crash()
    assert await stored_status(tmp_path, tag) == "PENDING"

    mark = first.telegram.mark()
    await start_bot(pilot_status_number_type="web", data_dir=str(tmp_path))
    told = await first.telegram.wait_for_message(chat_id=OPERATOR, after=mark)
    assert ": ringing" in told.plain and created["id"] in told.plain
    assert len(first.pilot.calls_started()) == 1


async def test_an_attempt_the_api_never_got_says_no_call_was_placed(
    start_bot: StartBot, tmp_path: Path
) -> None:
    first, post = await die_while_posting(start_bot, tmp_path, f"/call {PHONE}")
    await first.crash()  # and the API never created the call
    mark = first.telegram.mark()
    await start_bot(pilot_status_number_type="web", data_dir=str(tmp_path))
    told = await first.telegram.wait_for_message(chat_id=OPERATOR, after=mark)
    assert ": not placed" in told.plain and "no call was placed" in told.plain
    tag = post.json["bizOpaqueCallbackData"]
    assert await stored_status(tmp_path, tag) == "NOT_STARTED"


async def stored_status(data_dir: Path, call_id: str) -> str | None:
    engine = create_engine(database_url(None, data_dir))
    try:
        record = await Store(sessionmaker(engine)).get_call(call_id)
        return record.status if record else None
    finally:
        await engine.dispose()


async def test_the_lifecycle_works_on_each_storage_backend(
    start_bot: StartBot, db_url: str
) -> None:
    bot = await webhook_bot(start_bot, database_url=db_url)
    reply, pilot_id = await start_call(bot)
    await deliver(bot, event("call.connected", pilot_id, status="ACCEPTED"), key="a")
    await shown(bot, reply, ": answered")
    await deliver(bot, event("call.ended", pilot_id, status="COMPLETED", duration=3), key="b")
    await deliver(bot, event("call.ended", pilot_id, status="COMPLETED", duration=3), key="b")
    final = await shown(bot, reply, ": ended")
    assert "Duration: 0:03" in final.plain
    assert await history(bot, pilot_id) == ["PENDING", "INITIATED", "ACCEPTED", "COMPLETED"]
