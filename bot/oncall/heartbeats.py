"""Heartbeats: a dead man's switch per team. Monitoring pings `POST /heartbeat/<team>/<name>`;
when no ping came within the interval and its grace, an incident "heartbeat <name> missed since
12:04" opens through the same intake as an alert (posted, paged, silenced alike), and the next
ping resolves it.

Alertmanager's always-firing `Watchdog` alert is such a ping when routed there: its webhook
body counts as a ping while it says `firing`; a `resolved` Watchdog means the alerting pipeline
itself stopped, so it is not one. The check of missed heartbeats runs on every replica and
claims one heartbeat at a time (bot/storage/watch.py): one missed heartbeat opens one incident.
Nothing here knows aiogram.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial

from bot.errors import CallbotError
from bot.oncall import notes
from bot.oncall.alerts import Alert, parse_alertmanager
from bot.oncall.engine import OnCall, duration_text, parse_duration, valid_alias
from bot.storage.oncall import OnCallStore, Team
from bot.storage.watch import Heartbeat, Ping, WatchStore

log = logging.getLogger(__name__)
LEASE = timedelta(seconds=30)  # a claimed check is taken again after this, if cut off
MIN_INTERVAL, MAX_INTERVAL = 60, 7 * 86400
MAX_GRACE = 86400
_ADD = re.compile(r"every\s+(\S+)(?:\s+grace\s+(\S+))?", re.IGNORECASE)


def interval_and_grace(interval: object, grace: object = 0) -> tuple[int, int]:
    """'5m', '2m' → (300, 120): an interval of 1 minute to 7 days, a grace up to 1 day."""
    every, late = parse_duration(interval), parse_duration(grace or 0)
    if not MIN_INTERVAL <= every <= MAX_INTERVAL or not 0 <= late <= MAX_GRACE:
        raise ValueError("interval: 1m to 7d; grace: 0 to 1d")
    return every, late


Say = Callable[..., str]  # (template, **params) → the text in the team's language


def parse_add(text: str) -> tuple[int, int]:
    """`every 5m grace 2m` (grace optional) → seconds."""
    match = _ADD.fullmatch(text.strip())
    if match is None:
        raise CallbotError("heartbeat_usage")
    try:
        return interval_and_grace(match.group(1), match.group(2) or 0)
    except ValueError:
        raise CallbotError("heartbeat_usage") from None


def missed_alert(heartbeat: Heartbeat, team: Team, say: Say) -> Alert:
    """The incident a missed heartbeat opens, written in the team's language by `say`."""
    since = heartbeat.expected_at
    last = heartbeat.last_ping_at
    every = duration_text(heartbeat.interval_seconds)
    if heartbeat.grace_seconds:
        text = say(
            notes.HEARTBEAT_EVERY_GRACE, every=every, grace=duration_text(heartbeat.grace_seconds)
        )
    else:
        text = say(notes.HEARTBEAT_EVERY, every=every)
    if last:
        text += "; " + say(notes.HEARTBEAT_LAST_PING, last=last.strftime("%Y-%m-%d %H:%M"))
    else:
        text += "; " + say(notes.HEARTBEAT_NEVER)
    return Alert(
        source="heartbeat",
        dedup_key=dedup_key(heartbeat.name),
        firing=True,
        title=say(notes.HEARTBEAT_MISSED, name=heartbeat.name, since=notes.hm(since)),
        text=text,
        severity="critical",
        labels={"alertname": "heartbeat", "heartbeat": heartbeat.name, "team": team.name},
        links=(),
        team=team.name,
    )


def dedup_key(name: str) -> str:
    return f"heartbeat:{name}"


def _recovered_alert(heartbeat: Heartbeat, team: Team) -> Alert:
    return Alert(
        source="heartbeat",
        dedup_key=dedup_key(heartbeat.name),
        firing=False,
        title=f"heartbeat {heartbeat.name}",
        text="",
        severity=None,
        labels={},
        links=(),
        team=team.name,
    )


def counts_as_ping(body: object) -> bool:
    """Any body is a ping except an Alertmanager notification that is not firing (the Watchdog
    resolved: the pipeline that sends it broke). A malformed Alertmanager body raises AlertError."""
    if isinstance(body, dict) and "alerts" in body and "groupKey" in body:
        return parse_alertmanager(body).firing
    return True


class Heartbeats:
    def __init__(self, oncall: OnCall, store: WatchStore, teams: OnCallStore) -> None:
        self._oncall = oncall
        self._store = store
        self._teams = teams
        self._stopping = False

    def _now(self) -> datetime:
        return self._oncall.clock()  # one clock with the escalation (tests move it)

    async def declare(
        self, team: Team, name: str, interval: int, grace: int, *, source: str = "chat"
    ) -> Heartbeat:
        return await self._store.save_heartbeat(
            team.id,
            valid_alias(name),
            interval=interval,
            grace=grace,
            source=source,
            at=self._now(),
        )

    async def remove(self, team: Team, name: str) -> Heartbeat:
        gone = await self._store.remove_heartbeat(team.id, valid_alias(name))
        if gone is None:
            raise CallbotError("unknown_heartbeat", {"name": name[:32], "team": team.name})
        if gone.state == "missed":  # nobody pings it any more: its incident ends with it
            await self._oncall.intake(team, _recovered_alert(gone, team))
        return gone

    async def listed(self, team: Team | None = None) -> list[Heartbeat]:
        return await self._store.heartbeats(team.id if team else None)

    async def ping(self, team: Team, name: str) -> str:
        """A ping: 'ok', or 'recovered' when it ends a missed heartbeat's incident.
        Raises CallbotError unknown_heartbeat."""
        heartbeat = await self._store.heartbeat(team.id, name)
        if heartbeat is None:
            raise CallbotError("unknown_heartbeat", {"name": name[:32], "team": team.name})
        pinged: Ping | None = await self._store.ping(heartbeat.id, self._now())
        if pinged is None:
            raise CallbotError("unknown_heartbeat", {"name": name[:32], "team": team.name})
        if not pinged.recovered:
            return "ok"
        result, _ = await self._oncall.intake(team, _recovered_alert(pinged.heartbeat, team))
        log.info("heartbeat %s of team %s is back (%s)", name, team.name, result)
        return "recovered"

    async def check_due(self) -> int:
        """Open an incident for each heartbeat overdue now; returns how many were opened."""
        opened = 0
        while not self._stopping:
            now = self._now()
            claimed = await self._store.claim_missed(now, LEASE)
            if claimed is None:
                return opened
            team = await self._teams.team_by_id(claimed.team_id)
            if team is None:
                continue
            _, incident = await self._oncall.intake(
                team, missed_alert(claimed, team, partial(self._oncall.say, team))
            )
            if await self._store.mark_missed(
                claimed.id, fence=claimed.attempt, since=claimed.expected_at
            ):
                opened += 1
                log.warning("heartbeat %s of team %s missed", claimed.name, team.name)
            elif incident is not None:
                # pinged (or removed) while the incident was being opened: it is over already
                await self._oncall.intake(team, _recovered_alert(claimed, team))
        return opened

    async def load(self, team: Team, raw: object) -> int:
        """A team's `heartbeats` of ONCALL_FILE: `{name = {every = "5m", grace = "2m"}}`.
        Heartbeats the file declared before and no longer does are removed."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"team {team.name}: heartbeats must be a table of named heartbeats")
        names = set()
        for name, spec in raw.items():
            where = f"team {team.name}: heartbeat {str(name)[:32]}"
            if not isinstance(spec, dict) or "every" not in spec:
                raise ValueError(f'{where}: needs every (e.g. every = "5m")')
            try:
                alias = valid_alias(name)
                interval, grace = interval_and_grace(spec["every"], spec.get("grace", 0))
            except (ValueError, CallbotError) as err:
                raise ValueError(f"{where}: {err}") from None
            await self.declare(team, alias, interval, grace, source="file")
            names.add(alias)
        for stale in await self._store.heartbeats(team.id):
            if stale.source == "file" and stale.name not in names:
                await self.remove(team, stale.name)
        return len(names)

    async def run_forever(self, tick: float) -> None:
        while not self._stopping:
            try:
                await self.check_due()
            except Exception:
                log.exception("heartbeat check failed; retrying")
            await asyncio.sleep(tick)

    def stop(self) -> None:
        self._stopping = True
