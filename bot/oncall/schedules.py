"""Who is on call when: a team's shifts, handed off at a local time in its time zone, and the
overrides people take over them.

A team's schedule is one or more layers; a later layer wins wherever it has a shift. A layer
is a rotation over its members (the team's list unless it names its own):

* `daily 09:00 America/Sao_Paulo`: each member in turn for a day, handed off at 09:00 there;
* `weekly mon 09:00 Europe/Berlin`: each member in turn for a week, handed off on Mondays;
* either with `for 12h`: the shift lasts that long from its hand-off (then the layers below
  it, if any, are on call) — a business-hours layer over a round-the-clock one;
* the older forms: `weekly` (a week each from when the rotation was set, by index) and `none`
  (the first member).

Hand-offs are wall-clock times in the layer's zone (zoneinfo), so a 09:00 hand-off stays at
09:00 across a DST change and that day's shift is an hour shorter or longer. The first member
has the shift that contains the layer's `start` (when it was set, or as given). Above every
layer: a member pinned with `/oncall set <name>`, and above that the overrides (`/oncall take`,
`/oncall set <name> until <time>`), each for a bounded time. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "Layer",
    "OnCallNow",
    "Override",
    "Schedule",
    "parse_layer",
    "parse_rotation",
    "parse_until",
    "rotation_fields",
    "team_schedule",
]

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_ROTATION = re.compile(
    r"(?P<kind>daily|weekly)(?:\s+(?P<day>mon|tue|wed|thu|fri|sat|sun))?\s+"
    r"(?P<hh>\d{1,2}):(?P<mm>\d{2})(?:\s+(?P<zone>[A-Za-z0-9_+/-]+))?"
    r"(?:\s+for\s+(?P<length>\d+\s*[mhd]))?",
    re.IGNORECASE,
)
_LENGTH_UNIT = {"m": 60, "h": 3600, "d": 86400}
_LOOKAHEAD = 400  # layer boundaries walked at most to find the next person on call
MAX_LAYERS = 5
UTC_ZONE = ZoneInfo("UTC")


@dataclass(frozen=True)
class Override:
    """`alias` is on call from `start` to `end`, set by `by` (a person's name)."""

    alias: str
    start: datetime
    end: datetime
    by: str

    def covers(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def as_json(self) -> dict[str, str]:
        return {
            "alias": self.alias,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "by": self.by,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Override:
        return cls(
            alias=str(data["alias"]),
            start=datetime.fromisoformat(str(data["start"])),
            end=datetime.fromisoformat(str(data["end"])),
            by=str(data.get("by") or "?"),
        )


@dataclass(frozen=True)
class Layer:
    """One rotation: `kind` none | index (the older `weekly`) | daily | weekly."""

    kind: str
    members: tuple[str, ...]
    start: datetime  # the first member's shift contains it
    zone: ZoneInfo = UTC_ZONE
    at: time = time(0, 0)
    weekday: int = 0
    length: timedelta | None = None  # None: until the next hand-off

    @property
    def period_days(self) -> int:
        return 7 if self.kind == "weekly" else 1

    def shift_at(self, moment: datetime) -> tuple[str | None, datetime | None]:
        """Who this layer has on call at `moment` (None: nobody, a gap of a `for` shift), and
        when that changes (None: never)."""
        if not self.members:
            return None, None
        if self.kind == "none":
            return self.members[0], None
        if self.kind == "index":
            week = timedelta(days=7)
            index = (moment - self.start) // week
            return self.members[index % len(self.members)], self.start + (index + 1) * week
        day = self._handoff_day(moment)
        index = (day - self._handoff_day(self.start)).days // self.period_days
        begins = self._handoff(day)
        ends = self._handoff(day + timedelta(days=self.period_days))
        if self.length is not None:
            local = begins.astimezone(self.zone).replace(tzinfo=None) + self.length
            shift_end = min(ends, local.replace(tzinfo=self.zone).astimezone(UTC))
            if moment >= shift_end:
                return None, ends
            ends = shift_end
        return self.members[index % len(self.members)], ends

    def _handoff(self, day: date) -> datetime:
        return datetime.combine(day, self.at, tzinfo=self.zone).astimezone(UTC)

    def _handoff_day(self, moment: datetime) -> date:
        """The local date of the last hand-off at or before `moment`."""
        day = moment.astimezone(self.zone).date()
        if self.kind == "weekly":
            day -= timedelta(days=(day.weekday() - self.weekday) % 7)
        while self._handoff(day) > moment:
            day -= timedelta(days=self.period_days)
        return day


def parse_rotation(text: str, members: Sequence[str], start: datetime) -> Layer:
    """`daily 09:00 America/Sao_Paulo`, `weekly mon 09:00 Europe/Berlin for 12h`, `weekly`,
    `none` → a layer; ValueError with a short reason otherwise."""
    words = " ".join(str(text).split())
    if words.lower() in ("none", "weekly"):
        return Layer("none" if words.lower() == "none" else "index", tuple(members), start)
    match = _ROTATION.fullmatch(words)
    if match is None:
        raise ValueError(
            f"{words[:48]!r} is not a rotation (e.g. 'daily 09:00 America/Sao_Paulo', "
            "'weekly mon 09:00 Europe/Berlin', 'weekly', 'none')"
        )
    kind, day = match["kind"].lower(), match["day"]
    if kind == "weekly" and day is None:
        raise ValueError("a weekly rotation names its hand-off day, e.g. 'weekly mon 09:00'")
    if kind == "daily" and day is not None:
        raise ValueError("a daily rotation has no day: 'daily 09:00 …'")
    hour, minute = int(match["hh"]), int(match["mm"])
    if hour > 23 or minute > 59:
        raise ValueError(f"{match['hh']}:{match['mm']} is not a time of day")
    length = None
    if match["length"]:
        amount = match["length"].replace(" ", "")
        length = timedelta(seconds=int(amount[:-1]) * _LENGTH_UNIT[amount[-1].lower()])
        if not timedelta(minutes=1) <= length <= timedelta(days=7 if kind == "weekly" else 1):
            raise ValueError("a shift's length is from 1 minute to its rotation's period")
    return Layer(
        kind,
        tuple(members),
        start,
        zone=zone(match["zone"] or "UTC"),
        at=time(hour, minute),
        weekday=_WEEKDAYS.index(day.lower()) if day else 0,
        length=length,
    )


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name[:48]!r} is not a time zone (e.g. America/Sao_Paulo)") from None


def parse_layer(spec: Mapping[str, object], members: Sequence[str], start: datetime) -> Layer:
    """A stored (or ONCALL_FILE) layer: `{"rotation": …, "members": [...], "start": iso}`."""
    own = spec.get("members")
    named = tuple(str(m) for m in own) if isinstance(own, list | tuple) and own else None
    began = spec.get("start")
    if isinstance(began, str):
        began = datetime.fromisoformat(began)
    if isinstance(began, date) and not isinstance(began, datetime):
        began = datetime.combine(began, time(12, 0), tzinfo=UTC)
    if isinstance(began, datetime) and began.tzinfo is None:
        began = began.replace(tzinfo=UTC)
    return parse_rotation(
        str(spec.get("rotation", "none")),
        named or members,
        began if isinstance(began, datetime) else start,
    )


@dataclass(frozen=True)
class OnCallNow:
    """Who is on call, until when (None: until further notice), who comes next, and the
    override that put them there, if any."""

    who: str | None
    until: datetime | None
    next: str | None
    override: Override | None = None


@dataclass(frozen=True)
class Schedule:
    layers: tuple[Layer, ...]
    pinned: str | None = None  # `/oncall set <name>` without an end
    overrides: tuple[Override, ...] = ()

    @property
    def zone(self) -> ZoneInfo:
        """The zone times are told in: the top layer's."""
        return self.layers[-1].zone if self.layers else UTC_ZONE

    def who_at(self, moment: datetime) -> tuple[str | None, datetime | None, Override | None]:
        """Who is on call at `moment`, the next moment that may change it, and the override."""
        changes: list[datetime] = [o.start for o in self.overrides if o.start > moment]
        override = next((o for o in reversed(self.overrides) if o.covers(moment)), None)
        if override is not None:
            return override.alias, min([override.end, *changes]), override
        if self.pinned is not None:
            return self.pinned, min(changes, default=None), None
        who: str | None = None
        for layer in reversed(self.layers):
            person, ends = layer.shift_at(moment)
            if ends is not None:
                changes.append(ends)
            if person is not None:
                who = person
                break
        return who, min(changes, default=None), None

    def now(self, moment: datetime) -> OnCallNow:
        who, change, override = self.who_at(moment)
        for _ in range(_LOOKAHEAD):
            if change is None:
                return OnCallNow(who, None, None, override)
            then, later, _override = self.who_at(change)
            if then != who:
                return OnCallNow(who, change, then, override)
            if later is None or later <= change:
                return OnCallNow(who, None, None, override)
            change = later
        return OnCallNow(who, None, None, override)


def active(overrides: Iterable[Override], moment: datetime) -> tuple[Override, ...]:
    """The overrides not yet over (expired ones are dropped when the list is next written)."""
    return tuple(o for o in overrides if o.end > moment)


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


def parse_until(text: str, now: datetime, where: ZoneInfo) -> datetime:
    """When an override ends: `18:00` (its next occurrence in the team's zone), `2h`/`90m`
    from now, or `2026-12-02 09:00` (in the team's zone). ValueError otherwise."""
    words = " ".join(text.split())
    if match := _CLOCK.fullmatch(words):
        hour, minute = int(match[1]), int(match[2])
        if hour > 23 or minute > 59:
            raise ValueError(words)
        local = now.astimezone(where)
        end = datetime.combine(local.date(), time(hour, minute), tzinfo=where)
        if end <= now:
            end = datetime.combine(local.date() + timedelta(days=1), time(hour, minute), where)
        return end.astimezone(UTC)
    if match := re.fullmatch(r"(\d+)\s*([mhd])", words.lower()):
        return now + timedelta(seconds=int(match[1]) * _LENGTH_UNIT[match[2]])
    try:
        moment = datetime.fromisoformat(words)
    except ValueError:
        raise ValueError(words) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=where)
    if moment <= now:
        raise ValueError(words)
    return moment.astimezone(UTC)


class _TeamLike(Protocol):
    """A stored team (bot.storage.oncall.Team), as far as its schedule goes."""

    @property
    def members(self) -> tuple[str, ...]: ...
    @property
    def on_call(self) -> str | None: ...
    @property
    def rotation(self) -> str: ...
    @property
    def rotation_start(self) -> datetime: ...
    @property
    def layers(self) -> Sequence[Mapping[str, object]]: ...
    @property
    def overrides(self) -> tuple[Override, ...]: ...


def team_schedule(team: _TeamLike) -> Schedule:
    """A stored team's schedule: its layers, else its rotation (`weekly`, `none`, or a
    hand-off rotation); its pinned person and its overrides on top."""
    if team.layers:
        layers = tuple(parse_layer(s, team.members, team.rotation_start) for s in team.layers)
    else:
        try:
            layers = (parse_rotation(team.rotation, team.members, team.rotation_start),)
        except ValueError:
            layers = (Layer("none", team.members, team.rotation_start),)
    return Schedule(layers, pinned=team.on_call, overrides=team.overrides)


def rotation_fields(config: Mapping[str, object]) -> dict[str, object]:
    """A team's `rotation`, `layers` and `rotation_start` from ONCALL_FILE (or chat) as the
    columns they are stored in; ValueError with the reason when one is wrong."""
    fields: dict[str, object] = {}
    began = config.get("rotation_start")
    if began is not None:
        start = parse_layer({"rotation": "none", "start": began}, (), datetime.now(UTC)).start
        fields["rotation_start"] = start
    layers = config.get("layers")
    rotation = config.get("rotation")
    if layers is not None:
        if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"layers: a list of 1 to {MAX_LAYERS} tables")
        fields["layers"] = [_layer_spec(layer) for layer in layers]
        fields["rotation"] = "layers"
    elif rotation is not None:
        text = " ".join(str(rotation).split())
        if text.lower() in ("none", "weekly"):
            fields |= {"rotation": text.lower(), "layers": []}
        else:
            fields |= {"rotation": "layers", "layers": [_layer_spec({"rotation": text})]}
    return fields


def _layer_spec(layer: object) -> dict[str, object]:
    if not isinstance(layer, Mapping) or "rotation" not in layer:
        raise ValueError("each layer is a table with a rotation")
    spec: dict[str, object] = {"rotation": " ".join(str(layer["rotation"]).split())}
    members = layer.get("members")
    if members is not None:
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError("a layer's members are a list of contact names")
        spec["members"] = [m.strip().lower() for m in members]
    if layer.get("start") is not None:
        spec["start"] = parse_layer(layer, ("x",), datetime.now(UTC)).start.isoformat()
    parse_layer(spec, ("x",), datetime.now(UTC))  # the rotation is valid
    return spec
