"""What reading the events topic and mediating it natively costs per message (``pipeline.core = "native"``):
``next_batch`` of the Kafka source's partition (sources/kafka.py) and ``NativeMediator.split`` of what it
returned (operators/native.py), against a real broker (``meterflow.devservices.KafkaBroker``, started and
stopped here), with the source's per-message items (``chunks=False``: one ``((topic, part, offset), value)``
tuple per message, as every core read them before) and with its chunks (``chunks=True``: one SourceChunk per
consume call, read by ``Mediator.run_chunk``).

    python -m benchmarks.kafka_source
    python -m benchmarks.kafka_source --events 200000 --batch-size 5000 --repeat 5 --json
    python -m benchmarks.kafka_source --bytewax   # no broker: Bytewax's cost of per-message items vs chunks

The events are those of ``python -m benchmarks`` (benchmarks/workload.py), produced once to a one-partition
topic; every round reads the whole topic from the beginning with a fresh partition and mediator, the two ways
taking turns round by round. Printed per way, per message (best and median round): CPU of the calling thread
(``time.thread_time``: what the flow's thread pays; librdkafka fetches on its own threads), of which
``next_batch`` alone, and wall time. The garbage collector is tuned as ``meter run`` tunes it
(base/gc_tuning.py). Bytewax's own cost per stream item (one item per message, or per consume call) is not in
these numbers: ``--bytewax`` measures it alone (a Bytewax flow from a source of ready-made values to a
``flat_map_batch`` step that drops them, one item per message or one SourceChunk per batch, no broker),
``python -m benchmarks`` the whole flow. Numbers depend on the machine and on what else runs on it; compare
rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from typing import Any, Dict, List


def read_round(bootstrap: str, topic: str, cfg: Any, batch_size: int, chunks: bool) -> Dict[str, float]:
    """Read ``topic`` to its end and mediate it: thread CPU seconds (total, next_batch), wall, messages."""
    from meterflow.base.stats import FlowStats
    from meterflow.operators.native import NativeMediator
    from meterflow.sources.kafka import KafkaEventSource

    src = KafkaEventSource(bootstrap, topic, batch_size=batch_size, stop_at_end=True, chunks=chunks)
    (name,) = src.list_parts()
    part = src.build_part("ingest", name, None)
    stats = FlowStats()
    med = NativeMediator(cfg, stats=stats)
    source_s = 0.0
    calls = 0
    t0, w0 = time.thread_time(), time.perf_counter()
    try:
        while True:
            s0 = time.thread_time()
            try:
                batch = part.next_batch()
            except StopIteration:
                break
            source_s += time.thread_time() - s0
            if batch:
                calls += 1
                med.split(batch, False)
        cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
    finally:
        part.close()
    return {"cpu": cpu, "source": source_s, "wall": wall, "read": stats.snapshot()["read"],
            "per_call": stats.snapshot()["read"] / max(calls, 1)}


def bytewax_items(n: int, batch: int, chunks: bool) -> float:
    """Thread CPU ns per message of a Bytewax flow moving ``n`` values from a source (``batch`` per
    ``next_batch``, as items or as chunks, built as sources/kafka.py builds them) to a step that drops them."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
    from bytewax.testing import run_main

    from meterflow.schemas.chunk import SourceChunk

    values = [b"x" * 250] * n
    offsets = list(range(n))

    class Part(StatefulSourcePartition):
        i = 0

        def next_batch(self) -> List[Any]:
            i = self.i
            if i >= n:
                raise StopIteration()
            self.i += batch
            if chunks:
                return [SourceChunk("t", 0, offsets[i:i + batch], values[i:i + batch])]
            return [(("t", 0, off), v) for off, v in zip(offsets[i:i + batch], values[i:i + batch])]

        def snapshot(self) -> None:
            return None

    class Src(FixedPartitionedSource):
        def list_parts(self) -> List[str]:
            return ["0"]

        def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Part:
            return Part()

    flow = Dataflow("bench_items")
    op.inspect("drop", op.flat_map_batch("mediate", op.input("ingest", flow, Src()), lambda b: []))
    t0 = time.thread_time()
    run_main(flow)
    return (time.thread_time() - t0) / n * 1e9


def main(argv: List[str] | None = None) -> int:
    doc = str(__doc__)
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="messages in the topic (default 200000)")
    ap.add_argument("--customers", type=int, default=1000, help="customers of the workload (default 1000)")
    ap.add_argument("--batch-size", type=int, default=5000, help="kafka.batch_size: messages per consume call")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per way (default 3)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--bytewax", action="store_true", help="only Bytewax's cost per item (no broker)")
    args = ap.parse_args(argv)
    if args.bytewax:
        from meterflow.base.gc_tuning import tune_gc

        tune_gc()
        got: Dict[str, List[float]] = {"items": [], "chunks": []}
        for _ in range(args.repeat):
            for w in got:
                got[w].append(bytewax_items(args.events, args.batch_size, w == "chunks"))
        print(f"Bytewax source -> flat_map_batch of {args.events} values, batch_size {args.batch_size}, "
              f"{args.repeat} rounds (thread CPU ns per message: best / median)")
        for w, v in got.items():
            print(f"  {w:7s} {min(v):6.0f} / {statistics.median(v):6.0f}")
        return 0

    import confluent_kafka

    from benchmarks.native_core import build_bench
    from meterflow.base.gc_tuning import tune_gc
    from meterflow.devservices import KafkaBroker

    cfg, lines, _batches = build_bench(args.events, 5000, args.customers)
    tune_gc()  # as meter run does
    ways = {"items": False, "chunks": True}
    results: Dict[str, List[Dict[str, float]]] = {w: [] for w in ways}
    with KafkaBroker() as kafka:
        topic = kafka.create_topic(f"bench-source-{uuid.uuid4().hex[:8]}", partitions=1)
        prod = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 20})
        for line in lines:
            while True:
                try:
                    prod.produce(topic, line, partition=0)
                    break
                except BufferError:
                    prod.poll(0.05)
        prod.flush(60)
        del prod  # (its connection would outlive the broker)
        for chunks in ways.values():  # warm-up: connections, caches
            read_round(kafka.bootstrap, topic, cfg, args.batch_size, chunks)
        for _ in range(args.repeat):
            for w, chunks in ways.items():
                r = read_round(kafka.bootstrap, topic, cfg, args.batch_size, chunks)
                if r["read"] != len(lines):
                    raise SystemExit(f"{w}: read {r['read']} of {len(lines)} messages")
                results[w].append(r)
    n = len(lines)
    summary = {w: {f"{what}_ns_{how}": f([r[what] for r in rs]) / n * 1e9
                   for what in ("cpu", "source", "wall") for how, f in (("best", min), ("median", statistics.median))}
               | {"messages_per_consume": statistics.median([r["per_call"] for r in rs])}
               for w, rs in results.items()}
    if args.json:
        print(json.dumps({"events": n, "batch_size": args.batch_size, "repeat": args.repeat, "results": summary},
                         indent=2))
        return 0
    print(f"next_batch + NativeMediator.split of {n} messages, batch_size {args.batch_size}, {args.repeat} rounds "
          "(ns per message: best / median)")
    for w, s in summary.items():
        print(f"  {w:7s} thread CPU {s['cpu_ns_best']:6.0f} / {s['cpu_ns_median']:6.0f}   "
              f"of which next_batch {s['source_ns_best']:6.0f} / {s['source_ns_median']:6.0f}   "
              f"wall {s['wall_ns_best']:6.0f} / {s['wall_ns_median']:6.0f}   "
              f"messages per consume call {s['messages_per_consume']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
