"""Everything the bot says, as HTML with every user- or API-provided value escaped.

The error catalogue maps each code of `bot.errors` to a localized text naming what to do next.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import escape

from aiogram.utils.i18n import gettext as _
from aiogram.utils.i18n import lazy_gettext as __
from babel.support import LazyProxy

from bot import states
from bot.calls import NeedsPermission
from bot.errors import CallbotError
from bot.oncall import on_call_now
from bot.phones import Phone, mask
from bot.pilot_status.models import CallStatus, Limit, NumberType, PermissionProbe
from bot.storage.oncall import Contact, Incident, Team
from bot.storage.store import CallRecord, PermissionRequestRecord

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
        "<code>/contact remove &lt;name&gt;</code> or <code>/contact list</code>."
    ),
    "team_usage": __(
        "Usage: <code>/team add &lt;name&gt;</code> (in its chat), "
        "<code>/team members &lt;name&gt; &lt;contact…&gt;</code>, "
        "<code>/team policy &lt;name&gt; attempts=2 wait=300 rounds=2 ack_on_answer=no</code>, "
        "<code>/team rotation &lt;name&gt; weekly|none</code>, "
        "<code>/team token &lt;name&gt;</code> or <code>/team list</code>."
    ),
    "oncall_usage": __(
        "Usage: <code>/oncall [team]</code> or <code>/oncall set &lt;name&gt; [team]</code>."
    ),
    "interrupted": __(
        "The bot restarted before Pilot Status confirmed this call, and Pilot Status has no record "
        "of it: no call was placed. Send /call again."
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


def spoken_alert(team: str, title: str) -> str:
    return _("Alert for team {team}: {title}").format(team=team, title=title)


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


def permission_answered_text(request: PermissionRequestRecord) -> str:
    number = escape(mask(request.phone_display) if request.masked else request.phone_display)
    if request.status == "granted":
        return _("✅ {number} now allows WhatsApp calls from this business.").format(number=number)
    return _("🚫 {number} declined WhatsApp calls from this business.").format(number=number)


def incident_text(incident: Incident, team: Team) -> str:
    """A team's post of an alert: what fired, and what the escalation did."""
    severity = f"[{escape(incident.severity.upper())}] " if incident.severity else ""
    lines = [f"🚨 <b>{severity}{escape(incident.title)}</b>"]
    if incident.text:
        lines.append(escape(incident.text[:600]))
    if incident.labels:
        shown = list(incident.labels.items())[:6]
        lines.append(", ".join(f"<code>{escape(k)}={escape(v)}</code>" for k, v in shown))
    for number, url in enumerate(incident.links[:3], start=1):
        lines.append(
            f'<a href="{escape(url, quote=True)}">' + _("link {n}").format(n=number) + "</a>"
        )
    state = {
        "firing": _("🔴 firing, team {team}").format(team=escape(team.name)),
        "acknowledged": _("✅ acknowledged by {who} at {time}").format(
            who=escape(incident.acked_by or "?"),
            time=_clock(incident.acked_at) if incident.acked_at else "?",
        ),
        "resolved": _("✔️ resolved"),
        "exhausted": _("⚠️ nobody acknowledged; escalation ended"),
    }.get(incident.status, escape(incident.status))
    if incident.fired > 1:
        state += " " + _("(fired {n} times)").format(n=incident.fired)
    lines.append(state)
    lines.extend("• " + escape(note) for note in incident.notes[-8:])
    return "\n".join(lines)


def contacts_text(contacts: list[Contact]) -> str:
    if not contacts:
        return _("No contacts yet. Admins add them with /contact add &lt;alias&gt; &lt;phone&gt;.")
    return "\n".join(f"<b>{escape(c.alias)}</b> {escape(c.phone_display)}" for c in contacts)


def teams_text(teams: list[Team], now: datetime) -> str:
    if not teams:
        return _("No teams yet. Admins add one with /team add &lt;name&gt; in its chat.")
    lines = []
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
        )
    return "\n".join(lines)


def on_call_text(team: Team, now: datetime) -> str:
    who = on_call_now(team, now)
    if who is None:
        return _("Team {team} has nobody on its list yet.").format(team=escape(team.name))
    return _("On call for {team}: <b>{who}</b>").format(team=escape(team.name), who=escape(who))


def team_created_text(team: Team, token: str) -> str:
    return _(
        "Team <b>{name}</b> posts alerts to this chat. Its alert intake token (shown once):\n"
        "<code>{token}</code>\nSend alerts to /alerts/alertmanager/{name}, "
        "/alerts/grafana/{name} or /alerts/generic/{name} with the header "
        "<code>Authorization: Bearer &lt;token&gt;</code>."
    ).format(name=escape(team.name), token=escape(token))


def done_text() -> str:
    return _("Done.")


def button_acknowledge() -> str:
    return _("✋ Acknowledge")


def hung_up_text() -> str:
    return _("Hanging up.")


def export_caption(days: int, rows: int) -> str:
    return _("Audit of the last {days} days: {rows} entries.").format(days=days, rows=rows)


def button_hang_up() -> str:
    return _("📴 Hang up")


def button_call_now() -> str:
    return _("📞 Call now")


def button_newer() -> str:
    return _("◀️ Newer")


def button_older() -> str:
    return _("Older ▶️")


def needs_permission_text(outcome: NeedsPermission, phone: Phone, *, masked: bool) -> str:
    text = _(
        "🔒 {number} has not allowed WhatsApp calls from this business yet. Meta requires "
        "their permission before a call."
    ).format(number=number_label(phone, masked=masked))
    if outcome.probe.may_ask:
        return text + "\n" + _("Press <b>Ask for permission</b> to send them the request.")
    return text + "\n" + _("Meta does not allow another permission request right now.")


def confirm_text(
    phone: Phone, note: str | None, *, masked: bool, ttl: int, spoken: bool = False
) -> str:
    return (
        _("Call {number}?").format(number=number_label(phone, masked=masked))
        + _note_line(note, spoken)
        + "\n"
        + _("Confirm within {seconds} s.").format(seconds=ttl)
    )


def calling_text(phone: Phone, *, masked: bool) -> str:
    return _("Calling {number}…").format(number=number_label(phone, masked=masked))


def cancelled_text() -> str:
    return _("Cancelled. No call was placed.")


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
    ("whoami", __("Show your Telegram id and this chat's id")),
    ("help", __("How to use the bot")),
)


def button_confirm() -> str:
    return _("✅ Confirm")


def button_cancel() -> str:
    return _("✖️ Cancel")


def button_ask_permission() -> str:
    return _("🔓 Ask for permission")
