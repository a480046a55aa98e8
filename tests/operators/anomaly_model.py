"""An independent model of anomaly alerts, written from the contract (section 7) and README "Anomaly alerts", and
a generator of randomised usage histories for it (shared by the property test and the end-to-end test).

The model replays the events in arrival order with plain dicts and Fractions:
- an event counts once per (tenant, event_id), the first time it is seen, whether or not it is excluded;
- excluded events (properties environment = test, or an excluded customer) count nowhere;
- per (customer, metric) usage_d is the sum of contributions of the events whose timestamps fall in UTC day d:
  1 per event for count, the value for sum, negated for a correction; a metric's where filter applies, and a sum
  event without its property does not count for that metric;
- first = the first UTC day with an accepted event of (customer, metric); H = d - first; latest = the latest day
  of (customer, metric) so far (this event included); a day is judged only when H >= min_history_days and
  d >= latest - ceil(late_grace / 1 day) (README: the judging horizon);
- N = min(baseline_days, H); S = the usage of days d - N .. d - 1 (0 when none); when S > 0 the event after which
  usage_d * N > factor * S (factor as written, exactly) fires, once per (customer, metric, d).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

DAY = 86_400_000
DAY0 = int(datetime(2025, 3, 1, tzinfo=timezone.utc).timestamp() * 1000)
TENANT = "acme"
CUSTOMERS = ["c1", "c2", "c3", "internal"]  # "internal" is an excluded customer
METRICS = [  # (code, aggregation, property, where)
    ("calls", "count", None, {}),
    ("large", "count", None, {"model": "m-large"}),
    ("tokens", "sum", "tokens", {}),
    ("peak", "max", "tokens", {}),  # not count or sum: never judged
]


def config_dict(factor: float, baseline_days: int, min_history_days: int, late_grace: str,
                metrics: Optional[List[str]], rollup_window: str = "1h") -> Dict[str, Any]:
    anomaly: Dict[str, Any] = {"factor": factor, "baseline_days": baseline_days,
                               "min_history_days": min_history_days}
    if metrics is not None:
        anomaly["metrics"] = metrics
    return {
        "pipeline": {"rollup_window": rollup_window, "late_grace": late_grace, "dedupe_window": "3650d"},
        "tenants": [{"id": TENANT, "exclude_when": {"environment": "test"}, "excluded_customers": ["internal"]}],
        "metrics": [{"code": c, "event_type": "api_call", "aggregation": a, **({"property": p} if p else {}),
                     **({"where": w} if w else {})} for c, a, p, w in METRICS],
        "anomaly": anomaly,
    }


@dataclass(frozen=True)
class Ev:
    event_id: str
    customer: str
    ts: int
    tokens: Any  # None: absent
    model: str
    test: bool
    correction: bool

    def raw(self) -> bytes:
        props: Dict[str, Any] = {"model": self.model}
        if self.tokens is not None:
            props["tokens"] = self.tokens
        if self.test:
            props["environment"] = "test"
        d: Dict[str, Any] = {"event_id": self.event_id, "tenant_id": TENANT, "customer_id": self.customer,
                             "event_type": "api_call", "timestamp": self.ts, "properties": props}
        if self.correction:
            d["correction"] = True
        return json.dumps(d).encode()


def model_anomalies(events: Sequence[Ev], factor: float, baseline_days: int, min_history_days: int,
                    late_days: int, metrics: Optional[List[str]]) -> List[Tuple[str, str, str, int]]:
    """``(event_id, customer, metric, day)`` of every anomaly alert, in firing order."""
    judged = [c for c, a, _, _ in METRICS if a in ("count", "sum")] if metrics is None else metrics
    f = Fraction(repr(factor))
    seen = set()
    usage: Dict[Tuple[str, str], Dict[int, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    first: Dict[Tuple[str, str], int] = {}
    latest: Dict[Tuple[str, str], int] = {}
    fired = set()
    out = []
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        if e.test or e.customer == "internal":
            continue
        d = e.ts // DAY
        sign = -1 if e.correction else 1
        for code, agg, _prop, where in METRICS:
            if code not in judged:
                continue
            if any(k != "model" or v != e.model for k, v in where.items()):
                continue
            if agg == "sum":
                if e.tokens is None:
                    continue
                contribution = sign * Fraction(e.tokens)
            else:
                contribution = Fraction(sign)
            k = (e.customer, code)
            usage[k][d] += contribution
            first[k] = min(first.get(k, d), d)
            latest[k] = max(latest.get(k, d), d)
            h = d - first[k]
            if h < min_history_days or d < latest[k] - late_days or (k, d) in fired:
                continue
            n = min(baseline_days, h)
            s = sum((usage[k].get(x, Fraction(0)) for x in range(d - n, d)), Fraction(0))
            if s > 0 and usage[k][d] * n > f * s:
                fired.add((k, d))
                out.append((e.event_id, e.customer, code, d))
    return out


def make_events(draw_int, n: int) -> List[Ev]:
    """``n`` events drawn with ``draw_int(lo, hi)``: days mostly ascending with steps, some late (up to 3 days
    back), bursts (several events of one customer and day), duplicates, exclusions, corrections, token values
    that are integers or quarters (exact in floats), some without tokens."""
    events: List[Ev] = []
    day = 0
    for i in range(n):
        step = draw_int(0, 9)
        if step >= 8 and day < 24:
            day += 1 if step == 8 else 2
        late = draw_int(0, 9)
        d = max(0, day - (late - 6)) if late > 6 else day  # 7, 8, 9: 1 to 3 days back
        if events and draw_int(0, 29) == 0:  # a resent event (same id, any content)
            prev = events[draw_int(0, len(events) - 1)]
            events.append(Ev(prev.event_id, prev.customer, DAY0 + d * DAY + draw_int(0, DAY - 1), prev.tokens,
                             prev.model, False, False))
            continue
        cust = CUSTOMERS[draw_int(0, 3) if draw_int(0, 9) == 0 else draw_int(0, 2)]
        tv = draw_int(0, 12)
        tokens: Any = None if tv == 0 else (tv * 10 if tv < 10 else draw_int(1, 400) / 4)
        burst = draw_int(1, 6) if draw_int(0, 5) == 0 else 1
        for j in range(burst):
            events.append(Ev(f"e{i}_{j}", cust, DAY0 + d * DAY + draw_int(0, DAY - 1), tokens,
                             "m-large" if draw_int(0, 2) == 0 else "m-small", draw_int(0, 19) == 0,
                             draw_int(0, 24) == 0))
    return events
