"""In-process core throughput: decode -> validate -> dedupe -> aggregate, no Bytewax, no sinks.

Generates a realistic stream (skewed customers, duplicates, late, corrections,
bad events) in memory, then times the same operators the dataflow runs
(`Mediator` per batch, one `CustomerMeter` per key) and prints events/s, the
per-batch latency percentiles and peak memory. A baseline in the same process,
a bare ``msgspec`` decode of every line, puts the figure in proportion on a
noisy machine.

    python -m benchmarks.core_throughput --events 1000000
    python -m benchmarks.core_throughput --anomaly ab   # anomaly alerts off and on (api_calls, tokens), interleaved
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Dict, List

from meterflow.base.gc_tuning import tune_gc
from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.sample import customer_ids, generate_events, sample_config_toml, tenant_ids
from meterflow.schemas.config import parse_config
from meterflow.schemas.events import EVENT_DECODER

# [anomaly] for two metrics of the sample (a count and a sum), as the demo configures it.
ANOMALY_TOML = ('\n[anomaly]\nfactor = 3.0\nbaseline_days = 30\nmin_history_days = 7\n'
                'metrics = ["api_calls", "tokens"]\n')


def build(n: int, batch: int, customers: int, span_ms: int = 2 * 3_600_000, anomaly: bool = False):
    import tomllib

    start = 1_793_491_200_000  # 2026-11-01T00:00:00Z
    tenants = tenant_ids(3)
    toml = sample_config_toml(tenants, {t: customer_ids(customers // 2) for t in tenants}, "2026-11-01T00:00:00Z")
    cfg = parse_config(tomllib.loads(toml + (ANOMALY_TOML if anomaly else "")), "bench", environ={})
    lines = list(generate_events(n, tenants=3, customers=customers, start_ms=start, span_ms=span_ms))
    batches = [[(("bench", i + j), lines[i + j]) for j in range(min(batch, n - i))] for i in range(0, n, batch)]
    return cfg, lines, batches


class Core:
    """The operators the dataflow runs for one worker, without Bytewax: mediation, then one
    :class:`CustomerMeter` per key (changed rows kept pending, as between flush ticks)."""

    def __init__(self, cfg) -> None:
        self.rules = Rules(cfg)
        self.rules.gateway_states = cfg.redis is not None  # as the dataflow sets it: no Redis sink, no gateway state
        self.stats = FlowStats()
        self.mediator = Mediator(cfg, self.stats)
        self.meters: Dict[str, CustomerMeter] = {}

    def feed(self, batch) -> None:
        meters = self.meters
        for key, events in self.mediator(batch).groups.items():
            m = meters.get(key)
            if m is None:
                m = meters[key] = CustomerMeter(self.rules, key, stats=self.stats)
            m.process([events], flush=False)


def run_core(cfg, batches, flush_every: int = 50) -> Dict[str, float]:
    core = Core(cfg)
    stats, meters = core.stats, core.meters
    lat: List[float] = []
    rows = 0
    t0 = time.perf_counter()
    for b in batches:
        bt = time.perf_counter()
        core.feed(b)
        if (len(lat) + 1) % flush_every == 0:  # the dataflow flushes changed rows once per flush_interval
            for m in meters.values():
                if m.has_dirty():
                    em = m.flush()
                    rows += len(em.windows) + len(em.periods)
        lat.append(time.perf_counter() - bt)
    dt = time.perf_counter() - t0
    lat.sort()
    c = stats.snapshot()
    return {"seconds": dt, "events": c["read"], "rows": rows, "accepted": c["accepted"],
            "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}


def run_decode_baseline(lines: List[bytes], passes: int = 2) -> float:
    """Seconds for a bare msgspec decode of every line: the best of ``passes`` (the first pass over the
    lines also pays for warming caches and the allocator)."""
    decode = EVENT_DECODER.decode
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for line in lines:
            try:
                decode(line)
            except Exception:
                pass
        best = min(best, time.perf_counter() - t0)
    return best


def run_python_floor(lines: List[bytes], cfg) -> float:
    """The least per-event Python any design of this work can do: decode, one dict lookup and insert for
    dedupe, one dict update per metric of the event (no timestamps, windows, periods, validation or
    entitlements). Its rate bounds what a per-event Python loop can reach on this machine."""
    rules = Rules(cfg)
    decode = EVENT_DECODER.decode
    by_type = {t: tuple(m.code for m in ms) for t, ms in rules.by_event_type.items()}
    seen: Dict[str, int] = {}
    totals: Dict[tuple, int] = {}
    t0 = time.perf_counter()
    for line in lines:
        try:
            ev = decode(line)
        except Exception:
            continue
        eid = ev.event_id
        if eid in seen:
            continue
        seen[eid] = 1
        codes = by_type.get(ev.event_type)
        if codes is None:
            continue
        cust = ev.customer_id
        for code in codes:
            k = (cust, code)
            totals[k] = totals.get(k, 0) + 1
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=4096, help="events per batch (a Kafka/JSONL read)")
    ap.add_argument("--customers", type=int, default=2000)
    ap.add_argument("--anomaly", choices=("off", "on", "ab"), default="off",
                    help="anomaly alerts for api_calls and tokens: off, on, or ab (both alternating, best of --rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="with --anomaly ab: runs of each variant")
    args = ap.parse_args()
    t = time.perf_counter()
    cfg, lines, batches = build(args.events, args.batch, args.customers, anomaly=args.anomaly == "on")
    if args.anomaly == "ab":
        return _ab(args, lines, batches, time.perf_counter() - t)
    print(f"generated {len(lines):,} events in {time.perf_counter() - t:.1f}s "
          f"({args.customers} customers x 3 tenants, batch {args.batch})")
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
    print(f"memory    RSS grew {rss_after - rss_before:,.0f} MiB while metering (state: dedupe ids, windows, "
          f"periods); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB incl. the "
          "in-memory input")


def _ab(args: argparse.Namespace, lines: List[bytes], batches: list, gen_s: float) -> None:
    """The core with anomaly alerts off and on, over the same events, alternating (so drift on a shared machine
    hits both), best of ``rounds`` each: the per-event cost of the anomaly check."""
    import tomllib

    tenants = tenant_ids(3)
    toml = sample_config_toml(tenants, {t: customer_ids(args.customers // 2) for t in tenants}, "2026-11-01T00:00:00Z")
    cfgs = {"off": parse_config(tomllib.loads(toml), "bench", environ={}),
            "on": parse_config(tomllib.loads(toml + ANOMALY_TOML), "bench", environ={})}
    print(f"generated {len(lines):,} events in {gen_s:.1f}s ({args.customers} customers x 3 tenants, "
          f"batch {args.batch}); anomaly off/on alternating, best of {args.rounds}")
    tune_gc()
    # CPU seconds of this process as well as wall seconds: on a machine shared with other work the CPU time is
    # the steadier measure of what the code costs.
    best = {v: [float("inf"), float("inf")] for v in ("off", "on")}
    for i in range(args.rounds):
        for variant in ("off", "on") if i % 2 == 0 else ("on", "off"):
            c0 = time.process_time()
            r = run_core(cfgs[variant], batches)
            cpu = time.process_time() - c0
            print(f"  round {i + 1} anomaly {variant:<3}: {r['events'] / r['seconds']:>10,.0f} events/s wall, "
                  f"{r['events'] / cpu:>10,.0f} events/CPU-s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
            best[variant] = [min(best[variant][0], r["seconds"]), min(best[variant][1], cpu)]
    n = len(lines)
    for k, what in ((0, "wall"), (1, "CPU")):
        off, on = n / best["off"][k], n / best["on"][k]
        print(f"core      best {what:<4}: anomaly off {off:>10,.0f} events/s, on (2 metrics) {on:>10,.0f} events/s "
              f"({(on / off - 1) * 100:+.1f} %)")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


if __name__ == "__main__":
    main()
