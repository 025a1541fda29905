"""Everything the bot says, as HTML with every user- or API-provided value escaped.

The error catalogue maps each code of `bot.errors` to a localized text naming what to do next.
Every message renderer is `@fitted`: what it returns fits Telegram's 4096 characters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import UTC, datetime
from html import escape, unescape
from typing import ParamSpec

from aiogram.utils.i18n import gettext as _
from aiogram.utils.i18n import lazy_gettext as __
from babel.support import LazyProxy

from bot import states
from bot.calls.service import NeedsPermission
from bot.errors import CallbotError
from bot.oncall.engine import TEST_SOURCE, duration_text, on_call_now, plan
from bot.oncall.schedules import team_schedule
from bot.phones import Phone, mask
from bot.pilot_status.models import CallStatus, Limit, NumberType, PermissionProbe
from bot.storage.oncall import Contact, Incident, Team
from bot.storage.store import CallRecord, PermissionRequestRecord

TELEGRAM_TEXT_LIMIT = 4096  # characters of a message's text after its HTML is parsed
ALERT_LIMIT = 200  # characters of a callback query's alert
# a tag, an HTML entity, or one character of text
_TOKEN = re.compile(r"<(/?)([A-Za-z][\w-]*)[^>]*>|&(?:#\d+|#[xX][0-9a-fA-F]+|\w+);|.", re.S)
P = ParamSpec("P")


def _shown_length(text: str) -> int:
    """How Telegram counts a text: UTF-16 code units (an emoji may count 2)."""
    return len(text.encode("utf-16-le")) // 2


def fit(html: str, limit: int = TELEGRAM_TEXT_LIMIT) -> str:
    """The message cut to `limit` characters as Telegram counts them (after the HTML is
    parsed), ending with "…", every open tag closed; never cut inside a tag or an entity."""
    if len(html) * 2 <= limit:
        return html  # even if every character counted twice
    shown, cut = 0, None
    open_tags: list[str] = []
    for match in _TOKEN.finditer(html):
        closing, tag = match.group(1), match.group(2)
        if tag is not None:
            if cut is None:
                if closing and open_tags:
                    open_tags.pop()
                else:
                    open_tags.append(tag)
            continue
        shown += _shown_length(unescape(match.group()))
        if cut is None and shown > limit - 1:
            cut = (match.start(), list(open_tags))
    if cut is None or shown <= limit:
        return html
    end, tags = cut
    return html[:end].rstrip() + "…" + "".join(f"</{tag}>" for tag in reversed(tags))


def fitted(render: Callable[P, str]) -> Callable[P, str]:
    """A renderer whose message always fits Telegram's limit."""

    @functools.wraps(render)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> str:
        return fit(render(*args, **kwargs))

    return wrapper


def plain(html: str, limit: int = ALERT_LIMIT) -> str:
    """An HTML text as plain text (a callback alert is not parsed), cut to `limit`."""
    text = unescape(re.sub(r"<[^>]*>", "", html))
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


ERRORS: dict[str, LazyProxy] = {
    # the operator's input
    "usage": __(
        "Usage: <code>/call &lt;phone&gt; [note]</code>, e.g. "
        "<code>/call +55 11 99999-9999 server down</code>. Start the note with "
        "<code>say:</code> to have it spoken to them."
    ),
    "phone_empty": __("Tell me which number to call: <code>/call +55 11 99999-9999</code>."),
    "phone_not_a_number": __(
        "<b>{text}</b> is not a phone number. Write it with digits, e.g. +55 11 99999-9999."
    ),
    "phone_invalid": __(
        "<b>{text}</b> is not a valid phone number. Check the country and area code "
        "(numbers without + are read as {region})."
    ),
    "phone_not_mobile": __("<b>{text}</b> is a landline. WhatsApp calls need a mobile number."),
    # who is asking
    "not_operator": __(
        "Sorry, you are not allowed to place calls with this bot. Ask an admin to add your "
        "Telegram id (send /whoami) to OPERATOR_IDS."
    ),
    "chat_not_allowed": __(
        "Calls cannot be placed from this chat. Ask an admin to add this chat id (send /whoami) "
        "to ALLOWED_CHAT_IDS, or call from a private chat with me."
    ),
    # buttons and flow
    "confirm_expired": __("This request expired. Send /call again."),
    "not_your_button": __("Only the operator who asked can answer this."),
    "already_handled": __("This was already handled."),
    "call_in_flight": __(
        "A call to this number is being started right now. Wait for its answer before trying again."
    ),
    "shared_state_unavailable": __(
        "I cannot reach my shared state (Redis) right now, so nothing was done. Try again in a "
        "minute; if it keeps happening, tell an admin."
    ),
    "call_repeated_unknown": __(
        "This /call was received before, and whether its call started is not known yet. Check "
        "/calls before you call again."
    ),
    "permission_not_needed": __("This business number is a web number: it needs no permission."),
    "number_unsupported": __(
        "The business number cannot place calls: Pilot Status only calls from Meta Cloud API and "
        "web numbers. Check the number's provider in the Pilot Status dashboard."
    ),
    "internal": __("Something went wrong on my side. The error was logged; please try again."),
    # Pilot Status answers
    "api_validation": __(
        "Pilot Status refused the request as invalid (HTTP {status}). Check the number and try "
        "again; if it keeps happening, tell an admin."
    ),
    "api_missing_to": __("Pilot Status did not receive the number to call. Send /call again."),
    "api_feature_not_supported": __(
        "This business number does not support that. Calling works only with Meta Cloud API and "
        "web numbers; an admin can check PILOT_STATUS_NUMBER_TYPE and the number's provider."
    ),
    "api_number_not_found": __(
        "The API key is not bound to a WhatsApp number. An admin must use a number-scoped key "
        "or set PILOT_STATUS_NUMBER_ID."
    ),
    "api_unauthorized": __(
        "Pilot Status rejected the API key. An admin must check PILOT_STATUS_API_KEY."
    ),
    "api_tenant_scope": __(
        "The API key has the wrong scope for calls. An admin must use the number's own key, or "
        "set PILOT_STATUS_NUMBER_ID for a tenant key."
    ),
    "api_call_not_found": __("Pilot Status does not know that call on this number."),
    "api_not_connected": __(
        "The WhatsApp number is not connected. Reconnect it (scan the QR code) in the Pilot "
        "Status dashboard, then try again."
    ),
    "api_billing_suspended": __(
        "The Pilot Status account is suspended for billing. An admin must settle it in the "
        "dashboard."
    ),
    "api_rate_limited": __(
        "Pilot Status is receiving too many requests. Wait a minute and try again."
    ),
    "api_permission_required": __(
        "This person has not allowed WhatsApp calls from us yet. Ask for permission first."
    ),
    "api_permission_request_limit": __(
        "Too many permission requests were sent to this person. Meta allows only a few; wait a "
        "day before asking again."
    ),
    "api_outside_window": __(
        "A permission request can only be sent within 24 hours of this person's last WhatsApp "
        "message. Ask them to message the business number first."
    ),
    "api_payment_required": __(
        "Meta needs a payment method on the WhatsApp Business account before calls can be "
        "made. An admin must add one in Meta Business Manager."
    ),
    "api_calling_disabled": __(
        "Calling is not enabled on this WhatsApp number. An admin must enable it in the Pilot "
        "Status dashboard."
    ),
    "api_call_limit": __(
        "This number reached Meta's limit of business-initiated calls (100 per 24 hours). Try "
        "again tomorrow."
    ),
    "api_tier_too_low": __(
        "Meta does not allow calling yet: the number's messaging tier is below 2,000 a day."
    ),
    "api_calling_prerequisites": __(
        "Calling is not set up on the WhatsApp Business account (the 'calls' webhook field is "
        "not subscribed). An admin must finish the setup in the Pilot Status dashboard."
    ),
    "api_answer_too_late": __("The call's media answer came too late and Meta ended the call."),
    # voice: the bot's media endpoint and speech
    "media_busy": __(
        "I am already on {max} calls with media, my limit. Try again when one of them ends."
    ),
    "media_unavailable": __(
        "The bot's media (WebRTC) endpoint could not start, so no call was placed. An admin "
        "should check the logs."
    ),
    "speech_unavailable": __(
        "Speaking is not available: the text-to-speech engine (espeak-ng) is not installed or "
        "failed. Send the /call again without <code>say:</code>."
    ),
    "media_no_answer": __(
        "WhatsApp sent no media answer in time (Meta error 138007), so I hung up. Try again."
    ),
    "media_bad_answer": __(
        "WhatsApp's media answer could not be used, so I hung up. Try again; if it repeats, an "
        "admin should check the logs."
    ),
    "media_no_connection": __(
        "The audio connection to WhatsApp never came up (ICE failed), so I hung up. The bot's "
        "host needs outbound UDP, or a STUN server in STUN_SERVERS."
    ),
    "media_failed": __("The call's audio failed, so I hung up. An admin should check the logs."),
    "media_lost": __(
        "The bot restarted during this call and lost its audio, so it hung up. Call again if "
        "needed."
    ),
    "media_dtls_failed": __(
        "The audio connection to WhatsApp was reached, but its encryption (DTLS) handshake "
        "failed: the peer's certificate or fingerprint was refused, so I hung up. The network is "
        "fine; an admin should check the logs."
    ),
    "media_no_rtp": __(
        "The audio connection to WhatsApp came up, but no audio came through it, so I hung up "
        "(they would not have heard the message). Try again; if it repeats, an admin should check "
        "the bot's network and logs."
    ),
    "api_server_error": __("Pilot Status had a problem (HTTP {status}). Try again in a minute."),
    "api_bad_response": __(
        "Pilot Status answered something I could not read (HTTP {status}). Try again later; if it "
        "keeps happening, tell an admin."
    ),
    "api_timeout_maybe_sent": __(
        "Pilot Status did not answer in time. The call may still have started: check before you "
        "call again."
    ),
    "api_dropped": __(
        "The connection to Pilot Status broke after the request was sent. The call may still have "
        "started: check before you call again."
    ),
    "api_unreachable": __(
        "Cannot reach Pilot Status right now; nothing was sent. Try again in a minute."
    ),
    "api_unknown_code": __("Pilot Status refused (HTTP {status}, {code}): {message}"),
    # following calls
    "call_unknown": __(
        "I know no call <code>{ref}</code>. Use the call id from the call's message, or /calls."
    ),
    "not_your_call": __("Only the operator who started this call, or an admin, can hang it up."),
    "call_already_ended": __("This call has already ended."),
    "talk_unavailable": __(
        "Talking from Telegram needs the bot's public https address (PUBLIC_BASE_URL). "
        "Ask an admin to set it."
    ),
    "talk_needs_short_name": __(
        "Telegram opens the softphone from a group only through the bot's Mini App link "
        "(MINIAPP_SHORT_NAME). Ask an admin to set it, or use <code>/call … talk</code> in "
        "a private chat with me."
    ),
    "status_usage": __(
        "Usage: <code>/status &lt;call id&gt;</code>, or reply /status to a call's message."
    ),
    "hangup_usage": __(
        "Usage: <code>/hangup &lt;call id&gt;</code>, or press Hang up on the call's message."
    ),
    "permission_usage": __("Usage: <code>/permission &lt;phone&gt;</code>."),
    "admins_only": __("Only admins can do that."),
    "bad_alias": __(
        "<b>{alias}</b> cannot be a name: use a letter, then letters, digits, '.', '-' or '_'."
    ),
    "unknown_contact": __("I know no contact <b>{alias}</b>. See /contact list."),
    "unknown_team": __("I know no team <b>{team}</b>. See /team list."),
    "not_in_team": __(
        "This is the chat of team <b>{team}</b>: it calls only its members. Use their names "
        "(/team list)."
    ),
    "not_a_member": __("<b>{alias}</b> is not on team <b>{team}</b>'s list."),
    "contact_usage": __(
        "Usage: <code>/contact add &lt;name&gt; &lt;phone&gt;</code>, "
        "<code>/contact link &lt;name&gt; &lt;Telegram id&gt;</code>, "
        "<code>/contact remove &lt;name&gt;</code> or <code>/contact list</code>."
    ),
    "team_usage": __(
        "Usage: <code>/team add &lt;name&gt;</code> (in its chat), "
        "<code>/team members &lt;name&gt; &lt;contact…&gt;</code>, "
        "<code>/team policy &lt;name&gt; attempts=2 wait=300 rounds=2 ack_on_answer=no "
        "ack_timeout=4h repage_after=off</code>, "
        "<code>/team rotation &lt;name&gt; daily 09:00 America/Sao_Paulo|weekly mon 09:00 "
        "Europe/Berlin|weekly|none</code>, "
        "<code>/team token &lt;name&gt;</code>, <code>/team move &lt;name&gt;</code> (in its new "
        "chat), <code>/team test &lt;name&gt;</code> or <code>/team list</code>."
    ),
    "oncall_usage": __(
        "Usage: <code>/oncall [team]</code>, <code>/oncall take [duration] [team]</code> "
        "(default 4h), <code>/oncall set &lt;name&gt; until &lt;time&gt; [team]</code> or "
        "<code>/oncall set &lt;name&gt; [team]</code>."
    ),
    "bad_rotation": __(
        "That is not a rotation. Rotations look like <code>daily 09:00 America/Sao_Paulo</code>, "
        "<code>weekly mon 09:00 Europe/Berlin</code> (either with <code>for 12h</code> for a "
        "shorter shift), <code>weekly</code> or <code>none</code>."
    ),
    "bad_until": __(
        "Until when? Say <code>18:00</code> (in the team's time zone), <code>2h</code> or "
        "<code>2026-12-02 09:00</code>, in the future and within 7 days."
    ),
    "who_are_you": __(
        "I do not know which contact you are. An admin links you with "
        "<code>/contact link &lt;name&gt; &lt;your Telegram id&gt;</code> (see /whoami)."
    ),
    "ack_wrong_chat": __(
        "This alert belongs to another team's chat: acknowledge it there (admins can also use "
        "/ack in a private chat with me)."
    ),
    "unknown_incident": __("I know no incident <b>{id}</b>."),
    "heartbeat_usage": __(
        "Usage: <code>/heartbeat add &lt;name&gt; every 5m grace 2m</code>, "
        "<code>/heartbeat remove &lt;name&gt;</code> (in the team's chat; elsewhere "
        "<code>&lt;team&gt;/&lt;name&gt;</code>) or <code>/heartbeat list</code>. The interval "
        "is 1m to 7d, the grace up to 1d."
    ),
    "unknown_heartbeat": __(
        "Team <b>{team}</b> has no heartbeat <b>{name}</b>. See /heartbeat list."
    ),
    "silence_usage": __(
        "Usage: <code>/silence &lt;team&gt; &lt;duration&gt; [label=value…] [reason]</code>, e.g. "
        "<code>/silence infra 2h alertname=DiskFull disk swap</code> (up to 30d), "
        "<code>/silence list</code> or <code>/unsilence &lt;id&gt;</code>."
    ),
    "unknown_silence": __("No silence <b>{id}</b> is holding now. See /silence list."),
    "ack_usage": __("Usage: <code>/ack &lt;incident id&gt;</code>, e.g. <code>/ack 12</code>."),
    "interrupted": __(
        "The bot restarted before Pilot Status confirmed this call, and Pilot Status has no record "
        "of it: no call was placed. Send /call again."
    ),
    "team_exists_here": __(
        "Team <b>{team}</b> already posts alerts to this chat. For a new intake token, send "
        "<code>/team token {team}</code>."
    ),
    "team_elsewhere": __(
        "Team <b>{team}</b> already posts alerts to another chat; nothing was changed. To have "
        "it post here instead, send <code>/team move {team}</code> in this chat (its token "
        "stays the same)."
    ),
    "team_has_open_incidents": __(
        "Team <b>{team}</b> has open incidents, whose posts are in its current chat. Move it "
        "once they are resolved."
    ),
    "cannot_message_you": __(
        "I cannot message you privately, and the intake token is never shown in a group: "
        "nothing was changed, the current token still works. Open a private chat with "
        "@{bot}, press Start, then send the command here again."
    ),
    "call_lost": __("Pilot Status no longer knows this call, so how it ended is unknown."),
    "call_unfollowed": __(
        "This call was not seen ending in time and the bot stopped following it, so how it "
        "ended is unknown."
    ),
}

STATUS: dict[CallStatus, LazyProxy] = {
    CallStatus.INITIATED: __("started"),
    CallStatus.RINGING: __("ringing"),
    CallStatus.ACCEPTED: __("answered"),
    CallStatus.REJECTED: __("rejected"),
    CallStatus.COMPLETED: __("ended"),
    CallStatus.FAILED: __("failed"),
    CallStatus.MISSED: __("missed"),
    CallStatus.UNKNOWN: __("unknown"),
}
LIFECYCLE: dict[str, LazyProxy] = {
    states.PENDING: __("being placed"),
    states.NOT_STARTED: __("not placed"),
    states.UNKNOWN_OUTCOME: __("outcome unknown"),
    states.LOST: __("lost"),
}
ICONS = {
    "INITIATED": "📞",
    "RINGING": "🔔",
    "ACCEPTED": "🟢",
    "COMPLETED": "✅",
    "REJECTED": "⛔",
    "FAILED": "❌",
    "MISSED": "📵",
    states.PENDING: "⏳",
    states.NOT_STARTED: "❌",
    states.UNKNOWN_OUTCOME: "❔",
    states.LOST: "❓",
}


def status_label(status: str) -> str:
    if status in LIFECYCLE:
        return str(LIFECYCLE[status])
    return str(STATUS[CallStatus.parse(status)])


@fitted
def error_text(error: CallbotError) -> str:
    template = ERRORS.get(error.code, ERRORS["internal"])
    params = {key: escape(value) for key, value in error.params.items()}
    return str(template).format_map(_Blank(params))


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


def number_label(phone: Phone, *, masked: bool) -> str:
    return escape(phone.masked if masked else phone.display)


def _note_line(note: str | None, spoken: bool = False) -> str:
    if not note:
        return ""
    if spoken:
        return "\n" + _("🔊 Says: {note}").format(note=escape(note))
    return "\n" + _("Note: {note}").format(note=escape(note))


def spoken_default() -> str:
    """What a Meta call says when the operator gave nothing to say."""
    return _("Hello. This is an automated call. Please check your messages.")


def spoken_alert(team: str, title: str, *, acked_on_answer: bool, test: bool = False) -> str:
    """What an on-call ring says once answered: a test says so first; then how the alert is
    acknowledged."""
    said = [_("This is a TEST page. Nothing is wrong.")] if test else []
    said.append(_("Alert for team {team}: {title}").format(team=team, title=title))
    if test:
        said.append(_("Answering ends the test. Thank you."))
    elif acked_on_answer:
        said.append(_("This alert is now acknowledged by you."))
    else:
        said.append(_("To acknowledge it, open the team's chat and press Acknowledge."))
    return " ".join(said)


def limits_lines(limits: tuple[Limit, ...]) -> str:
    lines = []
    for limit in limits:
        if limit.max_allowed is None:
            continue
        lines.append(
            _("Calls used: {used} of {allowed} per {period}").format(
                used=limit.current_usage or 0,
                allowed=limit.max_allowed,
                period=_period(limit.time_period),
            )
        )
    return "".join("\n" + line for line in lines)


def _period(iso: str) -> str:
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?)?", iso)
    if not match or not any(match.groups()):
        return escape(iso)
    days, hours = (int(g) if g else 0 for g in match.groups())
    return _("{n} h").format(n=days * 24 + hours)


def _expiry(probe: PermissionProbe) -> str:
    when = probe.permission.expiration_time
    if not when:
        return ""
    moment = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n" + _("Permission valid until {moment}").format(moment=moment)


def call_number(record: CallRecord) -> str:
    if not record.phone_display:
        return _("number removed")  # after RETENTION_DAYS
    return escape(mask(record.phone_display) if record.masked else record.phone_display)


def _duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M UTC")


_NO_END_TIME = (states.NOT_STARTED, states.LOST)  # never placed, or its end is not known


@fitted
def call_text(record: CallRecord, limits: tuple[Limit, ...] = ()) -> str:
    """The message that follows a call from start to end."""
    icon = ICONS.get(record.status, "📞")
    lines = [
        _("{icon} <b>Call to {number}</b>: {status}").format(
            icon=icon, number=call_number(record), status=status_label(record.status)
        ),
        _("Started by {who} at {time}").format(
            who=escape(record.operator_name or str(record.operator_id)),
            time=_clock(record.created_at),
        ),
    ]
    if record.connected_at and not record.terminal:
        lines.append(_("Answered at {time}").format(time=_clock(record.connected_at)))
    if record.duration_seconds is not None:
        lines.append(_("Duration: {duration}").format(duration=_duration(record.duration_seconds)))
    elif record.terminal and record.ended_at and record.status not in _NO_END_TIME:
        lines.append(_("Ended at {time}").format(time=_clock(record.ended_at)))
    if record.pilot_call_id:
        lines.append(_("Call id: <code>{id}</code>").format(id=escape(record.pilot_call_id)))
    if record.external_call_id:
        lines.append(_("External id: <code>{id}</code>").format(id=escape(record.external_call_id)))
    if record.error_code and (
        record.status in (states.NOT_STARTED, states.UNKNOWN_OUTCOME, states.LOST)
        or record.error_code.startswith("media_")
    ):
        lines.append(error_text(CallbotError(record.error_code)))
    return "\n".join(lines) + limits_lines(limits) + _note_line(record.note, record.spoken)


@fitted
def calls_page_text(records: list[CallRecord], *, offset: int, total: int) -> str:
    if not records:
        return _("No calls from this chat yet.")
    header = _("Calls {first}-{last} of {total}, newest first:").format(
        first=offset + 1, last=offset + len(records), total=total
    )
    lines = [header]
    for record in records:
        line = "{icon} {time} {number} — {status}".format(
            icon=ICONS.get(record.status, "📞"),
            time=record.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            number=call_number(record),
            status=status_label(record.status),
        )
        if record.duration_seconds is not None:
            line += f" ({_duration(record.duration_seconds)})"
        if record.pilot_call_id:
            line += f" <code>{escape(record.pilot_call_id)}</code>"
        lines.append(line)
    return "\n".join(lines)


@fitted
def permission_text(phone: Phone, probe: PermissionProbe | None, *, masked: bool) -> str:
    number = number_label(phone, masked=masked)
    if probe is None:
        return _(
            "{number}: this business number is a web number, so no permission is needed."
        ).format(number=number)
    state = {
        "no_permission": _("no permission"),
        "temporary": _("temporary permission"),
        "permanent": _("permanent permission"),
    }[probe.permission.status.value]
    text = _("{number}: {state}.").format(number=number, state=state)
    text += _expiry(probe)
    for action in probe.actions:
        label = {
            "start_call": _("Calls"),
            "send_call_permission_request": _("Permission requests"),
        }.get(action.action_name, escape(action.action_name))
        allowed = _("allowed now") if action.can_perform_action else _("not allowed now")
        text += "\n" + f"{label}: {allowed}"
        for limit in action.limits:
            if limit.max_allowed is not None:
                text += "\n  " + _("{used} of {allowed} used per {period}").format(
                    used=limit.current_usage or 0,
                    allowed=limit.max_allowed,
                    period=_period(limit.time_period),
                )
    return text


@fitted
def permission_answered_text(request: PermissionRequestRecord) -> str:
    number = escape(mask(request.phone_display) if request.masked else request.phone_display)
    if request.status == "granted":
        return _("✅ {number} now allows WhatsApp calls from this business.").format(number=number)
    return _("🚫 {number} declined WhatsApp calls from this business.").format(number=number)


def incident_text(incident: Incident, team: Team) -> str:
    """A team's post of an alert: what fired, and what the escalation did.

    It always fits in one Telegram message, whatever the alert sent: the HTML itself (escaped,
    tags included, counted in UTF-16 units as Telegram does) stays within TELEGRAM_TEXT_LIMIT.
    The title, the state and the newest notes come first; then the text, the group's first
    alerts ("and N more" for the rest), labels and links, each as far as room is left.
    """
    room = _Room(TELEGRAM_TEXT_LIMIT)
    test = incident.source == TEST_SOURCE
    severity = f"[{incident.severity.upper()}] " if incident.severity else ""
    title = f"🧪 <b>TEST</b> — <b>{_escape_within(incident.title, 600)}</b>" if test else None
    header = room.take(title or f"🚨 <b>{_escape_within(severity + incident.title, 600)}</b>")
    state = {
        "firing": _("🔴 firing, team {team}").format(team=escape(team.name)),
        "acknowledged": _("✅ acknowledged by {who} at {time}").format(
            who=escape((incident.acked_by or "?")[:64]),
            time=_clock(incident.acked_at) if incident.acked_at else "?",
        ),
        "resolved": _("✔️ test page ended") if test else _("✔️ resolved"),
        "exhausted": _("⚠️ nobody acknowledged; escalation ended"),
    }.get(incident.status, escape(incident.status[:32]))
    if incident.fired > 1:
        state += " " + _("(fired {n} times)").format(n=incident.fired)
    footer = [room.take(state)]
    upcoming = room.take(next_step_text(incident, team))
    notes = _Room(1200)  # the newest notes, as many as fit
    newest = ["• " + _escape_within(note, 300) for note in reversed(incident.notes[-8:])]
    kept = [room.take(notes.take(line)) for line in newest if notes.fits(line)]
    footer.extend(reversed(kept))
    footer.append(upcoming)
    body: list[str] = []
    if incident.text:
        body += [room.take(_escape_within(incident.text[:600], min(900, room.left - 1)))]
    more = _("…and {n} more")
    reserve = len(more) + 12  # the "and N more" line, with any count
    shown = 0
    for item in incident.items:
        line = "▸ " + _escape_within(item, 300)
        if not room.fits(line, reserve=reserve):
            break
        body.append(room.take(line))
        shown += 1
    if incident.alert_count > shown and shown:
        body.append(room.take(more.format(n=incident.alert_count - shown)))
    labels = [
        f"<code>{escape(k[:100])}={escape(v[:100])}</code>"
        for k, v in list(incident.labels.items())[:6]
    ]
    while labels and not room.fits(", ".join(labels)):
        labels.pop()
    if labels:
        body.append(room.take(", ".join(labels)))
    for number, url in enumerate(incident.links[:3], start=1):
        link = f'<a href="{escape(url, quote=True)}">' + _("link {n}").format(n=number) + "</a>"
        if room.fits(link):
            body.append(room.take(link))
    return "\n".join(filter(None, [header, *body, *footer]))


def next_step_text(incident: Incident, team: Team) -> str:
    """What the escalation does next ("next: bob at 12:05 UTC"); "" when nothing is planned
    or a ring is being placed right now."""
    when = incident.next_action_at
    if incident.status != "firing" or when is None or incident.ring_call_id is not None:
        return ""
    steps = plan(team, when)
    if incident.step >= len(steps):
        return _("⏭ next: the escalation ends at {time}").format(time=_clock(when))
    return _("⏭ next: {who} at {time}").format(who=escape(steps[incident.step]), time=_clock(when))


_DIGEST_MARKS = {"firing": "🔴", "acknowledged": "✅", "resolved": "✔️", "exhausted": "⚠️"}


def digest_text(lines: list[Incident], team: Team) -> str:
    """A storm's digest post: the alerts past the team's share of posts in a minute, one line
    each (state, id, title), as many as fit; each firing one has its button below."""
    room = _Room(TELEGRAM_TEXT_LIMIT)
    count = len(lines)
    header = (
        _("🗂 <b>1 more alert</b> for team {team}:")
        if count == 1
        else _("🗂 <b>{n} more alerts</b> for team {team}:")
    ).format(n=count, team=escape(team.name))
    footer = _(
        "A storm: one post for these instead of a flood. Each ✋ button acknowledges its "
        "alert (or /ack &lt;id&gt;)."
    )
    more = _("…and {n} more")
    reserve = _shown_length(footer) + len(more) + 14
    body = [room.take(header)]
    shown = 0
    for line in lines:
        severity = f"[{line.severity.upper()}] " if line.severity else ""
        text = f"{_DIGEST_MARKS.get(line.status, '•')} #{line.id} " + _escape_within(
            severity + line.title, 160
        )
        if line.status == "acknowledged" and line.acked_by:
            text += " — " + escape(line.acked_by[:64])
        if not room.fits(text, reserve=reserve):
            break
        body.append(room.take(text))
        shown += 1
    if count > shown:
        body.append(room.take(more.format(n=count - shown)))
    body.append(room.take(footer))
    return "\n".join(body)


def button_acknowledge_one(incident_id: int) -> str:
    """A digest's button for one of its alerts."""
    return f"✋ #{incident_id}"


class _Room:
    """What is left of a message's length, lines joined by newlines."""

    def __init__(self, limit: int) -> None:
        self.left = limit + 1  # n lines need n - 1 newlines

    def fits(self, line: str, *, reserve: int = 0) -> bool:
        return _shown_length(line) + 1 + reserve <= self.left

    def take(self, line: str) -> str:
        cost = _shown_length(line) + 1
        if cost > self.left:
            return ""
        self.left -= cost
        return line


def _escape_within(text: str, limit: int) -> str:
    """`text` escaped for HTML, cut (with "…") so that the escaped form has at most `limit`
    UTF-16 units; never cut inside an entity."""
    escaped = escape(text)
    if _shown_length(escaped) <= limit:
        return escaped
    low, high = 0, len(text)  # the longest prefix whose escaped form fits with the ellipsis
    while low < high:
        middle = (low + high + 1) // 2
        if _shown_length(escape(text[:middle].rstrip()) + "…") <= limit:
            low = middle
        else:
            high = middle - 1
    return escape(text[:low].rstrip()) + "…" if limit > 0 else ""


@fitted
def contacts_text(
    contacts: list[Contact], *, offset: int = 0, total: int | None = None, masked: bool = False
) -> str:
    """A page of contacts (from `offset`, of `total`); numbers masked in groups."""
    if not contacts:
        return _("No contacts yet. Admins add them with /contact add &lt;alias&gt; &lt;phone&gt;.")
    header = _("Contacts {first}-{last} of {total}:").format(
        first=offset + 1, last=offset + len(contacts), total=total or len(contacts)
    )
    lines = [header]
    for contact in contacts:
        number = mask(contact.phone_display) if masked else contact.phone_display
        lines.append(f"<b>{escape(contact.alias)}</b> {escape(number)}")
    return "\n".join(lines)


@fitted
def teams_text(
    teams: list[Team], now: datetime, *, offset: int = 0, total: int | None = None
) -> str:
    if not teams:
        return _("No teams yet. Admins add one with /team add &lt;name&gt; in its chat.")
    lines = [
        _("Teams {first}-{last} of {total}:").format(
            first=offset + 1, last=offset + len(teams), total=total or len(teams)
        )
    ]
    for team in teams:
        lines.append(
            _(
                "<b>{name}</b> (chat {chat}): on call {who}; list {members}; {attempts} attempts "
                "each, {wait} s apart, {rounds} rounds"
            ).format(
                name=escape(team.name),
                chat=team.chat_id,
                who=escape(on_call_now(team, now) or "-"),
                members=escape(" → ".join(team.members) or "-"),
                attempts=team.attempts_per_person,
                wait=team.wait_seconds,
                rounds=team.max_rounds,
            )
            + "; "
            + team_policy_text(team)
        )
    return "\n".join(lines)


def team_policy_text(team: Team) -> str:
    never = _("never")
    return _("acknowledgement holds {ack}; pages again after exhaustion: {repage}").format(
        ack=duration_text(team.ack_timeout) if team.ack_timeout else never,
        repage=duration_text(team.repage_after) if team.repage_after else never,
    )


@fitted
def on_call_text(team: Team, now: datetime) -> str:
    """Who is on call now, until when, who is next, and the overrides still to run."""
    schedule = team_schedule(team)
    current = schedule.now(now)
    if current.who is None and not team.members:
        return _("Team {team} has nobody on its list yet.").format(team=escape(team.name))
    lines = [
        _("On call for {team}: <b>{who}</b>").format(
            team=escape(team.name), who=escape(current.who or "-")
        )
    ]
    zone = schedule.zone

    def when(moment: datetime) -> str:
        return escape(f"{moment.astimezone(zone):%Y-%m-%d %H:%M} {zone.key}")

    if current.override is not None:
        lines.append(_("covering (override by {by})").format(by=escape(current.override.by[:64])))
    if current.until is not None:
        lines.append(
            _("until {time}; next: <b>{who}</b>").format(
                time=when(current.until), who=escape(current.next or "-")
            )
        )
    coming = [o for o in schedule.overrides if o.end > now]
    if coming:
        lines.append(_("Overrides:"))
        lines += [
            _("• {who} from {start} to {end}, set by {by}").format(
                who=escape(o.alias),
                start=when(max(o.start, now)),
                end=when(o.end),
                by=escape(o.by[:64]),
            )
            for o in coming
        ]
    return "\n".join(lines)


@fitted
def test_page_text(team: Team, incident_id: int) -> str:
    return _(
        "Test page {id} of team <b>{team}</b> started: its plan runs for real (the post, the "
        "rings, the waits) and ends at the first answer or Acknowledge."
    ).format(id=incident_id, team=escape(team.name))


@fitted
def override_set_text(team: Team, now: datetime) -> str:
    return _("Override saved.") + "\n" + on_call_text(team, now)


@fitted
def team_created_text(team: Team, token: str) -> str:
    return _(
        "Team <b>{name}</b> posts alerts to this chat. Its alert intake token (shown once):\n"
        "<code>{token}</code>\nSend alerts to /alerts/alertmanager/{name}, "
        "/alerts/grafana/{name} or /alerts/generic/{name} with the header "
        "<code>Authorization: Bearer &lt;token&gt;</code>."
    ).format(name=escape(team.name), token=escape(token))


@fitted
def team_token_text(name: str, chat_id: int, token: str) -> str:
    """The intake token, for the admin's private chat only."""
    return _(
        "Team <b>{name}</b> posts alerts to chat <code>{chat}</code>. Its alert intake token "
        "(shown once):\n<code>{token}</code>\nSend alerts to /alerts/alertmanager/{name}, "
        "/alerts/grafana/{name} or /alerts/generic/{name} with the header "
        "<code>Authorization: Bearer &lt;token&gt;</code>. Any older token of the team no "
        "longer works."
    ).format(name=escape(name), chat=chat_id, token=escape(token))


@fitted
def team_token_sent_text(team: Team) -> str:
    return _(
        "Team <b>{name}</b> posts alerts to chat <code>{chat}</code>. I sent its intake token "
        "to you privately."
    ).format(name=escape(team.name), chat=team.chat_id)


@fitted
def team_moved_text(team: Team) -> str:
    return _(
        "Team <b>{name}</b> now posts alerts to this chat. Its intake token is unchanged."
    ).format(name=escape(team.name))


def done_text() -> str:
    return _("Done.")


def incident_unposted_text(incident: Incident, team: Team, reason: str) -> str:
    """To the admins in private: the team's chat cannot be reached, so acknowledge here."""
    return _(
        "⚠️ I cannot post to the chat of team <b>{team}</b> (Telegram: {reason}). Incident "
        "<b>{id}</b> pages people all the same: acknowledge it here with the button or "
        "<code>/ack {id}</code>."
    ).format(team=escape(team.name), reason=escape(reason[:200]), id=incident.id)


def button_acknowledge() -> str:
    return _("✋ Acknowledge")


def hung_up_text() -> str:
    return _("Hanging up.")


def export_caption(days: int, rows: int) -> str:
    return _("Audit of the last {days} days: {rows} entries.").format(days=days, rows=rows)


def button_hang_up() -> str:
    return _("📴 Hang up")


def button_talk() -> str:
    return _("🎧 Talk")


def button_call_now() -> str:
    return _("📞 Call now")


def button_newer() -> str:
    return _("◀️ Newer")


def button_older() -> str:
    return _("Older ▶️")


@fitted
def needs_permission_text(outcome: NeedsPermission, phone: Phone, *, masked: bool) -> str:
    text = _(
        "🔒 {number} has not allowed WhatsApp calls from this business yet. Meta requires "
        "their permission before a call."
    ).format(number=number_label(phone, masked=masked))
    if outcome.probe.may_ask:
        return text + "\n" + _("Press <b>Ask for permission</b> to send them the request.")
    return text + "\n" + _("Meta does not allow another permission request right now.")


@fitted
def confirm_text(
    phone: Phone, note: str | None, *, masked: bool, ttl: int, spoken: bool = False
) -> str:
    return (
        _("Call {number}?").format(number=number_label(phone, masked=masked))
        + _note_line(note, spoken)
        + "\n"
        + _("Confirm within {seconds} s.").format(seconds=ttl)
    )


@fitted
def calling_text(phone: Phone, *, masked: bool) -> str:
    return _("Calling {number}…").format(number=number_label(phone, masked=masked))


def cancelled_text() -> str:
    return _("Cancelled. No call was placed.")


@fitted
def permission_sent_text(phone: Phone, *, masked: bool) -> str:
    return _("📨 Permission request sent to {number}. You can call once they accept.").format(
        number=number_label(phone, masked=masked)
    )


def default_permission_reason() -> str:
    return _("May we call you on WhatsApp?")


def whoami_text(user_id: int | None, chat_id: int, chat_type: str) -> str:
    return (
        _("Your Telegram user id: <code>{user}</code>").format(user=user_id if user_id else "?")
        + "\n"
        + _("This chat id: <code>{chat}</code> ({kind})").format(
            chat=chat_id, kind=escape(chat_type)
        )
    )


def help_text(*, is_caller: bool, is_admin: bool, number_type: NumberType | None) -> str:
    lines = [
        _("I place WhatsApp voice calls through Pilot Status."),
        "",
        _(
            "<code>/call &lt;phone&gt; [note]</code> — call a WhatsApp number; in groups I ask you "
            "to confirm first."
        ),
        _(
            "<code>/call &lt;phone&gt; say: &lt;text&gt;</code> — the callee hears the text when "
            "they answer (<code>say en:</code> or <code>say pt:</code> picks the voice), then I "
            "hang up."
        ),
        _("/calls [n] — this chat's recent calls."),
        _("/status &lt;call id&gt; — fresh state of a call (or reply /status to its message)."),
        _("/hangup &lt;call id&gt; — end a call (or press Hang up on its message)."),
        _("/permission &lt;phone&gt; — whether a number allows calls from us (Meta numbers)."),
        _("/oncall [team] — who is on call; /contact list and /team list — contacts and teams."),
        _(
            "/ack &lt;incident id&gt; — acknowledge an alert: in its team's chat, or an admin in "
            "private (when the team's chat cannot be reached)."
        ),
        _(
            "/silence &lt;team&gt; &lt;duration&gt; [label=value] [reason], /silence list, "
            "/unsilence &lt;id&gt; — hold a team's pages back (alerts are posted quietly); "
            "/heartbeat list — the team's heartbeats and their last ping."
        ),
        _("/whoami — your Telegram id and this chat's id, for the admins' configuration."),
        _("/help — this message."),
    ]
    if not is_caller:
        lines += ["", _("You are not an operator yet: send /whoami and give the id to an admin.")]
    if is_admin:
        kind = {
            NumberType.META: _("Meta Cloud API (needs call permission; the bot is the media end)"),
            NumberType.WEB: _("web (no permission step)"),
            None: _("not detected yet (Pilot Status unreachable); I will retry on the next /call"),
        }[number_type]
        lines += [
            "",
            _("Admin: business number type: {kind}").format(kind=kind),
            _("/export [days] — the audit trail as a CSV file."),
            _("/contact add|remove, /team add|members|policy|rotation|token, /oncall set."),
            _("/heartbeat add &lt;name&gt; every 5m grace 2m, /heartbeat remove &lt;name&gt;."),
        ]
    return "\n".join(lines)


COMMANDS: tuple[tuple[str, LazyProxy], ...] = (
    ("call", __("Start a WhatsApp call: /call <phone> [note]")),
    ("calls", __("Recent calls of this chat")),
    ("status", __("Fresh state of a call: /status <call id>")),
    ("hangup", __("End a call: /hangup <call id>")),
    ("permission", __("WhatsApp call permission of a number")),
    ("oncall", __("Who is on call")),
    ("contact", __("Contacts: /contact list")),
    ("team", __("Teams: /team list")),
    ("ack", __("Acknowledge an incident: /ack <incident id>")),
    ("silence", __("Silence a team's pages: /silence <team> <duration> [reason]")),
    ("unsilence", __("End a silence: /unsilence <id>")),
    ("heartbeat", __("Heartbeats: /heartbeat list")),
    ("whoami", __("Show your Telegram id and this chat's id")),
    ("help", __("How to use the bot")),
)


def button_confirm() -> str:
    return _("✅ Confirm")


def button_cancel() -> str:
    return _("✖️ Cancel")


def button_ask_permission() -> str:
    return _("🔓 Ask for permission")
