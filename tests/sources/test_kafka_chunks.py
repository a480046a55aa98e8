"""The Kafka source's chunks (``chunks=True``, the events topic with ``pipeline.core = "native"``): one
SourceChunk per consume call whose messages are the per-message items, errors skipped or raised as before,
and the resume offset as before (a fake consumer handing out confluent_kafka Messages)."""

from __future__ import annotations

from typing import Any, List

import pytest
from confluent_kafka import KafkaError, Message

from meterflow.base.errors import MeterError
from meterflow.schemas.chunk import SourceChunk, chunk_items
from meterflow.sources.kafka import _TopicPartition


class _Consumer:
    def __init__(self, batches: List[List[Message]]) -> None:
        self.batches = batches
        self.timeouts: List[float] = []

    def consume(self, n: int, timeout: float) -> List[Message]:
        self.timeouts.append(timeout)
        return self.batches.pop(0) if self.batches else []


class _Watch:
    down = False


def _part(batches: List[List[Message]], chunks: bool) -> Any:
    p = object.__new__(_TopicPartition)  # (no broker: the attributes next_batch reads)
    p._topic, p._part, p._chunks, p._next, p._end = "usage.events", 2, chunks, 40, None
    p._consumer, p._watch, p._batch, p._timeout = _Consumer(batches), _Watch(), 100, 0.0
    return p


def _msg(off: int, value: Any = None, error: Any = None) -> Message:
    if error is not None:
        return Message(topic="usage.events", partition=2, offset=off, error=error)
    return Message(topic="usage.events", partition=2, offset=off, value=value)


EOF_ERR = KafkaError(KafkaError._PARTITION_EOF)
RETRY = KafkaError(KafkaError._TRANSPORT, retriable=True)
FATAL = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)


def _batches() -> List[List[Message]]:
    return [[_msg(40, b"a"), _msg(41, b"b"), _msg(43, None)],
            [_msg(44, b"c"), _msg(-1, error=EOF_ERR), _msg(45, b"d"), _msg(-1, error=RETRY)],
            [_msg(-1, error=EOF_ERR)],
            []]


def test_a_chunk_is_the_consume_calls_messages_and_skips_end_of_partition_and_retriable_errors():
    items, chunked = _part(_batches(), False), _part(_batches(), True)
    for want_next in (44, 46, 46, 46):
        plain, chunks = items.next_batch(), chunked.next_batch()
        assert len(chunks) <= 1 and all(type(c) is SourceChunk for c in chunks)
        assert chunk_items(chunks) == plain
        assert items.snapshot() == chunked.snapshot() == want_next
    assert chunk_items(_part(_batches()[:1], True).next_batch()) == [
        (("usage.events", 2, 40), b"a"), (("usage.events", 2, 41), b"b"), (("usage.events", 2, 43), None)]


@pytest.mark.parametrize("chunks", [False, True])
def test_a_fatal_error_in_a_chunk_stops_the_flow_and_keeps_the_resume_offset(chunks):
    p = _part([[_msg(40, b"a"), _msg(-1, error=EOF_ERR), _msg(-1, error=FATAL), _msg(41, b"b")]], chunks)
    with pytest.raises(MeterError, match=r"error consuming usage.events\[2\]: .*TOPIC_AUTHORIZATION_FAILED"):
        p.next_batch()
    assert p.snapshot() == 40


@pytest.mark.parametrize("chunks", [False, True])
def test_a_busy_worker_never_waits_in_consume_and_an_idle_one_does(chunks):
    """A consume call with a timeout holds the whole worker for all of it (librdkafka returns early only for a
    full batch): while a partition of the worker consumed messages in the last WORKER_IDLE_S every call takes
    what is fetched (timeout 0), and a partition that had nothing asks Bytewax to call it again after
    poll_timeout (next_awake); once the whole worker is idle, it waits in consume up to poll_timeout (the
    thread sleeps there) and next_awake is None."""
    from datetime import datetime, timedelta, timezone
    from threading import get_ident

    from meterflow.sources import kafka as source

    p = _part([[_msg(40, b"a")], [], [_msg(41, b"b")], [], [], [], [_msg(42, b"c")]], chunks)
    p._timeout = 0.25
    assert p.next_batch() and p.next_awake() is None
    before = datetime.now(timezone.utc)
    assert p.next_batch() == []  # (the worker consumed a moment ago: busy)
    awake = p.next_awake()
    assert awake is not None and before + timedelta(seconds=0.25) <= awake <= datetime.now(timezone.utc) + \
        timedelta(seconds=0.25)
    assert p.next_batch() and p.next_awake() is None
    assert p._consumer.timeouts == [0, 0, 0]
    source._LAST_DATA[get_ident()] -= 2 * source.WORKER_IDLE_S  # nothing consumed by the worker since then
    assert p.next_batch() == [] and p.next_awake() is None  # idle: the first call found nothing, the second waited
    assert p._consumer.timeouts[3:] == [0, 0.25]
    assert p.next_batch() and p.next_awake() is None  # messages after the wait
    assert p._consumer.timeouts[5:] == [0, 0.25]
