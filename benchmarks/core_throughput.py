"""In-process core throughput: decode -> validate -> dedupe -> aggregate, no Bytewax, no sinks.

Generates a realistic stream (skewed customers, duplicates, late, corrections,
bad events) in memory, then times the same operators the dataflow runs
(`Mediator` per batch, one `CustomerMeter` per key) and prints events/s, the
per-batch latency percentiles and peak memory. A baseline in the same process,
a bare ``msgspec`` decode of every line, puts the figure in proportion on a
noisy machine.

    python -m benchmarks.core_throughput --events 1000000
    python -m benchmarks.core_throughput --events 300000 --prices none,every,spend   # the Rate stage's cost, A/B
    python -m benchmarks.core_throughput --events 300000 --prices none,anomaly       # anomaly alerts' cost, A/B

``--prices`` runs the core once per variant over the same events in the same process, alternating, so their
ratio is measured on the same machine load: ``none`` is the sample configuration of earlier builds (api_calls
and tokens rated from overage_rate), ``every`` a price card on every metric (tiered, volume, package,
staircase, per_unit with a minimum: ``meterflow.sample.PRICE_CARDS``), ``spend`` also spend thresholds on each,
``anomaly`` the ``none`` configuration with anomaly alerts for two metrics (api_calls, a count, and tokens, a sum).
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

PRICE_VARIANTS = ("none", "every", "spend", "anomaly")
# [anomaly] for two metrics of the sample (a count and a sum), as the demo configures it.
ANOMALY_TOML = ('\n[anomaly]\nfactor = 3.0\nbaseline_days = 30\nmin_history_days = 7\n'
                'metrics = ["api_calls", "tokens"]\n')


def bench_config(customers: int, prices: str = "none"):
    """The sample configuration for the benchmark's customers, with the price variant ``prices``."""
    import tomllib

    tenants = tenant_ids(3)
    subscribed = {t: customer_ids(customers // 2) for t in tenants}
    priced = {} if prices in ("none", "anomaly") else {"prices": prices}  # "none": the call of earlier builds
    toml = sample_config_toml(tenants, subscribed, "2026-11-01T00:00:00Z", **priced)
    if prices == "anomaly":
        toml += ANOMALY_TOML
    return parse_config(tomllib.loads(toml), "bench", environ={})


def build(n: int, batch: int, customers: int, span_ms: int = 2 * 3_600_000):
    start = 1_793_491_200_000  # 2026-11-01T00:00:00Z
    cfg = bench_config(customers)
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
        self.spend_alerts = 0

    def feed(self, batch) -> None:
        meters = self.meters
        for key, events in self.mediator(batch).groups.items():
            m = meters.get(key)
            if m is None:
                m = meters[key] = CustomerMeter(self.rules, key, stats=self.stats)
            em = m.process([events], flush=False)
            if em.alerts:
                self.spend_alerts += sum(a.type == "spend_crossed" for a in em.alerts)


def run_core(cfg, batches, flush_every: int = 50) -> Dict[str, float]:
    core = Core(cfg)
    stats, meters = core.stats, core.meters
    lat: List[float] = []
    rows = rated = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for b in batches:
        bt = time.perf_counter()
        core.feed(b)
        if (len(lat) + 1) % flush_every == 0:  # the dataflow flushes changed rows once per flush_interval
            for m in meters.values():
                if m.has_dirty():
                    em = m.flush()
                    rows += len(em.windows) + len(em.periods)
                    rated += len(getattr(em, "rated", None) or ())
        lat.append(time.perf_counter() - bt)
    for m in meters.values():  # the last tick: every row changed since the previous one leaves (and is rated)
        if m.has_dirty():
            em = m.flush()
            rows += len(em.windows) + len(em.periods)
            rated += len(getattr(em, "rated", None) or ())
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    lat.sort()
    c = stats.snapshot()
    return {"seconds": dt, "cpu_seconds": cpu, "events": c["read"], "rows": rows, "rated": rated,
            "accepted": c["accepted"], "alerts": c.get("alerts", 0), "spend_alerts": core.spend_alerts,
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
    ap.add_argument("--prices", default="none", metavar="V[,V...]",
                    help="price variants of the sample plan, each timed over the same events: none (the sample "
                    "configuration of earlier builds), every (a price card on every metric), spend (and spend "
                    "thresholds on each), anomaly (none with anomaly alerts on two metrics); default none")
    ap.add_argument("--rounds", type=int, default=None,
                    help="passes over the variants, alternating (default 1 for one variant, 2 for several); the "
                    "best pass of each variant is reported")
    args = ap.parse_args()
    variants = [v.strip() for v in args.prices.split(",") if v.strip()]
    bad = [v for v in variants if v not in PRICE_VARIANTS]
    if bad or not variants:
        ap.error(f"--prices: expected some of {', '.join(PRICE_VARIANTS)}, got {args.prices!r}")
    rounds = args.rounds or (1 if len(variants) == 1 else 2)
    t = time.perf_counter()
    cfg, lines, batches = build(args.events, args.batch, args.customers)
    cfgs = {v: bench_config(args.customers, v) for v in variants}
    print(f"generated {len(lines):,} events in {time.perf_counter() - t:.1f}s "
          f"({args.customers} customers x 3 tenants, batch {args.batch})")
    tune_gc()
    base = run_decode_baseline(lines)
    floor = min(run_python_floor(lines, cfg) for _ in range(2))  # best of two, as the decode baseline
    rss_before = _rss_mib()
    best: Dict[str, Dict[str, float]] = {}
    passes: Dict[str, List[float]] = {v: [] for v in variants}
    cpu_best: Dict[str, float] = {}
    for _ in range(rounds):
        for v in variants:
            r = run_core(cfgs[v], batches)
            passes[v].append(r["events"] / r["seconds"])
            cpu_best[v] = min(cpu_best.get(v, float("inf")), r["cpu_seconds"])
            if v not in best or r["seconds"] < best[v]["seconds"]:
                best[v] = r
    rss_after = _rss_mib()
    print(f"baseline  msgspec decode only : {len(lines) / base:>12,.0f} events/s")
    print(f"floor     decode+dedupe+1 dict update per metric (any per-event Python loop): "
          f"{len(lines) / floor:>12,.0f} events/s")
    ref_eps = ref_cpu = None
    for v in variants:
        r = best[v]
        eps = r["events"] / r["seconds"]
        ref_eps = ref_eps or eps
        label = "core" if len(variants) == 1 else f"core[{v}]"
        print(f"{label:<12}decode->dedupe->agg : {eps:>12,.0f} events/s  ({eps / (len(lines) / base):.2f}x of "
              f"decode-only, {eps / (len(lines) / floor):.2f}x of the floor"
              + ("" if v == variants[0] else f", {eps / ref_eps:.3f}x of core[{variants[0]}]") + ")")
        if rounds > 1:
            print(f"            passes               : {', '.join(f'{x:,.0f}' for x in passes[v])} events/s")
        per_cpu = r["events"] / cpu_best[v]
        ref_cpu = ref_cpu or per_cpu
        print(f"            per CPU second       : {per_cpu:>12,.0f} events (best pass; process CPU time, steadier "
              "than wall time on a shared machine"
              + ("" if v == variants[0] else f"; {per_cpu / ref_cpu:.3f}x of core[{variants[0]}]") + ")")
        print(f"            per-batch latency    : p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
        print(f"            accepted {r['accepted']:,}  rows emitted {r['rows']:,}  rated rows {r['rated']:,}  "
              f"alerts {r['alerts']:,} (spend_crossed {r['spend_alerts']:,})")
    print(f"memory    RSS grew {rss_after - rss_before:,.0f} MiB while metering (state: dedupe ids, windows, "
          f"periods); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB incl. the "
          "in-memory input")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


if __name__ == "__main__":
    main()
