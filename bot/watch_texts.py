"""What the bot says about heartbeats and silences, as HTML with every user value escaped."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape

from aiogram.utils.i18n import gettext as _

from bot.oncall.engine import duration_text
from bot.storage.oncall import Team
from bot.storage.watch import Heartbeat, Silence
from bot.texts import fitted


def _when(moment: datetime, now: datetime) -> str:
    """14:00 UTC today, else 2026-12-05 14:00 UTC."""
    moment, now = moment.astimezone(UTC), now.astimezone(UTC)
    if moment.date() == now.date():
        return moment.strftime("%H:%M UTC")
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _every(heartbeat: Heartbeat) -> str:
    if heartbeat.grace_seconds:
        return _("every {interval}, grace {grace}").format(
            interval=duration_text(heartbeat.interval_seconds),
            grace=duration_text(heartbeat.grace_seconds),
        )
    return _("every {interval}").format(interval=duration_text(heartbeat.interval_seconds))


def _matchers(silence: Silence) -> str:
    if not silence.matchers:
        return _("all alerts")
    return ", ".join(f"<code>{escape(k)}={escape(v)}</code>" for k, v in silence.matchers.items())


@fitted
def heartbeats_text(heartbeats: list[Heartbeat], teams: Mapping[int, str], now: datetime) -> str:
    if not heartbeats:
        return _(
            "No heartbeats yet. Admins add one in the team's chat with "
            "<code>/heartbeat add &lt;name&gt; every 5m grace 2m</code>."
        )
    lines = [_("Heartbeats:")]
    for beat in heartbeats[:50]:
        if beat.state == "missed":
            state = _("🔴 missed since {time}").format(
                time=_when(beat.missed_since or beat.expected_at, now)
            )
        elif beat.last_ping_at is None:
            state = _("⏳ never pinged (missed after {time})").format(time=_when(beat.due_at, now))
        else:
            state = _("✅ last ping {time}").format(time=_when(beat.last_ping_at, now))
        name = f"{teams.get(beat.team_id, '?')}/{beat.name}"
        lines.append(f"<b>{escape(name)}</b> {_every(beat)}: {state}")
    if len(heartbeats) > 50:
        lines.append(_("…and {n} more").format(n=len(heartbeats) - 50))
    return "\n".join(lines)


@fitted
def heartbeat_added_text(team: Team, heartbeat: Heartbeat) -> str:
    return _(
        "Heartbeat <b>{name}</b> of team {team}: expected {every}. Ping it with "
        "<code>POST /heartbeat/{team}/{name}</code> and the team's intake token as "
        "<code>Authorization: Bearer &lt;token&gt;</code>; without a ping, an incident opens."
    ).format(name=escape(heartbeat.name), team=escape(team.name), every=_every(heartbeat))


@fitted
def silence_added_text(silence: Silence, team: Team, now: datetime) -> str:
    return _(
        "🔕 Silence <b>{id}</b> of team {team} until {until} ({matchers}): matching alerts are "
        "posted quietly and nobody is rung. End it early with <code>/unsilence {id}</code>."
    ).format(
        id=silence.id,
        team=escape(team.name),
        until=_when(silence.ends_at, now),
        matchers=_matchers(silence),
    )


@fitted
def silences_text(silences: list[Silence], teams: Mapping[int, str], now: datetime) -> str:
    if not silences:
        return _("No silences now or to come.")
    lines = [_("Silences:")]
    for silence in silences[:50]:
        if silence.starts_at > now:
            span = _("from {start} to {end}").format(
                start=_when(silence.starts_at, now), end=_when(silence.ends_at, now)
            )
        else:
            span = _("until {end}").format(end=_when(silence.ends_at, now))
        line = _("<b>{id}</b> {team} {span} by {who} ({matchers})").format(
            id=silence.id,
            team=escape(teams.get(silence.team_id, "?")),
            span=span,
            who=escape(silence.created_by[:64]),
            matchers=_matchers(silence),
        )
        if silence.reason:
            line += f": {escape(silence.reason)}"
        lines.append(line)
    return "\n".join(lines)


@fitted
def unsilenced_text(silence: Silence, held: int) -> str:
    if held:
        return _("Silence <b>{id}</b> ended: {n} incidents it held back page now.").format(
            id=silence.id, n=held
        )
    return _("Silence <b>{id}</b> ended.").format(id=silence.id)
