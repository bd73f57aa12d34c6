"""The pure schedule core (``loom_core.schedules``): the cron grammar, fire times in time
zones across DST changes and Feb 29, catch-up policies, run ids. No servers, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loom_core import ids
from loom_core import schedules as s

ZONES = ["UTC", "Europe/Lisbon", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
         "Pacific/Apia", "America/Santiago"]  # fmt: skip


def cron(text: str, tz: str = "UTC") -> s.When:
    return s.When(s.parse_cron(text), s.zone(tz))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def fires(when: s.When, after: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    t: datetime | None = after
    for _ in range(n):
        assert t is not None
        t = s.next_fire(when, t)
        assert t is not None
        out.append(t)
    return out


# ----------------------------------------------------------------------------- grammar


def _item(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    return st.one_of(
        st.just("*"),
        value.map(str),
        st.tuples(value, value).map(lambda p: f"{min(p)}-{max(p)}"),
        st.integers(1, max(1, high // 2)).map(lambda n: f"*/{n}"),
        st.tuples(value, st.integers(1, 5)).map(lambda p: f"{p[0]}/{p[1]}"),
    )


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    return st.lists(_item(low, high), min_size=1, max_size=3).map(
        lambda items: "*" if "*" in items else ",".join(items)
    )


CRONS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 28), _field(1, 12), _field(0, 6)).map(
    " ".join
)
INSTANTS = st.datetimes(datetime(2000, 1, 1), datetime(2090, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@settings(max_examples=300, deadline=None)
@given(CRONS, st.sampled_from(ZONES), INSTANTS)
# January 1, 8, 15, 22 or 29 that is a Friday: none from 2000 until 2010 (the search
# used to stop after 9 years and call it "never fires")
@example("* * */7 1 5", "UTC", datetime(2000, 1, 1, tzinfo=UTC))
def test_the_next_fire_time_is_after_now_and_matches_or_ends_a_gap(
    text: str, tz: str, now: datetime
) -> None:
    when = cron(text, tz)
    t = s.next_fire(when, now)
    assert t is not None and t > now
    local = t.astimezone(when.tz)
    rule = when.rule
    assert isinstance(rule, s.Cron)
    matches = (local.minute in rule.minutes and local.hour in rule.hours
               and local.month in rule.months and rule.day_matches(local))  # fmt: skip
    # a wall-clock time that never happens fires when the gap ends
    gap_end = (t - timedelta(seconds=1)).astimezone(when.tz).utcoffset() != local.utcoffset()
    assert matches or gap_end


@settings(max_examples=150, deadline=None)
@given(CRONS, INSTANTS)
def test_in_utc_no_matching_minute_is_skipped(text: str, now: datetime) -> None:
    when = cron(text)
    t = s.next_fire(when, now)
    assert t is not None
    rule = when.rule
    assert isinstance(rule, s.Cron)
    m = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    checked = 0
    while m < t and checked < 3000:  # a bounded brute force
        assert not (m.minute in rule.minutes and m.hour in rule.hours
                    and m.month in rule.months and rule.day_matches(m)), m  # fmt: skip
        m += timedelta(minutes=1)
        checked += 1


@settings(max_examples=60, deadline=None)
@given(CRONS, st.sampled_from(ZONES), INSTANTS)
def test_fire_times_increase_and_each_wall_time_fires_once(
    text: str, tz: str, now: datetime
) -> None:
    when = cron(text, tz)
    times = fires(when, now, 30)
    assert times == sorted(set(times))
    walls = [t.astimezone(when.tz).replace(tzinfo=None) for t in times]
    assert len(set(walls)) == len(walls)


def test_lisbon_spring_forward_fires_when_the_gap_ends() -> None:
    # 2026-03-29: 01:00 WET becomes 02:00 WEST; 01:30 never happens
    got = fires(cron("30 1 * * *", "Europe/Lisbon"), utc(2026, 3, 28, 12), 3)
    assert got == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_lisbon_fall_back_fires_a_repeated_time_once() -> None:
    # 2026-10-25: 02:00 WEST becomes 01:00 WET; 01:30 happens twice, fires at the first
    got = fires(cron("30 1 * * *", "Europe/Lisbon"), utc(2026, 10, 24, 12), 2)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_every_twenty_minutes_in_new_york_across_both_changes() -> None:
    spring = fires(cron("*/20 * * * *", "America/New_York"), utc(2026, 3, 8, 6, 30), 3)
    # 01:40 EST, then 03:00 EDT (02:xx never happens), 03:20 EDT
    assert spring == [utc(2026, 3, 8, 6, 40), utc(2026, 3, 8, 7, 0), utc(2026, 3, 8, 7, 20)]
    fall = fires(cron("*/20 * * * *", "America/New_York"), utc(2026, 11, 1, 5, 30), 4)
    # 01:40 EDT, then the repeated hour is not fired again: 02:00 EST
    assert fall[:2] == [utc(2026, 11, 1, 5, 40), utc(2026, 11, 1, 7, 0)]


def test_feb_29_fires_in_leap_years_only() -> None:
    when = cron("0 0 29 2 *")
    assert s.next_fire(when, utc(2024, 1, 1)) == utc(2024, 2, 29)
    assert s.next_fire(when, utc(2024, 2, 29)) == utc(2028, 2, 29)
    assert s.next_fire(when, utc(2097, 3, 1)) == utc(2104, 2, 29)  # 2100 is no leap year


@pytest.mark.parametrize("text", ["0 0 31 2 *", "0 0 30 2 *", "0 0 30,31 2 *",
                                  "0 0 31 4,6,9,11 *", "* * 31 feb *"])  # fmt: skip
def test_a_day_that_never_occurs_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(s.ScheduleError) as caught:
        s.parse_cron(text)
    info = caught.value.info
    assert (info.code, info.path) == ("invalid_cron", "$.cron.day_of_month")
    assert "never" in info.message


def test_a_day_of_week_makes_any_day_possible() -> None:
    # both days restricted: either matches (Vixie cron), so Mondays in February fire
    assert s.next_fire(cron("0 0 31 2 1"), utc(2026, 1, 1)) == utc(2026, 2, 2)


@pytest.mark.parametrize(
    ("text", "field"),
    [("60 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day_of_month"),
     ("* * * 13 *", "month"), ("* * * * 8", "day_of_week"), ("5-1 * * * *", "minute"),
     ("*/0 * * * *", "minute"), ("* * * foo *", "month"), ("* * * * funday", "day_of_week"),
     ("1,,2 * * * *", "minute"), ("*/x * * * *", "minute"), ("-1 * * * *", "minute")],
)  # fmt: skip
def test_a_bad_field_is_named(text: str, field: str) -> None:
    with pytest.raises(s.ScheduleError) as caught:
        s.parse_cron(text, "$.when.cron")
    assert caught.value.info.path == f"$.when.cron.{field}"
    assert field in caught.value.info.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_is_refused_typed(text: str) -> None:
    try:
        s.parse_cron(text)
    except s.ScheduleError as exc:
        assert exc.info.code == "invalid_cron" and (exc.info.path or "").startswith("$.cron")


def test_names_macros_and_sunday_as_seven() -> None:
    assert s.parse_cron("0 9 * jan-mar MON-fri").weekdays == frozenset({1, 2, 3, 4, 5})
    assert s.parse_cron("0 0 * * 7").weekdays == frozenset({0})
    assert s.parse_cron("@daily").hours == frozenset({0})
    assert s.next_fire(cron("@hourly"), utc(2026, 5, 1, 10, 0)) == utc(2026, 5, 1, 11, 0)
    with pytest.raises(s.ScheduleError):
        s.parse_cron("@sometimes")
    with pytest.raises(s.ScheduleError):
        s.parse_cron("* * * * * " * 40)


@pytest.mark.parametrize("name", ["Mars/Olympus", "../etc/passwd", "/etc/localtime", "", "a b",
                                  "Europe/" + "x" * 80])  # fmt: skip
def test_bad_time_zones_are_refused(name: str) -> None:
    with pytest.raises(s.ScheduleError) as caught:
        s.zone(name)
    assert (caught.value.info.code, caught.value.info.path) == ("invalid_timezone", "$.tz")


@pytest.mark.parametrize("name", ["a.b", "with space", "", "-x", "x" * 49, "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(s.ScheduleError) as caught:
        s.check_name(name)
    assert caught.value.info.path == "$.name"


# ----------------------------------------------------------------------------- every, at


def test_every_parses_compound_intervals_within_bounds() -> None:
    assert s.parse_every("1h30m") == timedelta(minutes=90)
    assert s.parse_every("1s") == timedelta(seconds=1)
    for bad in ("", "10", "m", "500ms", "367d", "1h 30m", "-1s", "1.5h"):
        with pytest.raises(s.ScheduleError):
            s.parse_every(bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 86_400 * 3), INSTANTS, st.integers(-(10**6), 10**9))
def test_every_fires_on_its_grid_after_now(seconds: int, anchor: datetime, offset: int) -> None:
    when = s.When(s.Every(timedelta(seconds=seconds), anchor), s.zone("UTC"))
    now = anchor + timedelta(seconds=offset)
    t = s.next_fire(when, now)
    assert t is not None and t > now and t >= anchor
    assert (t - anchor) % timedelta(seconds=seconds) == timedelta(0)
    assert t - now <= timedelta(seconds=seconds) or now < anchor


def test_a_one_shot_fires_once() -> None:
    when = s.When(s.At(utc(2026, 12, 5, 9)), s.zone("UTC"))
    assert s.next_fire(when, utc(2026, 12, 5, 8)) == utc(2026, 12, 5, 9)
    assert s.next_fire(when, utc(2026, 12, 5, 9)) is None


# ----------------------------------------------------------------------------- catch-up


EVERY_MINUTE = s.When(s.Every(timedelta(minutes=1), utc(2026, 1, 1)), s.zone("UTC"))


def test_catch_up_policies_after_ten_missed_minutes() -> None:
    missed_from, now = utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 10, 30)
    latest = s.due(EVERY_MINUTE, missed_from, now, "latest")
    assert latest.fires == (utc(2026, 1, 1, 0, 10),) and latest.dropped
    assert latest.next_at == utc(2026, 1, 1, 0, 11)
    every = s.due(EVERY_MINUTE, missed_from, now, "all")
    assert every.fires == tuple(utc(2026, 1, 1, 0, m) for m in range(1, 11)) and not every.dropped
    bounded = s.due(EVERY_MINUTE, missed_from, now, "all", max_catch_up=3)
    assert bounded.fires == tuple(utc(2026, 1, 1, 0, m) for m in (1, 2, 3)) and bounded.dropped
    assert bounded.next_at == utc(2026, 1, 1, 0, 11)
    # none: the latest fires only within the grace
    assert s.due(EVERY_MINUTE, missed_from, now, "none").fires == (utc(2026, 1, 1, 0, 10),)
    late = s.due(EVERY_MINUTE, missed_from, now, "none", grace=timedelta(seconds=10))
    assert late.fires == () and late.dropped and late.next_at == utc(2026, 1, 1, 0, 11)


def test_nothing_is_due_before_its_time() -> None:
    assert s.due(EVERY_MINUTE, utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 4)).fires == ()
    assert s.due(EVERY_MINUTE, None, utc(2026, 1, 1)).next_at is None


@settings(max_examples=100, deadline=None)
@given(CRONS, st.sampled_from(ZONES), INSTANTS, st.integers(0, 3 * 86_400),
       st.sampled_from(s.CATCH_UPS))  # fmt: skip
def test_catch_up_fires_due_times_only_and_moves_past_now(
    text: str, tz: str, start: datetime, down_s: int, policy: s.CatchUp
) -> None:
    when = cron(text, tz)
    next_at = s.next_fire(when, start)
    assert next_at is not None
    now = next_at + timedelta(seconds=down_s)
    due = s.due(when, next_at, now, policy, max_catch_up=20)
    assert all(next_at <= t <= now for t in due.fires)
    assert list(due.fires) == sorted(set(due.fires)) and len(due.fires) <= 20
    assert due.next_at is not None and due.next_at > now
    if policy == "latest":
        assert len(due.fires) == 1 and s.next_fire(when, due.fires[0]) > now  # type: ignore[operator]


# ----------------------------------------------------------------------------- run ids


@settings(max_examples=200)
@given(INSTANTS, INSTANTS)
def test_run_ids_are_tokens_and_one_per_fire_time(a: datetime, b: datetime) -> None:
    ra, rb = s.run_id_for("0123456789ab", a), s.run_id_for("0123456789ab", b)
    assert ids.is_token(ra) and len(ra) <= 64
    same_ms = a.replace(microsecond=a.microsecond // 1000 * 1000) == b.replace(
        microsecond=b.microsecond // 1000 * 1000
    )
    assert (ra == rb) == same_ms


def test_a_february_29_on_a_weekday_is_found_across_2100() -> None:
    """Feb 29 that is a Sunday (weekday field `*/7`: Sundays, so both must match):
    2004, 2032, 2060, 2088, then 2128 (2100 is no leap year): the longest wait the
    calendar has, 40 years."""
    when = cron("0 0 29 2 */7")
    after_2088 = s.next_fire(when, datetime(2088, 3, 1, tzinfo=UTC))
    assert after_2088 == datetime(2128, 2, 29, tzinfo=UTC)
