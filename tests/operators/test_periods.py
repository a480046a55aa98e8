"""Billing periods and rollup windows: UTC, anchors (incl. the 31st), weeks, quarters, years.

Expected boundaries are written out by hand (calendar facts), not recomputed
with the code under test.
"""

from __future__ import annotations

import doctest
import importlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.periods import add_months, period_bounds, window_bounds
from meterflow.base.timeutil import Rfc3339Parser, dt_to_ms, ms_to_dt, ms_to_iso, parse_duration_ms, parse_rfc3339_ms

UTC = timezone.utc
EST = timezone(timedelta(hours=-5))


def ms(text: str) -> int:
    """Epoch ms of an RFC 3339 string (test helper, via the standard library)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((dt - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1))


def bounds_iso(ts: str, kind: str, anchor: str = "1970-01-01T00:00:00Z"):
    s, e = period_bounds(ms(ts), kind, ms(anchor))
    return ms_to_iso(s), ms_to_iso(e)


# -- calendar months (customers without a subscription) --------------------------------------

@pytest.mark.parametrize("ts, start, end", [
    ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("2026-01-31T23:59:59.999Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
    ("2026-02-28T23:59:59Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
    ("2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
    ("2026-12-31T23:59:59.999Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("1999-07-04T00:00:00Z", "1999-07-01T00:00:00Z", "1999-08-01T00:00:00Z"),
])
def test_calendar_month(ts, start, end):
    assert bounds_iso(ts, "month") == (start, end)


def test_utc_boundary_2359_est_on_jan_31_is_february():
    # 23:59 EST on Jan 31 = 04:59 UTC on Feb 1: February's period, February 1st's day window.
    local = datetime(2026, 1, 31, 23, 59, tzinfo=EST)
    t = dt_to_ms(local)
    assert ms_to_iso(t) == "2026-02-01T04:59:00Z"
    assert tuple(map(ms_to_iso, period_bounds(t, "month", 0))) == ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z")
    assert tuple(map(ms_to_iso, window_bounds(t, 86_400_000))) == ("2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z")


# -- anchored months ------------------------------------------------------------------------

ANCHOR_31 = "2026-01-31T00:00:00Z"


@pytest.mark.parametrize("ts, start, end", [
    ("2026-01-31T00:00:00Z", "2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z"),
    ("2026-02-27T23:59:59.999Z", "2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z"),
    ("2026-02-28T00:00:00Z", "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"),  # clamped, then back to the 31st
    ("2026-03-30T23:59:59Z", "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"),
    ("2026-03-31T00:00:00Z", "2026-03-31T00:00:00Z", "2026-04-30T00:00:00Z"),
    ("2026-05-01T00:00:00Z", "2026-04-30T00:00:00Z", "2026-05-31T00:00:00Z"),
    ("2026-06-15T00:00:00Z", "2026-05-31T00:00:00Z", "2026-06-30T00:00:00Z"),
    ("2026-12-31T00:00:00Z", "2026-12-31T00:00:00Z", "2027-01-31T00:00:00Z"),
    ("2028-02-29T00:00:00Z", "2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z"),  # leap year
    ("2028-02-28T23:00:00Z", "2028-01-31T00:00:00Z", "2028-02-29T00:00:00Z"),
    # before the anchor, periods extend backwards with the same clamping
    ("2026-01-30T23:59:59Z", "2025-12-31T00:00:00Z", "2026-01-31T00:00:00Z"),
    ("2025-12-15T00:00:00Z", "2025-11-30T00:00:00Z", "2025-12-31T00:00:00Z"),
    ("2025-03-01T00:00:00Z", "2025-02-28T00:00:00Z", "2025-03-31T00:00:00Z"),
])
def test_month_anchored_on_the_31st(ts, start, end):
    assert bounds_iso(ts, "month", ANCHOR_31) == (start, end)


def test_month_anchor_keeps_time_of_day():
    anchor = "2026-01-31T12:00:00Z"
    assert bounds_iso("2026-02-28T11:59:59.999Z", "month", anchor) == ("2026-01-31T12:00:00Z", "2026-02-28T12:00:00Z")
    assert bounds_iso("2026-02-28T12:00:00Z", "month", anchor) == ("2026-02-28T12:00:00Z", "2026-03-31T12:00:00Z")
    assert bounds_iso("2026-01-31T11:00:00Z", "month", anchor) == ("2025-12-31T12:00:00Z", "2026-01-31T12:00:00Z")


def test_month_anchor_given_with_an_offset_is_utc():
    # 2026-11-01T00:00:00+01:00 is 2026-10-31T23:00Z: periods follow the UTC instant.
    anchor = dt_to_ms(datetime(2026, 11, 1, tzinfo=timezone(timedelta(hours=1))))
    s, e = period_bounds(ms("2026-11-15T00:00:00Z"), "month", anchor)
    assert (ms_to_iso(s), ms_to_iso(e)) == ("2026-10-31T23:00:00Z", "2026-11-30T23:00:00Z")


def test_add_months_clamps_day_of_month():
    a = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    assert [add_months(a, k).date().isoformat() for k in range(-2, 5)] == [
        "2025-11-30", "2025-12-31", "2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]
    assert add_months(a, 1).time() == a.time()


# -- quarters, years, weeks, days -------------------------------------------------------------

@pytest.mark.parametrize("ts, start, end", [
    ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z"),
    ("2026-03-31T23:59:59.999Z", "2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z"),
    ("2026-04-01T00:00:00Z", "2026-04-01T00:00:00Z", "2026-07-01T00:00:00Z"),
    ("2026-11-15T00:00:00Z", "2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z"),
])
def test_calendar_quarter(ts, start, end):
    assert bounds_iso(ts, "quarter") == (start, end)


@pytest.mark.parametrize("ts, start, end", [
    ("2025-12-01T00:00:00Z", "2025-11-30T12:00:00Z", "2026-02-28T12:00:00Z"),
    ("2026-02-28T11:59:59Z", "2025-11-30T12:00:00Z", "2026-02-28T12:00:00Z"),
    ("2026-02-28T12:00:00Z", "2026-02-28T12:00:00Z", "2026-05-30T12:00:00Z"),
    ("2026-08-30T12:00:00Z", "2026-08-30T12:00:00Z", "2026-11-30T12:00:00Z"),
    ("2025-11-30T11:59:59Z", "2025-08-30T12:00:00Z", "2025-11-30T12:00:00Z"),
])
def test_quarter_anchored_on_the_30th(ts, start, end):
    assert bounds_iso(ts, "quarter", "2025-11-30T12:00:00Z") == (start, end)


def test_year_anchored_on_feb_29():
    anchor = "2024-02-29T00:00:00Z"
    assert bounds_iso("2024-06-01T00:00:00Z", "year", anchor) == ("2024-02-29T00:00:00Z", "2025-02-28T00:00:00Z")
    assert bounds_iso("2025-02-28T00:00:00Z", "year", anchor) == ("2025-02-28T00:00:00Z", "2026-02-28T00:00:00Z")
    assert bounds_iso("2028-03-01T00:00:00Z", "year", anchor) == ("2028-02-29T00:00:00Z", "2029-02-28T00:00:00Z")
    assert bounds_iso("2026-01-01T00:00:00Z", "year") == ("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")


@pytest.mark.parametrize("ts, start, end", [
    ("2026-01-05T00:00:00Z", "2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z"),   # Monday anchor
    ("2026-01-11T23:59:59.999Z", "2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z"),
    ("2026-01-12T00:00:00Z", "2026-01-12T00:00:00Z", "2026-01-19T00:00:00Z"),
    ("2026-01-04T23:59:59Z", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z"),   # before the anchor
    ("2026-03-01T10:00:00Z", "2026-02-23T00:00:00Z", "2026-03-02T00:00:00Z"),
])
def test_week_anchored_on_a_monday(ts, start, end):
    assert bounds_iso(ts, "week", "2026-01-05T00:00:00Z") == (start, end)


def test_day_anchored_at_six():
    anchor = "2026-01-01T06:00:00Z"
    assert bounds_iso("2026-03-10T05:59:59Z", "day", anchor) == ("2026-03-09T06:00:00Z", "2026-03-10T06:00:00Z")
    assert bounds_iso("2026-03-10T06:00:00Z", "day", anchor) == ("2026-03-10T06:00:00Z", "2026-03-11T06:00:00Z")
    assert bounds_iso("2026-03-10T12:00:00Z", "day") == ("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")


# -- rollup windows ----------------------------------------------------------------------------

@pytest.mark.parametrize("ts, width, start, end", [
    ("2026-11-03T14:30:00Z", "1h", "2026-11-03T14:00:00Z", "2026-11-03T15:00:00Z"),
    ("2026-11-03T14:00:00Z", "1h", "2026-11-03T14:00:00Z", "2026-11-03T15:00:00Z"),
    ("2026-11-03T14:59:59.999Z", "1h", "2026-11-03T14:00:00Z", "2026-11-03T15:00:00Z"),
    ("2026-11-03T14:34:59Z", "5m", "2026-11-03T14:30:00Z", "2026-11-03T14:35:00Z"),
    ("2026-11-03T14:30:59.999Z", "1m", "2026-11-03T14:30:00Z", "2026-11-03T14:31:00Z"),
    ("2026-11-03T23:59:59Z", "1d", "2026-11-03T00:00:00Z", "2026-11-04T00:00:00Z"),
])
def test_windows_align_to_utc_epoch(ts, width, start, end):
    s, e = window_bounds(ms(ts), parse_duration_ms(width))
    assert (ms_to_iso(s), ms_to_iso(e)) == (start, end)


# -- properties ----------------------------------------------------------------------------------

T_MIN = ms("2000-01-01T00:00:00Z")
T_MAX = ms("2040-01-01T00:00:00Z")


@settings(max_examples=300, deadline=None, database=None)
@given(ts=st.integers(T_MIN, T_MAX), anchor=st.integers(T_MIN, T_MAX),
       kind=st.sampled_from(["day", "week", "month", "quarter", "year"]))
def test_periods_tile_time(ts, anchor, kind):
    """Every instant is in exactly one period; periods are contiguous; the anchor starts one."""
    s, e = period_bounds(ts, kind, anchor)
    assert s <= ts < e
    assert period_bounds(s, kind, anchor) == (s, e)
    assert period_bounds(e - 1, kind, anchor) == (s, e)
    assert period_bounds(e, kind, anchor)[0] == e
    assert period_bounds(s - 1, kind, anchor)[1] == s
    assert period_bounds(anchor, kind, anchor)[0] == anchor
    a, b = ms_to_dt(s), ms_to_dt(anchor)
    assert a.time() == b.time()
    if kind in ("month", "quarter", "year"):
        # day of month = the anchor's, clamped to the month's length
        import calendar
        assert a.day == min(b.day, calendar.monthrange(a.year, a.month)[1])
        months = (a.year - b.year) * 12 + a.month - b.month
        assert months % {"month": 1, "quarter": 3, "year": 12}[kind] == 0
    else:
        assert (e - s) == {"day": 1, "week": 7}[kind] * 86_400_000


# -- docstring examples run (STYLE: "Docstring examples that run (doctest) or none at all") --------------

def _modules_with_examples():
    """Every module of the package whose docstrings hold an example: all of them run here."""
    root = Path(__file__).resolve().parents[2]
    found = []
    for folder in ("base", "schemas", "operators", "sources", "sinks", "dataflows", "meterflow"):
        for path in sorted((root / folder).glob("*.py")):
            if ">>>" in path.read_text():
                prefix = "meterflow" if folder == "meterflow" else f"meterflow.{folder}"
                found.append(prefix if path.stem == "__init__" else f"{prefix}.{path.stem}")
    return found


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.failed == 0


# -- the memoised RFC 3339 parser of the mediation hot path ---------------------------------------------------

_PREFIXES = ["2026-11-01T00:00:00", "2026-02-28T23:59:59", "2024-02-29T12:30:45", "2026-02-29T00:00:00",
             "2026-11-01t00:00:00", "2026-11-01 00:00:00", "2026-13-01T00:00:00", "2026-11-01T24:00:00",
             "2026-11-01T00:00", "０２０２-11-01T00:00:00", "2026-11-01T00:00:60"]
_SUFFIXES = ["Z", "z", ".250Z", ".5Z", ".9999999Z", ".123456+05:30", "-05:00", "+00:00", "", "0Z", "1Z",
             ".Z", "+05", "+0530", " Z", "Zjunk", ".12a Z", ":00Z", "00Z", ".000001-00:01"]


def _full_or_error(text):
    try:
        return parse_rfc3339_ms(text)
    except ValueError:
        return "error"


def _cached_or_error(parser, text):
    try:
        return parser(text)
    except ValueError:
        return "error"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PREFIXES), st.sampled_from(_SUFFIXES)), min_size=1, max_size=40))
def test_cached_parser_agrees_with_the_full_parser_on_every_mix_of_halves(pairs):
    # Halves cached from one timestamp are reused with halves of others: every mix must give the full answer.
    parser = Rfc3339Parser()
    for prefix, suffix in pairs + pairs[::-1]:
        text = prefix + suffix
        assert _cached_or_error(parser, text) == _full_or_error(text), text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=4_102_444_800_000), st.sampled_from(["", ".5", ".123", ".1234567"]),
       st.sampled_from(["Z", "+01:00", "-11:30"]))
def test_cached_parser_is_exact_for_any_instant(ms, frac, zone):
    parser = Rfc3339Parser()
    text = ms_to_iso(ms - ms % 1000)[:19] + frac + zone
    first = parser(text)
    assert first == parse_rfc3339_ms(text)
    assert parser(text) == first  # from the cache


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999), min_size=1,
                max_size=30))
def test_ms_to_iso_with_its_cache_of_seconds_is_the_strftime_text(values):
    """ms_to_iso keeps the text of recent seconds; each call, cached or not, gives the uncached text."""
    def uncached(ms):
        dt = ms_to_dt(ms)
        frac = ms % 1000
        return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac:03d}Z" if frac else "Z")

    for ms in values + [v + 1 for v in values] + values:  # (the same second again, another millisecond of it)
        if ms <= 253_402_300_799_999:
            assert ms_to_iso(ms) == uncached(ms), ms
