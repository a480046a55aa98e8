"""Prometheus metrics of the metering flow (``meter run --metrics-port N``; README: HTTP service, Metrics).

Nothing here runs unless :func:`enable` was called (the CLI does it for ``--metrics-port``): then
``sinks_from_config`` passes the flow's sinks through :func:`instrument`, which times every sink's batch
writes and counts its errors, and adds one sink that counts dead letters by reason, alerts by type and the
ingest-to-detection latency of alerts; ``build_flow`` runs the meter step's logic through :func:`timed_logic`
(the time of each shard's batches and snapshots). Event counters are read from :data:`meterflow.base.stats.STATS` at
scrape time (the run's own counters: the numbers of ``meter run``'s summary). Everything is in
:data:`REGISTRY`, served by :func:`start_metrics_server`.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Type, TypeVar

from bytewax.outputs import DynamicSink, Sink, StatelessSinkPartition
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meterflow.base.stats import STATS, FlowStats
from meterflow.base.timeutil import parse_rfc3339_ms
from meterflow.schemas.records import Emission

REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

DEAD_LETTERS = Counter("meterflow_dead_letters", "Dead-letter records by reason", ["reason"], registry=REGISTRY)
ALERTS = Counter("meterflow_alerts", "Alerts fired by type", ["type"], registry=REGISTRY)
DETECTION = Histogram("meterflow_ingest_to_detection_seconds", "From reading an event to the alert it fired "
                      "(detected_at - ingested_at)", registry=REGISTRY, buckets=_LATENCY_BUCKETS)
BATCH = Histogram("meterflow_sink_batch_seconds", "Time a sink took to write one batch of the flow's outputs",
                  ["sink"], registry=REGISTRY, buckets=_LATENCY_BUCKETS)
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
METER_BATCH = Histogram("meterflow_batch_seconds", "Time the meter step took to process one batch of one shard "
                        "(its on_batch: dedupe, aggregation, entitlements)", registry=REGISTRY, buckets=_STEP_BUCKETS)
SNAPSHOT = Histogram("meterflow_snapshot_seconds", "Time the meter step took to build one shard's recovery snapshot "
                     "(runs with a recovery directory only)", registry=REGISTRY, buckets=_STEP_BUCKETS)
SINK_ERRORS = Counter("meterflow_sink_errors", "Batches a sink failed to write (the flow stops or retries)",
                      ["sink"], registry=REGISTRY)

_state = {"enabled": False}
_WEBHOOKS: List[Any] = []

# STATS counter -> (metric, outcome label) for meterflow_events_total.
_OUTCOMES = (("accepted", "accepted"), ("duplicates", "duplicate"), ("excluded", "excluded"),
             ("dead_lettered", "dead_lettered"))


class _FlowCollector(Collector):
    def __init__(self, stats: FlowStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Any]:
        c = self._stats.snapshot()
        yield CounterMetricFamily("meterflow_events_read", "Events read by the flow", value=c["read"])
        events = CounterMetricFamily("meterflow_events", "Events read, by what became of them (read = the sum)",
                                     labels=["outcome"])
        for key, outcome in _OUTCOMES:
            events.add_metric([outcome], c.get(key, 0))
        yield events
        yield CounterMetricFamily("meterflow_missing_property", "Per-metric missing_property dead letters "
                                  "(the event still counts for its other metrics)", value=c.get("missing_property", 0))
        yield CounterMetricFamily("meterflow_redis_errors", "Failed Redis writes of the gateway state",
                                  value=c.get("redis_errors", 0))
        yield GaugeMetricFamily("meterflow_redis_down", "1 while the gateway state cannot be written to Redis",
                                value=1 if c.get("redis_down", 0) > 0 else 0)
        yield GaugeMetricFamily("meterflow_redis_pending_states", "Gateway states waiting for Redis",
                                value=c.get("redis_pending", 0))
        from meterflow.sources.kafka import consumer_lags

        lag = GaugeMetricFamily("meterflow_consumer_lag", "Messages of an input partition not read yet",
                                labels=["topic", "partition"])
        for topic, part, n in consumer_lags():
            lag.add_metric([topic, str(part)], n)
        yield lag
        depth = GaugeMetricFamily("meterflow_webhook_outbox_depth", "Alerts waiting in the webhook outbox")
        depth.add_metric([], sum(w.stats().pending for w in _WEBHOOKS))
        yield depth


REGISTRY.register(_FlowCollector(STATS))


def enable() -> None:
    _state["enabled"] = True


def enabled() -> bool:
    return _state["enabled"]


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve :data:`REGISTRY` on ``http://addr:port/metrics`` from a daemon thread, and instrument the flow."""
    from meterflow.base.errors import MeterError

    try:
        start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise MeterError(f"--metrics-port {port}: cannot listen on {addr}:{port} ({exc.strerror or exc}): choose a "
                         "free port") from exc
    enable()


L = TypeVar("L")
_TIMED: Dict[type, type] = {}


def timed_logic(cls: Type[L]) -> Type[L]:
    """``cls`` (a Bytewax ``StatefulBatchLogic``) itself unless :func:`enable`d, so a run without
    ``--metrics-port`` pays nothing; else a subclass that observes each ``on_batch`` in ``meterflow_batch_seconds``
    and each snapshot built (not ``None``) in ``meterflow_snapshot_seconds``."""
    if not enabled():
        return cls
    timed = _TIMED.get(cls)
    if timed is None:
        base: Any = cls

        class Timed(base):
            def on_batch(self, values: List[Any]) -> Any:
                t0 = time.perf_counter()
                try:
                    return super().on_batch(values)
                finally:
                    METER_BATCH.observe(time.perf_counter() - t0)

            def snapshot(self) -> Any:
                t0 = time.perf_counter()
                state = super().snapshot()
                if state is not None:
                    SNAPSHOT.observe(time.perf_counter() - t0)
                return state

        Timed.__name__ = Timed.__qualname__ = "Timed" + cls.__name__
        timed = _TIMED[cls] = Timed
    return timed


class _CountingPartition(StatelessSinkPartition[Emission]):
    def write_batch(self, items: List[Emission]) -> None:
        for e in items:
            for d in e.dead_letters:
                DEAD_LETTERS.labels(d.reason).inc()
            for a in e.alerts:
                ALERTS.labels(a.type).inc()
                if a.ingested_at and a.detected_at:
                    try:
                        DETECTION.observe(max(0.0, (parse_rfc3339_ms(a.detected_at) -
                                                    parse_rfc3339_ms(a.ingested_at)) / 1000))
                    except ValueError:
                        pass


class CountingSink(DynamicSink[Emission]):
    """Counts the flow's dead letters by reason and alerts by type (writes nothing)."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPartition:
        return _CountingPartition()


class _TimedPartition(StatelessSinkPartition[Emission]):
    def __init__(self, inner: StatelessSinkPartition, name: str) -> None:
        self._inner = inner
        self._hist = BATCH.labels(name)
        self._errors = SINK_ERRORS.labels(name)

    def write_batch(self, items: List[Emission]) -> None:
        t0 = time.perf_counter()
        try:
            self._inner.write_batch(items)
        except BaseException:
            self._errors.inc()
            raise
        finally:
            self._hist.observe(time.perf_counter() - t0)

    def close(self) -> None:
        self._inner.close()


class TimedSink(DynamicSink[Emission]):
    def __init__(self, inner: DynamicSink, name: str) -> None:
        self.inner = inner
        self._name = name

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TimedPartition:
        return _TimedPartition(self.inner.build(step_id, worker_index, worker_count), self._name)


def instrument(sinks: Sequence[Tuple[str, Sink]]) -> List[Tuple[str, Sink]]:
    """The sinks, each timed (dynamic sinks only), plus the counting sink; unchanged unless :func:`enable`d."""
    if not enabled():
        return list(sinks)
    from meterflow.sinks.webhook import WebhookSink

    out: List[Tuple[str, Sink]] = []
    for name, sink in sinks:
        if isinstance(sink, WebhookSink):
            _WEBHOOKS.append(sink)
        out.append((name, TimedSink(sink, name) if isinstance(sink, DynamicSink) else sink))
    out.append(("metrics", CountingSink()))
    return out

