"""The metering dataflow: ingest -> mediate -> meter (dedupe + aggregate) -> sinks.

``build_flow(config, source, sinks)`` wires any source and sinks (tests pass
``TestingSource``/``TestingSink``); :func:`flow_from_config` picks them from the
configuration. ``python -m bytewax.run "dataflows.metering:flow"`` builds the
module-level ``flow`` from ``METER_CONFIG`` (and ``METER_INPUT`` in embedded mode).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any, List, Optional, Sequence, Tuple

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from operators.changelog import ChangelogMediator
from operators.entitlements import EntitlementUpdate
from operators.errors import MeterError
from operators.mediate import Mediator
from operators.meter import CustomerMeter
from operators.rules import Rules
from schemas.config import Config, load_config
from schemas.records import Emission


class _MeterLogic(StatefulBatchLogic):
    """Bytewax glue around :class:`CustomerMeter` (the key arrives with the first event).

    Dead letters leave with the batch that raised them. Changed rollup rows leave at once when the
    key has not flushed within ``pipeline.flush_interval``, otherwise at the next notification, so a
    busy customer writes each row about once per interval instead of once per batch.
    """

    def __init__(self, rules: Rules, resume: Optional[bytes], recoverable: bool, mediator: Mediator) -> None:
        self._rules = rules
        self._recoverable = recoverable
        self._interval = timedelta(milliseconds=rules.flush_ms)
        self._next_flush = _EPOCH_DT
        self._meter: Optional[CustomerMeter] = None
        if resume is not None:
            self._meter = CustomerMeter.from_snapshot(rules, resume)
            # The process watermark is not stored by itself: the greatest watermark any resumed
            # customer had seen is exactly the watermark at the snapshot.
            mediator.observe_watermark(self._meter.wm)

    def on_batch(self, values: List[Any]) -> Tuple[List[Emission], bool]:
        meter = self._meter
        if meter is None:
            first = values[0]
            if type(first) is EntitlementUpdate:
                key = first.message.tenant_id + "|" + first.message.customer_id
            else:
                key = first[0].event.tenant_id + "|" + first[0].event.customer_id
            meter = self._meter = CustomerMeter(self._rules, key)
        now = datetime.now(timezone.utc)
        due = now >= self._next_flush
        em = meter.process(values, flush=due)
        if due:
            self._next_flush = now + self._interval
        if em.windows or em.periods or em.dead_letters or em.alerts or em.gateway or em.wallets:
            return [em], StatefulBatchLogic.RETAIN
        return [], StatefulBatchLogic.RETAIN

    def notify_at(self) -> Optional[datetime]:
        if self._meter is not None and self._meter.has_dirty():
            return self._next_flush
        return None

    def on_notify(self) -> Tuple[List[Emission], bool]:
        return self._drain()

    def on_eof(self) -> Tuple[List[Emission], bool]:
        return self._drain()

    def _drain(self) -> Tuple[List[Emission], bool]:
        if self._meter is None or not self._meter.has_dirty():
            return [], StatefulBatchLogic.RETAIN
        self._next_flush = datetime.now(timezone.utc) + self._interval
        return [self._meter.flush()], StatefulBatchLogic.RETAIN

    def snapshot(self) -> Optional[bytes]:
        # Bytewax asks for snapshots every epoch even without recovery; only pay for them when they are kept.
        if not self._recoverable:
            return None
        if self._meter is None:  # pragma: no cover - bytewax snapshots only keys that saw items
            raise MeterError("snapshot requested before any event reached this key")
        return self._meter.snapshot()


_EPOCH_DT = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _is_keyed(item: Any) -> bool:
    return type(item) is tuple


def _drop_key(kv: Tuple[str, Emission]) -> Emission:
    return kv[1]


def build_flow(config: Config, source: Source, sinks: Sequence[Tuple[str, Sink]], flow_id: str = "meterflow",
               recoverable: bool = True, entitlements: Optional[Source] = None) -> Dataflow:
    """Wire the metering dataflow. ``source`` emits ``(src, raw_bytes)``; every sink receives :class:`Emission`s.

    ``entitlements`` (optional) emits changelog records ``(src, raw_bytes)`` that are joined into the
    same keyed state as the events, so a subscription change applies to the customer's next event.
    ``recoverable=False`` (a run without a recovery directory) skips building state snapshots.
    """
    rules = Rules(config)
    mediator = Mediator(config)
    flow = Dataflow(flow_id)
    raw = op.input("ingest", flow, source)
    mediated = op.flat_map_batch("mediate", raw, mediator)
    split = op.branch("split_dead_letters", mediated, _is_keyed)
    keyed, dead = split.trues, split.falses
    if entitlements is not None:
        changes = op.flat_map_batch("mediate_entitlements", op.input("entitlements_in", flow, entitlements),
                                    ChangelogMediator(config))
        csplit = op.branch("split_bad_entitlements", changes, _is_keyed)
        keyed = op.merge("events_and_changes", keyed, csplit.trues)
        dead = op.merge("all_dead_letters", dead, csplit.falses)
    metered = op.stateful_batch("meter", keyed, lambda resume: _MeterLogic(rules, resume, recoverable, mediator))
    emissions = op.merge("emissions", op.map("drop_key", metered, _drop_key), dead)
    for name, sink in sinks:
        op.output(name, emissions, sink)
    return flow


def sinks_from_config(config: Config) -> List[Tuple[str, Sink]]:
    """ClickHouse always (embedded chDB unless [clickhouse] names a server); Kafka topics in Kafka mode;
    live gateway state when [redis] is configured; the alert sinks of [alerts]."""
    from sinks.clickhouse import ClickHouseSink

    sinks: List[Tuple[str, Sink]] = [("clickhouse", ClickHouseSink(config.clickhouse))]
    if config.kafka is not None:
        from sinks.kafka import AggregatedTopicSink, DeadLetterTopicSink

        k = config.kafka
        sinks.append(("aggregated_topic", AggregatedTopicSink(k.bootstrap_servers, k.aggregated_topic, k.client_config)))
        sinks.append(("dead_letter_topic", DeadLetterTopicSink(k.bootstrap_servers, k.dead_letter_topic, k.client_config)))
    if config.redis is not None:
        from sinks.redis import GatewayStateSink

        sinks.append(("redis_gateway", GatewayStateSink(config.redis)))
    from sinks.alerts import alert_sinks_from_config

    sinks.extend(alert_sinks_from_config(config))
    return sinks


def source_from_config(config: Config, inputs: Sequence[str] = (), stop_at_end: bool = False) -> Source:
    """Kafka events topic when [kafka] is configured and no input is given; otherwise JSONL inputs."""
    if inputs:
        from sources.jsonl import JsonlSource

        return JsonlSource(list(inputs))
    if config.kafka is not None:
        from sources.kafka import KafkaEventSource

        k = config.kafka
        return KafkaEventSource(k.bootstrap_servers, k.events_topic, k.client_config, batch_size=k.batch_size,
                                stop_at_end=stop_at_end)
    raise MeterError("no input: without a [kafka] section, pass --input FILE (or - for standard input)")


def entitlements_source_from_config(config: Config, inputs: Sequence[str] = (), event_inputs: Sequence[str] = (),
                                   stop_at_end: bool = False) -> Optional[Source]:
    """The entitlements changelog: JSONL ``inputs`` if given; else the Kafka topic when Kafka feeds the events.

    A missing changelog topic is not an error (the config file's subscriptions apply); it is logged.
    """
    if inputs:
        from sources.jsonl import JsonlSource

        return JsonlSource(list(inputs))
    if config.kafka is not None and not event_inputs:
        from sources.kafka import KafkaEventSource

        k = config.kafka
        return KafkaEventSource(k.bootstrap_servers, k.entitlements_topic, k.client_config, batch_size=k.batch_size,
                                stop_at_end=stop_at_end, config_key="kafka.entitlements_topic", missing_ok=True)
    return None


def flow_from_config(config: Config, inputs: Sequence[str] = (), stop_at_end: bool = False,
                     recoverable: bool = True, entitlements: Sequence[str] = ()) -> Dataflow:
    return build_flow(config, source_from_config(config, inputs, stop_at_end), sinks_from_config(config),
                      recoverable=recoverable,
                      entitlements=entitlements_source_from_config(config, entitlements, inputs, stop_at_end))


def __getattr__(name: str) -> Any:
    # `python -m bytewax.run "dataflows.metering:flow"` reads the module attribute `flow`.
    if name != "flow":
        raise AttributeError(name)
    path = os.environ.get("METER_CONFIG")
    if not path:
        raise MeterError("set METER_CONFIG to the configuration file to run dataflows.metering:flow")
    inputs = [p for p in os.environ.get("METER_INPUT", "").split(",") if p]
    changes = [p for p in os.environ.get("METER_ENTITLEMENTS_INPUT", "").split(",") if p]
    return flow_from_config(load_config(path), inputs, stop_at_end=os.environ.get("METER_STOP_AT_END") == "1",
                            entitlements=changes)
