"""Silences and maintenance windows: while one holds, a team's matching alerts are posted
quietly and nobody is rung; when it ends, an alert still firing pages.

A silence comes from chat (`/silence <team> <duration> [label=value…] [reason]`, from now) or
from ONCALL_FILE (a window with a start, an end and their time zone). Its matchers are label
equalities that must all hold (`alertname=DiskFull`); without any, every alert of the team is
silenced. The engine asks `holding` before an incident's first step and before each step after
(bot/oncall/engine.py): a step that finds its alert silenced waits for the silence's end. Nothing
here knows aiogram.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bot.errors import CallbotError
from bot.oncall.engine import parse_duration
from bot.storage.watch import Silence, WatchStore, Window

MAX_SILENCE = timedelta(days=30)
MAX_MATCHERS = 10
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,99})=(\S{1,100})")
_WINDOW_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_LOCAL = ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")


class Silences:
    def __init__(self, store: WatchStore) -> None:
        self._store = store

    async def holding(
        self, team_id: int, labels: Mapping[str, str], now: datetime
    ) -> Silence | None:
        """The silence that holds an alert with these labels now: the one ending last."""
        return _holding(await self._store.silences(now, team_id), team_id, labels, now)

    async def holding_each(
        self, alerts: Sequence[tuple[int, Mapping[str, str]]], now: datetime
    ) -> list[Silence | None]:
        """`holding` for each (team id, labels), in one query (a batch of steps)."""
        silences = await self._store.silences(now)
        return [_holding(silences, team_id, labels, now) for team_id, labels in alerts]

    async def add(self, team_id: int, words: list[str], *, by: str, now: datetime) -> Silence:
        """`<duration> [label=value…] [reason…]`, from now."""
        if not words:
            raise CallbotError("silence_usage")
        try:
            seconds = parse_duration(words[0])
        except ValueError:
            raise CallbotError("silence_usage") from None
        if seconds <= 0 or timedelta(seconds=seconds) > MAX_SILENCE:
            raise CallbotError("silence_usage")
        rest = words[1:]
        matchers: dict[str, str] = {}
        while rest and (match := _MATCHER.fullmatch(rest[0])) and len(matchers) < MAX_MATCHERS:
            matchers[match.group(1)] = match.group(2)
            rest = rest[1:]
        return await self._store.add_silence(
            team_id,
            starts_at=now,
            ends_at=now + timedelta(seconds=seconds),
            matchers=matchers,
            reason=" ".join(rest)[:200],
            created_by=by,
            at=now,
        )

    async def end(self, silence_id: int, now: datetime) -> tuple[Silence, list[int]]:
        """End a silence now; returns it and the incidents it held back (due at once)."""
        silence = await self._store.silence(silence_id)
        if silence is None or silence.ends_at <= now:
            raise CallbotError("unknown_silence", {"id": str(silence_id)})
        return silence, await self._store.end_silence(silence_id, now)

    async def listed(self, now: datetime, team_id: int | None = None) -> list[Silence]:
        return await self._store.silences(now, team_id)

    async def load_windows(self, team_id: int, team: str, raw: object, *, now: datetime) -> int:
        """A team's `windows` of ONCALL_FILE (see the README); returns how many."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"team {team}: windows must be a table of named windows")
        windows = [_window(team, name, spec) for name, spec in raw.items()]
        await self._store.save_windows(team_id, windows, at=now)
        return len(windows)


def _window(team: str, name: object, spec: object) -> Window:
    where = f"team {team}: window {str(name)[:64]}"
    if not isinstance(name, str) or not _WINDOW_NAME.fullmatch(name):
        raise ValueError(f"{where}: a name is a letter, then letters, digits, '.', '-' or '_'")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be a table with start, end and timezone")
    try:
        zone = ZoneInfo(str(spec.get("timezone", "UTC")))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{where}: unknown timezone {str(spec.get('timezone'))[:64]!r}") from None
    starts_at = _moment(where, "start", spec.get("start"), zone)
    ends_at = _moment(where, "end", spec.get("end"), zone)
    if ends_at <= starts_at:
        raise ValueError(f"{where}: end must come after start")
    return Window(
        name=name,
        starts_at=starts_at,
        ends_at=ends_at,
        matchers=_matchers(where, spec.get("matchers", {})),
        reason=str(spec.get("reason", ""))[:200],
    )


def _moment(where: str, key: str, value: object, zone: ZoneInfo) -> datetime:
    """A TOML local date-time, or text like "2026-12-05 22:00", in the window's time zone."""
    if isinstance(value, datetime):
        local = value
    elif isinstance(value, str):
        parsed = next((m for f in _LOCAL if (m := _parse(value.strip(), f)) is not None), None)
        if parsed is None:
            raise ValueError(f"{where}: {key} must look like 2026-12-05 22:00")
        local = parsed
    else:
        raise ValueError(f"{where}: {key} is required (e.g. 2026-12-05 22:00)")
    if local.tzinfo is None:
        local = local.replace(tzinfo=zone)
    return local.astimezone(UTC)


def _parse(text: str, layout: str) -> datetime | None:
    try:
        return datetime.strptime(text, layout)
    except ValueError:
        return None


def _matchers(where: str, raw: object) -> dict[str, str]:
    """`{alertname = "DiskFull"}` or `["alertname=DiskFull"]`."""
    pairs: list[tuple[str, str]] = []
    if isinstance(raw, dict):
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, list):
        for item in raw:
            match = _MATCHER.fullmatch(str(item))
            if match is None:
                raise ValueError(f"{where}: matcher {str(item)[:64]!r} is not label=value")
            pairs.append((match.group(1), match.group(2)))
    else:
        raise ValueError(f"{where}: matchers must be a table or a list of label=value")
    if len(pairs) > MAX_MATCHERS:
        raise ValueError(f"{where}: at most {MAX_MATCHERS} matchers")
    for label, value in pairs:
        if _MATCHER.fullmatch(f"{label}={value}") is None:
            raise ValueError(f"{where}: matcher {label[:64]!r} is not label=value")
    return dict(pairs)


def _holding(
    silences: list[Silence], team_id: int, labels: Mapping[str, str], now: datetime
) -> Silence | None:
    """Of these silences, the one holding the team's alert now: the one ending last."""
    holding = [s for s in silences if s.team_id == team_id and s.holds(labels, now)]
    return max(holding, key=lambda s: s.ends_at, default=None)
