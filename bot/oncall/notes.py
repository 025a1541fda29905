"""The lines an escalation adds to its incident's post, in the team's language.

Each note is a template marked for the catalogue (`_` here only marks: pybabel extracts it,
bot/locales has its Portuguese) and rendered when it is written, in the team's `locale`, by
the translator the app gives the engine (aiogram's I18n). Stored as rendered text: the post
shows it as it was said. Nothing here knows aiogram.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

Translate = Callable[[str, str], str]  # (locale, English template) → the template in that locale


def _(template: str) -> str:
    """Marks a template for the catalogue; translated when rendered (see `Notes`)."""
    return template


RESOLVED = _("{time} resolved")
PAGING_AGAIN = _("{time} still firing {after} after the escalation ended: paging again")
STILL_FIRING = _("still firing, escalation exhausted at {time}")
NOBODY_ON_LIST = _("{time} team {team} has nobody on its list")
ENDED = _("{time} nobody acknowledged: escalation ended")
NO_CONTACT = _("{time} {alias}: no such contact, skipped")
THROTTLED = _("{time} throttle held the call to {alias} until {until}")
CALLING = _("{time} calling {alias}")
CALL_FAILED = _("{time} call to {alias} failed: {code}")
UNKNOWN_NOT_AGAIN = _("{time} call to {alias}: outcome unknown ({code}), not rung again")
UNKNOWN_AFTER_RESTART = _("{time} call to {alias}: outcome unknown, not rung again")
PLACED_BEFORE_RESTART = _("{time} call to {alias} was placed before a restart")
NO_PERMISSION = _("{time} {alias} has not allowed WhatsApp calls; next person")
PERMISSION_ASKED = _(
    "{time} {alias} has not allowed WhatsApp calls: permission request sent; next person"
)
PERMISSION_ASK_FAILED = _(
    "{time} {alias} has not allowed WhatsApp calls: permission request failed ({code}); next person"
)
SILENCED = _("{time} silenced until {until} by {who}")
SILENCE_OVER = _("{time} silence over: paging")
HEARTBEAT_MISSED = _("heartbeat {name} missed since {since}")
HEARTBEAT_EVERY = _("expected every {every}")
HEARTBEAT_EVERY_GRACE = _("expected every {every}, grace {grace}")
HEARTBEAT_LAST_PING = _("last ping {last} UTC")
HEARTBEAT_NEVER = _("never pinged")
QUOTA = _("{time} Meta quota nearly spent: {used} of {allowed}")
ACK_EXPIRED = _("{time} acknowledged by {who} {held} ago and not resolved: firing again")
ANSWERED_WAITING = _("{time} answered; waiting for Acknowledge")
ANSWERED_ACK = _("{time} acknowledged by answering the call")
NOT_ANSWERED = _("{time} not answered ({how})")
TEST_TITLE = _("Test page of team {team}")
TEST_TEXT = _(
    "A test of the team's paging: the plan runs for real and ends at the first answer or "
    "Acknowledge."
)
TEST_STARTED = _("{time} test page started by {who}")
TEST_ENDED = _("{time} test page ended: {how}")
TEST_ANSWERED = _("answered by {who}")
TEST_ACKED = _("acknowledged by {who}")

# how a ring ended, as NOT_ANSWERED says it
ENDINGS = {
    "missed": _("missed"),
    "rejected": _("rejected"),
    "failed": _("failed"),
    "completed": _("ended"),
    "not placed": _("not placed"),
}


def hm(moment: datetime) -> str:
    return moment.strftime("%H:%M")


class Notes:
    """Renders notes in a locale; without a translator, in English."""

    def __init__(self, translate: Translate | None = None) -> None:
        self._translate = translate or (lambda _locale, template: template)

    def say(self, locale: str, template: str, *, at: datetime | None = None, **params: str) -> str:
        if at is not None:
            params["time"] = hm(at)
        return self._translate(locale, template).format(**params)

    def ending(self, locale: str, label: str) -> str:
        template = ENDINGS.get(label)
        return self._translate(locale, template) if template else label
