"""What the aggregated topic sink costs per row: ``write_batch`` of ``meterflow.sinks.kafka.AggregatedTopicSink``
against a real broker (``meterflow.devservices.KafkaBroker``, started and stopped here), for the working tree's
sinks/kafka.py and, side by side, the same file at other git revisions.

    python -m benchmarks.kafka_sink
    python -m benchmarks.kafka_sink --ref 7e62e6f --rows 2000 --batches 50 --repeat 5
    python -m benchmarks.kafka_sink --ref main --queue-messages 500 --json
    python -m benchmarks.kafka_sink --deferred   # also the working tree's sink with defer_acks (no recovery)

Each batch is ``--rows`` rows (window and period rows half and half, ``--keys`` keys spread over the batches, as
a flush of the native core emits them), one ``Emission`` per 100 rows; every implementation writes the same
batches to its own topic (``--partitions``). A round is all ``--batches`` batches, each returning only once
the broker acknowledged every message (write_batch flushes; with ``--deferred`` the ``worktree+defer`` sink's
batches return before their acks, and its round ends when the producer has flushed them: what ``close`` waits
for); the implementations take turns round by round, ``--repeat`` rounds each after one warm-up batch.

Printed per implementation, per row (best and median round): CPU of this process (``time.process_time``:
the Python thread and librdkafka's threads, so what the flow's process pays), CPU of the calling thread alone
(``time.thread_time``: what the flow's thread pays; librdkafka compresses and sends on its own threads) and
wall time. The broker's own CPU (a separate JVM) is not counted. Numbers depend on the machine and on what else
runs on it (on a shared machine they are noisy); compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any, Dict, List

from meterflow.schemas.records import Emission, PeriodAggregate, WindowAggregate

ROOT = Path(__file__).resolve().parent.parent
H = 3_600_000
T = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def batches(n_batches: int, rows: int, keys: int) -> List[List[Emission]]:
    out = []
    k = 0
    for b in range(n_batches):
        recs: List[Any] = []
        for i in range(rows):
            k = (k + 7919) % keys  # a prime stride: every key, in a scattered order
            tenant, cust = f"tenant-{k % 3}", f"cust-{k // 3:05d}"
            v = b * rows + i + 1
            if i % 2:
                recs.append(WindowAggregate(tenant_id=tenant, customer_id=cust, metric="api_calls",
                                            window_start=T + (b % 24) * H, window_end=T + (b % 24 + 1) * H,
                                            dimensions={}, value=float(v), events=v, version=v))
            else:
                recs.append(PeriodAggregate(tenant_id=tenant, customer_id=cust, metric="tokens", period_start=T,
                                            period_end=T + 720 * H, value=v * 1.5, included=100000.0,
                                            overage_units=0.0, events=v, excluded_events=0, version=v))
        out.append([Emission(windows=[r for r in recs[j:j + 100] if isinstance(r, WindowAggregate)],
                             periods=[r for r in recs[j:j + 100] if isinstance(r, PeriodAggregate)])
                    for j in range(0, rows, 100)])
    return out


def load(ref: str) -> types.ModuleType:
    """sinks/kafka.py of the working tree (``ref`` "") or of git revision ``ref``, as a module of its own."""
    path = ROOT / "sinks" / "kafka.py"
    if ref:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:sinks/kafka.py"], check=True,
                              capture_output=True, text=True).stdout
    else:
        text = path.read_text()
    mod = types.ModuleType(f"kafka_sink_{ref or 'worktree'}")
    mod.__file__ = str(path)
    sys.modules[mod.__name__] = mod  # `from __future__ import annotations` + msgspec need a findable module
    exec(compile(text, f"{ref or 'worktree'}:sinks/kafka.py", "exec"), mod.__dict__)
    return mod


def main(argv: List[str] | None = None) -> int:
    doc = str(__doc__)
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", action="append", default=[],
                    help="also measure sinks/kafka.py at this git revision (repeatable)")
    ap.add_argument("--rows", type=int, default=2000, help="rows per write_batch (default 2000)")
    ap.add_argument("--batches", type=int, default=50, help="batches per round (default 50)")
    ap.add_argument("--keys", type=int, default=6000, help="distinct row keys (default 6000)")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of each topic (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per implementation (default 3)")
    ap.add_argument("--queue-messages", type=int, default=0,
                    help="client_config queue.buffering.max.messages (default: librdkafka's, 100000)")
    ap.add_argument("--deferred", action="store_true",
                    help="also measure the working tree's sink with defer_acks=True (a flow without recovery)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    from meterflow.devservices import KafkaBroker

    work = batches(args.batches, args.rows, args.keys)
    client = {"queue.buffering.max.messages": str(args.queue_messages)} if args.queue_messages else {}
    names = ["worktree", *(["worktree+defer"] if args.deferred else []), *args.ref]
    mods = {name: load("" if name.startswith("worktree") else name) for name in names}
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
    n = args.rows * args.batches
    with KafkaBroker() as kafka:
        parts = {}
        for name in names:
            topic = kafka.create_topic(f"bench-sink-{uuid.uuid4().hex[:8]}", partitions=args.partitions)
            extra = {"defer_acks": True} if name == "worktree+defer" else {}
            parts[name] = mods[name].AggregatedTopicSink(kafka.bootstrap, topic, client, **extra).build(
                "aggregated", 0, 1)
            parts[name].write_batch(work[0])  # warm-up: connection, metadata, idempotent producer id
        for _ in range(args.repeat):
            for name in names:
                part = parts[name]
                c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
                for items in work:
                    part.write_batch(items)
                part._producer.flush(60)  # (nothing left unless deferred: the round ends with every ack)
                results[name].append({"cpu_ns_per_row": (time.process_time() - c0) / n * 1e9,
                                      "thread_ns_per_row": (time.thread_time() - t0) / n * 1e9,
                                      "wall_ns_per_row": (time.perf_counter() - w0) / n * 1e9})
        for part in parts.values():
            part.close()
    summary = {name: {f"{what}_{how}": f([r[what] for r in rs])
                      for what in ("cpu_ns_per_row", "thread_ns_per_row", "wall_ns_per_row")
                      for how, f in (("best", min), ("median", statistics.median))}
               for name, rs in results.items()}
    if args.json:
        print(json.dumps({"rows": args.rows, "batches": args.batches, "repeat": args.repeat,
                          "results": summary}, indent=2))
        return 0
    print(f"write_batch of {args.rows} rows x {args.batches} batches, {args.repeat} rounds "
          f"(ns per row: best / median)")
    for name, s in summary.items():
        print(f"  {name:12s} CPU {s['cpu_ns_per_row_best']:7.0f} / {s['cpu_ns_per_row_median']:7.0f}   "
              f"calling thread {s['thread_ns_per_row_best']:7.0f} / {s['thread_ns_per_row_median']:7.0f}   "
              f"wall {s['wall_ns_per_row_best']:7.0f} / {s['wall_ns_per_row_median']:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
