"""Billing periods in UTC that follow a subscription's anchor.

A monthly period anchored on the 31st ends on the last day of shorter months
(day-of-month clamped) and returns to the 31st when the month has one; the
anchor's time of day is kept. Customers without a subscription use calendar
months (anchor 1970-01-01T00:00:00Z).
"""

from __future__ import annotations

import calendar
from datetime import datetime
from typing import Tuple

from meterflow.base.timeutil import UTC, dt_to_ms, ms_to_dt  # noqa: F401 - UTC is used by the doctests

PERIOD_MONTHS = {"month": 1, "quarter": 3, "year": 12}
PERIOD_DAYS = {"day": 1, "week": 7}
PERIOD_KINDS = tuple(PERIOD_DAYS) + tuple(PERIOD_MONTHS)
CALENDAR_ANCHOR_MS = 0  # 1970-01-01T00:00:00Z


def add_months(anchor: datetime, months: int) -> datetime:
    """The anchor moved by whole months, its day clamped to the target month's length.

    >>> add_months(datetime(2026, 1, 31, tzinfo=UTC), 1).date().isoformat()
    '2026-02-28'
    >>> add_months(datetime(2026, 1, 31, tzinfo=UTC), 2).date().isoformat()
    '2026-03-31'
    """
    total = anchor.year * 12 + (anchor.month - 1) + months
    year, month0 = divmod(total, 12)
    day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
    return anchor.replace(year=year, month=month0 + 1, day=day)


def period_bounds(ts_ms: int, kind: str, anchor_ms: int) -> Tuple[int, int]:
    """[start, end) in epoch ms of the period of ``kind`` anchored at ``anchor_ms`` that holds ``ts_ms``.

    Works before the anchor too (periods extend backwards).

    >>> from base.timeutil import ms_to_iso
    >>> s, e = period_bounds(1764547140000, "month", 0)  # 2025-11-30T23:59Z
    >>> ms_to_iso(s), ms_to_iso(e)
    ('2025-11-01T00:00:00Z', '2025-12-01T00:00:00Z')
    """
    days = PERIOD_DAYS.get(kind)
    if days is not None:
        length = days * 86_400_000
        start = anchor_ms + ((ts_ms - anchor_ms) // length) * length
        return start, start + length
    step = PERIOD_MONTHS[kind]
    anchor = ms_to_dt(anchor_ms)
    t = ms_to_dt(ts_ms)
    k = ((t.year - anchor.year) * 12 + (t.month - anchor.month)) // step
    first = add_months(anchor, k * step)
    while first > t:
        k -= 1
        first = add_months(anchor, k * step)
    after = add_months(anchor, (k + 1) * step)
    while after <= t:
        k += 1
        first, after = after, add_months(anchor, (k + 1) * step)
    return dt_to_ms(first), dt_to_ms(after)


def window_bounds(ts_ms: int, width_ms: int) -> Tuple[int, int]:
    """Tumbling window aligned to UTC epoch boundaries.

    >>> window_bounds(5_400_000, 3_600_000)
    (3600000, 7200000)
    """
    start = ts_ms - ts_ms % width_ms
    return start, start + width_ms
