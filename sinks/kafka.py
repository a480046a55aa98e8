"""Kafka outputs for downstream systems: the aggregated, dead-letter and alerts topics.

Delivery guarantee: at-least-once (idempotent producer, ``acks=all``). With a
recovery directory every ``write_batch`` returns only after every message of the
batch is acknowledged, so nothing a snapshot covers can be lost; a resumed flow
may send a row again. Without one (``defer_acks``: the aggregated, rated, review
and dead-letter topics) ``write_batch`` queues the rows and returns: the flow's thread folds
the next events while the broker acknowledges. A failed delivery is raised by
the next ``write_batch`` (or ``close``) with the same error, and ``close`` waits
for every acknowledgement, so a flow that ends without an error had every row
acknowledged; one that fails may have left rows of its last batches undelivered,
which a rerun (it reads the topics from the start) sends again. The alerts topic
does the same without recovery (its producer sends each alert at once, with no
linger, and the flow's thread does not wait for the broker's answer before the
next events: a rerun re-detects an undelivered alert, with the same ``alert_id``).
A rerun re-derives an undelivered review item or dead letter the same way (same
``review_id`` and ``version``, same ``dl_id``).
Consumers get exactly-once *values* by upserting: the aggregated topic is keyed
``tenant|customer|metric`` and each record carries its identity
(kind, start, dimensions) and a ``version`` that only grows — keep the highest.
Dead letters are keyed by their deterministic ``dl_id``, alerts by their
deterministic ``alert_id`` (a consumer keeps the first record of each id).

:func:`publish_entitlements` is the producer side of the entitlements changelog
(``meter entitlements publish``).
"""

from __future__ import annotations

from collections import deque
from itertools import repeat, starmap
from operator import attrgetter, length_hint
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from meterflow.base.errors import MeterError
from meterflow.schemas.alerts import ALERT_ENCODER
from meterflow.schemas.records import AGGREGATE_ENCODER, RATED_ENCODER, Emission
from meterflow.schemas.reviews import REVIEW_ENCODER
from meterflow.sources.kafka_watch import BrokerWatch, watch_for

#: ``kafka.outage_timeout`` default, seconds: how long a delivery may wait for an unreachable broker.
OUTAGE_TIMEOUT = 60.0

#: librdkafka's default ``queue.buffering.max.messages``: how many messages the producer holds unacknowledged.
QUEUE_MESSAGES = 100_000

#: The parts of the row topics' key ``tenant|customer|metric``, as a tuple per row ("|".join makes the key).
_ROW_KEY = attrgetter("tenant_id", "customer_id", "metric")


def producer_config(bootstrap: str, client_config: Optional[Dict[str, str]] = None,
                    outage_timeout: float = OUTAGE_TIMEOUT) -> Dict[str, Any]:
    """An idempotent ``acks=all`` producer whose messages fail (``message.timeout.ms``) once they have waited
    ``outage_timeout`` seconds for the broker; ``client_config`` may override any of it."""
    return {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
            "compression.type": "lz4", "message.timeout.ms": max(1, int(outage_timeout * 1000)),
            **(client_config or {})}


class _ProducerPartition(StatelessSinkPartition[Emission]):
    """One producer per worker. Deliveries are checked without a Python call per message: librdkafka reports
    only failed deliveries (``delivery.report.only.error``) to one producer-wide callback, and ``flush``
    says how many messages are still unacknowledged, so a batch is confirmed when ``flush`` returns 0 and no
    failure was reported.

    While the broker is unreachable ``flush`` waits: librdkafka retries, and each message fails after
    ``message.timeout.ms`` (``kafka.outage_timeout``); the batch then fails and the flow stops, so nothing
    unacknowledged is ever covered by a snapshot.

    ``defer_acks`` (every topic of a flow without recovery): a batch is queued and not flushed; the next
    batch first serves the delivery reports due (``poll(0)``) and, if one failed, flushes and raises as a
    synchronous batch would; ``close`` flushes and raises the same way. The local queue stays bounded by
    the room check of :meth:`_send_rows` (with the broker down it fills, and the messages' timeouts end
    the wait). While the cluster is down, fewer unacknowledged messages than after the last batch (which
    librdkafka's own requests can also cause) lead to a metadata probe (:meth:`BrokerWatch.probe`), whose
    answer ends the outage. A synchronous flush that ends with every message acknowledged ends an outage
    known before the batch's first message was produced (:meth:`BrokerWatch.ok`), not one reported later."""

    def __init__(self, config: Dict[str, Any], topic: str, watch: BrokerWatch, defer_acks: bool = False) -> None:
        self._failed: List[str] = []
        self._watch = watch
        self._defer = defer_acks  # row topics without --recovery: a batch's acks are checked at the next batch
        self._queued = 0  # deferred: len(producer) when the last batch was queued (fewer now: some were acked)
        self._broken = False  # a batch failed: close() does not wait for what is left
        self._producer = Producer({**config, **watch.client_config(), "delivery.report.only.error": True,
                                   "on_delivery": self._on_delivery})
        self._topic = topic
        self._wait = float(config["message.timeout.ms"]) / 1000 + 10  # flush backstop past the message timeout
        self._room = max(1, int(config.get("queue.buffering.max.messages", QUEUE_MESSAGES)))

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(err.str())

    def _produce(self, key: bytes, value: bytes, headers: Optional[list] = None) -> None:
        while True:
            try:
                self._producer.produce(self._topic, value, key, headers=headers)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.05)

    def _send_rows(self, rows: List[Any], encode: Any) -> None:
        """Produce ``rows`` keyed ``tenant|customer|metric``, in order, with no Python-level call per row: the
        keys are joined and the values encoded in C (``encode_lines``: msgspec escapes every newline inside
        JSON, so splitting its output at newlines gives each row's own encoding), and ``starmap`` calls
        ``produce`` for each. Before each chunk the producer is made to have room for all of it (its queue
        holds ``queue.buffering.max.messages``; ``len(producer)`` counts what is unacknowledged), so the queue
        cannot fill mid-chunk. If it still does (``queue.buffering.max.kbytes``), the messages before the one
        refused are queued and the rest are produced again from it: the order on the topic is the order of
        ``rows``. Then :meth:`_flush` confirms the whole batch (with ``defer_acks``, the next batch or
        ``close`` does)."""
        keys = list(map("|".join, map(_ROW_KEY, rows)))
        values = encode(rows).split(b"\n")
        values.pop()  # the empty piece after the last newline
        if len(values) != len(keys):  # a newline inside a row's JSON would pair keys with the wrong values
            raise MeterError(f"Kafka topic {self._topic!r}: {len(rows)} rows encoded as {len(values)} lines")
        producer = self._producer
        if self._defer:
            self._check_earlier()
        produced_at = self._watch.now()
        produce = producer.produce
        topic = self._topic
        n, done = len(keys), 0
        chunk = max(1, self._room // 4)  # big batches go in chunks, each queued while the one before drains
        while done < n and not self._failed:  # a failure already reported fails the batch: stop queuing
            take = min(n - done, chunk)
            while len(producer) + take > self._room and not self._failed:
                producer.poll(0.05)  # deliveries (or, with the broker down, message timeouts) make room
            if self._failed:
                break
            ks, vs = (keys, values) if take == n else (keys[done:done + take], values[done:done + take])
            left = iter(ks)  # zip takes each key last: what it has left is what produce has not been given
            try:
                deque(starmap(produce, zip(repeat(topic, take), vs, left)), 0)
                done += take
            except BufferError:  # queue full by bytes: the refused message and the ones after it go again
                done += take - length_hint(left) - 1
                producer.poll(0.05)
        self._end_batch(produced_at)

    def _end_batch(self, produced_at: float) -> None:
        """A batch is queued: confirm it now (:meth:`_flush`), or with ``defer_acks`` leave it to the next batch
        or ``close`` unless a failure is already known."""
        if not self._defer or self._failed:
            self._flush(produced_at)
            return
        self._producer.poll(0)  # serve the delivery reports (and error_cb) due now, without waiting
        self._queued = len(self._producer)
        self._broken = False  # (queued after an earlier failure: close confirms these too)

    def _send_each(self, messages: Iterable[Tuple[bytes, bytes, list]]) -> None:
        """Produce ``(key, value, headers)`` messages one call each (a batch of dead letters, reviews or alerts),
        then end the batch (:meth:`_end_batch`); with ``defer_acks`` earlier batches are checked first, also when
        this one has nothing."""
        if self._defer:
            self._check_earlier()
        produced_at = self._watch.now()
        wrote = False
        for key, value, headers in messages:
            self._produce(key, value, headers)
            wrote = True
        if wrote:
            self._end_batch(produced_at)

    def _check_earlier(self) -> None:
        """Deferred acks: fail now (the way :meth:`_flush` does) if an earlier batch's delivery failed, and
        clear a broker outage once messages were acknowledged since the last batch."""
        producer = self._producer
        producer.poll(0)
        if self._failed:
            self._flush()  # waits for the rest (as a synchronous batch would), then raises
        if len(producer) < self._queued:  # maybe acknowledgements (or librdkafka's own requests): probe, if down
            self._watch.probe(producer, self._topic)
        self._queued = len(producer)

    def _flush(self, produced_at: Optional[float] = None) -> None:
        """Wait for every queued message's acknowledgement; raise if one failed. ``produced_at``
        (:meth:`BrokerWatch.now` before the batch's first message was produced): the acknowledgements are an
        answer of the broker since then, which ends an outage known by then (not one reported later, during
        the flush: those messages may have been acknowledged before the broker went away)."""
        remaining = self._producer.flush(self._wait)
        if remaining or self._failed:
            self._broken = True
            why = self._failed[0] if self._failed else f"{remaining} messages unacknowledged after {self._wait:g} s"
            n = len(self._failed)
            self._failed.clear()
            what = f"{remaining + n} messages to topic {self._topic!r} not delivered ({why})"
            if self._watch.down or "timed out" in why.lower():
                raise self._watch.outage_error(what)
            raise MeterError(f"Kafka topic {self._topic!r}: delivery failed ({why}, brokers "
                             f"{self._watch.bootstrap}); the flow stops so that a rerun of the same command with "
                             "--recovery re-sends from the last snapshot (check the broker)")
        if produced_at is not None:
            self._watch.ok(produced_at)

    def close(self) -> None:
        if self._defer and not self._broken:
            self._flush()  # the flow's end: every row acknowledged, or the flow fails with the delivery error
            return
        # After a failed batch the broker is gone: what is left was never acknowledged, and the rerun re-sends it.
        self._producer.flush(0 if self._watch.down else 30)


class _AggregatedPartition(_ProducerPartition):
    def write_batch(self, items: List[Emission]) -> None:
        rows = [rec for e in items for recs in (e.windows, e.periods) for rec in recs]
        if rows:
            self._send_rows(rows, AGGREGATE_ENCODER.encode_lines)
        elif self._defer:
            self._check_earlier()


class _RatedPartition(_ProducerPartition):
    def write_batch(self, items: List[Emission]) -> None:
        rows = [rec for e in items for rec in e.rated]
        if rows:
            self._send_rows(rows, RATED_ENCODER.encode_lines)
        elif self._defer:
            self._check_earlier()


class _ReviewPartition(_ProducerPartition):
    def write_batch(self, items: List[Emission]) -> None:
        encode = REVIEW_ENCODER.encode
        self._send_each((rec.review_id.encode(), encode(rec), [("route", rec.route.encode())])
                        for e in items for rec in e.reviews)


class _DeadLetterPartition(_ProducerPartition):
    def write_batch(self, items: List[Emission]) -> None:
        self._send_each((d.dl_id.encode(), d.payload,
                         [("reason", d.reason.encode()), ("detail", d.detail.encode()), ("source", d.source.encode()),
                          ("tenant_id", d.tenant_id.encode()), ("metric", d.metric.encode()),
                          ("received_at", str(d.received_at).encode())])
                        for e in items for d in e.dead_letters)


class _AlertPartition(_ProducerPartition):
    def write_batch(self, items: List[Emission]) -> None:
        encode = ALERT_ENCODER.encode
        self._send_each((a.alert_id.encode(), encode(a), [("type", a.type.encode()),
                                                          ("tenant_id", a.tenant_id.encode())])
                        for e in items for a in e.alerts)


class _TopicSink(DynamicSink[Emission]):
    """One producer partition (``_partition``) per worker on ``topic``; ``_defaults``: client settings of this kind
    of topic that a ``client_config`` entry still overrides."""

    _partition: Type[_ProducerPartition]
    _defaults: Dict[str, str] = {}

    def __init__(self, bootstrap: str, topic: str, client_config: Optional[Dict[str, str]] = None,
                 outage_timeout: float = OUTAGE_TIMEOUT, defer_acks: bool = False) -> None:
        self._config = producer_config(bootstrap, {**self._defaults, **(client_config or {})}, outage_timeout)
        self._defer = defer_acks
        self._watch = (bootstrap, outage_timeout)
        self._topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducerPartition:
        return self._partition(self._config, self._topic, watch_for(*self._watch), self._defer)


class AggregatedTopicSink(_TopicSink):
    """Window and period aggregates as JSON (meterflow.schemas.records.WindowAggregate / PeriodAggregate, tagged by
    ``type``) on the aggregated topic, keyed ``tenant|customer|metric``."""

    _partition = _AggregatedPartition


class RatedTopicSink(_TopicSink):
    """Rated rows (``meterflow.schemas.records.RatedRow``) as JSON on the rated topic, keyed ``tenant|customer|metric``;
    money as JSON numbers with exact decimal digits. Consumers keep the highest ``version`` per
    (key, period_start): a replay re-sends rows with versions already seen."""

    _partition = _RatedPartition


class ReviewTopicSink(_TopicSink):
    """Review items (``meterflow.schemas.reviews.ReviewItem``) as JSON on the reviews topic for tools, keyed by
    ``review_id``, with a ``route`` header; money as JSON numbers with exact digits. Consumers keep the highest
    ``version`` per key: a replay re-sends items with versions already seen."""

    _partition = _ReviewPartition


class DeadLetterTopicSink(_TopicSink):
    """Dead letters on the dead-letter topic: the original payload bytes untouched as the value, the reason,
    detail, source, tenant and metric as headers, keyed by ``dl_id``."""

    _partition = _DeadLetterPartition


class AlertTopicSink(_TopicSink):
    """Alerts on the alerts topic: the contract's alert JSON (``meterflow.schemas.alerts.Alert``) as the value, keyed by
    the deterministic ``alert_id``, with ``type`` and ``tenant_id`` headers for routing without decoding.

    At-least-once: a resumed flow may re-send an alert with the same key; consumers deduplicate by key."""

    _partition = _AlertPartition
    # An alert is sent the moment it is produced (no linger: it is what someone waits for); with
    # ``defer_acks`` (a flow without recovery) the flow's thread does not wait for its acknowledgement either.
    _defaults = {"linger.ms": "0"}


def publish_entitlements(bootstrap: str, topic: str, messages: Sequence[Tuple[bytes, bytes]],
                         client_config: Optional[Dict[str, str]] = None,
                         timeout: float = 30.0, what: str = "entitlements") -> List[Tuple[int, int]]:
    """Produce ``(key, value)`` records to the entitlements topic with an idempotent producer, wait for every
    acknowledgement and return ``(partition, offset)`` per record, in order. Raises MeterError on any failure."""
    producer = Producer({**producer_config(bootstrap, client_config), "linger.ms": 0,
                         "message.timeout.ms": int(timeout * 1000)})
    where: List[Optional[Tuple[int, int]]] = [None] * len(messages)
    errors: List[str] = []

    def on_delivery(i: int) -> Any:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                where[i] = (msg.partition(), msg.offset())
        return cb

    for i, (key, value) in enumerate(messages):
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery(i))
    remaining = producer.flush(timeout)
    if errors or remaining or any(w is None for w in where):
        why = errors[0] if errors else f"{remaining} messages unacknowledged after {timeout:g} s"
        raise MeterError(f"Kafka topic {topic!r} at {bootstrap}: publishing {what} failed ({why})")
    return where  # type: ignore[return-value]
