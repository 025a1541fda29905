"""/call through the real aiogram stack and the real httpx client, over loopback HTTP fakes."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from bot.shared.pending import PendingStore
from tests.conftest import ADMIN, API_KEY, GROUP, OPERATOR, STRANGER, TOKEN, RunningBot, StartBot
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import SentMessage

PHONE = "+5511999999999"


async def command(bot: RunningBot, text: str, **kwargs: object) -> SentMessage:
    """Send a command as a user and return the bot's reply."""
    mark = bot.telegram.mark()
    kwargs.setdefault("user_id", OPERATOR)
    chat_id = kwargs.get("chat_id") or kwargs["user_id"]
    bot.telegram.send_command(text, **kwargs)  # type: ignore[arg-type]
    return await bot.telegram.wait_for_message(chat_id=chat_id, after=mark)  # type: ignore[arg-type]


def api_calls(pilot: FakePilotStatus, operation: str) -> list:
    return [r for r in pilot.requests if r.operation == operation]


async def test_operator_starts_a_call_on_a_web_number(start_bot: StartBot) -> None:
    bot = await start_bot()
    reply = await command(bot, "/call +55 (11) 99999-9999 server down")
    [post] = bot.pilot.calls_started()
    call_id = next(iter(bot.pilot.calls))
    assert post.json["to"] == PHONE
    assert "sdp" not in post.json and "sdpType" not in post.json
    assert re.fullmatch(r"cb_[0-9a-f]{16}", post.json["bizOpaqueCallbackData"])
    assert post.headers["x-api-key"] == API_KEY
    assert "Call to" in reply.plain and "+55 11 99999-9999" in reply.plain
    assert call_id in reply.plain and ": started" in reply.plain
    assert "Note: server down" in reply.plain


async def test_note_with_html_is_escaped_and_never_sent_to_the_api(start_bot: StartBot) -> None:
    bot = await start_bot()
    reply = await command(bot, "/call 11 99999-9999 <b>disk</b> & cache")
    assert "Note: <b>disk</b> & cache" in reply.plain
    [post] = bot.pilot.calls_started()
    assert "disk" not in str(post.json) and "cache" not in str(post.json)


async def test_bad_number_is_refused_with_a_reason_and_nothing_is_sent(start_bot: StartBot) -> None:
    bot = await start_bot()
    before = len(bot.pilot.requests)
    reply = await command(bot, "/call 11 3333-4444")
    assert "landline" in reply.plain
    reply = await command(bot, "/call 12ab")
    assert "is not a phone number" in reply.plain
    reply = await command(bot, "/call hello")
    assert "I know no contact" in reply.plain
    reply = await command(bot, "/call")
    assert "Usage" in reply.plain
    assert len(bot.pilot.requests) == before


async def test_stranger_is_refused_without_any_api_request(start_bot: StartBot) -> None:
    bot = await start_bot()
    before = len(bot.pilot.requests)
    reply = await command(bot, f"/call {PHONE}", user_id=STRANGER)
    assert "not allowed to place calls" in reply.plain
    assert "/whoami" in reply.plain
    assert len(bot.pilot.requests) == before


async def test_chat_outside_allowed_chats_is_refused(start_bot: StartBot) -> None:
    bot = await start_bot(allowed_chat_ids="-100999")
    before = len(bot.pilot.requests)
    reply = await command(bot, f"/call {PHONE}", chat_id=GROUP, chat_type="supergroup")
    assert "cannot be placed from this chat" in reply.plain
    assert len(bot.pilot.requests) == before


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (409, "WHATSAPP_INSTANCE_NOT_CONNECTED", "not connected"),
        (429, None, "too many requests"),
        (401, None, "rejected the API key"),
        (403, "TENANT_SCOPE_NOT_ALLOWED", "wrong scope"),
        (400, "MISSING_TO", "did not receive the number"),
        (400, "NUMBER_NOT_FOUND", "not bound to a WhatsApp number"),
        (400, "FEATURE_NOT_SUPPORTED", "does not support that"),
        (422, "BILLING_SUSPENDED", "suspended for billing"),
        (400, "META_CALLING_PAYMENT_REQUIRED", "payment method"),
        (400, "WEIRD_<NEW>", "WEIRD_<NEW>"),
        (500, None, "had a problem (HTTP 500)"),
    ],
)
async def test_api_refusals_end_in_one_clear_reply(
    start_bot: StartBot, status: int, code: str | None, expected: str
) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.error("start_call", code, status=status)
    reply = await command(bot, f"/call {PHONE}")
    assert expected.lower() in reply.plain.lower()
    assert len(bot.telegram.bot_messages(OPERATOR)) == 1


async def test_rate_limit_is_retried_then_reported(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web", pilot_status_max_retries=2)
    bot.pilot.error("start_call", None, status=429)
    reply = await command(bot, f"/call {PHONE}")
    assert "too many requests" in reply.plain.lower()
    assert len(bot.pilot.calls_started()) == 3  # a 429 is a refusal: safe to ask again


async def test_non_json_gateway_page_is_explained(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.script("start_call", status=502, raw=b"error code: 502", content_type="text/plain")
    reply = await command(bot, f"/call {PHONE}")
    assert "had a problem (HTTP 502)" in reply.plain


async def test_timeout_says_the_call_may_have_started_and_does_not_retry(
    start_bot: StartBot,
) -> None:
    bot = await start_bot(pilot_status_number_type="web", pilot_status_read_timeout=0.3)
    bot.pilot.script(
        "start_call", status=201, body={"id": "call_late", "status": "INITIATED"}, delay=1.0
    )
    reply = await command(bot, f"/call {PHONE}")
    assert "did not answer in time" in reply.plain
    assert "may still have started" in reply.plain
    assert len(bot.pilot.calls_started()) == 1


async def test_dropped_connection_is_not_retried(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.script("start_call", drop=True)
    reply = await command(bot, f"/call {PHONE}")
    assert "connection to Pilot Status broke" in reply.plain
    assert len(bot.pilot.calls_started()) == 1


async def test_refused_connection_says_nothing_was_sent(
    start_bot: StartBot, pilot: FakePilotStatus
) -> None:
    bot = await start_bot(
        pilot_status_number_type="web", pilot_status_base_url="http://127.0.0.1:9"
    )
    reply = await command(bot, f"/call {PHONE}")
    assert "Cannot reach Pilot Status" in reply.plain and "nothing was sent" in reply.plain


async def test_errors_are_in_the_users_language(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.error("start_call", "WHATSAPP_INSTANCE_NOT_CONNECTED", status=409)
    reply = await command(bot, f"/call {PHONE}", language_code="pt-br")
    assert "não está conectado" in reply.plain
    reply = await command(bot, "/call 11 3333-4444", language_code="pt")
    assert "telefone fixo" in reply.plain


async def test_duplicate_update_starts_one_call(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    mark = bot.telegram.mark()
    update_id, _ = bot.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await bot.telegram.wait_for_message(chat_id=OPERATOR, after=mark)
    bot.telegram.push_raw_duplicate(update_id)
    await command(bot, "/whoami")  # a later update is handled, so the duplicate was seen
    assert len(bot.pilot.calls_started()) == 1
    assert len([m for m in bot.telegram.bot_messages(OPERATOR) if "Call to" in m.plain]) == 1


async def test_second_call_to_a_number_being_dialled_is_refused(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.script(
        "start_call",
        status=201,
        body={"id": "call_slow", "status": "INITIATED"},
        delay=0.5,
        times=1,
    )
    mark = bot.telegram.mark()
    bot.telegram.send_command(f"/call {PHONE}", user_id=OPERATOR)
    await asyncio.sleep(0.2)
    bot.telegram.send_command(f"/call {PHONE}", user_id=ADMIN)
    refusal = await bot.telegram.wait_for_message(chat_id=ADMIN, after=mark)
    assert "being started right now" in refusal.plain
    started = await bot.telegram.wait_for_message(chat_id=OPERATOR, after=mark)
    assert "call_slow" in started.plain
    assert len(bot.pilot.calls_started()) == 1


# groups: confirm first


async def group_prompt(bot: RunningBot, text: str = f"/call {PHONE} db down") -> SentMessage:
    prompt = await command(bot, text, chat_id=GROUP, chat_type="supergroup")
    assert prompt.buttons(), prompt
    return prompt


async def press(bot: RunningBot, prompt: SentMessage, label: str, user_id: int = OPERATOR) -> dict:
    data = next(d for text, d in prompt.buttons() if label in text)
    _, query_id = bot.telegram.press_button(
        user_id=user_id,
        chat_id=GROUP,
        message_id=prompt.message_id,
        data=data,
        chat_type="supergroup",
    )
    return await bot.telegram.wait_for_callback_answer(query_id)


async def test_group_call_waits_for_confirmation_and_masks_the_number(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    prompt = await group_prompt(bot)
    assert "+55 11 9****-9999" in prompt.plain and "99999-9999" not in prompt.plain
    assert bot.pilot.calls_started() == []
    await press(bot, prompt, "Confirm")
    final = await bot.telegram.wait_for_message(lambda m: "Call to" in m.plain, chat_id=GROUP)
    assert final.message_id == prompt.message_id
    assert "+55 11 9****-9999" in final.plain and "99999-9999" not in final.plain
    assert [label for label, _ in final.buttons()] == ["📴 Hang up"]
    assert len(bot.pilot.calls_started()) == 1


async def test_only_the_asking_operator_can_confirm(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    prompt = await group_prompt(bot)
    answer = await press(bot, prompt, "Confirm", user_id=ADMIN)
    assert answer["show_alert"] in (True, "true")
    assert "Only the operator who asked" in answer["text"]
    answer = await press(bot, prompt, "Confirm", user_id=STRANGER)
    assert "Only the operator who asked" in answer["text"]
    assert bot.pilot.calls_started() == []
    assert bot.telegram.message(GROUP, prompt.message_id).buttons()  # still pending


async def test_double_confirm_starts_one_call(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    prompt = await group_prompt(bot)
    data = next(d for text, d in prompt.buttons() if "Confirm" in text)
    ids = [
        bot.telegram.press_button(
            user_id=OPERATOR,
            chat_id=GROUP,
            message_id=prompt.message_id,
            data=data,
            chat_type="supergroup",
        )[1]
        for _ in range(2)
    ]
    answers = [await bot.telegram.wait_for_callback_answer(i) for i in ids]
    await bot.telegram.wait_for_message(lambda m: "Call to" in m.plain, chat_id=GROUP)
    assert len(bot.pilot.calls_started()) == 1
    assert any("already handled" in (a.get("text") or "") for a in answers)


async def test_cancel_places_no_call(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    prompt = await group_prompt(bot)
    await press(bot, prompt, "Cancel")
    edited = await bot.telegram.wait_for_message(lambda m: "Cancelled" in m.plain, chat_id=GROUP)
    assert edited.buttons() == []
    assert bot.pilot.calls_started() == []


async def test_expired_confirmation_places_no_call(start_bot: StartBot) -> None:
    now = [0.0]
    store: PendingStore[object] = PendingStore(60, clock=lambda: now[0])
    bot = await start_bot(pilot_status_number_type="web", data={"pending_calls": store})
    prompt = await group_prompt(bot)
    now[0] = 61.0
    answer = await press(bot, prompt, "Confirm")
    assert "expired" in answer["text"]
    edited = await bot.telegram.wait_for_message(lambda m: "expired" in m.plain, chat_id=GROUP)
    assert edited.message_id == prompt.message_id and edited.buttons() == []
    assert bot.pilot.calls_started() == []


async def test_api_error_after_confirm_replaces_the_prompt(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.pilot.error("start_call", "WHATSAPP_INSTANCE_NOT_CONNECTED", status=409)
    prompt = await group_prompt(bot)
    await press(bot, prompt, "Confirm")
    edited = await bot.telegram.wait_for_message(
        lambda m: "not connected" in m.plain, chat_id=GROUP
    )
    assert edited.message_id == prompt.message_id and edited.buttons() == []


# Meta numbers


async def test_meta_without_permission_offers_the_request_button(start_bot: StartBot) -> None:
    bot = await start_bot()
    bot.pilot.number_type = "meta"
    bot.dp["number_types"]._known = None  # as if the type were learnt on the first /call
    reply = await command(bot, f"/call {PHONE} about your order")
    assert "has not allowed WhatsApp calls" in reply.plain
    assert bot.pilot.calls_started() == []
    [(label, data)] = reply.buttons()
    assert "Ask for permission" in label
    _, query_id = bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    await bot.telegram.wait_for_callback_answer(query_id)
    done = await bot.telegram.wait_for_message(
        lambda m: "Permission request sent" in m.plain, chat_id=OPERATOR
    )
    assert done.message_id == reply.message_id
    [request] = api_calls(bot.pilot, "request_permission")
    assert request.json == {"to": PHONE, "text": "about your order"}


async def test_permission_request_uses_a_localized_default_reason(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    reply = await command(bot, f"/call {PHONE}", language_code="pt-br")
    [(_, data)] = reply.buttons()
    bot.telegram.press_button(
        user_id=OPERATOR,
        chat_id=OPERATOR,
        message_id=reply.message_id,
        data=data,
        language_code="pt-br",
    )
    await bot.telegram.wait_for_message(
        lambda m: "Pedido de permissão enviado" in m.plain, chat_id=OPERATOR
    )
    [request] = api_calls(bot.pilot, "request_permission")
    assert request.json["text"] == "Podemos te ligar pelo WhatsApp?"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("META_CALL_PERMISSION_REQUEST_LIMIT", "Too many permission requests"),
        ("META_OUTSIDE_24H_WINDOW", "within 24 hours"),
    ],
)
async def test_permission_request_refusals_are_explained(
    start_bot: StartBot, code: str, expected: str
) -> None:
    bot = await start_bot(pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    bot.pilot.error("request_permission", code, status=400)
    reply = await command(bot, f"/call {PHONE}")
    [(_, data)] = reply.buttons()
    bot.telegram.press_button(
        user_id=OPERATOR, chat_id=OPERATOR, message_id=reply.message_id, data=data
    )
    edited = await bot.telegram.wait_for_message(lambda m: expected in m.plain, chat_id=OPERATOR)
    assert edited.message_id == reply.message_id


async def test_meta_with_permission_dials_with_our_offer_and_shows_the_quota(
    start_bot: StartBot,
) -> None:
    bot = await start_bot(pilot_status_number_type="meta")
    bot.pilot.number_type = "meta"
    bot.pilot.set_permission(PHONE, "temporary", usage=2, max_allowed=5)
    reply = await command(bot, f"/call {PHONE}")
    assert ": started" in reply.plain
    assert "Calls used: 2 of 5 per 24 h" in reply.plain
    [post] = bot.pilot.calls_started()
    assert post.json["sdpType"] == "offer"
    lines = post.json["sdp"].splitlines()
    assert "a=setup:active" in lines
    assert [line.split()[0] for line in lines if line.startswith("a=fingerprint:")] == [
        "a=fingerprint:sha-256"
    ]
    assert [line for line in lines if line.startswith("a=rtpmap:")] == ["a=rtpmap:111 opus/48000/2"]
    assert any(line.startswith("a=candidate:") for line in lines)


# start, help, whoami


async def test_start_sets_menus_detects_the_number_and_logs_no_secret(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await start_bot()
    assert {c["command"] for c in bot.telegram.commands[("default", None)]} >= {"call", "whoami"}
    pt = {c["command"]: c["description"] for c in bot.telegram.commands[("default", "pt")]}
    assert pt["call"].startswith("Iniciar uma chamada")
    started = [r.getMessage() for r in caplog.records if "callbot started" in r.getMessage()]
    assert started == ["callbot started as @callbot_test_bot; business number type: web (detected)"]
    assert API_KEY not in caplog.text and TOKEN.split(":")[1] not in caplog.text


async def test_unreachable_api_at_start_is_probed_again_on_first_call(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pilot = FakePilotStatus(api_key=API_KEY, number_type="web")
    pilot.error("get_settings", None, status=503, times=1)
    await pilot.start()
    try:
        bot = await start_bot(pilot_status_base_url=pilot.url, pilot_status_max_retries=0)
        assert "business number type: unknown" in caplog.text
        bot.pilot = pilot
        reply = await command(bot, f"/call {PHONE}")
        assert "Call to" in reply.plain
        assert len(pilot.calls_started()) == 1
    finally:
        await pilot.close()


async def test_whoami_tells_anyone_their_ids(start_bot: StartBot) -> None:
    bot = await start_bot()
    reply = await command(bot, "/whoami", user_id=STRANGER, chat_id=GROUP, chat_type="group")
    assert str(STRANGER) in reply.plain and str(GROUP) in reply.plain


async def test_help_shows_the_number_type_to_admins_only(start_bot: StartBot) -> None:
    bot = await start_bot()
    admin = await command(bot, "/help", user_id=ADMIN)
    assert "business number type: web" in admin.plain
    operator = await command(bot, "/help", user_id=OPERATOR, language_code="pt-br")
    assert "tipo do número" not in operator.plain and "/call" in operator.plain
    stranger = await command(bot, "/help", user_id=STRANGER)
    assert "not an operator yet" in stranger.plain


async def test_reply_waits_out_telegram_flood_control(start_bot: StartBot) -> None:
    bot = await start_bot(pilot_status_number_type="web")
    bot.telegram.fail_next(
        "sendMessage", error_code=429, description="Too Many Requests: retry after 1", retry_after=1
    )
    reply = await command(bot, f"/call {PHONE}")
    assert "Call to" in reply.plain
    assert len(bot.pilot.calls_started()) == 1
    attempts = [p for m, p in bot.telegram.requests if m == "sendMessage"]
    assert len(attempts) == 2
