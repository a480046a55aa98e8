"""A realistic, reproducible usage workload for the demo, benchmarks and tests.

Skewed like real usage (a few heavy customers, a long tail: Zipf-like weights),
with retried duplicates, late arrivals, corrections, test traffic and a few bad
events. The same seed gives the same bytes.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Optional, Sequence

import orjson

from meterflow.base.timeutil import ms_to_iso

REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
MODELS = ["m-small", "m-large"]
ENDPOINTS = ["/v2/completions", "/v2/embeddings", "/v2/search"]


def tenant_ids(n: int) -> List[str]:
    return [f"tenant{t:02d}" for t in range(n)]


def customer_ids(n: int) -> List[str]:
    return [f"cust_{c:05d}" for c in range(n)]


# Price cards of the 'pro' plan for ``sample_config_toml(prices=...)``, one per metric and model (README: Rating).
PRICE_CARDS = {
    "api_calls": 'price = { model = "tiered", tiers = [{ up_to = 500, unit_amount = 0.004 }, '
                 '{ up_to = 2000, unit_amount = 0.003 }, { unit_amount = 0.002 }] }',
    "tokens": 'price = { model = "volume", tiers = [{ up_to = 200000, unit_amount = 0.00001 }, '
              '{ up_to = 1000000, unit_amount = 0.000008 }, { unit_amount = 0.000006 }] }',
    "active_users": 'price = { model = "package", package_size = 10, package_amount = 5.0 }',
    "latency_p95": 'price = { model = "staircase", tiers = [{ up_to = 300, flat_amount = 0.0 }, '
                   '{ up_to = 600, flat_amount = 20.0 }, { flat_amount = 50.0 }] }',
    "seats": 'price = { model = "per_unit", unit_amount = 2.0, minimum = 50.0 }',
}


def sample_config_toml(tenants: List[str], subscribed: Dict[str, List[str]], anchor_iso: str,
                       included: int = 2000, extra: str = "", prices: Optional[str] = None,
                       spend_thresholds: Sequence[float] = (100.0, 1000.0)) -> str:
    """A configuration for the generated workload: api_calls (count), tokens (sum, by region),
    active_users (unique_count), latency p95, seats (latest); a 'pro' plan with thresholds.

    ``prices="every"`` gives the plan a price card on every metric (``PRICE_CARDS``: tiered, volume, package,
    staircase, per_unit with a minimum), ``"spend"`` also ``spend_thresholds`` on each; None (the default) is
    the configuration of earlier builds, byte for byte (overage_rate on api_calls and tokens)."""
    if prices not in (None, "every", "spend"):
        raise ValueError(f"prices must be None, 'every' or 'spend', got {prices!r}")
    out = ['[pipeline]\nrollup_window = "1h"\nlate_grace = "6h"\ndedupe_window = "24h"\n']
    for t in tenants:
        out.append(f'[[tenants]]\nid = "{t}"\nexclude_when = {{ environment = "test" }}\n'
                   f'excluded_customers = ["cust_internal"]\n')
    out.append('''[[metrics]]
code = "api_calls"
event_type = "api_call"
aggregation = "count"

[[metrics]]
code = "tokens"
event_type = "api_call"
aggregation = "sum"
property = "tokens"
group_by = ["region"]

[[metrics]]
code = "active_users"
event_type = "api_call"
aggregation = "unique_count"
property = "user_id"

[[metrics]]
code = "latency_p95"
event_type = "api_call"
aggregation = "p95"
property = "latency_ms"

[[metrics]]
code = "seats"
event_type = "seat_count"
aggregation = "latest"
property = "seats"

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
included = %d
thresholds = [75, 90, 100]
enforcement = "soft"
overage_rate = 0.002
[plans.entitlements.tokens]
included = %d
thresholds = [80, 100]
enforcement = "soft"
overage_rate = 0.00001
''' % (included, included * 400))
    if prices is not None:
        cards = []
        for code, card in PRICE_CARDS.items():
            head = "" if code in ("api_calls", "tokens") else f"[plans.entitlements.{code}]\n"
            amounts = ", ".join(repr(float(a)) for a in spend_thresholds)
            spend = f"spend_thresholds = [{amounts}]\n" if prices == "spend" else ""
            cards.append((code, head + card + "\n" + spend))
        # api_calls and tokens keep their included and thresholds: their cards go into their tables
        text = out.pop()
        for code, body in cards[:2]:
            marker = f"[plans.entitlements.{code}]\n"
            i = text.index(marker) + len(marker)
            text = text[:i] + body + text[i:]
        out.append(text + "".join(body for _, body in cards[2:]))
    for t, custs in subscribed.items():
        for c in custs:
            out.append(f'[[subscriptions]]\ntenant_id = "{t}"\ncustomer_id = "{c}"\nplan = "pro"\n'
                       f'period = "month"\nanchor = "{anchor_iso}"\naccount_name = "{t.title()} / {c}"\n'
                       f'arr = 120000.0\n')
    out.append(extra)
    return "\n".join(out)


def generate_events(n: int, *, tenants: int = 3, customers: int = 50, start_ms: int, span_ms: int,
                    seed: int = 7, dup_rate: float = 0.02, late_rate: float = 0.01, bad_rate: float = 0.002,
                    correction_rate: float = 0.002, test_rate: float = 0.01,
                    late_by_ms: Optional[int] = None) -> Iterator[bytes]:
    """Yield ``n`` JSONL lines (bytes, no newline) in roughly increasing event time."""
    rng = random.Random(seed)
    tids = tenant_ids(tenants)
    cids = customer_ids(customers)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(customers)]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    recent: List[bytes] = []
    late_by = late_by_ms if late_by_ms is not None else 3_600_000
    for i in range(n):
        r = rng.random()
        if recent and r < dup_rate:
            yield recent[rng.randrange(len(recent))]
            continue
        if r < dup_rate + bad_rate:
            yield rng.choice([b"{not json", b'{"event_id": 5}', b"\xff\xfe\x00binary",
                              b'{"event_id":"bad%d","tenant_id":"%s","customer_id":"c","event_type":"api_call",'
                              b'"timestamp":"2026-01-01T00:00:00"}' % (i, tids[0].encode()),
                              b'{"event_id":"u%d","tenant_id":"ghost","customer_id":"c","event_type":"api_call",'
                              b'"timestamp":1}' % i])
            continue
        ts = start_ms + (span_ms * i) // max(1, n)
        if rng.random() < late_rate:
            ts = max(start_ms, ts - late_by)
        tenant = tids[rng.randrange(tenants)]
        cust = cids[_pick(cum, rng.random() * acc)]
        if rng.random() < 0.05:
            ev: Dict[str, Any] = {"event_id": f"evt_{seed}_{i}", "tenant_id": tenant, "customer_id": cust,
                  "event_type": "seat_count", "timestamp": ms_to_iso(ts),
                  "properties": {"seats": rng.randrange(1, 200)}}
        else:
            props: Dict[str, Any] = {"endpoint": rng.choice(ENDPOINTS), "model": rng.choice(MODELS),
                                     "region": rng.choice(REGIONS),
                     "tokens": rng.randrange(10, 4000), "user_id": f"u{rng.randrange(40)}",
                     "latency_ms": rng.randrange(20, 900)}
            if rng.random() < test_rate:
                props["environment"] = "test"
            ev = {"event_id": f"evt_{seed}_{i}", "tenant_id": tenant, "customer_id": cust,
                  "event_type": "api_call", "timestamp": ms_to_iso(ts) if i % 3 else ts, "properties": props}
            if rng.random() < correction_rate:
                ev["correction"] = True
                ev["corrects"] = f"evt_{seed}_{max(0, i - 1)}"
        line = orjson.dumps(ev)
        recent.append(line)
        if len(recent) > 1000:
            recent.pop(0)
        yield line


DAY_MS = 86_400_000


def generate_spike(tenant: str, customer: str, spike_day_ms: int, *, history_days: int = 10, per_day: int = 20,
                   spike: int = 200, spike_span_ms: int = 2 * 3_600_000, seed: int = 7) -> Iterator[bytes]:
    """A customer whose usage spikes: ``per_day`` api calls (give or take a few) on each of the ``history_days``
    UTC days before the day starting at ``spike_day_ms``, then ``spike`` calls early on that day (about
    ``spike / per_day`` times its daily average: an anomaly under ``[anomaly] factor = 3``) spread over its first
    ``spike_span_ms``, in time order. ``spike_day_ms`` is a UTC day start."""
    rng = random.Random(seed)
    n = 0
    for d in range(history_days, -1, -1):
        day = spike_day_ms - d * DAY_MS
        count = spike if d == 0 else per_day + rng.randrange(-3, 4)
        span = spike_span_ms if d == 0 else DAY_MS
        for k in range(count):
            n += 1
            yield orjson.dumps({"event_id": f"spike_{seed}_{n}", "tenant_id": tenant, "customer_id": customer,
                                "event_type": "api_call", "timestamp": ms_to_iso(day + span * k // count),
                                "properties": {"endpoint": "/v2/completions", "model": "m-large",
                                               "region": REGIONS[k % 3], "tokens": 1000, "user_id": "u1",
                                               "latency_ms": 100}})


def _pick(cum: List[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
