"""What the ClickHouse sink costs per row: ``_write`` of ``meterflow.sinks.clickhouse`` (the partition's insert of a
batch of emissions) into embedded chDB, for the working tree's sinks/clickhouse.py and sinks/clickhouse_schema.py
and, side by side, the same two files at other git revisions.

    python -m benchmarks.clickhouse_sink --ref main
    python -m benchmarks.clickhouse_sink --ref main --rows 5000 --batches 20 --repeat 5 --encode-only
    python -m benchmarks.clickhouse_sink --python --json

Each batch is ``--rows`` rows of one kind (window rows with one dimension, period rows, rated rows with money),
one ``Emission`` per 100 rows, ``--keys`` keys spread over the batches; every implementation writes the same
batches into its own database of one chDB path (a temporary directory). A round is all ``--batches`` batches of a
kind; the implementations take turns round by round, ``--repeat`` rounds each after one warm-up batch.
``--python`` also measures the working tree with the native encoder off (what it does without ``meterflow_native``).
``--encode-only`` replaces the client by one that only makes the bytes the real one would send (the driver's
``Native`` chunks for a column insert; ``raw_insert`` takes its bytes as they are): what the sink costs in Python
and the native extension, holding the GIL, without chDB's part of the insert.

Printed per kind and implementation, per row (best and median round): CPU of this process
(``time.process_time``: every thread, chDB's included), CPU of the calling thread (``time.thread_time``: the
thread that holds the GIL while it encodes) and wall time. Numbers depend on the machine and on what else runs on
it (on a shared machine they are noisy); compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List

from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import Emission, PeriodAggregate, RatedRow, WindowAggregate

ROOT = Path(__file__).resolve().parent.parent
H = 3_600_000
T = 1_793_491_200_000  # 2026-11-01T00:00:00Z
KINDS = ("windows", "periods", "rated")
ZERO = Decimal(0)  # as operators/rating.py: one shared zero


def record(kind: str, b: int, i: int, k: int) -> Any:
    tenant, cust = f"tenant-{k % 3}", f"cust-{k // 3:05d}"
    v = b * 100_000 + i + 1
    if kind == "windows":
        return WindowAggregate(tenant_id=tenant, customer_id=cust, metric="api_calls", window_start=T + (b % 24) * H,
                               window_end=T + (b % 24 + 1) * H, dimensions={"region": f"r{k % 4}"}, value=float(v),
                               events=v, version=v)
    if kind == "periods":
        return PeriodAggregate(tenant_id=tenant, customer_id=cust, metric="tokens", period_start=T,
                               period_end=T + 720 * H, value=v * 1.5, included=100000.0 if k % 2 else None,
                               overage_units=0.0, events=v, excluded_events=0, version=v)
    amount = Decimal(v).scaleb(-3)
    return RatedRow(tenant_id=tenant, customer_id=cust, metric="tokens", period_start=T, period_end=T + 720 * H,
                    plan="pro", currency="EUR", price_model="per_unit", usage=v * 1.5, included=1000.0,
                    overage_units=0.0, charge=amount, overage_amount=ZERO, minimum=ZERO, amount=amount,
                    custom_rate=False, final=False, version=v, account_name=f"Account {k}", arr=12.0 * v)


def batches(kind: str, n_batches: int, rows: int, keys: int) -> List[List[Emission]]:
    out = []
    k = 0
    for b in range(n_batches):
        recs = []
        for i in range(rows):
            k = (k + 7919) % keys  # a prime stride: every key, in a scattered order
            recs.append(record(kind, b, i, k))
        out.append([Emission(**{kind: recs[j:j + 100]}) for j in range(0, rows, 100)])
    return out


def load(ref: str, shared: types.ModuleType) -> types.ModuleType:
    """sinks/clickhouse.py (with its sinks/clickhouse_schema.py) of git revision ``ref``, as modules of their own;
    the embedded chDB client is ``shared``'s (chDB opens one data path per process)."""
    tag = "".join(c if c.isalnum() else "_" for c in ref)
    mods = {}
    for name in ("clickhouse_schema", "clickhouse"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:sinks/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from meterflow.sinks.clickhouse_schema import",
                            f"from bench_{tag}_clickhouse_schema import")
        mod = types.ModuleType(f"bench_{tag}_{name}")
        mod.__file__ = str(ROOT / "sinks" / f"{name}.py")
        sys.modules[mod.__name__] = mod  # `from __future__ import annotations` + msgspec need a findable module
        exec(compile(text, f"{ref}:sinks/{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    mod = mods["clickhouse"]
    mod._EMBEDDED, mod._EMBEDDED_LOCK = shared._EMBEDDED, shared._EMBEDDED_LOCK
    return mod


class EncodeOnly:
    """A client that makes the bytes an insert sends, and sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def insert(self, context: Any) -> None:
        from clickhouse_connect.driver.transform import NativeTransform

        self.sent += sum(map(len, NativeTransform.build_insert(context)))

    def raw_insert(self, table: str, column_names: Any, insert_block: bytes, fmt: str = "") -> None:
        self.sent += len(insert_block)


def main(argv: List[str] | None = None) -> int:
    doc = str(__doc__)
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", action="append", default=[],
                    help="also measure sinks/clickhouse*.py at this git revision (repeatable)")
    ap.add_argument("--python", action="store_true", help="also measure the working tree without the native encoder")
    ap.add_argument("--kind", action="append", choices=KINDS, help="kinds of rows (default: all three)")
    ap.add_argument("--rows", type=int, default=2000, help="rows per batch (default 2000)")
    ap.add_argument("--batches", type=int, default=20, help="batches per round (default 20)")
    ap.add_argument("--keys", type=int, default=6000, help="distinct row keys (default 6000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per implementation (default 3)")
    ap.add_argument("--encode-only", action="store_true", help="make the insert bytes, send nothing")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    from meterflow.sinks import clickhouse as worktree

    kinds = args.kind or list(KINDS)
    names = ["worktree", *(["worktree-python"] if args.python else []), *args.ref]
    mods = {name: worktree if name.startswith("worktree") else load(name, worktree) for name in names}
    n = args.rows * args.batches
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ch-") as path:
        parts = {}
        for i, name in enumerate(names):
            cfg = ClickHouseConfig(dsn=f"chdb://{path}", database=f"bench_{i}")
            parts[name] = part = mods[name].ClickHouseSink(cfg).build("clickhouse", 0, 1)
            if name == "worktree-python":
                part._hot = {kind: (ctx, None, cols, money) for kind, (ctx, _spec, cols, money) in part._hot.items()}
            if args.encode_only:
                part._client = EncodeOnly()
        for kind in kinds:
            work = batches(kind, args.batches, args.rows, args.keys)
            results: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
            for part in parts.values():
                part._write(work[0])  # warm-up
            for _ in range(args.repeat):
                for name in names:
                    part = parts[name]
                    c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
                    for items in work:
                        part._write(items)
                    results[name].append({"cpu_ns_per_row": (time.process_time() - c0) / n * 1e9,
                                          "thread_ns_per_row": (time.thread_time() - t0) / n * 1e9,
                                          "wall_ns_per_row": (time.perf_counter() - w0) / n * 1e9})
            summary[kind] = {name: {f"{what}_{how}": f([r[what] for r in rs])
                                    for what in ("cpu_ns_per_row", "thread_ns_per_row", "wall_ns_per_row")
                                    for how, f in (("best", min), ("median", statistics.median))}
                             for name, rs in results.items()}
        for part in parts.values():
            if not args.encode_only:
                part.close()
    if args.json:
        print(json.dumps({"rows": args.rows, "batches": args.batches, "repeat": args.repeat,
                          "encode_only": args.encode_only, "results": summary}, indent=2))
        return 0
    print(f"_write of {args.rows} rows x {args.batches} batches, {args.repeat} rounds"
          f"{' (encode only)' if args.encode_only else ''} (ns per row: best / median)")
    for kind, by_name in summary.items():
        print(f" {kind}")
        for name, s in by_name.items():
            print(f"  {name:16s} CPU {s['cpu_ns_per_row_best']:7.0f} / {s['cpu_ns_per_row_median']:7.0f}   "
                  f"calling thread {s['thread_ns_per_row_best']:7.0f} / {s['thread_ns_per_row_median']:7.0f}   "
                  f"wall {s['wall_ns_per_row_best']:7.0f} / {s['wall_ns_per_row_median']:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
