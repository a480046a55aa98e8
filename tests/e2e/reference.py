"""An independent reference implementation of the metering contract, for end-to-end checks.

It deliberately shares no code with the pipeline (no msgspec, no operators.*, no schemas.*):
events are decoded with the standard ``json`` module, validated by hand against the usage event
rules (README: What it does), and aggregated with plain Python following README: Outputs:

* dedupe by (tenant_id, event_id), the first arrival wins (a duplicate of a too-late event is a
  duplicate, not a second dead letter);
* excluded events (tenant ``exclude_when`` match or an ``excluded_customers`` member) are not in
  ``value``/``events``; they are counted in the period row's ``excluded_events``;
* ``correction: true`` negates the event's contribution to ``count`` and ``sum``; the other
  aggregations ignore corrections (documented in operators/aggregate.py);
* ``p95`` is nearest-rank: the ceil(0.95 n)-th smallest value, computed in integers;
* ``latest`` is the value of the greatest timestamp, a tie going to the later arrival;
* windows are tumbling and aligned to the UTC epoch; periods follow the subscription's monthly
  anchor, calendar months in UTC without a subscription;
* dead-letter reasons: invalid_json, invalid_event, unknown_tenant, missing_property (per metric;
  the other metrics still count the event) and too_late (the billing period ended more than
  late_grace before the watermark = the greatest event time seen so far in arrival order);
* invalid_event also covers nesting deeper than 64 levels anywhere (counted by a character scan
  here) and a timestamp before 1970 or more than max_clock_skew (1 h) after ``now_ms``, the wall
  clock when the events were read (when the caller gives it);
* the run summary's counters: each event is exactly one of accepted, duplicates, excluded and
  dead_lettered; missing_property dead letters are counted apart.

Inputs are processed in the order given (file order); a test that feeds the same events through
several Kafka partitions must make its workload insensitive to cross-partition order (no
``latest`` ties, no event near enough to a period end + late_grace for order to matter).
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EVENT_BYTES = 1_048_576  # pipeline.max_event_bytes default: bigger payloads are invalid_event
MAX_DEPTH = 64  # deeper nesting anywhere is invalid_event
MAX_CLOCK_SKEW_MS = 3_600_000  # pipeline.max_clock_skew default
NUMERIC_AGGS = {"sum", "max", "min", "latest", "p95", "p99"}


@dataclass(frozen=True)
class Metric:
    code: str
    event_type: str
    aggregation: str
    prop: Optional[str] = None
    group_by: Tuple[str, ...] = ()


# The metrics of meterflow.sample.sample_config_toml, restated independently.
SAMPLE_METRICS = (
    Metric("api_calls", "api_call", "count"),
    Metric("tokens", "api_call", "sum", "tokens", ("region",)),
    Metric("active_users", "api_call", "unique_count", "user_id"),
    Metric("latency_p95", "api_call", "p95", "latency_ms"),
    Metric("seats", "seat_count", "latest", "seats"),
)


@dataclass
class Spec:
    tenants: Dict[str, Tuple[Dict[str, Any], Tuple[str, ...]]]  # id -> (exclude_when, excluded_customers)
    subscriptions: Dict[Tuple[str, str], Tuple[datetime, Dict[str, float]]]  # -> (monthly anchor, included)
    metrics: Sequence[Metric] = SAMPLE_METRICS
    window_ms: int = 3_600_000
    grace_ms: int = 6 * 3_600_000


def sample_spec(tenants: Sequence[str], subscribed: Dict[str, Sequence[str]], anchor: datetime,
                included: int = 2000) -> Spec:
    """The Spec matching ``sample_config_toml(tenants, subscribed, anchor, included)``."""
    return Spec(
        tenants={t: ({"environment": "test"}, ("cust_internal",)) for t in tenants},
        subscriptions={(t, c): (anchor, {"api_calls": float(included), "tokens": float(included * 400)})
                       for t, cs in subscribed.items() for c in cs})


# -- time ---------------------------------------------------------------------------------

def to_ms(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(milliseconds=1)


def _month_shift(anchor: datetime, k: int) -> datetime:
    y, m0 = divmod(anchor.year * 12 + anchor.month - 1 + k, 12)
    day = min(anchor.day, calendar.monthrange(y, m0 + 1)[1])
    return anchor.replace(year=y, month=m0 + 1, day=day)


def month_period(ts_ms: int, anchor: datetime) -> Tuple[int, int]:
    """[start, end) of the monthly period anchored at ``anchor`` holding ``ts_ms`` (linear search)."""
    t = EPOCH + timedelta(milliseconds=ts_ms)
    k = (t.year - anchor.year) * 12 + (t.month - anchor.month) + 1
    while to_ms(_month_shift(anchor, k)) > ts_ms:
        k -= 1
    return to_ms(_month_shift(anchor, k)), to_ms(_month_shift(anchor, k + 1))


CALENDAR = datetime(1970, 1, 1, tzinfo=UTC)


# -- decoding ----------------------------------------------------------------------------

class Bad(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) > 0


def _parse_ts(v: Any, now_ms: Optional[int]) -> int:
    if isinstance(v, bool):
        raise Bad("invalid_event")
    if isinstance(v, int):
        ts = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise Bad("invalid_event") from None
        if dt.tzinfo is None:
            raise Bad("invalid_event")
        ts = to_ms(dt)
    else:
        raise Bad("invalid_event")
    if ts < 0 or (now_ms is not None and ts > now_ms + MAX_CLOCK_SKEW_MS):
        raise Bad("invalid_event")
    return ts


def nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects, scanning characters (brackets in strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw.decode("latin-1"):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def decode(raw: bytes, now_ms: Optional[int] = None) -> Tuple[dict, int]:
    """(event dict, timestamp ms) or raise Bad(reason)."""
    if not raw:
        raise Bad("invalid_json")
    if len(raw) > MAX_EVENT_BYTES or nesting(raw) > MAX_DEPTH:
        raise Bad("invalid_event")
    try:
        ev = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Bad("invalid_json") from None
    if not isinstance(ev, dict):
        raise Bad("invalid_event")
    eid = ev.get("event_id")
    if not _nonempty_str(eid) or len(eid) > 256:
        raise Bad("invalid_event")
    for k in ("tenant_id", "customer_id", "event_type"):
        if not _nonempty_str(ev.get(k)):
            raise Bad("invalid_event")
    if "timestamp" not in ev:
        raise Bad("invalid_event")
    ts = _parse_ts(ev["timestamp"], now_ms)
    props = ev.get("properties", {})
    if not isinstance(props, dict) or any(
            not (v is None or isinstance(v, (str, int, float, bool))) for v in props.values()):
        raise Bad("invalid_event")
    if "correction" in ev and not isinstance(ev["correction"], bool):
        raise Bad("invalid_event")
    if ev.get("corrects") is not None and not isinstance(ev["corrects"], str):
        raise Bad("invalid_event")
    ev["properties"] = props
    return ev, ts


# -- aggregation -------------------------------------------------------------------------

@dataclass
class _Acc:
    aggregation: str
    events: int = 0
    count: int = 0
    total: Fraction = Fraction(0)
    values: List[Any] = field(default_factory=list)
    latest: Tuple[int, int, Any] = (-1, -1, None)  # (ts, arrival, value)

    def add(self, v: Any, ts: int, sign: int, arrival: int) -> None:
        self.events += 1
        self.count += sign
        if v is not None:
            self.values.append(v)
            if self.aggregation == "sum":
                self.total += sign * Fraction(v)
            if (ts, arrival) > self.latest[:2]:
                self.latest = (ts, arrival, v)

    def value(self) -> float:
        a = self.aggregation
        if a == "count":
            return float(self.count)
        if a == "sum":
            return float(self.total)
        if a == "unique_count":
            return float(len({v if isinstance(v, str) else (type(v).__name__, v) for v in self.values}))
        if a in ("p95", "p99"):
            pct = 95 if a == "p95" else 99
            xs = sorted(self.values)
            rank = max(1, (pct * len(xs) + 99) // 100)  # ceil(p * n) in integers
            return float(xs[rank - 1])
        if a == "latest":
            return float(self.latest[2])
        if a == "max":
            return float(max(self.values))
        if a == "min":
            return float(min(self.values))
        raise AssertionError(a)


@dataclass
class Expected:
    # (tenant, customer, metric, period_start) -> dict(period_end, value, included, overage_units, events,
    #                                                   excluded_events)
    periods: Dict[Tuple, Dict[str, Any]]
    # (tenant, customer, metric, window_start, ((dim, value), ...)) -> dict(window_end, value, events)
    windows: Dict[Tuple, Dict[str, Any]]
    # one (input index, reason, metric) per dead letter
    dead_letters: List[Tuple[int, str, str]]
    duplicates: int = 0
    latest_ties: List[Tuple] = field(default_factory=list)  # ambiguous `latest` ties (should be empty)
    # the run summary's counters (read, accepted, duplicates, excluded, dead_lettered, missing_property)
    counters: Dict[str, int] = field(default_factory=dict)


def _dim(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def compute(raws: Sequence[bytes], spec: Spec, now_ms: Optional[int] = None) -> Expected:
    """What the pipeline must produce for ``raws`` read in this order (``now_ms``: the wall clock when they
    were read, for the clock-skew rule; None skips that rule)."""
    seen: set = set()
    wm = 0
    dead: List[Tuple[int, str, str]] = []
    wins: Dict[Tuple, _Acc] = {}
    pers: Dict[Tuple, _Acc] = {}
    excluded: Dict[Tuple, int] = {}
    period_ends: Dict[Tuple, int] = {}
    by_type: Dict[str, List[Metric]] = {}
    latest_ts: Dict[Tuple, List[Tuple[int, Any]]] = {}
    for m in spec.metrics:
        by_type.setdefault(m.event_type, []).append(m)
    dups = accepted = excluded_n = 0
    for i, raw in enumerate(raws):
        try:
            ev, ts = decode(raw, now_ms)
        except Bad as exc:
            dead.append((i, exc.reason, ""))
            continue
        tenant, cust = ev["tenant_id"], ev["customer_id"]
        rule = spec.tenants.get(tenant)
        if rule is None:
            dead.append((i, "unknown_tenant", ""))
            continue
        wm_before = wm
        wm = max(wm, ts)
        if (tenant, ev["event_id"]) in seen:
            dups += 1
            continue
        seen.add((tenant, ev["event_id"]))
        metrics = by_type.get(ev["event_type"])
        if not metrics:
            accepted += 1  # accepted, no metric for its type
            continue
        sub = spec.subscriptions.get((tenant, cust))
        pstart, pend = month_period(ts, sub[0] if sub else CALENDAR)
        if pend + spec.grace_ms < wm_before:
            dead.append((i, "too_late", ""))
            continue
        props = ev["properties"]
        exclude_when, excluded_customers = rule
        is_excluded = cust in excluded_customers or (
            bool(exclude_when) and all(k in props and props[k] == v for k, v in exclude_when.items()))
        sign = -1 if ev.get("correction") is True else 1
        if is_excluded:
            excluded_n += 1
        else:
            accepted += 1
        for m in metrics:
            pk = (tenant, cust, m.code, pstart)
            period_ends[pk] = pend
            if is_excluded:
                excluded[pk] = excluded.get(pk, 0) + 1
                continue
            v = None
            if m.aggregation != "count":
                v = props.get(m.prop)
                if v is None or (m.aggregation in NUMERIC_AGGS and
                                 (isinstance(v, bool) or not isinstance(v, (int, float)))):
                    dead.append((i, "missing_property", m.code))
                    continue
            if sign < 0 and m.aggregation not in ("count", "sum"):
                continue
            wstart = ts - ts % spec.window_ms
            dims = tuple((g, _dim(props.get(g))) for g in m.group_by)
            wk = (tenant, cust, m.code, wstart, dims)
            wins.setdefault(wk, _Acc(m.aggregation)).add(v, ts, sign, i)
            pers.setdefault(pk, _Acc(m.aggregation)).add(v, ts, sign, i)
            if m.aggregation == "latest":
                for key in (wk, pk):
                    latest_ts.setdefault(key, []).append((ts, v))
    ties = []
    for key, pts in latest_ts.items():
        top = max(t for t, _ in pts)
        if len({v for t, v in pts if t == top}) > 1:
            ties.append(key)
    periods = {}
    for pk, pend in period_ends.items():
        acc = pers.get(pk)
        tenant, cust, code, _ = pk
        sub = spec.subscriptions.get((tenant, cust))
        included = sub[1].get(code) if sub else None
        value = acc.value() if acc else 0.0
        periods[pk] = {"period_end": pend, "value": value, "included": included,
                       "overage_units": max(0.0, value - included) if included is not None else 0.0,
                       "events": acc.events if acc else 0, "excluded_events": excluded.get(pk, 0)}
    windows = {wk: {"window_end": wk[3] + spec.window_ms, "value": acc.value(), "events": acc.events}
               for wk, acc in wins.items()}
    whole = sum(1 for _, reason, _ in dead if reason != "missing_property")
    counters = {"read": len(raws), "accepted": accepted, "duplicates": dups, "excluded": excluded_n,
                "dead_lettered": whole, "missing_property": len(dead) - whole}
    return Expected(periods, windows, dead, dups, ties, counters)


# -- shapes of the pipeline's outputs, for comparison -------------------------------------

def views_periods(rows: Sequence[Sequence[Any]]) -> Dict[Tuple, Dict[str, Any]]:
    """chread.py ``periods`` rows -> the Expected.periods shape (a duplicate identity is an error)."""
    out: Dict[Tuple, Dict[str, Any]] = {}
    for t, c, m, ps, pe, value, included, overage, events, excl in rows:
        key = (t, c, m, ps)
        assert key not in out, f"usage_by_period has two rows for {key}"
        out[key] = {"period_end": pe, "value": value, "included": included, "overage_units": overage,
                    "events": events, "excluded_events": excl}
    return out


def views_windows(rows: Sequence[Sequence[Any]]) -> Dict[Tuple, Dict[str, Any]]:
    out: Dict[Tuple, Dict[str, Any]] = {}
    for t, c, m, ws, we, dims, value, events in rows:
        key = (t, c, m, ws, tuple(sorted(dims.items())))
        assert key not in out, f"usage_by_window has two rows for {key}"
        out[key] = {"window_end": we, "value": value, "events": events}
    return out


def topic_view(records: Sequence[dict]) -> Tuple[Dict[Tuple, Dict[str, Any]], Dict[Tuple, Dict[str, Any]]]:
    """A downstream consumer's view of the aggregated topic: per identity the highest-version record.

    Records that share the highest version of an identity must be identical (anything else would
    make "keep the highest version" ambiguous).
    """
    best: Dict[Tuple, dict] = {}
    for r in records:
        if r["type"] == "window":
            ident = ("window", r["tenant_id"], r["customer_id"], r["metric"], r["window_start"],
                     tuple(sorted(r["dimensions"].items())))
        else:
            assert r["type"] == "period", r
            ident = ("period", r["tenant_id"], r["customer_id"], r["metric"], r["period_start"])
        cur = best.get(ident)
        if cur is None or r["version"] > cur["version"]:
            best[ident] = r
        elif r["version"] == cur["version"]:
            assert r == cur, f"two different records with the same version for {ident}: {cur} vs {r}"
    periods, windows = {}, {}
    for ident, r in best.items():
        if ident[0] == "window":
            windows[ident[1:]] = {"window_end": r["window_end"], "value": r["value"], "events": r["events"]}
        else:
            periods[ident[1:]] = {"period_end": r["period_end"], "value": r["value"], "included": r["included"],
                                  "overage_units": r["overage_units"], "events": r["events"],
                                  "excluded_events": r["excluded_events"]}
    return periods, windows


def diff(expected: Dict[Tuple, Any], actual: Dict[Tuple, Any], limit: int = 8) -> str:
    """A short human-readable difference of two keyed dicts ('' when equal)."""
    lines = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    changed = [k for k in expected if k in actual and expected[k] != actual[k]]
    for k in missing[:limit]:
        lines.append(f"missing {k}: expected {expected[k]}")
    for k in extra[:limit]:
        lines.append(f"unexpected {k}: {actual[k]}")
    for k in changed[:limit]:
        lines.append(f"wrong {k}: expected {expected[k]}, got {actual[k]}")
    if lines:
        lines.insert(0, f"{len(missing)} missing, {len(extra)} unexpected, {len(changed)} wrong "
                        f"(of {len(expected)} expected rows)")
    return "\n".join(lines)
