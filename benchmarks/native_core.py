"""The native core against the Python core (issue 16): decode -> validate -> dedupe -> aggregate, in process.

(``benchmarks.core_throughput`` is the Python core's benchmark with the Rate stage's price variants; this one
puts the native core beside it on the workload of ``python -m benchmarks``.)

Generates a realistic stream (skewed customers, duplicates, late, corrections,
bad events) in memory, then times the same operators the dataflow runs
(`Mediator` per batch, one `CustomerMeter` per key) and prints events/s, the
per-batch latency percentiles and peak memory. A baseline in the same process,
a bare ``msgspec`` decode of every line, puts the figure in proportion on a
noisy machine.

With ``--workload bench`` (the default) the stream and rules are those of ``python -m benchmarks``
(benchmarks/workload.py: count and sum metrics, a plan with thresholds) and the native core
(operators/native.py, when ``meterflow_native`` is built) runs on the same batches, so one run prints
msgspec decode alone, the Python core and the native core, with their ratios. The native core does
mediation, dedupe and the folds, not the entitlement checks the Python core also runs (not native in
NativeBatchCore); the line after it is the native path with threshold detection (:func:`run_native_flow`:
NativeMediator.split -> each shard's NativeMeters.fold_bundle, every customer with thresholds, its alerts
compared with the Python core's), the figure for the goal's decode -> ... -> threshold detection.
``--aggs`` adds max, min, latest, unique_count and p95 metrics of the same events' tokens (seven metrics
instead of two) to the bench workload. ``--workload sample`` is the richer sample
configuration (group_by, unique_count, p95, latest), Python core only.

``--flow`` (bench workload) also runs the whole dataflow in process (``build_flow`` over ``TestingSource``,
1 worker, recovery off, outputs discarded) with ``pipeline.core = "python"`` and ``"native"``, twice: as
configured (every customer has thresholds: the native fold stops at the events that reach a level, where
Python checks them) and with the subscriptions left out (no customer evaluates anything). It prints events/s
and CPU seconds per million events of each, and checks that both cores emit the same final rows and the same
alerts (id, type, event_id, usage).

    python -m benchmarks.native_core --events 300000 [--flow]
    python -m benchmarks.native_core --events 300000 --shards 256,64,16   # the per-shard cost of a batch
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any, Dict, List

from benchmarks.core_throughput import _rss_mib, build, run_core, run_decode_baseline, run_python_floor
from meterflow.base.gc_tuning import tune_gc
from meterflow.base.stats import FlowStats
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config

# --aggs: the aggregations that are not additive, over the same events (tokens of every api_call)
_AGG_METRICS = "".join(f'[[metrics]]\ncode = "{agg}_tokens"\nevent_type = "api_call"\naggregation = "{agg}"\n'
                       f'property = "tokens"\n\n' for agg in ("max", "min", "latest", "unique_count", "p95"))


STREAM_NOW = 1_793_491_200_000 + 86_400_000  # the wall clock of the native runs: a day after the stream starts (the
# clock-skew rule admits every event)


def build_bench(n: int, batch: int, customers: int, aggs: bool = False):
    """The workload of ``python -m benchmarks`` (benchmarks/workload.py) and its meterflow configuration
    (``aggs``: with the metrics of :data:`_AGG_METRICS` too)."""
    import tomllib

    from benchmarks.peers.meterflow import config_toml
    from benchmarks.workload import build_workload

    wl = build_workload(n, customers, 3)
    text = config_toml(wl.rules, wl.subscribed)
    if aggs:
        text = text.replace("[[plans]]", _AGG_METRICS + "[[plans]]", 1)
    cfg = parse_config(tomllib.loads(text), "bench", environ={})
    lines = [v for _, v in wl.items]
    batches = [[(("bench", i + j), lines[i + j]) for j in range(min(batch, n - i))] for i in range(0, n, batch)]
    return cfg, lines, batches


def run_native(cfg, batches, now: int) -> Dict[str, float]:
    """The native core over the batches (a fresh state): seconds, events, rows returned, accepted."""
    from meterflow.operators.native import NativeBatchCore

    core = NativeBatchCore(cfg, clock=lambda: now)
    rows = 0
    lat: List[float] = []
    t0 = time.perf_counter()
    for b in batches:
        bt = time.perf_counter()
        out = core.process(b)
        rows += len(out.windows) + len(out.periods)
        lat.append(time.perf_counter() - bt)
    dt = time.perf_counter() - t0
    lat.sort()
    c = core.counters()
    return {"seconds": dt, "events": sum(len(b) for b in batches), "rows": rows, "accepted": c["accepted"],
            "python_path": c["python_path"], "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "seen_bytes": core._core.dedupe_bytes(),
            "tracked_ids": core._core.tracked_ids(), "customers": core._core.customers()}


def run_native_flow(cfg, batches, now: int, flush_every: int = 50) -> Dict[str, Any]:
    """The real native path of one worker in process, thresholds included (every customer of the bench workload
    has them): :meth:`NativeMediator.split` over each batch, then each shard's bundle to that shard's
    ``_ShardLogic`` (dataflows/metering.py) with its :class:`NativeMeters`, called directly: customers admitted
    as the flow admits them, folded by :meth:`NativeMeters.fold_bundle` with the threshold checks at the events
    that reach a level, alerts from their ``CustomerMeter``. No Bytewax runtime, no sinks (outputs counted, then
    dropped), recovery off. The shards' clock makes a flush tick due every ``flush_every`` batches (the cadence
    of :func:`benchmarks.core_throughput.run_core`) and ``on_eof`` ends the run (sync, the last flush, rows the
    watermark closed leave final). Seconds, CPU seconds, events, alerts by type, the threshold alerts as the
    benchmark's alert keys (``benchmarks.peers.common.alert_key``, sorted: the workload's ``expected_alerts``),
    rows emitted, dead letters, and the customers folded natively and on Python (as ``FOLD_TALLY`` counts them)."""
    import msgspec

    from benchmarks.peers.common import alert_key
    from meterflow.base.timeutil import parse_rfc3339_ms
    from meterflow.dataflows.metering import _ShardLogic
    from meterflow.operators.native import FOLD_TALLY, NativeMediator, NativeMeters

    cfg = msgspec.structs.replace(cfg, pipeline=msgspec.structs.replace(cfg.pipeline, core="native"))
    rules = Rules(cfg)
    rules.gateway_states = cfg.redis is not None  # as build_flow sets it
    shards = cfg.pipeline.shards
    tick = [0]
    interval = rules.flush_ms
    mediator = NativeMediator(cfg, FlowStats(), clock=lambda: now)
    make = NativeMeters.factory(cfg)
    logics: Dict[str, Any] = {}
    alerts: Dict[str, int] = {}
    crossed: List[Any] = []
    rows = dead = 0
    tally0 = FOLD_TALLY.snapshot()

    def take(emissions: List[Any]) -> None:
        nonlocal rows, dead
        for em in emissions:
            rows += len(em.windows) + len(em.periods)
            dead += len(em.dead_letters)
            for a in em.alerts:
                alerts[a.type] = alerts.get(a.type, 0) + 1
                if a.type == "threshold_crossed":
                    crossed.append(a)

    c0, t0 = time.process_time(), time.perf_counter()
    for n, b in enumerate(batches):
        tick[0] = (n // flush_every) * interval  # a tick is due at batch 0, flush_every, 2 * flush_every, ...
        keyed, dl, _raw = mediator.split(b, False)
        dead += len(dl)
        for shard, bundle in keyed:
            logic = logics.get(shard)
            if logic is None:
                logic = logics[shard] = _ShardLogic(rules, shards, None, False, mediator, clock=lambda: tick[0],
                                                    native=make())
            take(logic.on_batch([bundle])[0])
    for logic in logics.values():
        take(logic.on_eof()[0])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tally = FOLD_TALLY.snapshot()
    keys = sorted({alert_key(f"{a.tenant_id}|{a.customer_id}", a.metric, parse_rfc3339_ms(a.period_start),
                             float(a.threshold_pct)) for a in crossed})
    return {"seconds": dt, "cpu_seconds": cpu, "events": sum(len(b) for b in batches), "alerts": alerts,
            "threshold_alerts": keys, "rows": rows, "dead_letters": dead,
            "folded_native": tally.get("native", 0) - tally0.get("native", 0),
            "folded_python": tally.get("python", 0) - tally0.get("python", 0),
            "evaluated": sum(len(lg._native.evaluated) for lg in logics.values())}


def run_shard_counts(args: argparse.Namespace, counts: List[int]) -> None:
    """:func:`run_native_flow` over the bench workload at each ``pipeline.shards`` count, ``args.rounds``
    alternating rounds (a noisy machine moves all counts of a round alike): events/s, CPU and the shard calls."""
    import msgspec

    from meterflow.operators.native import AVAILABLE

    if not AVAILABLE:
        print("native    not built (./dev setup builds meterflow_native when cargo is installed)")
        return
    cfg, lines, batches = build_bench(args.events, args.batch, args.customers, args.aggs)
    tune_gc()
    now = STREAM_NOW
    best: Dict[int, float] = {}
    for rnd in range(1, args.rounds + 1):
        for n in counts:
            c = msgspec.structs.replace(cfg, pipeline=msgspec.structs.replace(cfg.pipeline, shards=n))
            r = run_native_flow(c, batches, now)
            eps = r["events"] / r["seconds"]
            best[n] = max(best.get(n, 0.0), eps)
            print(f"round {rnd}  shards {n:>5}: {eps:>10,.0f} events/s {r['cpu_seconds'] / r['events'] * 1e6:5.2f} "
                  f"CPU s/M, {r['alerts'].get('threshold_crossed', 0):,} threshold alerts, {r['rows']:,} rows",
                  flush=True)
    base = best[counts[0]]
    print("best of each: " + ", ".join(f"{n} shards {e:,.0f} events/s ({e / base:.2f}x of {counts[0]})"
                                       for n, e in best.items()))


def dedupe_table_figures(sizes=(10_000, 100_000, 1_000_000), repeat: int = 3) -> List[Dict[str, float]]:
    """The native dedupe table against ``HashMap<u64, u64>`` (what BatchCore held before) in one table of n
    random fingerprints, natively (``meterflow_native.bench_dedupe``): ns per check (new ids, growth included;
    then all of them again, duplicates) and bytes per id (slots and side structures at the table's real load),
    each time the best of ``repeat``."""
    import meterflow_native

    out = []
    for n in sizes:
        runs = [meterflow_native.bench_dedupe(n, seed) for seed in range(1, repeat + 1)]
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        out.append(best)
    return out


def run_resume(customers: int, rounds: int = 3) -> Dict[str, float]:
    """One shard resumed from a snapshot of ``customers`` customers (5 events each, in 5 hourly windows, on the
    bench workload's count and sum metrics, no subscription), on each core, best of ``rounds``: seconds of
    ``_ShardLogic`` construction, which decodes every customer's snapshot and, on the native core, loads each into
    the native fold (:meth:`NativeMeters.load`)."""
    import json

    from meterflow.base.timeutil import now_ms
    from meterflow.dataflows.metering import _ShardLogic
    from meterflow.operators import native
    from meterflow.operators.mediate import Mediator, bundle_shards

    cfg, _, _ = build_bench(1000, 1000, 10)
    tenant = cfg.tenants[0].id
    base = now_ms() - 40 * 86_400_000
    lines = [(("in", n), json.dumps({"event_id": f"e{c}-{e}", "tenant_id": tenant, "customer_id": f"resume{c}",
                                     "event_type": "api_call", "timestamp": base + e * 3_600_000,
                                     "properties": {"tokens": e + 0.5}}).encode())
             for n, (c, e) in enumerate((c, e) for c in range(customers) for e in range(5))]
    med = Mediator(cfg, FlowStats())
    logic = _ShardLogic(Rules(cfg), 1, None, True, med)
    for i in range(0, len(lines), 5000):
        logic.on_batch([b for _, b in bundle_shards(med(lines[i:i + 5000]).groups, 1)])
    state = logic.snapshot()
    out: Dict[str, float] = {}
    for core in ("python", "native"):
        if core == "native" and not native.AVAILABLE:
            continue
        best, loaded = 1e9, 0
        for _ in range(rounds):
            nm = native.NativeMeters(cfg) if core == "native" else None
            t = time.perf_counter()
            _ShardLogic(Rules(cfg), 1, state, True, Mediator(cfg, FlowStats()), native=nm)
            best = min(best, time.perf_counter() - t)
            loaded = nm.loaded if nm is not None else 0
        out[core] = best
        print(f"resume    {core:6} core: {customers:,} customers from one shard's snapshot in {best * 1e3:,.0f} ms"
              + (f" ({loaded:,} loaded into the native fold)" if core == "native" else ""))
    if "native" in out:
        print(f"          the native load adds {(out['native'] - out['python']) * 1e3:,.0f} ms "
              f"({(out['native'] - out['python']) / customers * 1e6:,.0f} us per customer)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=4096, help="events per batch (a Kafka/JSONL read)")
    ap.add_argument("--customers", type=int, default=2000)
    ap.add_argument("--workload", choices=("bench", "sample"), default="bench",
                    help="bench: benchmarks/workload.py (count+sum, also run natively); sample: the sample config")
    ap.add_argument("--flow", action="store_true",
                    help="also run the whole dataflow in process with pipeline.core python and native")
    ap.add_argument("--aggs", action="store_true",
                    help="bench workload plus max, min, latest, unique_count and p95 metrics of the tokens")
    ap.add_argument("--shards", default="", metavar="N,M,...",
                    help="only the native path with threshold detection (run_native_flow) at each of these "
                         "pipeline.shards counts, in alternating rounds (the per-shard cost of a batch)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --shards")
    ap.add_argument("--resume", type=int, default=0, metavar="N",
                    help="only time a shard's resume of N customers from a snapshot, on each core (the native one "
                         "loads every customer back into the native fold)")
    args = ap.parse_args()
    if args.resume:
        run_resume(args.resume)
        return
    if args.shards:
        run_shard_counts(args, [int(x) for x in args.shards.split(",")])
        return
    t = time.perf_counter()
    if args.workload == "bench":
        cfg, lines, batches = build_bench(args.events, args.batch, args.customers, args.aggs)
    else:
        cfg, lines, batches = build(args.events, args.batch, args.customers)
    print(f"generated {len(lines):,} events in {time.perf_counter() - t:.1f}s "
          f"({args.customers} customers x 3 tenants, batch {args.batch}, workload {args.workload})")
    tune_gc()
    base = run_decode_baseline(lines)
    floor = min(run_python_floor(lines, cfg) for _ in range(2))  # best of two, as the decode baseline
    rss_before = _rss_mib()
    r = run_core(cfg, batches)
    rss_after = _rss_mib()
    eps = r["events"] / r["seconds"]
    print(f"baseline  msgspec decode only : {len(lines) / base:>12,.0f} events/s")
    print(f"floor     decode+dedupe+1 dict update per metric (any per-event Python loop): "
          f"{len(lines) / floor:>12,.0f} events/s")
    print(f"core      decode->dedupe->agg : {eps:>12,.0f} events/s  ({eps / (len(lines) / base):.2f}x of decode-only, "
          f"{eps / (len(lines) / floor):.2f}x of the floor)")
    print(f"          per-batch latency    : p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
    print(f"          accepted {r['accepted']:,}  rows emitted {r['rows']:,}")
    if args.workload == "bench":
        _print_native(cfg, batches, len(lines) / base, eps, r)
        if args.flow:
            _print_flows(cfg, batches)
    print(f"memory    RSS grew {rss_after - rss_before:,.0f} MiB while metering (state: dedupe ids, windows, "
          f"periods); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB incl. the "
          "in-memory input")


def _print_native(cfg, batches, decode_eps: float, python_eps: float, py: Dict[str, float]) -> None:
    from meterflow.operators.native import AVAILABLE, unsupported

    if not AVAILABLE:
        print("native    not built (./dev setup builds meterflow_native when cargo is installed)")
        return
    why = unsupported(cfg)
    if why:
        print(f"native    cannot run this configuration: {why}")
        return
    now = STREAM_NOW
    best = min((run_native(cfg, batches, now) for _ in range(2)), key=lambda x: x["seconds"])  # as the baseline
    eps = best["events"] / best["seconds"]
    print(f"native    decode->dedupe->agg : {eps:>12,.0f} events/s  ({eps / decode_eps:.2f}x of decode-only, "
          f"{eps / python_eps:.2f}x of the Python core; no entitlement checks yet)")
    print(f"          per-batch latency    : p50 {best['p50_ms']:.2f} ms  p99 {best['p99_ms']:.2f} ms")
    print(f"          accepted {best['accepted']:,} (Python core {py['accepted']:,}); {best['python_path']:,} "
          f"events through the Python path; rows returned {best['rows']:,} (every batch's changed rows)")
    flow = min((run_native_flow(cfg, batches, now) for _ in range(2)), key=lambda x: x["seconds"])
    feps = flow["events"] / flow["seconds"]
    got = flow["alerts"].get("threshold_crossed", 0)
    print(f"native    + threshold detection: {feps:>12,.0f} events/s {flow['cpu_seconds'] / flow['events'] * 1e6:5.2f} "
          f"CPU s/M ({feps / decode_eps:.2f}x of decode-only, {feps / python_eps:.2f}x of the Python core): "
          "NativeMediator.split -> each shard's _ShardLogic with NativeMeters.fold_bundle, a flush tick every 50 "
          "batches and at the end, no Bytewax, no sinks")
    print(f"          {got:,} threshold alerts (Python core {py['alerts']:,}"
          f"{', same count' if got == py['alerts'] else ', COUNT DIFFERS'}); {flow['folded_native']:,} customers "
          f"folded natively ({flow['evaluated']:,} of them evaluating thresholds), {flow['folded_python']:,} on Python")
    import meterflow_native

    ids, struct = best["tracked_ids"], meterflow_native.IdTable().nbytes()  # (an empty table: its struct alone)
    print(f"          dedupe: {ids:,} ids tracked in {best['customers']:,} customers' tables, "
          f"{best['seen_bytes'] / max(ids, 1):.1f} B per id with each table's fixed cost "
          f"({(best['seen_bytes'] - best['customers'] * struct) / max(ids, 1):.1f} B without the {struct} B "
          "struct per table)")
    for f in dedupe_table_figures():
        per = f["table_bytes"] / f["ids"]
        print(f"native    dedupe table, {f['ids']:>9,} ids in one table: {per:5.1f} B per id, "
              f"new {f['table_new_ns']:5.1f} ns, duplicate {f['table_dup_ns']:5.1f} ns per check; HashMap<u64, u64> "
              f"{f['hashmap_bytes'] / f['ids']:5.1f} B per id, new {f['hashmap_new_ns']:5.1f} ns, duplicate "
              f"{f['hashmap_dup_ns']:5.1f} ns")


class _Collect:
    """A sink keeping each row's latest value (what a store of upserts ends with)."""

    def __init__(self) -> None:
        self.rows: Dict[tuple, tuple] = {}
        self.alerts: Dict[str, tuple] = {}

    def sink(self):
        from bytewax.outputs import DynamicSink, StatelessSinkPartition

        rows, alerts = self.rows, self.alerts

        class _Part(StatelessSinkPartition):
            def write_batch(self, items) -> None:
                for em in items:
                    for r in em.periods:
                        k = (r.tenant_id, r.customer_id, r.metric, r.period_start)
                        if k not in rows or rows[k][0] <= r.version:
                            rows[k] = (r.version, r.value, r.events, r.final)
                    for a in em.alerts:
                        alerts[a.alert_id] = (a.type, a.event_id, a.usage)

        class _Sink(DynamicSink):
            def build(self, step_id, worker_index, worker_count):
                return _Part()

        return _Sink()


def run_flow(cfg, batches, core: str) -> Dict[str, Any]:
    """The whole dataflow in process, one worker: wall and CPU seconds, and the final period rows."""
    import msgspec
    from bytewax.testing import TestingSource, run_main

    from meterflow.dataflows.metering import build_flow

    cfg = msgspec.structs.replace(cfg, pipeline=msgspec.structs.replace(cfg.pipeline, core=core))
    items = [it for b in batches for it in b]
    out = _Collect()
    flow = build_flow(cfg, TestingSource(items, batch_size=len(batches[0])), [("out", out.sink())],
                      recoverable=False)
    c0, t0 = time.process_time(), time.perf_counter()
    run_main(flow)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "rows": out.rows,
            "alerts": out.alerts}


def _print_flows(cfg, batches) -> None:
    import msgspec

    from meterflow.operators.native import native_problem

    why = native_problem(cfg)
    if why:
        print(f"flow      native cannot run: {why}")
        return
    n = sum(len(b) for b in batches)
    bare = msgspec.structs.replace(cfg, subscriptions=[])
    for label, c in (("as configured (thresholds checked at their levels)", cfg),
                     ("no subscriptions (nothing evaluated)", bare)):
        py = run_flow(c, batches, "python")
        nat = run_flow(c, batches, "native")
        same = "same final rows" if py["rows"] == nat["rows"] else "ROWS DIFFER"
        same += ", same alerts" if py["alerts"] == nat["alerts"] else ", ALERTS DIFFER"
        print(f"flow      {label}: python {n / py['seconds']:>10,.0f} events/s {py['cpu'] / n * 1e6:5.1f} CPU s/M; "
              f"native {n / nat['seconds']:>10,.0f} events/s {nat['cpu'] / n * 1e6:5.1f} CPU s/M "
              f"({py['seconds'] / nat['seconds']:.2f}x); {same} ({len(py['rows']):,} period rows, "
              f"{len(py['alerts']):,} alerts)")


if __name__ == "__main__":
    main()
