"""A repeatable harness for the native mediator and fold (``pipeline.core = "native"``), for profiling.

The benchmark's workload (benchmarks/workload.py ``build_workload``, its configuration as
``benchmarks.peers.meterflow.config_toml`` writes it for ``python -m benchmarks``) in batches of Kafka-like
``((topic, partition, offset), raw)`` items, driven through :meth:`NativeMediator.split` with the raw archive
on (``pipeline.archive_raw`` defaults to true and ``meter run`` in the benchmark has a ClickHouse store), then
each shard's bundle through its ``_ShardLogic`` (:meth:`NativeMeters.fold_bundle_parts`), as
:func:`benchmarks.native_core.run_native_flow` does. The clocks are fixed (``ingested_at`` included), so every
output is the same from run to run: ``--digest`` prints a SHA-256 of the bundles (their pickles), dead letters,
archive bytes and emitted rows/alerts, to check that a change to the native code keeps them identical (it
runs itself again with ``PYTHONHASHSEED=0``: some outputs follow a set's order).

The workload is cached (``--cache``, a pickle of the configuration text and lines) so that a run under
valgrind does not generate it again (``--prepare`` only writes the cache). Instruction counts (repeatable on a
noisy machine): the whole process under callgrind, then the inclusive counts of the extension's calls
(``Mediator.run``, ``.archive``, ``.take``, ``BatchCore.fold_bundle``)::

    python -m benchmarks.mediate_profile --events 20000 --prepare
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
        .venv/bin/python -m benchmarks.mediate_profile --events 20000 --repeat 1 [--split-only]
    callgrind_annotate --threshold=100 --inclusive=yes /tmp/cg.out \
        | grep -E 'pymethods.rs:meterflow_native::.*__pymethod_(run|archive|take|fold_bundle)__'
    callgrind_annotate --inclusive=yes /tmp/cg.out | grep native/src | head -30   # the hot functions

(build with ``CARGO_PROFILE_RELEASE_DEBUG=true .venv/bin/maturin develop --release -m native/Cargo.toml`` for
line-level annotation). Wall time, best of ``--repeat`` passes of split and fold::

    python -m benchmarks.mediate_profile --events 300000 --repeat 5 [--digest]

To compare two builds on this machine, copy each build's ``site-packages/meterflow_native`` directory aside
(``/tmp/old/meterflow_native``, ``/tmp/new/meterflow_native``) and alternate ``PYTHONPATH=/tmp/old`` and
``PYTHONPATH=/tmp/new`` runs (the same digest, then the best of each).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

NOW = 1_793_500_000_000  # a fixed wall clock (2026-11-01T02:40Z): after the workload's events
TOPIC = "bench.events"


def fix_clock() -> None:
    """The wall clock fixed at NOW for every meterflow module (ingested_at, the dead letters' received_at, the
    alerts' detected_at): the outputs repeat."""
    import meterflow.base.timeutil as tu

    tu.now_ms = lambda: NOW  # (before the modules that import it by name)
    for name, mod in list(sys.modules.items()):
        if name.startswith("meterflow.") and getattr(mod, "now_ms", None) is not None:
            mod.now_ms = lambda: NOW  # type: ignore[attr-defined]


def workload(events: int, customers: int, batch: int, cache: Optional[Path]) -> Tuple[Any, List[List[Any]]]:
    """(config, batches) of the benchmark workload; cached in ``cache`` when given."""
    import tomllib

    from meterflow.schemas.config import parse_config

    if cache is not None and cache.exists():
        text, lines = pickle.loads(cache.read_bytes())
    else:
        from benchmarks.peers.meterflow import config_toml
        from benchmarks.workload import build_workload

        wl = build_workload(events, customers, 3)
        text, lines = config_toml(wl.rules, wl.subscribed), [v for _, v in wl.items]
        if cache is not None:
            cache.write_bytes(pickle.dumps((text, lines)))
    text = text.replace("[pipeline]\n", '[pipeline]\ncore = "native"\n', 1)
    cfg = parse_config(tomllib.loads(text), "bench", environ={})
    n = len(lines)
    # two partitions, as the benchmark's topic: offsets per partition
    batches = [[((TOPIC, (i + j) % 2, (i + j) // 2), lines[i + j]) for j in range(min(batch, n - i))]
               for i in range(0, n, batch)]
    return cfg, batches


def run(cfg: Any, batches: List[List[Any]], archive: bool, digest: Optional[Any], fold: bool = True
        ) -> Dict[str, float]:
    """One pass: a fresh NativeMediator and shards over every batch (``fold``: the bundles folded too); seconds
    in split and in the folds."""
    from meterflow.base.stats import FlowStats
    from meterflow.dataflows.metering import _ShardLogic
    from meterflow.operators import native
    from meterflow.operators.rules import Rules

    fix_clock()
    rules = Rules(cfg)
    mediator = native.NativeMediator(cfg, FlowStats(), clock=lambda: NOW)
    make = native.NativeMeters.factory(cfg)
    logics: Dict[str, Any] = {}
    tick = [0]  # the shards' clock: a flush tick due every 50 batches
    split_s = fold_s = 0.0
    for n, b in enumerate(batches):
        tick[0] = n // 50 * rules.flush_ms
        t0 = time.perf_counter()
        keyed, dead, raw = mediator.split(b, archive)
        t1 = time.perf_counter()
        split_s += t1 - t0
        if digest is not None:
            for shard, bundle in keyed:
                digest.update(shard.encode())
                digest.update(pickle.dumps(bundle))
            digest.update(repr(dead).encode())
            digest.update(repr(raw).encode())
        t1 = time.perf_counter()
        for shard, bundle in keyed if fold else ():
            logic = logics.get(shard)
            if logic is None:
                logic = logics[shard] = _ShardLogic(rules, cfg.pipeline.shards, None, False, mediator,
                                                    clock=lambda: tick[0], native=make())
            out = logic.on_batch([bundle])[0]
            if digest is not None:
                digest.update(repr(out).encode())
        fold_s += time.perf_counter() - t1
    for logic in logics.values():
        out = logic.on_eof()[0]
        if digest is not None:
            digest.update(repr(out).encode())
    return {"split_s": split_s, "fold_s": fold_s}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--customers", type=int, default=2000, help="per tenant (3 tenants), as python -m benchmarks")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-archive", action="store_true", help="archive_raw off")
    ap.add_argument("--split-only", action="store_true", help="NativeMediator.split alone (no folds)")
    ap.add_argument("--digest", action="store_true", help="print a SHA-256 of every output (first pass)")
    ap.add_argument("--cache", default=None, help="workload cache (default /tmp/mediate_profile-<events>.pkl)")
    ap.add_argument("--prepare", action="store_true", help="only build the workload cache")
    args = ap.parse_args(argv)
    if args.digest and os.environ.get("PYTHONHASHSEED") != "0":  # (set iteration orders in the outputs)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.mediate_profile", *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    cache = Path(args.cache or f"/tmp/mediate_profile-{args.events}-{args.customers}.pkl")
    fix_clock()
    cfg, batches = workload(args.events, args.customers, args.batch, cache)
    if args.prepare:
        print(f"cached {sum(map(len, batches)):,} events in {cache}")
        return 0
    best: Dict[str, float] = {}
    for r in range(args.repeat):
        h = hashlib.sha256() if args.digest and r == 0 else None
        got = run(cfg, batches, not args.no_archive, h, not args.split_only)
        if h is not None:
            print(f"digest {h.hexdigest()}")
        best = {k: min(v, best.get(k, v)) for k, v in got.items()}
    n = sum(map(len, batches))
    print(f"{n:,} events, best of {args.repeat}: split {best['split_s'] * 1e3:.1f} ms "
          f"({best['split_s'] / n * 1e9:.0f} ns/event), fold {best['fold_s'] * 1e3:.1f} ms "
          f"({best['fold_s'] / n * 1e9:.0f} ns/event)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
