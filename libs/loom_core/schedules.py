"""When a schedule fires: its grammar and its fire times, as pure functions.

A schedule is one of
- ``cron``: five fields (minute hour day-of-month month day-of-week) read as wall-clock
  time in a time zone (default UTC); lists, ranges, steps, month and day names, and the
  macros ``@hourly @daily @weekly @monthly @yearly``;
- ``every``: a fixed interval (``90s``, ``10m``, ``1h30m``), counted from the
  schedule's anchor (its creation, whole seconds);
- ``at``: one instant (one-shot).

Daylight-saving time, decided once: every local wall-clock time fires at most once. A
time that happens twice (clocks go back) fires at its first occurrence; a time that
never happens (clocks go forward) fires at the instant the gap ends. So fire times only
ever increase, and a daily 02:30 job still runs on the day the clocks skip 02:30.

Catch-up (firings missed while nothing ran): ``none`` fires the latest missed time only
if it is at most ``grace`` late; ``latest`` (default) fires the latest missed time once;
``all`` fires every missed time, oldest first, at most ``max_catch_up`` (the rest are
dropped). Each firing's run id is derived from the schedule id and its fire time, so
however many firers (restarts, replicas) see it due, it is submitted once.

No clock here: ``now`` is always an argument. Time zones come from the system's tz
database (static data, read once per zone by ``zoneinfo``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loom_core.errors import LoomError

__all__ = [
    "At",
    "CatchUp",
    "Cron",
    "Due",
    "Every",
    "ScheduleError",
    "When",
    "check_name",
    "due",
    "next_fire",
    "parse_cron",
    "parse_every",
    "run_id_for",
    "zone",
]

CatchUp = Literal["none", "latest", "all"]
CATCH_UPS: tuple[CatchUp, ...] = ("none", "latest", "all")

RUN_ID_PREFIX = "sch-"  # reserved: a client's run id may not start with it
MAX_CRON_CHARS = 200
MIN_EVERY = timedelta(seconds=1)
MAX_EVERY = timedelta(days=366)
# a cron expression that can fire fires within this many years. When one day field
# starts with `*` a day must match both (``Cron.day_matches``), and a date falls on a
# given weekday again only 5 to 12 years later (day 1 of a month: `*/7` always holds
# it), 28 to 40 for Feb 29 (2072 -> 2112 across 2100); every date meets every weekday
# within the calendar's 400-year cycle, so a parsed expression always fires
_SEARCH_YEARS = 41
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
_ZONE = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")

_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day_of_month", 1, 31),
    ("month", 1, 12),
    ("day_of_week", 0, 7),
)
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")  # fmt: skip
_MONTHS = {m[:3].lower(): i for i, m in enumerate(_MONTH_NAMES, start=1)}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
# the most days each month ever has (February: leap years)
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class ScheduleError(LoomError, ValueError):
    """A schedule that cannot be: ``code`` says which kind, ``path`` where."""

    def __init__(self, code: str, message: str, path: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


# ----------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    # a field starting with `*` is unrestricted for the day rule (as in Vixie cron):
    # both restricted -> a day matches either; otherwise it must match both
    day_star: bool
    weekday_star: bool

    def day_matches(self, day: datetime) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.day_star or self.weekday_star:
            return dom and dow
        return dom or dow


@dataclass(frozen=True)
class Every:
    interval: timedelta
    anchor: datetime  # aware, UTC


@dataclass(frozen=True)
class At:
    instant: datetime  # aware, UTC


@dataclass(frozen=True)
class When:
    rule: Cron | Every | At
    tz: ZoneInfo


def parse_cron(text: str, path: str = "$.cron") -> Cron:
    """The cron expression ``text``, or ScheduleError naming the field that is wrong
    (``path`` + ``.minute``, ``.day_of_month``, ...)."""
    if len(text) > MAX_CRON_CHARS:
        raise ScheduleError("invalid_cron", f"longer than {MAX_CRON_CHARS} characters", path)
    expanded = _MACROS.get(text.strip().lower(), text)
    if expanded.strip().startswith("@"):
        raise ScheduleError(
            "invalid_cron",
            f"unknown macro {text.strip()!r}; known: {', '.join(sorted(_MACROS))}",
            path,
        )
    parts = expanded.split()
    if len(parts) != 5:
        raise ScheduleError(
            "invalid_cron",
            f"{len(parts)} field(s); a cron expression has 5: minute hour day-of-month "
            "month day-of-week (e.g. '*/5 * * * *')",
            path,
        )
    values = [
        _field(part, name, low, high, f"{path}.{name}")
        for part, (name, low, high) in zip(parts, _FIELDS, strict=True)
    ]
    weekdays = frozenset(d % 7 for d in values[4])
    cron = Cron(
        text=text,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        day_star=parts[2].startswith("*"),
        weekday_star=parts[4].startswith("*"),
    )
    if cron.weekday_star and not any(
        day <= _MONTH_DAYS[month - 1] for month in cron.months for day in cron.days
    ):
        months = ", ".join(_MONTH_NAMES[m - 1] for m in sorted(cron.months))
        raise ScheduleError(
            "invalid_cron",
            f"day_of_month {parts[2]!r} never occurs in {months}: this schedule would never fire",
            f"{path}.day_of_month",
        )
    return cron


def _field(text: str, name: str, low: int, high: int, path: str) -> frozenset[int]:
    names = _MONTHS if name == "month" else _DAYS if name == "day_of_week" else {}
    found: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not 1 <= int(step_text) <= high:
                raise ScheduleError(
                    "invalid_cron", f"{name}: step {step_text!r} in {item!r} must be a "
                    f"whole number from 1 to {high}", path,
                )  # fmt: skip
            step = int(step_text)
        if base == "*":
            first, last = low, high
        else:
            start, dash, end = base.partition("-")
            first = _value(start, names, name, low, high, path)
            # `a/n` runs from a to the field's end
            last = _value(end, names, name, low, high, path) if dash else (high if slash else first)
            if first > last:
                raise ScheduleError("invalid_cron", f"{name}: range {base!r} runs backwards", path)
        found.update(range(first, last + 1, step))
    return frozenset(found)


def _value(text: str, names: dict[str, int], name: str, low: int, high: int, path: str) -> int:
    word = text.strip().lower()
    if word in names:
        return names[word]
    if not word.isdigit() or not low <= int(word) <= high:
        hint = f" or a name ({', '.join(names)})" if names else ""
        raise ScheduleError(
            "invalid_cron",
            f"{name}: {text!r} is not a value from {low} to {high}{hint}",
            path,
        )
    return int(word)


_EVERY = re.compile(r"(\d{1,9})(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str, path: str = "$.every") -> timedelta:
    """``90s``, ``10m``, ``1h30m``, ``1d``: from 1 second to 366 days."""
    compact = text.strip().lower()
    pieces = _EVERY.findall(compact)
    if not pieces or "".join(n + u for n, u in pieces) != compact:
        raise ScheduleError(
            "invalid_schedule",
            f"every {text[:40]!r} is not an interval: write a number and a unit (s, m, h, d), "
            "e.g. 30s, 10m, 1h30m",
            path,
        )
    interval = timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in pieces))
    if not MIN_EVERY <= interval <= MAX_EVERY:
        raise ScheduleError("invalid_schedule", f"every {text!r} must be from 1s to 366d", path)
    return interval


def zone(name: str, path: str = "$.tz") -> ZoneInfo:
    """The IANA time zone ``name`` (``Europe/Lisbon``, ``UTC``)."""
    if not _ZONE.fullmatch(name or "") or len(name) > 64:
        raise ScheduleError(
            "invalid_timezone", f"{name[:64]!r} is not an IANA time zone name such as "
            "Europe/Lisbon or UTC", path,
        )  # fmt: skip
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            "invalid_timezone", f"unknown time zone {name!r} (e.g. Europe/Lisbon, UTC)", path
        ) from None


def check_name(name: str, path: str = "$.name") -> str:
    if not _NAME.fullmatch(name or ""):
        raise ScheduleError(
            "invalid_schedule",
            f"schedule name {name[:64]!r}: 1 to 48 letters, digits, '-' or '_', starting "
            "with a letter or digit (no dots or spaces)",
            path,
        )
    return name


# ----------------------------------------------------------------------------- fire times


def next_fire(when: When, after: datetime) -> datetime | None:
    """The first fire time strictly after ``after`` (aware), in UTC; None when there is
    none (a one-shot that is past)."""
    rule = when.rule
    if isinstance(rule, At):
        return rule.instant if rule.instant > after else None
    if isinstance(rule, Every):
        if after < rule.anchor:
            return rule.anchor
        step = _micros(rule.interval)
        done = _micros(after - rule.anchor) // step + 1
        return rule.anchor + timedelta(microseconds=done * step)
    return _next_cron(rule, when.tz, after)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _next_cron(cron: Cron, tz: ZoneInfo, after: datetime) -> datetime:
    # Wall-clock candidates in increasing order map to non-decreasing instants (see
    # ``_instant``), so the first one after ``after`` is the answer. Starting at the
    # wall-clock reading of ``after`` is safe: no earlier reading maps later than it.
    local = after.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
    limit = datetime(min(local.year + _SEARCH_YEARS, 9999), 1, 1)
    candidate = local
    while candidate < limit:
        candidate = _next_match(cron, candidate, limit)
        if candidate >= limit:
            break
        instant = _instant(candidate, tz)
        if instant > after:
            return instant
        candidate += timedelta(minutes=1)
    # parse_cron refuses expressions that never fire; this is the bound that proves it
    raise ScheduleError("invalid_cron", f"{cron.text!r} never fires", "$.cron")


def _next_match(cron: Cron, t: datetime, limit: datetime) -> datetime:
    """The first naive wall-clock minute >= ``t`` that the fields match."""
    while t < limit:
        if t.month not in cron.months:
            t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            continue
        if not cron.day_matches(t):
            t = t.replace(hour=0, minute=0) + timedelta(days=1)
            continue
        if t.hour not in cron.hours:
            t = t.replace(minute=0) + timedelta(hours=1)
            continue
        if t.minute not in cron.minutes:
            t += timedelta(minutes=1)
            continue
        return t
    return limit


def _instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of naive wall-clock ``wall`` in ``tz``: its first occurrence if
    it happens twice; the end of the gap if it never happens."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=1 reads it with the offset after the change (an instant before the
    # gap), fold=0 with the one before (an instant after it); the gap ends between them.
    low = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    high = int(first.timestamp())
    before = datetime.fromtimestamp(low, tz).utcoffset()
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == before:
            low = mid
        else:
            high = mid
    return datetime.fromtimestamp(high, UTC)


def _latest_at_or_before(when: When, start: datetime, now: datetime) -> datetime | None:
    """The last fire time in ``[start, now]`` (None: none)."""
    rule = when.rule
    if isinstance(rule, At):
        return rule.instant if start <= rule.instant <= now else None
    if isinstance(rule, Every):
        if now < rule.anchor:
            return None
        step = _micros(rule.interval)
        last = rule.anchor + timedelta(microseconds=_micros(now - rule.anchor) // step * step)
        return last if last >= start else None
    # cron: look back through growing windows, so a frequent schedule costs few steps
    for window in (timedelta(hours=1), timedelta(days=1), timedelta(days=32),
                   timedelta(days=367), timedelta(days=366 * _SEARCH_YEARS)):  # fmt: skip
        found: datetime | None = None
        t = next_fire(when, max(start, now - window) - timedelta(microseconds=1))
        while t is not None and t <= now:
            found = t
            t = next_fire(when, t)
        if found is not None or now - window <= start:
            return found
    return None


@dataclass(frozen=True)
class Due:
    """What a firer does now: submit ``fires`` (oldest first), then wait for ``next_at``
    (None: the schedule is done). ``dropped``: missed times not fired (the policy)."""

    fires: tuple[datetime, ...]
    next_at: datetime | None
    dropped: bool = False


def due(
    when: When,
    next_at: datetime | None,
    now: datetime,
    catch_up: CatchUp = "latest",
    grace: timedelta = timedelta(seconds=60),
    max_catch_up: int = 100,
) -> Due:
    """The firings due at ``now`` for a schedule whose next fire time is ``next_at``."""
    if next_at is None or next_at > now:
        return Due((), next_at)
    after = next_fire(when, now)
    if catch_up == "all":
        fires: list[datetime] = []
        t: datetime | None = next_at
        while t is not None and t <= now and len(fires) < max_catch_up:
            fires.append(t)
            t = next_fire(when, t)
        return Due(tuple(fires), after, dropped=t is not None and t <= now)
    latest = _latest_at_or_before(when, next_at, now) or next_at
    if catch_up == "none" and now - latest > grace:
        return Due((), after, dropped=True)
    return Due((latest,), after, dropped=latest != next_at)


def run_id_for(schedule_id: str, fire_at: datetime) -> str:
    """The run id of one firing: the same for every firer that sees it (run ids are
    subject tokens: letters, digits, ``-``, ``_``)."""
    utc = fire_at.astimezone(UTC)
    return f"{RUN_ID_PREFIX}{schedule_id}-{utc:%Y%m%dT%H%M%S}{utc.microsecond // 1000:03d}Z"
