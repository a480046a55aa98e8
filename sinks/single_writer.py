"""One writer for an output that a multi-process Bytewax cluster must not open in every process.

Embedded chDB holds its data path in one process (``meterflow.sinks.clickhouse.embedded_holder``), and the
JSONL alert file keeps its set of written alert ids in the process that appends to it. In a cluster of
several ``meter run`` processes such an output is wrapped in :class:`SingleWriterSink`: a Bytewax
``FixedPartitionedSink`` with ONE partition that only the writer process (process 0) lists, so Bytewax
routes every item of that step, from every worker of every process, to a worker of process 0, which alone
builds the wrapped sink (lazily, on the first batch). The other processes never open it.

Delivery and recovery are those of the wrapped sink: the partition keeps no state of its own (its snapshot
is ``None``), so a resumed cluster replays from the last snapshot of the meter step and the writer rewrites
the same idempotent upserts (ClickHouse: ``ReplacingMergeTree(version)``; the alert file: once per
``alert_id``). A single process, whatever its ``--workers``, does not use this wrapper: its workers share
one embedded client already (``ClickHouseSink``), so its outputs and cost are those of before.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition

WRITER_PROCESS = 0  # the process that owns every single-writer output of a cluster
PARTITION = "writer"  # the one partition key (also the routing key of every item)


class _WriterPartition(StatefulSinkPartition[Any, None]):
    def __init__(self, inner: StatelessSinkPartition[Any]) -> None:
        self._inner = inner

    def write_batch(self, values: List[Any]) -> None:
        self._inner.write_batch(values)

    def snapshot(self) -> None:
        return None  # nothing to resume: the wrapped outputs are idempotent upserts

    def close(self) -> None:
        self._inner.close()


class SingleWriterSink(FixedPartitionedSink[Any, None]):
    """``inner`` (a ``DynamicSink``) written by one worker of process ``WRITER_PROCESS`` for the whole cluster.

    Items are ``(key, value)`` pairs (``writer_item``); every key goes to the one partition."""

    def __init__(self, inner: DynamicSink[Any], process_id: int) -> None:
        self.inner = inner
        self.writer = process_id == WRITER_PROCESS

    def list_parts(self) -> List[str]:
        return [PARTITION] if self.writer else []

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[None]) -> _WriterPartition:
        return _WriterPartition(self.inner.build(step_id, 0, 1))


def writer_item(value: Any) -> Tuple[str, Any]:
    """An item as the ``(key, value)`` pair a :class:`SingleWriterSink` reads."""
    return (PARTITION, value)
