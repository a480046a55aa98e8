"""What every peer contender shares: the same event contract, the same rules, one result format.

The work is the same for every contender (and matches meterflow's semantics for the benchmark's
configuration): decode the event with the project's one ``EVENT_DECODER`` (same validation), parse the
timestamp (a text timestamp without a zone is invalid), drop unknown tenants, deduplicate by event id
within ``tenant|customer``, skip excluded traffic (``exclude_when`` / ``excluded_customers``), and for
``api_call`` events add ``api_calls`` (count) and ``tokens`` (sum of the ``tokens`` property) to the
customer's calendar-month total (the benchmark's subscriptions are monthly, anchored on the 1st at
00:00 UTC), a correction (``"correction": true``) subtracting. Threshold ``t`` of a metric fires once per
customer, metric and period when ``usage * 100 >= t * included``.

This module imports only the standard library, msgspec, confluent-kafka and two stdlib-only modules of
the project (``meterflow.schemas.events``, ``meterflow.base.timeutil``), so the Quix Streams contender can use it from
its own virtual environment.

Result file (JSON), written by every contender with :func:`write_result`::

    {"contender", "events": messages consumed, "t_first": epoch s when consuming started,
     "t_end": epoch s when every output was final, "totals": {"tenant|customer|metric|period_ms": value},
     "alerts": ["tenant|customer|metric|period_ms|threshold", ...], "counters": {...},
     "state_bytes", "tracked_ids", "state_how", "notes"}
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import msgspec

from meterflow.base.timeutil import parse_rfc3339_ms
from meterflow.schemas.events import EVENT_DECODER

METRICS = ("api_calls", "tokens")
# Every contender's consumer reads with these (meterflow through kafka.client_config): librdkafka's default
# 1 MiB per partition fetch, not the CPU, caps a local consumer near 200K messages/s.
FETCH_CONFIG = {"max.partition.fetch.bytes": "16777216", "queued.min.messages": "500000"}
_MAX_NUMBER = 1e300
_DAY_MS = 86_400_000
_EPOCH_DATE = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MONTH_OF_DAY: Dict[int, int] = {}


class Rules:
    """Tenants, exclusions, thresholds and each customer's included units (from the rules JSON)."""

    def __init__(self, doc: Dict[str, Any]) -> None:
        self.tenants: Dict[str, Tuple[Tuple[Tuple[str, Any], ...], frozenset]] = {
            t: (tuple(r.get("exclude_when", {}).items()), frozenset(r.get("excluded_customers", [])))
            for t, r in doc["tenants"].items()}
        self.thresholds: List[float] = [float(t) for t in doc["thresholds"]]
        self.default_included: Dict[str, float] = {m: float(v) for m, v in doc["included"].items()}
        self.by_key: Dict[str, Dict[str, float]] = {
            k: {m: float(v) for m, v in inc.items()} for k, inc in doc.get("included_by_key", {}).items()}
        self.doc = doc

    @classmethod
    def load(cls, path: str) -> "Rules":
        return cls(json.loads(Path(path).read_text()))

    def included(self, key: str, metric: str) -> float:
        inc = self.by_key.get(key)
        if inc is not None and metric in inc:
            return inc[metric]
        return self.default_included.get(metric, 0.0)


class Usage(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One billable, valid ``api_call`` (before dedupe): what the contenders aggregate."""

    key: str  # tenant|customer
    event_id: str
    period_ms: int  # start of the calendar month (UTC) of the event time
    api: int  # +1, or -1 for a correction
    tokens: Optional[float]  # signed; None when the property is missing or not a number
    ts: int


def month_start_ms(ts: int) -> int:
    """Start of the UTC calendar month holding ``ts`` (epoch ms).

    >>> month_start_ms(1793491200000 + 5) == 1793491200000  # 2026-11-01T00:00:00Z
    True
    """
    day = ts // _DAY_MS
    m = _MONTH_OF_DAY.get(day)
    if m is None:
        d = _EPOCH_DATE + timedelta(days=day)
        m = _MONTH_OF_DAY[day] = int(datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()) * 1000
    return m


def parse_usage(raw: Optional[bytes], rules: Rules) -> Optional[Usage]:
    """The event's usage, or None for a bad event, an unknown tenant, excluded traffic or another type."""
    if not raw:
        return None
    try:
        ev = EVENT_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    ts = ev.timestamp
    if type(ts) is not int:
        try:
            ts = parse_rfc3339_ms(ts)
        except ValueError:
            return None
    rule = rules.tenants.get(ev.tenant_id)
    if rule is None:
        return None
    if ev.event_type != "api_call":
        return None
    exclude_when, excluded_customers = rule
    props = ev.properties
    if ev.customer_id in excluded_customers or (exclude_when and _matches(props, exclude_when)):
        return None
    sign = -1 if ev.correction else 1
    tok = props.get("tokens")
    tokens: Optional[float] = None
    if tok is not None and type(tok) is not bool and isinstance(tok, (int, float)) and -_MAX_NUMBER < tok < _MAX_NUMBER:
        tokens = float(tok * sign)
    return Usage(ev.tenant_id + "|" + ev.customer_id, ev.event_id, month_start_ms(ts), sign, tokens, ts)


def _matches(props: Dict[str, Any], wanted: Tuple[Tuple[str, Any], ...]) -> bool:
    for k, v in wanted:
        p = props.get(k, _matches)
        if p != v or (type(p) is bool) is not (type(v) is bool):
            return False
    return True


def total_key(key: str, metric: str, period_ms: int) -> str:
    return f"{key}|{metric}|{period_ms}"


def alert_key(key: str, metric: str, period_ms: int, threshold: float) -> str:
    return f"{key}|{metric}|{period_ms}|{threshold:g}"


def crossed(used: float, included: float, thresholds: List[float]) -> List[float]:
    """Thresholds reached at ``used`` (``used * 100 >= t * included``)."""
    if included <= 0:
        return []
    return [t for t in thresholds if used * 100 >= t * included]


class ReferenceMeter:
    """An independent in-memory model: dedupe set, monthly totals, thresholds fired once (the oracle)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.seen: Set[Tuple[str, str]] = set()
        self.totals: Dict[str, float] = {}
        self.fired: Dict[str, int] = {}  # alert key -> index of the crossing event (in feed order)
        self.n = 0

    def feed(self, raw: bytes) -> None:
        i = self.n
        self.n += 1
        u = parse_usage(raw, self.rules)
        if u is None or (u.key, u.event_id) in self.seen:
            return
        self.seen.add((u.key, u.event_id))
        for metric, delta in (("api_calls", u.api), ("tokens", u.tokens)):
            if delta is None:
                continue
            tk = total_key(u.key, metric, u.period_ms)
            used = self.totals[tk] = self.totals.get(tk, 0.0) + delta
            for t in crossed(used, self.rules.included(u.key, metric), self.rules.thresholds):
                self.fired.setdefault(alert_key(u.key, metric, u.period_ms, t), i)


def clean_totals(totals: Dict[str, float]) -> Dict[str, float]:
    """Totals with zero rows dropped (a customer with only excluded or cancelled usage may have a 0 row)."""
    return {k: float(v) for k, v in totals.items() if v}


# -- Kafka plumbing ---------------------------------------------------------------------------------------

def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT (tail mode stops on it)."""
    ev = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        ev.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return ev


class TopicReader:
    """Every partition of ``topic`` from the beginning; with ``to_end`` it stops at the end offsets found at
    start (a drained topic), otherwise it tails until ``stop`` is set."""

    def __init__(self, bootstrap: str, topic: str, *, to_end: bool, stop: Optional[threading.Event] = None,
                 batch: int = 5000, timeout: Optional[float] = None) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}-{time.time_ns()}",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                  "enable.partition.eof": False, "log_level": 2, **FETCH_CONFIG})
        md = self.consumer.list_topics(topic, timeout=15).topics[topic]
        parts = sorted(md.partitions)
        self.ends: Dict[int, int] = {}
        if to_end:
            for p in parts:
                self.ends[p] = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.to_end, self.stop = to_end, stop or threading.Event()
        # Tailing: return a batch after at most 5 ms, like meterflow's Kafka source; draining: fill batches.
        self.batch, self.timeout = batch, timeout if timeout is not None else (0.05 if to_end else 0.005)
        self.count = 0
        self.t_first: Optional[float] = None

    @property
    def total(self) -> int:
        return sum(self.ends.values())

    def batches(self) -> Iterator[List[Tuple[Optional[bytes], Optional[bytes]]]]:
        """Lists of ``(key, value)``; empty lists while idle in tail mode."""
        pos = {p: 0 for p in self.ends}
        remaining = {p for p, end in self.ends.items() if end > 0}
        consume = self.consumer.consume
        self.t_first = time.time()  # the clock starts when the consumer starts polling
        while not self.stop.is_set():
            if self.to_end and not remaining:
                return
            msgs = consume(self.batch, self.timeout)
            out = []
            for m in msgs:
                if m.error() is not None:
                    continue
                out.append((m.key(), m.value()))
                if self.to_end:
                    p = m.partition()
                    pos[p] = m.offset() + 1
                    if pos[p] >= self.ends[p]:
                        remaining.discard(p)
            self.count += len(out)
            yield out

    def close(self) -> None:
        self.consumer.close()


class AlertProducer:
    """Alerts as JSON ``{"k": alert key, "at": detected epoch ms}`` on the contender's alerts topic."""

    def __init__(self, bootstrap: str, topic: Optional[str]) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "log_level": 2}) if topic else None
        self.keys: List[str] = []

    def send(self, key: str) -> None:
        self.keys.append(key)
        if self.producer is not None:
            self.producer.produce(self.topic, json.dumps({"k": key, "at": int(time.time() * 1000)}).encode(),
                                  key=key.encode())
            self.producer.poll(0)

    def flush(self) -> None:
        if self.producer is not None:
            self.producer.flush(30)


def write_result(path: str, contender: str, *, events: int, t_first: Optional[float], t_end: float,
                 totals: Optional[Dict[str, float]] = None, alerts: Optional[List[str]] = None,
                 counters: Optional[Dict[str, Any]] = None, state_bytes: Optional[float] = None,
                 tracked_ids: Optional[int] = None, state_how: str = "", notes: str = "") -> None:
    doc = {"contender": contender, "events": events, "t_first": t_first, "t_end": t_end,
           "totals": clean_totals(totals) if totals is not None else None,
           "alerts": sorted(set(alerts)) if alerts is not None else None, "counters": counters or {},
           "state_bytes": state_bytes, "tracked_ids": tracked_ids, "state_how": state_how, "notes": notes}
    Path(path).write_text(json.dumps(doc))


def base_args(description: str):
    """The arguments every peer takes."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True, help="events topic")
    ap.add_argument("--rules", required=True, help="rules JSON written by the harness")
    ap.add_argument("--out", required=True, help="result JSON to write")
    ap.add_argument("--alerts-topic", help="topic for alerts (default: none, kept in the result only)")
    ap.add_argument("--tail", action="store_true", help="tail the topic until SIGTERM (latency runs) "
                    "instead of stopping at its end")
    ap.add_argument("--ready-file", help="touched once the consumer is assigned (latency runs)")
    return ap


def touch(path: Optional[str]) -> None:
    if path:
        Path(path).write_text(str(time.time()))
