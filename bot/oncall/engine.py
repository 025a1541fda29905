"""On-call: alerts become incidents that ring people on WhatsApp until someone acknowledges.

The escalation plan of a team: the person on call first, then the rest of its list in order,
each `attempts_per_person` times, for `max_rounds` rounds. Each step rings one person; the next
step comes after `wait_seconds`, or at once when the call ends unanswered. Timers are stored
(`next_action_at`), so they survive a restart; acknowledging or resolving clears them, and a
step re-checks that under a row lock, so a stopped escalation never rings anyone afterwards.
A ring is placed once: a step is claimed with a lease (renewed while it runs) and a new
attempt, its fence; its call is stored on the incident right before `POST /v1/calls` (write
ahead), and whoever takes the step next settles that ring from the call record (placed, never
sent, or unknown even to the API's list) rather than ringing the person again.
Per-destination throttles hold a ring back rather than flood a phone (4 unanswered calls in a
row revoke a WhatsApp call permission); they are checked again when the ring is recorded,
under the number's lock, so replicas ringing one person for two incidents at once cannot both
pass. Several replicas share the timers: each claims due steps in batches, passing over
rows another replica holds (see bot/storage/oncall.py). Nothing here knows aiogram.

The post to the team's chat is an outbox step: stored as pending with the incident, tried at
once, and retried with backoff until Telegram takes it (an old post that is gone is replaced by
a new one). Ringing does not wait for it; when the chat cannot be reached, the admins are told
in private, with an Acknowledge button that works there. Acknowledging ends the ring in
progress and holds for the team's `ack_timeout`, then the incident fires again. An exhausted
escalation stays open: a repeat of its alert updates it, and pages again only after the team's
`repage_after`. While a silence holds an alert (bot/oncall/silences.py), its incident is posted
quietly and each step it comes to waits for the silence's end instead of ringing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from bot import states
from bot.calls.service import CallRequest, CallService, NeedsPermission, Started
from bot.errors import CallbotError, describe
from bot.oncall import notes
from bot.oncall.alerts import Alert
from bot.oncall.schedules import rotation_fields, team_schedule
from bot.ops.shutdown import InFlight
from bot.phones import Phone, mask, parse_phone, split_phone_and_note
from bot.pilot_status.errors import APIConnectionError, PilotStatusError
from bot.storage.oncall import (
    Claimed,
    Contact,
    Held,
    Incident,
    NewIncident,
    OnCallStore,
    PostShare,
    Team,
)
from bot.storage.store import CallRecord, utcnow
from bot.storage.watch import Silence
from bot.voice.speech import Speech

log = logging.getLogger(__name__)
LEASE = timedelta(seconds=15)
SYSTEM = 0  # the "operator" of the calls the escalation places
POST_WAIT = 5.0  # seconds one post attempt may take (intake waits for the first one)
# a post attempt is reserved this long: it takes at most POST_WAIT, and one cut off by a kill
# is retried soon after
POST_LEASE = timedelta(seconds=2 * POST_WAIT)
TEST_SOURCE = "test"  # the source of a test page's incident (`/team test`)
POST_GIVE_UP = timedelta(days=1)  # after that an unposted incident is only logged
# a step whose number is being called right now (another incident's ring, an operator's /call)
# is tried again this much later, not skipped
BUSY_RETRY = timedelta(seconds=1)
# How long a post waits, at most, for the steps this process is running: under a burst the
# rings go out first and the posts follow (a step that is stuck holds them back no longer).
RINGS_FIRST = 1.0
# How long the timer sleeps when what is due was left by a look that took nothing: it is in
# hand (a post waiting for the rings, a row another replica holds; a freed slot wakes the
# timer). Without it the timer looks again and again at once.
IN_HAND = 0.25
TELL_ADMINS_AFTER = 3  # failed posts in a row (Telegram down) before the admins are told
_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class PostFailed(Exception):
    """The post to a team's chat was not made. `unreachable`: Telegram refused it for good (the
    bot was removed, the chat is gone); otherwise it may work later (5xx, network, 429)."""

    def __init__(self, reason: str, *, unreachable: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.retry_after = retry_after


def parse_duration(value: object) -> int:
    """'4h', '30m', '90s', '2d', 900 or '900' → seconds; 'off' (or 0) → 0."""
    text = str(value).strip().lower()
    if text in ("off", "no", "never"):
        return 0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{str(value)[:32]!r} is not a duration (e.g. 4h, 30m, 900, off)")
    return int(match.group(1)) * _UNIT[match.group(2)]


def policy_duration(value: object) -> int:
    """A team's `ack_timeout` or `repage_after`: off (0), or 1 minute to 7 days."""
    seconds = parse_duration(value)
    return seconds and max(60, min(7 * 86400, seconds))


def duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


@dataclass(frozen=True)
class Throttle:
    calls: int
    seconds: int

    @classmethod
    def parse_many(cls, text: str) -> tuple[Throttle, ...]:
        """'1/60,3/900' → at most 1 call a minute and 3 in 15 minutes."""
        limits = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            calls, _, seconds = part.partition("/")
            limits.append(cls(int(calls), int(seconds)))
        return tuple(limits)


@dataclass(frozen=True)
class _Known:
    """What a step looks up before it rings, read once for a batch of claimed steps."""

    team: Team
    silence: Silence | None
    contacts: Mapping[str, Contact]


class SilenceCheck(Protocol):
    """Whether a silence holds a team's alert now (bot/oncall/silences.py)."""

    async def holding(
        self, team_id: int, labels: Mapping[str, str], now: datetime
    ) -> Silence | None: ...

    async def holding_each(
        self, alerts: Sequence[tuple[int, Mapping[str, str]]], now: datetime
    ) -> list[Silence | None]:
        """`holding` for each (team id, labels) at once."""
        ...


class IncidentView(Protocol):
    """Where incidents show (the team's chat; implemented with aiogram in bot/live.py)."""

    async def post_incident(self, incident: Incident, team: Team) -> int:
        """Make the post show this state: edit it, or send a new one when there is none (or it
        is gone). Returns its message id; raises PostFailed."""
        ...

    async def show_incident(self, incident: Incident, team: Team) -> None: ...

    async def post_digest(self, head: Incident, lines: list[Incident], team: Team) -> int:
        """Like post_incident, for a digest: one post listing `lines`, each with its own
        Acknowledge button while it fires."""
        ...

    async def tell_admins(
        self, incident: Incident, team: Team, admins: tuple[int, ...], reason: str
    ) -> int:
        """Tell the admins in private that the team's chat is unreachable; how many were told."""
        ...


TEAM_FIELDS = (
    "members",
    "on_call",
    "rotation",
    "attempts_per_person",
    "wait_seconds",
    "max_rounds",
    "answer_is_ack",
    "ack_timeout",
    "repage_after",
    "locale",
)
LOCALES = ("en", "pt_BR")
DURATION_FIELDS = ("ack_timeout", "repage_after")
_ALIAS = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


def valid_alias(alias: object) -> str:
    text = str(alias).strip().lower()
    if not _ALIAS.fullmatch(text):
        raise CallbotError("bad_alias", {"alias": str(alias)[:32]})
    return text


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def plan(team: Team, now: datetime) -> list[str]:
    """Who each step rings, in order."""
    first = on_call_now(team, now)
    order = [first, *(m for m in team.members if m != first)] if first else list(team.members)
    steps = [alias for alias in order for _ in range(max(1, team.attempts_per_person))]
    return steps * max(1, team.max_rounds)


def on_call_now(team: Team, now: datetime) -> str | None:
    """Who is on call: an override, the pinned person, else the schedule's shift."""
    return team_schedule(team).who_at(now)[0]


class OnCall:
    def __init__(
        self,
        store: OnCallStore,
        calls: CallService,
        view: IncidentView,
        *,
        throttles: tuple[Throttle, ...] = (Throttle(1, 60), Throttle(3, 900)),
        locale: str = "en",
        clock: Callable[[], datetime] = utcnow,
        speech: Callable[[Team, Incident], Speech | None] = lambda _team, _incident: None,
        lease: timedelta = LEASE,
        post_share: PostShare | None = None,
        drain: InFlight | None = None,
        admins: tuple[int, ...] = (),
        on_step: Callable[[str], None] | None = None,
        silences: SilenceCheck | None = None,
        translate: notes.Translate | None = None,
    ) -> None:
        self._store = store
        self._silences = silences  # held back from ringing while one holds
        self._notes = notes.Notes(translate)  # the post's lines, in each team's language
        self._on_step = on_step  # told what each step did (bot.ops.metrics counts it)
        self.lease = lease  # a claimed step is renewed every third of it while it runs
        self.post_share = post_share  # a team's posts a minute; past it, a digest (None: off)
        self._drain = drain or InFlight()
        self._running: set[int] = set()  # incidents whose step this process is running
        self._stopping = False
        self._timer_running = False  # run_forever runs: intake may take first steps itself
        # Set once the calls' recovery after a start has asked the API about attempts a crash
        # left half-done: only then does a ring of unknown outcome count as "maybe rung".
        self.calls_recovered = asyncio.Event()
        self._speech = speech  # what a ring says: (team, incident) → speech, or None
        self._calls = calls
        self._view = view
        self._throttles = throttles
        self._locale = locale
        self.clock = clock
        self._wake = asyncio.Event()
        self._wakes_at: datetime | None = None  # when the sleeping timer looks next (else now)
        self._admins = admins  # told in private when a team's chat cannot be reached
        # one post attempt per incident at a time; the lock lives while someone holds it
        self._post_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._post_tasks: set[asyncio.Task[bool]] = set()  # refreshes off the hot path
        # one ring of a number at a time from this process; a lock lives while it is used
        self._dialing: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # steps going on by themselves: first steps started by intake, the timer's
        self._step_tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None  # the timer's (see _timer_slots)
        # a running step's "ring on its way" (see _start_step), called once its POST goes out
        self._ringing: dict[int, Callable[[], None]] = {}
        # steps running now (their POSTs are the hot path): posts wait for them, bounded
        self._steps_running = 0
        self._steps_over = asyncio.Event()  # set while no step runs
        self._steps_over.set()
        self._post_queued: set[int] = set()  # refreshes waiting for their turn (_publish_soon)
        self._posting: set[int] = set()  # posts the timer is making now
        # the timer's posts, going on after its run
        self._timer_posts: set[asyncio.Future[list[bool | BaseException]]] = set()

    def _locale_of(self, team: Team) -> str:
        return team.locale or self._locale

    def say(self, of: Team, template: str, **params: str) -> str:
        """A template of bot.oncall.notes in the team's language (a heartbeat's incident)."""
        return self._notes.say(self._locale_of(of), template, at=None, **params)

    def _note(self, of: Team, template: str, *, at: datetime, **params: str) -> str:
        """A line of the post, in the team's language."""
        return self._notes.say(self._locale_of(of), template, at=at, **params)

    def _silenced_note(self, of: Team, silence: Silence, now: datetime) -> str:
        return self._note(
            of, notes.SILENCED, at=now, until=_hm(silence.ends_at), who=silence.created_by
        )

    # configuration

    async def load(self, config: dict[str, object], *, region: str) -> tuple[int, int]:
        """Contacts and teams from a parsed TOML file (see the README); returns the counts."""
        now = self.clock()
        contacts = config.get("contacts", {})
        teams = config.get("teams", {})
        if not isinstance(contacts, dict) or not isinstance(teams, dict):
            raise ValueError("[contacts] and [teams] must be tables")
        for alias, entry in contacts.items():
            # `alice = "+55…"`, or `alice = { phone = "+55…", telegram = 1234 }`
            number, telegram = (
                (entry.get("phone", ""), entry.get("telegram"))
                if isinstance(entry, dict)
                else (entry, None)
            )
            phone = parse_phone(str(number), region)
            await self._store.save_contact(
                Contact(
                    valid_alias(alias),
                    phone.e164,
                    phone.display,
                    int(telegram) if telegram is not None else None,
                ),
                at=now,
            )
        for name, team in teams.items():
            if not isinstance(team, dict) or "chat_id" not in team:
                raise ValueError(f"team {name}: chat_id is required")
            token = team.get("token")
            fields = {k: team[k] for k in TEAM_FIELDS if k in team}
            if "members" in fields:
                fields["members"] = [valid_alias(a) for a in fields["members"]]
            if "locale" in fields and fields["locale"] not in LOCALES:
                raise ValueError(f"team {name}: locale: one of {', '.join(LOCALES)}")
            for key in DURATION_FIELDS:
                if key in fields:
                    try:
                        fields[key] = policy_duration(fields[key])
                    except ValueError as err:
                        raise ValueError(f"team {name}: {key}: {err}") from None
            try:
                fields |= rotation_fields(team)
            except ValueError as err:
                raise ValueError(f"team {name}: {err}") from None
            await self._store.save_team(
                valid_alias(name),
                chat_id=int(team["chat_id"]),
                token_hash=token_hash(str(token)) if token else None,
                at=now,
                **fields,
            )
        return len(contacts), len(teams)

    async def callee(self, chat_id: int, text: str, *, region: str) -> tuple[Phone, str | None]:
        """What `/call` names: a contact's alias or a number, then the note. In a team's chat,
        only the team's members may be called."""
        first, _, rest = text.strip().partition(" ")
        contact = None
        if _ALIAS.fullmatch(first.lower()):
            contact = await self._store.contact(first.lower())
            if contact is None:
                raise CallbotError("unknown_contact", {"alias": first[:32]})
            phone, note = Phone(contact.phone, contact.phone_display), rest.strip() or None
        else:
            phone, note = split_phone_and_note(text, region)
        team = await self._store.team_of_chat(chat_id)
        if team is not None:
            members = [await self._store.contact(alias) for alias in team.members]
            if phone.e164 not in {m.phone for m in members if m is not None}:
                raise CallbotError("not_in_team", {"team": team.name})
        return phone, note

    # intake

    async def authorize(self, team_name: str, token: str) -> Team | None:
        team = await self._store.team(team_name)
        if team is None or not team.token_hash:
            return None
        return team if hmac.compare_digest(team.token_hash, token_hash(token)) else None

    async def intake(self, team: Team, alert: Alert) -> tuple[str, Incident | None]:
        """Store the alert first, then show it. Returns what happened and the incident."""
        now = self.clock()
        open_incident = await self._store.open_incident(team.id, alert.dedup_key)
        if not alert.firing:
            if open_incident is None:
                return "ignored", None
            incident, _ = await self._store.update_incident(
                open_incident.id,
                at=now,
                status="resolved",
                next_action_at=None,
                note=self._note(team, notes.RESOLVED, at=now),
                repost=True,
            )
            assert incident is not None
            await self._publish(incident.id)
            return "resolved", incident
        if open_incident is not None and open_incident.status == "exhausted":
            return await self._still_firing(open_incident, team)
        if open_incident is not None:
            # The monitoring's repeat (or its retry after an error) refreshes the post, and
            # makes it if it was never made.
            incident, _ = await self._store.update_incident(
                open_incident.id,
                at=now,
                fired=open_incident.fired + 1,
                # a group that grew (or shrank) shows its current alerts
                title=alert.title,
                alert_items=list(alert.items),
                alert_count=alert.count,
                post_status="pending",
                post_next_at=now,  # at once, even if a retry was waiting
            )
            assert incident is not None
            await self._publish(incident.id)
            return "updated", incident
        silence = await self._silence(team, alert.labels, now)
        rings_now = self._rings_at_intake and silence is None
        incident = await self._store.create_incident(
            NewIncident(
                team_id=team.id,
                dedup_key=alert.dedup_key,
                source=alert.source,
                title=alert.title,
                text=alert.text,
                severity=alert.severity,
                labels=alert.labels,
                links=alert.links,
                items=alert.items,
                alert_count=alert.count,
                silence_id=silence.id if silence else None,
                held_until=silence.ends_at if silence else None,
                notes=(self._silenced_note(team, silence, now),) if silence else (),
            ),
            at=now,
            claim=self.lease if rings_now else None,
            share=self.post_share,
        )
        log.info("incident %s for team %s: %s", incident.id, team.name, alert.source)
        if rings_now:
            rung = self._ring_first(incident, team, now)
            with suppress(TimeoutError):  # the post waits for the ring to be on its way
                async with asyncio.timeout(POST_WAIT):
                    await rung.wait()
        elif silence is None:
            self._wake.set()  # its first step is due now: the timer (maybe another's) takes it
        # else its first step is due when the silence ends: the timer takes it then
        await self._publish(incident.id)
        return "created", await self._store.incident(incident.id) or incident

    async def test_page(self, team: Team, by: str) -> Incident:
        """`/team test`: the team's plan for real (posts, rings, waits), labelled TEST, until
        the first answer or Acknowledge ends it (or its plan runs out)."""
        now = self.clock()
        locale = self._locale_of(team)
        incident = await self._store.create_incident(
            NewIncident(
                team_id=team.id,
                dedup_key=f"test:{now.isoformat()}:{secrets.token_hex(4)}",
                source=TEST_SOURCE,
                title=self._notes.say(locale, notes.TEST_TITLE, team=team.name),
                text=self._notes.say(locale, notes.TEST_TEXT),
                notes=(self._note(team, notes.TEST_STARTED, at=now, who=by),),
            ),
            at=now,
        )
        self._wake.set()
        log.info("test page %s for team %s", incident.id, team.name)
        await self._publish(incident.id)
        return await self._store.incident(incident.id) or incident

    @property
    def _rings_at_intake(self) -> bool:
        """Whether this process takes a new incident's first step itself: while its timer runs
        steps (a process without one, ONCALL_TICK_SECONDS=0, leaves them to the replicas that
        have one), and not once it is stopping."""
        return self._timer_running and not self._stopping

    def _ring_first(self, incident: Incident, team: Team, now: datetime) -> asyncio.Event:
        """The first step of a new incident, claimed when it was created, runs at once: not
        after the timer's next look, and not after the post, which follows from its write
        ahead, in parallel with the POST. Returns an event set once the ring is written ahead
        (its POST going out) or the step ended. A shutdown waits for it like any step."""
        rung = asyncio.Event()
        # intake found no silence holding it a moment ago
        known = _Known(team, silence=None, contacts={})
        task = self._start_step(incident, now, known, on_ring=rung.set, track=True)
        self._step_tasks.add(task)
        task.add_done_callback(self._step_done)
        return rung

    def _start_step(
        self,
        incident: Incident,
        now: datetime,
        known: _Known | None,
        *,
        on_ring: Callable[[], None],
        track: bool = False,
    ) -> asyncio.Task[None]:
        """Run a claimed step in a task. `on_ring` is called once, when its ring is on its way
        (written ahead: the POST goes out) or the step ended without one. With `track`, a
        shutdown waits for it (the timer's steps are tracked by run_due)."""
        called = False

        def rung() -> None:
            nonlocal called
            if not called:
                called = True
                on_ring()

        self._running.add(incident.id)
        self._ringing[incident.id] = rung

        async def step() -> None:
            self._steps_running += 1
            self._steps_over.clear()
            try:
                async with self._drain.track() if track else nullcontext():
                    await self._step(incident, now, known)
            finally:
                if self._ringing.get(incident.id) is rung:
                    self._rung(incident.id)
                rung()
                self._steps_running -= 1
                if not self._steps_running:
                    self._steps_over.set()

        return asyncio.create_task(step(), name=f"step {incident.id}")

    def _step_done(self, task: asyncio.Task[None]) -> None:
        """A step that went on by itself (a first step, the timer's) ended."""
        self._step_tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Its lease runs out and the timer takes the step again.
            log.error("on-call step failed", exc_info=error)

    async def _still_firing(self, incident: Incident, team: Team) -> tuple[str, Incident]:
        """A repeat of an alert whose escalation ran out: the same incident, paged again only
        once the team's `repage_after` has passed since."""
        now = self.clock()
        ended = incident.exhausted_at or incident.created_at
        if team.repage_after and now - ended >= timedelta(seconds=team.repage_after):
            reopened = await self._store.restart_escalation(
                incident.id,
                at=now,
                expected="exhausted",
                fired=incident.fired + 1,
                note=self._note(
                    team, notes.PAGING_AGAIN, at=now, after=duration_text(team.repage_after)
                ),
            )
            if reopened is not None:
                self._wake.set()
                log.info("incident %s of team %s pages again", incident.id, team.name)
                await self._publish(reopened.id)
                return "repaged", reopened
        tail = self._note(team, notes.STILL_FIRING, at=ended)
        said = bool(incident.notes) and incident.notes[-1].endswith(tail)
        updated, _ = await self._store.update_incident(
            incident.id,
            at=now,
            note=None if said else f"{_hm(now)} {tail}",
            fired=incident.fired + 1,
            post_status="pending",
            post_next_at=now,
        )
        assert updated is not None
        await self._publish(updated.id)
        return "updated", updated

    async def _silence(
        self, team: Team, labels: Mapping[str, str], now: datetime
    ) -> Silence | None:
        if self._silences is None:
            return None
        return await self._silences.holding(team.id, labels, now)

    async def acknowledge(
        self,
        incident_id: int,
        by: str,
        *,
        chat_id: int | None = None,
        admin: bool = False,
        note: str | None = None,
    ) -> Incident | None:
        """Stop the escalation and end the ring in progress; None when it was not firing.

        From a chat (`chat_id`), only the team's own chat may acknowledge, or an admin in
        private (`admin`): a button's data can be forged anywhere. Without `chat_id` (the rung
        person answered, on a team that counts that), there is nothing to check."""
        incident = await self._store.incident(incident_id)
        if incident is None:
            raise CallbotError("unknown_incident", {"id": str(incident_id)})
        team = await self._store.team_by_id(incident.team_id)
        assert team is not None
        if chat_id is not None and chat_id != team.chat_id and not admin:
            log.warning("acknowledge of incident %s refused from chat %s", incident_id, chat_id)
            raise CallbotError("ack_wrong_chat")
        now = self.clock()
        holds = timedelta(seconds=team.ack_timeout) if team.ack_timeout else None
        test = incident.source == TEST_SOURCE
        if test:  # the first answer or Acknowledge ends a test page
            how = note or self._notes.say(self._locale_of(team), notes.TEST_ACKED, who=by)
            note = self._note(team, notes.TEST_ENDED, at=now, how=how)
            holds = None
        incident, changed = await self._store.update_incident(
            incident_id,
            at=now,
            only_if_firing=True,
            status="resolved" if test else "acknowledged",
            next_action_at=now + holds if holds else None,  # the acknowledgement's timeout
            acked_by=by,
            acked_at=now,
            note=note,
            repost=True,
        )
        if incident is None or not changed:
            return None
        # the ring in progress: written ahead (its POST maybe unanswered yet), or placed
        ring = incident.ring_call_id or incident.call_id
        if ring is not None:
            await self._hang_up_ring(ring)
        self._publish_soon(incident.id)
        return incident

    async def _hang_up_ring(self, call_id: str) -> None:
        """Hang up an escalation's call that still rings (an answered one ends by itself)."""
        try:
            record = await self._calls.find(call_id)
            if record.terminal or record.connected_at is not None or not record.pilot_call_id:
                return
            await self._calls.hang_up(call_id, actor_id=SYSTEM, is_admin=True)
            log.info("ring %s ended: its incident was acknowledged", call_id)
        except (CallbotError, PilotStatusError) as err:
            log.warning("cannot end ring %s: %s", call_id, describe(err).code)

    # the post (an outbox step)

    def _publish_soon(self, incident_id: int) -> None:
        """The post's refresh without making the caller wait for Telegram (a webhook, a step):
        a task, awaited by `stop`; if it is lost, the timer makes the pending post. One that is
        still waiting for its turn (the incident's post lock) shows this change too: no second
        one is started for it."""
        if incident_id in self._post_queued:
            return
        self._post_queued.add(incident_id)
        task = asyncio.create_task(self._publish(incident_id), name=f"post {incident_id}")
        self._post_tasks.add(task)
        task.add_done_callback(self._post_done)

    def _post_done(self, task: asyncio.Task[bool]) -> None:
        self._post_tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("post refresh failed; the timer retries it", exc_info=error)

    async def close(self) -> None:
        """Let post refreshes in flight finish (bounded), then cancel what is left. First
        steps still running after the drain are cut off (their lease retakes them)."""
        running: list[asyncio.Future[Any]] = [*self._step_tasks, *self._timer_posts]
        for step in running:
            step.cancel()
        await asyncio.gather(*self._step_tasks, *self._timer_posts, return_exceptions=True)
        if self._post_tasks:
            await asyncio.wait(list(self._post_tasks), timeout=POST_WAIT)
        for task in list(self._post_tasks):
            task.cancel()
        await asyncio.gather(*self._post_tasks, return_exceptions=True)

    async def _publish(self, incident_id: int, *, timer: bool = False) -> bool:
        """One attempt at the incident's post, if it is due; a failure is retried later. The
        timer passes over a post another replica is claiming (it makes it, or it stays due).
        The steps this process is running (their rings) go first, for at most RINGS_FIRST."""
        with suppress(TimeoutError):
            async with asyncio.timeout(RINGS_FIRST):
                await self._steps_over.wait()
        lock = self._post_locks.setdefault(incident_id, asyncio.Lock())
        async with lock:  # a second caller then finds the post made, or makes the newer state
            self._post_queued.discard(incident_id)  # a change from now on needs a new turn
            now = self.clock()
            incident = await self._store.claim_post(incident_id, now, POST_LEASE, skip_locked=timer)
            if incident is None:
                return False
            team = await self._store.team_by_id(incident.team_id)
            assert team is not None
            if incident.digest_head:
                return await self._publish_digest(incident, team)
            try:
                async with asyncio.timeout(POST_WAIT):
                    message_id = await self._view.post_incident(incident, team)
            except TimeoutError:
                failure = PostFailed("no answer from Telegram", unreachable=False)
            except PostFailed as err:
                failure = err
            else:
                posted = await self._store.post_done(incident.id, message_id)
                if posted is not None and posted.shown() != incident.shown():
                    # changed while it was being posted: the newest state is shown last
                    await self._view.show_incident(posted, team)
                return True
            await self._post_failed(incident, team, failure)
            return False

    async def _publish_digest(self, head: Incident, team: Team) -> bool:
        """One attempt at a digest post (claimed, as its head's post): edited only when a line
        shows something new, so a storm's escalation notes cost no message."""
        lines = await self._store.digest_lines(head.id)
        shown = _fingerprint(lines)
        if head.post_message_id is not None and shown == head.digest_shown:
            await self._store.post_done(head.id, head.post_message_id, shown=shown)
            return True
        try:
            async with asyncio.timeout(POST_WAIT):
                message_id = await self._view.post_digest(head, lines, team)
        except TimeoutError:
            failure = PostFailed("no answer from Telegram", unreachable=False)
        except PostFailed as err:
            failure = err
        else:
            await self._store.post_done(head.id, message_id, shown=shown)
            if _fingerprint(await self._store.digest_lines(head.id)) != shown:
                # a line changed while it was being posted: the newest state is shown last
                await self._store.update_incident(head.id, at=self.clock(), repost=True)
                self._publish_soon(head.id)
            return True
        await self._post_failed(head, team, failure)
        return False

    async def _post_failed(self, incident: Incident, team: Team, failure: PostFailed) -> None:
        now = self.clock()
        attempts = incident.post_attempts + 1
        retry_at: datetime | None = now + timedelta(
            seconds=max(min(600, 5 * 2 ** min(attempts - 1, 10)), failure.retry_after or 0)
        )
        if now - incident.created_at > POST_GIVE_UP:
            retry_at = None
            log.error("incident %s never reached chat %s; giving up", incident.id, team.chat_id)
        await self._store.post_failed(incident.id, attempts=attempts, retry_at=retry_at)
        log.warning(
            "post of incident %s to chat %s failed (attempt %d): %s",
            incident.id,
            team.chat_id,
            attempts,
            failure.reason,
        )
        if failure.unreachable or attempts >= TELL_ADMINS_AFTER:
            await self._tell_admins(incident, team, failure.reason)
        if retry_at is not None:
            self._wake.set()  # the timer sleeps until the retry at most

    async def _tell_admins(self, incident: Incident, team: Team, reason: str) -> None:
        """Once per incident (the post is claimed meanwhile, so nobody else tells them); tried
        again with the next failed post until at least one admin was told."""
        if not self._admins or incident.admins_told_at is not None:
            return
        current = await self._store.incident(incident.id) or incident
        told = 0
        with suppress(TimeoutError):
            async with asyncio.timeout(POST_WAIT):
                told = await self._view.tell_admins(current, team, self._admins, reason)
        log.warning(
            "chat %s of team %s unreachable; %d admins told about incident %s",
            team.chat_id,
            team.name,
            told,
            incident.id,
        )
        if told:
            await self._store.mark_admins_told(incident.id, self.clock())

    async def _expire_acks(self) -> None:
        """Acknowledged incidents that were not resolved within the team's `ack_timeout`
        fire again: from the person on call, with a note and the post refreshed."""
        now = self.clock()
        for incident_id in await self._store.acks_expired(now):
            incident = await self._store.incident(incident_id)
            team = await self._store.team_by_id(incident.team_id) if incident else None
            if incident is None or team is None:
                continue
            held = duration_text(team.ack_timeout)
            reopened = await self._store.restart_escalation(
                incident_id,
                at=now,
                expected="acknowledged",
                note=self._note(
                    team, notes.ACK_EXPIRED, at=now, who=incident.acked_by or "?", held=held
                ),
                skip_locked=True,  # another replica is restarting it
            )
            if reopened is not None:  # its post is refreshed alongside its first step
                log.info("incident %s: acknowledgement timed out; firing again", incident_id)

    # the timer

    async def run_due(
        self, parallel: int = 16, *, wait_for_posts: bool = True, wait_for_steps: bool = True
    ) -> int:
        """Take every step that is due now, several at once; returns how many were taken. Each
        is claimed when a slot is free, so what this process cannot start yet stays free for
        another replica; a step made due again meanwhile waits for the next run. Due posts are
        made alongside, with slots of their own (a post waiting for Telegram's send limits never
        holds a ring back); without `wait_for_posts` (the timer) they go on after it returns.
        Without `wait_for_steps` (the timer), it takes what its free slots allow and returns:
        the steps go on, and the timer looks again once a slot is free or a timer is due."""
        if self._stopping:
            return 0
        await self._expire_acks()
        if not wait_for_steps:
            taken = await self._start_due(self._timer_slots(parallel))
            self._post_due(parallel, wait=False)
            return taken
        gate = asyncio.Semaphore(parallel)
        posting = self._post_due(parallel, wait=wait_for_posts)
        steps: dict[int, asyncio.Task[None]] = {}
        try:
            async with self._drain.track():  # a shutdown waits for the steps claimed here
                try:
                    await self._claim_steps(gate, steps)
                finally:
                    results = await asyncio.gather(*steps.values(), return_exceptions=True)
            for incident_id, result in zip(steps, results, strict=True):
                if isinstance(result, BaseException):
                    # Its lease runs out and the step is taken again later.
                    log.error("on-call step of incident %s failed", incident_id, exc_info=result)
        finally:
            if posting is not None:
                await posting
        return len(steps)

    def _post_due(self, parallel: int, *, wait: bool) -> Awaitable[None] | None:
        """Make the due posts, `parallel` at a time, in a task; with `wait`, what to await for
        them (their failures logged), else they go on by themselves."""
        posts_gate = asyncio.Semaphore(parallel)

        async def post(incident_id: int) -> bool:
            async with posts_gate:
                return await self._publish(incident_id, timer=True)

        async def make() -> list[bool | BaseException]:
            due = await self._store.posts_due(self.clock())
            posts[:] = [i for i in due if i not in self._posting]
            self._posting.update(posts)
            try:
                return await asyncio.gather(*(post(i) for i in posts), return_exceptions=True)
            finally:
                self._posting.difference_update(posts)

        posts: list[int] = []
        posting = asyncio.ensure_future(make())
        if wait:

            async def done() -> None:
                _log_failed_posts(posts, await posting)

            return done()
        self._timer_posts.add(posting)
        posting.add_done_callback(self._timer_posts.discard)
        posting.add_done_callback(partial(_posts_done, posts))
        return None

    def _timer_slots(self, parallel: int) -> asyncio.Semaphore:
        """The timer's slots: kept across its runs, since its steps outlive them."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(parallel)
        return self._slots

    async def _start_due(self, gate: asyncio.Semaphore) -> int:
        """The timer's claims: as many due steps as it has free slots, started to go on by
        themselves (a shutdown waits for them). A slot freed when none was wakes the timer
        (due steps may be waiting for it)."""
        steps: dict[int, asyncio.Task[None]] = {}

        def free() -> None:
            if gate.locked():
                self._wake.set()
            gate.release()

        await self._claim_steps(gate, steps, wait=False, on_ring=free)
        for task in steps.values():
            self._step_tasks.add(task)
            task.add_done_callback(self._step_done)
        return len(steps)

    async def run_forever(self, tick: float) -> None:
        """Take due steps, then sleep until the next timer (at most `tick`), or until a new
        incident wakes it. Ends after `stop()`."""
        self._timer_running = True
        while not self._stopping:
            delay = tick
            self._wake.clear()  # before looking: an incident arriving meanwhile wakes the wait
            self._wakes_at = None
            try:
                taken = await self.run_due(wait_for_posts=False, wait_for_steps=False)
                next_at = await self._store.next_due_at()
                if next_at is not None:
                    due_in = (next_at - self.clock()).total_seconds()
                    # due now: more to take after a batch; else what this look left is in hand
                    delay = min(tick, max(0.0, due_in) if due_in > 0 or taken else IN_HAND)
            except Exception:
                log.exception("on-call step failed; retrying")
            self._wakes_at = self.clock() + timedelta(seconds=delay)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def wake(self) -> None:
        """Look for due steps now (a silence ended early)."""
        self._wake.set()

    def _due(self, incident: Incident) -> None:
        """The incident's timer changed: the timer looks now if it would look too late. A
        ring's next step is due after its wait, mostly after the timer's next look anyway: each
        ring waking it cost a pass of its queries (bench/README.md, stop 19)."""
        at, wakes_at = incident.next_action_at, self._wakes_at
        if at is not None and (wakes_at is None or at < wakes_at):
            self._wake.set()

    def stop(self) -> None:
        """Shutting down: take no new step (the ones running finish: see InFlight)."""
        self._stopping = True
        self._wake.set()

    def _rung(self, incident_id: int) -> Callable[[], None] | None:
        """The step's ring is on its way (or the step ended): its "on its way" callback."""
        return self._ringing.pop(incident_id, None)

    async def _claim_steps(
        self,
        gate: asyncio.Semaphore,
        steps: dict[int, asyncio.Task[None]],
        *,
        wait: bool = True,
        on_ring: Callable[[], None] | None = None,
    ) -> None:
        """Claim due steps in batches, as many as there are free slots, and start them
        (`steps`). A step holds its slot until its ring is on its way (written ahead, its POST
        going out) or it ends (`on_ring` then; default: the slot is released): the POST's
        answer and the step's settling take no slot. Without `wait`, it returns when no slot
        is free rather than waiting for one."""
        while not self._stopping:
            if not wait and gate.locked():
                return
            await gate.acquire()
            slots = 1
            while not gate.locked():  # every slot free now, without waiting
                await gate.acquire()
                slots += 1
            try:
                now = self.clock()
                claimed = Claimed()
                if not self._stopping:
                    skip = {*self._running, *steps}  # this process runs them (renewing)
                    claimed = await self._store.claim_due(now, self.lease, limit=slots, skip=skip)
                known = await self._look_up(claimed, now)
            except BaseException:
                for _ in range(slots):
                    gate.release()
                raise
            for _ in range(slots - len(claimed.incidents)):
                gate.release()
            if not claimed.incidents:
                return
            for incident in claimed.incidents:
                steps[incident.id] = self._start_step(
                    incident,
                    now,
                    known.get(incident.id),
                    on_ring=on_ring or gate.release,
                    track=not wait,
                )

    async def _look_up(self, claimed: Claimed, now: datetime) -> dict[int, _Known]:
        """What the claimed steps look up before they ring, in one query each for all of them:
        their silences and the contacts they ring (their teams came with the claim)."""
        incidents = [i for i in claimed.incidents if i.team_id in claimed.teams]
        if not incidents:
            return {}
        silences: list[Silence | None] = [None] * len(incidents)
        if self._silences is not None:
            alerts = [(i.team_id, i.labels) for i in incidents]
            silences = await self._silences.holding_each(alerts, now)
        aliases = set()
        for incident in incidents:
            steps = plan(claimed.teams[incident.team_id], now)
            if incident.step < len(steps):
                aliases.add(steps[incident.step])
        contacts = await self._store.contacts_named(aliases) if aliases else {}
        return {
            incident.id: _Known(claimed.teams[incident.team_id], silence, contacts)
            for incident, silence in zip(incidents, silences, strict=True)
        }

    async def _step(self, incident: Incident, now: datetime, known: _Known | None = None) -> None:
        """Run a claimed step, its lease renewed meanwhile (`known`: what it would look up)."""
        renewing = asyncio.create_task(self._renew(incident), name=f"lease {incident.id}")
        try:
            result = await self._run_step(incident, now, known)
            if self._on_step is not None:
                self._on_step(result)
        finally:
            self._running.discard(incident.id)
            # cancelled, not awaited: awaiting it could swallow a cancellation aimed at the step
            renewing.cancel()

    async def _renew(self, incident: Incident) -> None:
        """Keep the claim while the step runs (a POST may take longer than the lease)."""
        period = max(0.05, self.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(period)
            try:
                if not await self._store.renew(
                    incident.id, incident.attempt, self.clock() + self.lease
                ):
                    return
            except Exception:
                log.exception("cannot renew the lease of incident %s", incident.id)

    async def _run_step(self, incident: Incident, now: datetime, known: _Known | None) -> str:
        """Run the step; returns what it did (a metrics label: see bot.ops.metrics.STEP_RESULTS)."""
        team = known.team if known else await self._store.team_by_id(incident.team_id)
        assert team is not None
        steps = plan(team, now)
        fence = incident.attempt
        if incident.ring_call_id is not None:
            # A ring of this step was written ahead by an attempt that did not settle it
            # (a crash, a kill): settle it from its call record instead of ringing again.
            pending = await self._settle_earlier_ring(incident, team, steps, now)
            if pending is None:
                return "settled"
            incident = pending
        if known is not None:
            silence = known.silence
        else:
            silence = await self._silence(team, incident.labels, now)
        if silence is not None:  # nobody is rung: the step waits for the silence's end
            said = incident.silence_id == silence.id
            await self._update(
                incident,
                team,
                fence=fence,
                next_action_at=silence.ends_at,
                silence_id=silence.id,
                note=None if said else self._silenced_note(team, silence, now),
            )
            return "silenced"
        if incident.silence_id is not None:
            await self._store.update_incident(
                incident.id,
                at=now,
                only_if_firing=True,
                repost=True,
                silence_id=None,
                note=self._note(team, notes.SILENCE_OVER, at=now),
            )
        if not steps:
            await self._update(
                incident,
                team,
                fence=fence,
                status="exhausted",
                next_action_at=None,
                exhausted_at=now,
                note=self._note(team, notes.NOBODY_ON_LIST, at=now, team=team.name),
            )
            return "exhausted"
        if incident.step >= len(steps):
            await self._update(
                incident,
                team,
                fence=fence,
                # a test page that nobody answered is over; a real one stays open
                status="resolved" if incident.source == TEST_SOURCE else "exhausted",
                next_action_at=None,
                exhausted_at=now,
                note=self._note(team, notes.ENDED, at=now),
            )
            return "exhausted"
        alias = steps[incident.step]
        if known is not None and alias in known.contacts:
            contact: Contact | None = known.contacts[alias]
        else:
            contact = await self._store.contact(alias)
        if contact is None:
            await self._update(
                incident,
                team,
                fence=fence,
                step=incident.step + 1,
                next_action_at=now,
                note=self._note(team, notes.NO_CONTACT, at=now, alias=alias),
            )
            return "skipped"
        held_until = await self._held(contact.phone, now)
        if held_until is not None:
            await self._update(
                incident,
                team,
                fence=fence,
                next_action_at=held_until,
                note=self._note(team, notes.THROTTLED, at=now, alias=alias, until=_hm(held_until)),
            )
            return "throttled"
        request = CallRequest(
            operator_id=SYSTEM,
            chat_id=team.chat_id,
            phone=Phone(contact.phone, contact.phone_display),
            note=incident.title,
            operator_name=f"on-call {team.name}",
            locale=self._locale_of(team),
            masked=True,
            speech=self._speech(team, incident),
            origin="alert",
        )
        written: list[str] = []
        phone = contact.phone

        async def write_ahead(record: CallRecord) -> None:
            """Right before the POST: the ring is stored on the step, if it is still ours and
            the throttles still let it through (another replica may have rung the number)."""
            ringing = await self._store.begin_ring(
                incident.id,
                fence=fence,
                call_id=record.id,
                phone=phone,
                at=now,
                note=self._note(team, notes.CALLING, at=now, alias=alias),
                held=lambda rings: self._hold(rings, now),
                window=self._window,
            )
            if ringing is None:
                raise _Superseded
            if isinstance(ringing, Held):
                raise _Held(ringing.until)
            written.append(record.id)
            self._publish_soon(ringing.id)
            if (rung := self._rung(incident.id)) is not None:
                rung()  # its slot is free, or intake's wait for the post to follow it ends

        try:
            # Rings of one number from this process take turns (a storm's incidents all ring
            # the person on call) instead of meeting its guard and retrying a second later.
            async with self._dialing.setdefault(phone, asyncio.Lock()):
                outcome = await self._calls.start(request, before_post=write_ahead)
        except _Superseded:
            return "superseded"  # acknowledged, resolved or taken by another attempt meanwhile
        except _Held as held:
            await self._update(
                incident,
                team,
                fence=fence,
                next_action_at=held.until,
                note=self._note(team, notes.THROTTLED, at=now, alias=alias, until=_hm(held.until)),
            )
            return "throttled"
        except (CallbotError, PilotStatusError) as err:
            code = describe(err).code
            if not written and code == "call_in_flight":
                # The number is being called (another incident's ring starting, an operator's
                # /call): this step waits its turn. No note: it is tried again in a moment.
                await self._store.update_incident(
                    incident.id,
                    at=self.clock(),
                    only_if_firing=True,
                    fence=fence,
                    next_action_at=now + BUSY_RETRY,
                )
                return "throttled"
            if not written:
                await self._update(
                    incident,
                    team,
                    fence=fence,
                    step=incident.step + 1,
                    next_action_at=now,
                    note=self._note(team, notes.CALL_FAILED, at=now, alias=alias, code=code),
                )
                return "failed"
            [call_id] = written
            if isinstance(err, APIConnectionError) and err.maybe_sent:
                note = self._note(team, notes.UNKNOWN_NOT_AGAIN, at=now, alias=alias, code=code)
            else:
                note = self._note(team, notes.CALL_FAILED, at=now, alias=alias, code=code)
                await self._store.drop_ring(call_id)
            await self._end_ring(
                incident, team, call_id, note, step=incident.step + 1, next_action_at=now
            )
            return "failed"
        next_person = _next_person(steps, incident.step)
        if isinstance(outcome, NeedsPermission):
            note = self._note(team, notes.NO_PERMISSION, at=now, alias=alias)
            if outcome.probe.may_ask:
                try:
                    await self._calls.request_permission(
                        request.phone,
                        incident.title,
                        operator_id=SYSTEM,
                        chat_id=team.chat_id,
                        locale=self._locale_of(team),
                        masked=True,
                    )
                    note = self._note(team, notes.PERMISSION_ASKED, at=now, alias=alias)
                except (CallbotError, PilotStatusError) as err:
                    note = self._note(
                        team,
                        notes.PERMISSION_ASK_FAILED,
                        at=now,
                        alias=alias,
                        code=describe(err).code,
                    )
            await self._update(
                incident,
                team,
                fence=fence,
                step=next_person,
                next_action_at=now,
                note=note,
            )
            return "no_permission"
        quota = _quota_note(outcome)
        placed = self.clock()  # the wait for an acknowledgement runs from the ring, not the claim
        # Applied only if no end event settled this ring first (then the next step is due).
        await self._end_ring(
            incident,
            team,
            outcome.record.id,
            self._note(team, notes.QUOTA, at=now, used=quota[0], allowed=quota[1])
            if quota
            else None,
            step=incident.step + 1,
            call_id=outcome.record.id,
            next_action_at=placed + timedelta(seconds=team.wait_seconds),
        )
        return "rang"

    async def _settle_earlier_ring(
        self, incident: Incident, team: Team, steps: list[str], now: datetime
    ) -> Incident | None:
        """What became of a ring written ahead but never settled. Returns the incident when
        the step is still to be rung (its call provably never went out), else None."""
        call_id = incident.ring_call_id
        assert call_id is not None
        alias = steps[incident.step] if incident.step < len(steps) else "?"
        record = await self._calls.record(call_id)
        if record is None or record.status == states.NOT_STARTED:
            # Its POST never went out (or was refused): the step rings now after all.
            return await self._store.forget_ring(incident.id, call_id, fence=incident.attempt)
        if record.status in (states.PENDING, states.UNKNOWN_OUTCOME):
            if not self.calls_recovered.is_set():
                return None  # the calls' recovery (which asks the API) runs first; lease waits
            # Not even the API's list of calls could tell: maybe rung. Never ring it twice.
            note = self._note(team, notes.UNKNOWN_AFTER_RESTART, at=now, alias=alias)
            await self._end_ring(
                incident, team, call_id, note, step=incident.step + 1, next_action_at=now
            )
            return None
        unanswered = record.terminal and record.connected_at is None
        await self._end_ring(
            incident,
            team,
            call_id,
            self._note(team, notes.PLACED_BEFORE_RESTART, at=now, alias=alias),
            step=incident.step + 1,
            call_id=call_id,
            next_action_at=now if unanswered else now + timedelta(seconds=team.wait_seconds),
        )
        return None

    async def _end_ring(
        self, incident: Incident, team: Team, ring: str, note: str | None, **fields: object
    ) -> None:
        updated, changed = await self._store.end_ring(
            incident.id, ring, at=self.clock(), note=note, **fields
        )
        if updated is not None and changed:
            self._publish_soon(updated.id)
            self._due(updated)
        elif updated is not None and updated.status != "firing" and fields.get("call_id"):
            # Acknowledged (or resolved) while this ring was being placed: it must not ring on.
            await self._hang_up_ring(ring)

    @property
    def _window(self) -> timedelta:
        """How far back the throttles look."""
        return timedelta(seconds=max((t.seconds for t in self._throttles), default=0))

    async def _held(self, phone: str, now: datetime) -> datetime | None:
        """When the throttles allow the next ring of this number (None: now). A first look:
        the ring is checked again when it is recorded (begin_ring)."""
        if not self._throttles:
            return None
        return self._hold(await self._store.rings_since(phone, now - self._window), now)

    def _hold(self, rings: list[datetime], now: datetime) -> datetime | None:
        """Until when these rings of a number (oldest first) hold its next ring; None: not."""
        until: datetime | None = None
        for throttle in self._throttles:
            recent = [r for r in rings if r > now - timedelta(seconds=throttle.seconds)]
            if len(recent) >= throttle.calls:
                free = recent[-throttle.calls] + timedelta(seconds=throttle.seconds)
                until = max(until, free) if until else free
        return until

    async def _update(
        self, incident: Incident, team: Team, *, fence: int | None = None, **fields: object
    ) -> None:
        updated, changed = await self._store.update_incident(
            incident.id,
            at=self.clock(),
            only_if_firing=True,
            fence=fence,
            repost=True,  # every change is shown through the post's outbox step
            **fields,  # type: ignore[arg-type]
        )
        if updated is not None and changed:
            self._publish_soon(updated.id)

    # call outcomes (from the lifecycle)

    async def call_changed(self, record: CallRecord) -> None:
        if record.operator_id != SYSTEM:
            return  # an operator's call: no incident to look up on this hot path
        incident = await self._store.incident_of_call(record.id)
        if incident is None or incident.status != "firing":
            return
        team = await self._store.team_by_id(incident.team_id)
        assert team is not None
        now = self.clock()
        if record.status == "ACCEPTED" and answer_acknowledges(team, incident):
            who = mask(record.phone_display)
            if incident.source == TEST_SOURCE:
                how = self._notes.say(self._locale_of(team), notes.TEST_ANSWERED, who=who)
            else:
                how = self._note(team, notes.ANSWERED_ACK, at=now)
            await self.acknowledge(incident.id, f"{who} (answered)", note=how)
            return
        if record.status == "ACCEPTED":
            await self._update(
                incident, team, note=self._note(team, notes.ANSWERED_WAITING, at=now)
            )
            return
        if record.status == states.NOT_STARTED and incident.ring_call_id == record.id:
            return  # its ring never went out: the step settles it and rings after all
        if record.terminal and record.connected_at is None:
            label = record.status.lower() if record.status != states.NOT_STARTED else "not placed"
            # Its ring may still be in flight (the end outran the POST's answer): the next
            # step is due now all the same.
            updated, changed = await self._store.ring_ended(
                incident.id,
                record.id,
                at=now,
                note=self._note(
                    team,
                    notes.NOT_ANSWERED,
                    at=now,
                    how=self._notes.ending(self._locale_of(team), label),
                ),
            )
            if updated is not None and changed:
                self._publish_soon(updated.id)
                self._due(updated)


class _Superseded(Exception):
    """The step is not this attempt's any more: its ring must not be placed."""


class _Held(Exception):
    """The throttles hold the ring back (the number was rung meanwhile): it is not placed."""

    def __init__(self, until: datetime) -> None:
        super().__init__(until.isoformat())
        self.until = until


def answer_acknowledges(team: Team, incident: Incident) -> bool:
    """Whether answering a ring of this incident acknowledges it: the team says so, or it has
    no Acknowledge to press."""
    return team.answer_is_ack or incident.source == TEST_SOURCE or _no_button(incident)


def _no_button(incident: Incident) -> bool:
    """The team has no Acknowledge to press: its post was never made, or its chat cannot be
    reached. Then answering the ring acknowledges."""
    if incident.in_digest:
        return False  # its button is in its digest's post (retried like any post)
    unposted = incident.post_status == "pending"
    return unposted and (incident.post_message_id is None or incident.admins_told_at is not None)


def _log_failed_posts(posts: list[int], results: Sequence[object]) -> None:
    for incident_id, posted in zip(posts, results, strict=True):
        if isinstance(posted, BaseException):  # its lease runs out and it is tried again
            log.error("post of incident %s failed", incident_id, exc_info=posted)


def _posts_done(posts: list[int], done: asyncio.Future[list[bool | BaseException]]) -> None:
    if done.cancelled():
        return
    if (error := done.exception()) is not None:  # the due posts were not even found
        log.error("due posts not made; the timer retries them", exc_info=error)
        return
    _log_failed_posts(posts, done.result())


def _fingerprint(lines: list[Incident]) -> str:
    """What a digest post shows of its lines (their ids and states), in 16 characters."""
    shown = ",".join(f"{line.id}:{line.status}" for line in lines)
    return hashlib.sha256(shown.encode()).hexdigest()[:16]


def _next_person(steps: list[str], step: int) -> int:
    """The first step after `step` that rings somebody else."""
    current = steps[step]
    for index in range(step + 1, len(steps)):
        if steps[index] != current:
            return index
    return len(steps)


def _quota_note(started: Started) -> tuple[str, str] | None:
    """(used, allowed) when a Meta quota is nearly spent."""
    for limit in started.limits:
        if limit.max_allowed and (limit.current_usage or 0) + 1 >= limit.max_allowed:
            return str(limit.current_usage), str(limit.max_allowed)
    return None


def _hm(moment: datetime) -> str:
    return moment.strftime("%H:%M")
