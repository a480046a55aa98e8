"""Kafka input: every partition of the events topic is a Bytewax partition.

Offsets live in Bytewax's recovery snapshots (not in a consumer group), so a
resumed flow re-reads exactly from the last snapshot and the idempotent sinks
absorb the replay. With ``stop_at_end`` the source reads up to the end offsets it
finds at start-up and then finishes (backfills, tests); otherwise it tails.

Messages are emitted as ``((topic, partition, offset), value)`` tuples: no
per-message wrapper objects on the hot path, and one list comprehension per
consumed batch (errors, which are rare, are handled only when a batch has one).
With ``chunks`` (the events topic with ``pipeline.core = "native"``) a consume call is
emitted as one :class:`~meterflow.schemas.chunk.SourceChunk` (the offsets and values
taken by ``map`` over the messages' C methods): no Python bytecode and no stream item
per message before the native mediator.

A broker outage (sources/kafka_watch.py): the partitions wait for the cluster, probing it once a second,
and stop the flow with one error once it has been unreachable for ``kafka.outage_timeout``; a rerun with
the same ``--recovery`` resumes from the last snapshot's offsets.
"""

from __future__ import annotations

import logging
import time
import weakref
from datetime import datetime, timedelta, timezone
from threading import get_ident
from typing import Any, Dict, List, Optional, Tuple

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from meterflow.base.errors import MeterError
from meterflow.schemas.chunk import SourceChunk
from meterflow.sources.kafka_watch import BrokerWatch, watch_for
from meterflow.sources.stop import STOP

log = logging.getLogger("meterflow.kafka")

_error, _offset, _value = Message.error, Message.offset, Message.value  # (C methods: map calls them directly)


class _TopicPartition(StatefulSourcePartition[Tuple[Any, bytes], int]):
    def __init__(self, config: Dict[str, Any], topic: str, part: int, resume: Optional[int], batch_size: int,
                 stop_at_end: bool, poll_timeout: float, watch: BrokerWatch, chunks: bool = False) -> None:
        self._topic, self._part = topic, part
        self._chunks = chunks
        self._next = resume if resume is not None else OFFSET_BEGINNING
        self._watch = watch
        self._consumer = Consumer({**config, **watch.client_config()})
        self._consumer.assign([TopicPartition(topic, part, self._next)])
        _LIVE.add(self)
        self._batch = batch_size
        self._timeout = poll_timeout
        self._awake: Optional[datetime] = None  # an idle partition's next poll (next_awake); None: at once
        self._end: Optional[int] = None
        if stop_at_end:
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
            except KafkaException as exc:
                raise watch.outage_error(f"reading the end offset of {topic}[{part}]",
                                         str(exc.args[0] if exc.args else exc)) from exc
            self._end = high

    def next_batch(self) -> List[Tuple[Any, bytes]]:
        if STOP.is_set():
            raise StopIteration()
        if self._end is not None and self._next != OFFSET_BEGINNING and self._next >= self._end:
            raise StopIteration()
        if self._end == 0:
            raise StopIteration()
        # What is already fetched, without waiting: a busy topic's batch is what arrived while the flow was busy,
        # so an event waits for one pass of the flow and no more. While the worker is busy (one of its partitions
        # consumed messages in the last WORKER_IDLE_S), a partition with nothing fetched is polled again after
        # poll_timeout (next_awake) and the worker goes on meanwhile with the other partitions and the steps after
        # the source: a consume call with a timeout would hold all of them for its whole timeout, even when
        # messages arrive during it (librdkafka returns early only for a full batch), and an always idle partition
        # (the changelog) would do so at every pass. Once the whole worker is idle, the partition waits in consume
        # up to poll_timeout: the thread sleeps there (Bytewax's own loop, waiting for next_awake, cost an idle
        # flow about 3 % of a core more, measured by hand).
        self._awake = None
        worker = get_ident()
        msgs = self._consumer.consume(self._batch, 0)
        if not msgs:
            if time.monotonic() - _LAST_DATA.get(worker, 0.0) > WORKER_IDLE_S:
                msgs = self._consumer.consume(self._batch, self._timeout)
            else:
                self._awake = datetime.now(timezone.utc) + timedelta(seconds=self._timeout)
        if self._watch.down:
            self._while_down(bool(msgs))
        if not msgs:
            return []
        _LAST_DATA[worker] = time.monotonic()
        topic, part = self._topic, self._part
        if self._chunks:
            return self._chunk(msgs)
        # The hot path: one comprehension, no per-message Python statements; errors are rare and are
        # looked at only when the comprehension dropped something.
        out: List[Any] = [((topic, part, msg.offset()), msg.value()) for msg in msgs if msg.error() is None]
        if len(out) != len(msgs):
            self._check(msgs)
        if out:
            self._next = out[-1][0][2] + 1
        return out

    def _chunk(self, msgs: List[Message]) -> List[Any]:
        """The consumed messages as one SourceChunk (none when all were errors to skip)."""
        if any(map(_error, msgs)):  # (a KafkaError is true: C iteration, no bytecode per message)
            self._check(msgs)
            msgs = [msg for msg in msgs if msg.error() is None]
            if not msgs:
                return []
        offsets: List[Any] = list(map(_offset, msgs))
        self._next = offsets[-1] + 1
        return [SourceChunk(self._topic, self._part, offsets, list(map(_value, msgs)))]

    def _check(self, msgs: List[Message]) -> None:
        """Raise for the first error of ``msgs`` that is not an end of partition or retriable (skipped)."""
        for msg in msgs:
            err = msg.error()
            if err is None or err.code() == KafkaError._PARTITION_EOF or err.retriable():
                continue
            raise MeterError(f"error consuming {self._topic}[{self._part}]: {err} (check the broker and kafka "
                             "settings)")

    def _while_down(self, consumed: bool) -> None:
        """The cluster was unreachable: a metadata probe answered (:meth:`BrokerWatch.probe`, at most once a
        second, and before the flow is stopped) ends the outage; past kafka.outage_timeout with nothing consumed
        the flow stops (offsets resume from the last snapshot). A consumed message is no answer: it may have been
        fetched before the outage began (the consumer prefetches); it only defers the stop."""
        watch = self._watch
        watch.probe(self._consumer, self._topic, force=not consumed and watch.down_for() > watch.timeout)
        if not consumed:
            watch.check(f"reading {self._topic}[{self._part}] from offset {self._next}")

    def next_awake(self) -> Optional[datetime]:
        return self._awake

    def snapshot(self) -> int:
        return self._next

    def lag(self) -> Optional[int]:
        """Messages of the partition not read yet, from the end offset the last fetch reported (no broker
        call); None before the first fetch."""
        try:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(self._topic, self._part), cached=True)
        except (KafkaException, RuntimeError):
            return None
        if high is None or high < 0:
            return None
        return max(0, high - (self._next if self._next >= 0 else max(low, 0)))

    def close(self) -> None:
        _LIVE.discard(self)
        self._consumer.close()


_LIVE: "weakref.WeakSet[_TopicPartition]" = weakref.WeakSet()  # partitions being read in this process
# A worker thread's partitions wait inside consume only once none of them consumed anything for this long.
WORKER_IDLE_S = 0.05
_LAST_DATA: Dict[int, float] = {}  # worker thread id -> time.monotonic() a partition of it last consumed messages


def consumer_lags() -> List[Tuple[str, int, int]]:
    """``(topic, partition, lag)`` of every partition this process reads (Prometheus, meter run --metrics-port)."""
    out = []
    for p in list(_LIVE):
        lag = p.lag()
        if lag is not None:
            out.append((p._topic, p._part, lag))
    return out


class KafkaEventSource(FixedPartitionedSource[Tuple[Any, bytes], int]):
    """A topic (the usage events, or the entitlements changelog) as a partitioned Bytewax source. ``chunks``:
    one :class:`~meterflow.schemas.chunk.SourceChunk` per consume call instead of one ``(src, raw)`` item per
    message (the events topic with ``pipeline.core = "native"``; mediation takes either)."""

    def __init__(self, bootstrap_servers: str, topic: str, client_config: Optional[Dict[str, str]] = None,
                 batch_size: int = 5000, stop_at_end: bool = False, poll_timeout: float = 0.005,
                 config_key: str = "kafka.events_topic", missing_ok: bool = False,
                 outage_timeout: float = 60.0, chunks: bool = False) -> None:
        self._chunks = chunks
        self._config: Dict[str, Any] = {"bootstrap.servers": bootstrap_servers, **(client_config or {})}
        self._outage_timeout = outage_timeout
        self._config_key = config_key
        self._missing_ok = missing_ok
        self._topic = topic
        self._batch = batch_size
        self._stop_at_end = stop_at_end
        self._timeout = poll_timeout

    def list_parts(self) -> List[str]:
        admin = AdminClient(self._config)
        try:
            meta = admin.list_topics(topic=self._topic, timeout=15)
        except KafkaException as exc:
            raise MeterError(f"cannot reach Kafka at {self._config['bootstrap.servers']} "
                             f"(kafka.bootstrap_servers): {exc.args[0] if exc.args else exc}") from exc
        tmeta = meta.topics.get(self._topic)
        missing = tmeta is None or tmeta.error is not None or not tmeta.partitions
        if missing and self._missing_ok:
            log.warning("Kafka topic %r (%s) does not exist; continuing without it", self._topic, self._config_key)
            return []
        if missing or tmeta is None:
            why = tmeta.error if tmeta is not None and tmeta.error is not None else "no partitions"
            raise MeterError(f"Kafka topic {self._topic!r} on {self._config['bootstrap.servers']} is not usable "
                             f"({why}); create it or set {self._config_key}")
        return [f"{p}-{self._topic}" for p in sorted(tmeta.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _TopicPartition:
        idx, topic = for_part.split("-", 1)
        cfg = {"group.id": "meterflow-unused", "enable.auto.commit": False, "enable.partition.eof": False,
               "auto.offset.reset": "earliest", **self._config}
        watch = watch_for(self._config["bootstrap.servers"], self._outage_timeout)
        return _TopicPartition(cfg, topic, int(idx), resume_state, self._batch, self._stop_at_end, self._timeout,
                               watch, self._chunks)


def ensure_topic(bootstrap_servers: str, topic: str, client_config: Optional[Dict[str, str]] = None,
                 timeout: float = 15.0) -> bool:
    """Create ``topic`` (one partition, the broker's default replication) when it does not exist, so that a
    tailing flow, whose partitions are fixed at start, reads records published to it later. Returns whether it
    was created; any failure (no permission, an unreachable broker) is logged and left to the source to report."""
    from confluent_kafka.admin import NewTopic

    # log_level 3: librdkafka's info line about its purged background queue at exit is no news on stderr
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_config or {}), "log_level": 3})
    try:
        tmeta = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        if tmeta is not None and tmeta.error is None and tmeta.partitions:
            return False
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1)],
                            request_timeout=timeout)[topic].result(timeout=timeout)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        if getattr(err, "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        log.warning("could not create Kafka topic %r: %s", topic, err)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # until its partition has a leader
        tmeta = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        if tmeta is not None and tmeta.error is None and tmeta.partitions and \
                all(p.leader >= 0 for p in tmeta.partitions.values()):
            break
        time.sleep(0.1)
    return True


def read_key(bootstrap_servers: str, topic: str, key: bytes, client_config: Optional[Dict[str, str]] = None,
             timeout: float = 30.0) -> List[bytes]:
    """The values of ``topic``'s records keyed ``key``, in log order, read from the beginning of every partition
    to the end offsets at call time (a missing topic has none). For command-line look-ups on small topics
    (``meter review`` reads an item and its decisions); raises MeterError when the broker does not answer."""
    return [v for _p, _o, v in read_topic(bootstrap_servers, topic, client_config, timeout, key=key)]


def read_topic(bootstrap_servers: str, topic: str, client_config: Optional[Dict[str, str]] = None,
               timeout: float = 30.0, key: Optional[bytes] = None) -> List[Tuple[int, int, bytes]]:
    """``(partition, offset, value)`` of every record of ``topic`` (only those keyed ``key`` when given), sorted,
    read from the beginning of every partition to the end offsets at call time within ``timeout`` seconds (a
    missing topic has none; a tombstone's value is ``b""``). Raises MeterError when the broker does not answer."""
    where = f"Kafka topic {topic!r} at {bootstrap_servers}"
    c = Consumer({"bootstrap.servers": bootstrap_servers, **(client_config or {}), "group.id": "meterflow-unused",
                  "enable.auto.commit": False, "enable.partition.eof": False, "auto.offset.reset": "earliest"})
    try:
        try:
            tmeta = c.list_topics(topic, timeout=timeout).topics.get(topic)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                return []
            ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in tmeta.partitions}
        except KafkaException as exc:
            raise MeterError(f"{where}: cannot read it ({exc.args[0] if exc.args else exc}); check "
                             "kafka.bootstrap_servers") from exc
        todo = {p for p, end in ends.items() if end > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        out: List[Tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise MeterError(f"{where}: not read to its end within {timeout:g} s; check the broker")
            for msg in c.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF or err.retriable():
                        continue
                    raise MeterError(f"{where}: {err}")
                p, off = msg.partition() or 0, msg.offset() or 0
                if off < ends[p] and (key is None or msg.key() == key):
                    out.append((p, off, msg.value() or b""))
            for tp in c.position([TopicPartition(topic, p) for p in todo]):  # past the end (gaps and all)
                if tp.offset >= ends[tp.partition]:
                    todo.discard(tp.partition)
        return sorted(out)
    finally:
        c.close()
