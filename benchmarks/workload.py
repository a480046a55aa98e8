"""The benchmark's workloads and the rules every contender applies.

* Throughput: :func:`build_workload` draws events from :func:`meterflow.sample.generate_events` (tenants x
  customers, Zipf-skewed customers, 2 % duplicates, 1 % late by an hour, bad events, corrections, test
  traffic) over two hours of November 2026, keyed ``tenant|customer`` like producers key them, and
  computes the expected totals and threshold crossings with an independent in-memory model
  (:class:`benchmarks.peers.common.ReferenceMeter`).
* Latency: :class:`LatencyPlan` produces ``api_call`` events at a fixed rate with wall-clock timestamps,
  round robin over customers whose quotas are spread so that crossings happen all through the run, and
  knows which produced event crosses each threshold (so every contender is timed from the same
  breach, whatever it reports).
* :func:`rules_doc` is the rules JSON the peers read; :func:`meterflow_toml` is the same rules as a
  meterflow configuration (a plan ``pro`` plus custom-contract overrides per customer).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import msgspec

from benchmarks.peers.common import ReferenceMeter, Rules, alert_key, clean_totals
from meterflow.sample import customer_ids, generate_events, tenant_ids

START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
SPAN_MS = 2 * 3_600_000
THRESHOLDS = [75, 90, 100]
TOKENS_PER_CALL_INCLUDED = 400  # the sample plan: tokens included = 400 x api_calls included


class _Key(msgspec.Struct):
    tenant_id: str = ""
    customer_id: str = ""


_KEY_DECODER = msgspec.json.Decoder(_Key)


def event_key(raw: bytes) -> bytes:
    """The producer's message key ``tenant|customer`` (``bad`` when the bytes are not such JSON)."""
    try:
        k = _KEY_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return b"bad"
    return f"{k.tenant_id}|{k.customer_id}".encode() if k.tenant_id else b"bad"


def rules_doc(tenants: Sequence[str], included_api: float, included_by_key: Optional[Dict[str, Dict[str, float]]]
              = None, thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, Any]:
    return {"tenants": {t: {"exclude_when": {"environment": "test"}, "excluded_customers": ["cust_internal"]}
                        for t in tenants},
            "thresholds": list(thresholds),
            "included": {"api_calls": included_api, "tokens": included_api * TOKENS_PER_CALL_INCLUDED},
            "included_by_key": included_by_key or {}}


@dataclass
class Workload:
    items: List[Tuple[bytes, bytes]]  # (key, value) in production order
    rules: Dict[str, Any]
    subscribed: List[str]  # tenant|customer keys with a subscription (all of them)
    expected_totals: Dict[str, float]
    expected_alerts: List[str]
    counts: Dict[str, int] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(len(v) for _, v in self.items)


def build_workload(events: int, customers: int, tenants: int, seed: int = 7, included_api: float = 2000) -> Workload:
    lines = list(generate_events(events, tenants=tenants, customers=customers, start_ms=START_MS, span_ms=SPAN_MS,
                                 seed=seed))
    tids = tenant_ids(tenants)
    cids = customer_ids(customers)
    rules = rules_doc(tids, included_api)
    ref = ReferenceMeter(Rules(rules))
    items = []
    for line in lines:
        items.append((event_key(line), line))
        ref.feed(line)
    counted = len(ref.seen)
    return Workload(items=items, rules=rules, subscribed=[f"{t}|{c}" for t in tids for c in cids],
                    expected_totals=clean_totals(ref.totals), expected_alerts=sorted(ref.fired),
                    counts={"events": len(items), "billable_unique_api_calls": counted,
                            "customers_with_usage": len({k.rsplit("|", 2)[0] for k in ref.totals})})


def load_topic(bootstrap: str, topic: str, items: Iterable[Tuple[bytes, bytes]]) -> int:
    """Produce every item (idempotent producer, acknowledged) and return how many."""
    from confluent_kafka import Producer

    errors: List[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                  "batch.num.messages": 10000, "compression.type": "none", "log_level": 2})
    n = 0
    for key, value in items:
        while True:
            try:
                p.produce(topic, value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 10000 == 0:
            p.poll(0)
    if p.flush(120) != 0 or errors:
        raise RuntimeError(f"loading {topic}: {len(errors)} delivery errors, e.g. {errors[:1]}")
    return n


# -- latency -----------------------------------------------------------------------------------------------

LAT_TENANT = "acme"
LAT_TOKENS = 100  # tokens per latency event
WARM_KEY = f"{LAT_TENANT}|warm"


@dataclass
class LatencyPlan:
    """``rate`` events/s for ``seconds`` over ``customers`` customers (round robin), quotas spread."""

    rate: int
    seconds: float
    customers: int = 200

    def __post_init__(self) -> None:
        per = self.rate * self.seconds / self.customers
        self.n_events = int(self.rate * self.seconds)
        self.included = [max(4, int(per * (0.1 + 0.8 * i / max(1, self.customers - 1)))) for i in
                         range(self.customers)]

    def key(self, c: int) -> str:
        return f"{LAT_TENANT}|c{c}"

    def rules(self) -> Dict[str, Any]:
        by_key = {self.key(c): {"api_calls": inc, "tokens": self.tokens_included(inc)}
                  for c, inc in enumerate(self.included)}
        by_key[WARM_KEY] = {"api_calls": 1, "tokens": 1}
        return rules_doc([LAT_TENANT], 1_000_000, by_key)

    @staticmethod
    def tokens_included(inc: int) -> int:
        return inc * LAT_TOKENS * 11 // 10  # tokens cross a little after calls

    def subscribed(self) -> List[str]:
        return [self.key(c) for c in range(self.customers)] + [WARM_KEY]

    def event(self, i: int, now_ms: int) -> Tuple[bytes, bytes]:
        c = i % self.customers
        return (self.key(c).encode(),
                json.dumps({"event_id": f"l{i}", "tenant_id": LAT_TENANT, "customer_id": f"c{c}",
                            "event_type": "api_call", "timestamp": now_ms,
                            "properties": {"tokens": LAT_TOKENS}}, separators=(",", ":")).encode())

    @staticmethod
    def warm_event(n: int) -> Tuple[bytes, bytes]:
        return (WARM_KEY.encode(), json.dumps({"event_id": f"w{n}", "tenant_id": LAT_TENANT, "customer_id": "warm",
                                               "event_type": "api_call", "timestamp": int(time.time() * 1000),
                                               "properties": {"tokens": LAT_TOKENS}}).encode())

    def crossings(self, sent: int, period_ms: int) -> Dict[str, int]:
        """Alert key -> index of the produced event that crosses it, for the first ``sent`` events."""
        out: Dict[str, int] = {}
        n = self.customers
        for c, inc in enumerate(self.included):
            have = len(range(c, sent, n))  # events customer c received
            metrics = (("api_calls", inc, 1), ("tokens", self.tokens_included(inc), LAT_TOKENS))
            for metric, included, per_event in metrics:
                for t in THRESHOLDS:
                    k = -(-t * included // (100 * per_event))  # smallest k with k * per_event * 100 >= t * included
                    if k <= have:
                        out[alert_key(self.key(c), metric, period_ms, t)] = c + (k - 1) * n
        return out
