"""Time in meterflow: timezone-aware UTC, carried as integer epoch milliseconds.

Integers compare and bucket exactly (no float rounding at window edges) and are
cheap to keep in state.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Dict

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    """Parse "90s", "5m", "1h", "1d", "2w" into milliseconds.

    >>> parse_duration_ms("1h")
    3600000
    >>> parse_duration_ms("0s")
    0
    """
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"expected a duration like '30s', '5m', '1h', '1d', got {text!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def dt_to_ms(dt: datetime) -> int:
    """Exact epoch milliseconds of an aware datetime (sub-millisecond digits are truncated).

    >>> dt_to_ms(datetime(2026, 11, 1, tzinfo=UTC))
    1793491200000
    """
    return (dt - EPOCH) // _MS


def parse_rfc3339_ms(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 timestamp with ``Z`` or an offset; digits past the millisecond
    are truncated, never rounded (``...59.9999999Z`` stays in its second). Raises ValueError.

    >>> parse_rfc3339_ms("2026-11-01T00:00:00Z")
    1793491200000
    >>> parse_rfc3339_ms("2026-04-30T23:59:59.9999999Z") % 86_400_000
    86399999
    >>> parse_rfc3339_ms("2026-10-31T19:00:00-05:00") == parse_rfc3339_ms("2026-11-01T00:00:00Z")
    True
    """
    if len(text) < 20 or text[4] != "-" or text[7] != "-" or text[10] not in "Tt " or text[13] != ":":
        raise ValueError(f"timestamp {text[:64]!r} is not RFC 3339 (expected like 2026-11-03T14:30:00Z)")
    if text[-1] == "z":  # RFC 3339 allows a lower-case zone designator
        text = text[:-1] + "Z"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"timestamp {text[:64]!r} is not RFC 3339 (expected like 2026-11-03T14:30:00Z)") from None
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {text[:64]!r} has no zone: add Z or an offset such as +00:00")
    return (dt - EPOCH) // _MS


_PREFIX_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}")
_CACHE_LIMIT = 65_536


class Rfc3339Parser:
    """:func:`parse_rfc3339_ms` with memoised halves, for the mediation hot path.

    An RFC 3339 timestamp is ``YYYY-MM-DDTHH:MM:SS`` followed by an optional fraction and the zone, and its
    epoch milliseconds are the sum of two parts that each depend on one half only: the first 19 characters
    read as UTC, plus the suffix's fraction (truncated to the millisecond) minus its offset. Both parts are
    cached the first time the full parser accepts a timestamp, so a stream of timestamps costs two slices
    and two dict lookups each instead of a datetime parse. Anything unusual goes to the full parser, which
    also raises the same errors. Each cache holds at most 65,536 entries (cleared when full).

    >>> p = Rfc3339Parser()
    >>> p("2026-11-01T00:00:00.250Z") - p("2026-10-31T19:00:00-05:00")
    250
    """

    __slots__ = ("_prefix", "_suffix")

    def __init__(self) -> None:
        self._prefix: dict = {}
        self._suffix: dict = {}

    def __call__(self, text: str) -> int:
        p = self._prefix.get(text[:19])
        if p is not None:
            s = self._suffix.get(text[19:])
            if s is not None:
                return p + s
        ms = parse_rfc3339_ms(text)  # raises ValueError on anything that is not RFC 3339 with a zone
        head = text[:19]
        if _PREFIX_SHAPE.fullmatch(head):
            if len(self._prefix) >= _CACHE_LIMIT:
                self._prefix.clear()
            if len(self._suffix) >= _CACHE_LIMIT:
                self._suffix.clear()
            p = self._prefix.get(head)
            if p is None:
                p = self._prefix[head] = parse_rfc3339_ms(head + "Z")
            self._suffix[text[19:]] = ms - p
        return ms


def ms_to_dt(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds."""
    return EPOCH + timedelta(milliseconds=ms)


def ms_to_iso(ms: int) -> str:
    """RFC 3339 in UTC with a ``Z``, milliseconds shown only when non-zero.

    >>> ms_to_iso(1793491200000)
    '2026-11-01T00:00:00Z'
    >>> ms_to_iso(1793491200123)
    '2026-11-01T00:00:00.123Z'
    """
    sec, frac = divmod(ms, 1000)
    head = _ISO_SECONDS.get(sec)
    if head is None:  # (strftime costs microseconds: the texts of recent seconds are kept)
        if len(_ISO_SECONDS) >= 8192:
            _ISO_SECONDS.clear()
        head = _ISO_SECONDS[sec] = ms_to_dt(ms - frac).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{frac:03d}Z" if frac else head + "Z"


_ISO_SECONDS: Dict[int, str] = {}  # epoch second -> its RFC 3339 text without the zone (ms_to_iso)


def now_ms() -> int:
    """Wall-clock epoch milliseconds, truncated (inject a different getter in tests). From ``time.time_ns``: the
    same millisecond as ``dt_to_ms(datetime.now(UTC))`` at about half the cost (it is read once per customer at
    every flush tick)."""
    return time.time_ns() // 1_000_000
