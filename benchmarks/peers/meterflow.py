"""meterflow as a contender: its configuration for the benchmark's rules, a Bytewax-process launcher, the
collection of its outputs, and the in-process core and state-memory figures.

* ``meterflow-1w`` / ``meterflow-1w-recovery`` run ``meter run --stop-at-end --json`` (the harness starts
  it); ``meterflow-2p`` runs ``python -m benchmarks.peers.meterflow process`` twice: each builds the same
  flow as ``python -m bytewax.run dataflows.metering:flow -a host:port;host:port -i N`` (``flow_from_config``
  then ``bytewax.run.cli_main`` with the addresses and process id, as ``meter run --addresses ... --process-id N``
  does), times it, and writes its counters. Both processes have the same configuration, so the same chDB
  path: process 0 alone writes it (README: Running a cluster).
* Totals come from what meterflow wrote, not from inside it: the ``usage.aggregated`` period records
  (highest ``version`` per row) and the ``threshold_crossed`` alerts on the alerts topic; for
  ``meterflow-2p`` the cluster's one ClickHouse store (``usage_by_period`` and ``alerts_log``, read by
  ``python -m benchmarks.peers.meterflow store`` in its own process: chDB opens one path per process).
* ``python -m benchmarks.peers.meterflow core`` times the in-process core (the operators the dataflow
  runs, no Kafka, no sinks; ``benchmarks.core_throughput.run_core``) on the same events and measures the
  keyed state with ``tracemalloc``: bytes freed when every customer's dedupe table is emptied (per tracked
  event id), and bytes held by all ``CustomerMeter`` objects (per customer); plus snapshot (pickle) bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.peers.common import FETCH_CONFIG, alert_key, clean_totals, total_key

ANCHOR = "2020-01-01T00:00:00Z"  # monthly periods on the 1st at 00:00 UTC: calendar months


def config_toml(rules: Dict[str, Any], subscribed: Sequence[str], *, bootstrap: Optional[str] = None,
                topics: Optional[Dict[str, str]] = None, chdb: Optional[str] = None) -> str:
    """The rules as a meterflow configuration: plan ``pro`` with the default quotas, and a custom contract
    (``overrides``) for every customer with its own quotas."""
    thresholds = ", ".join(f"{t:g}" for t in rules["thresholds"])
    out = ['[pipeline]\nrollup_window = "1h"\nlate_grace = "6h"\ndedupe_window = "24h"\n']
    for t, r in rules["tenants"].items():
        when = ", ".join(f"{k} = {json.dumps(v)}" for k, v in r["exclude_when"].items())
        out.append(f'[[tenants]]\nid = "{t}"\nexclude_when = {{ {when} }}\n'
                   f'excluded_customers = {json.dumps(r["excluded_customers"])}\n')
    out.append('[[metrics]]\ncode = "api_calls"\nevent_type = "api_call"\naggregation = "count"\n\n'
               '[[metrics]]\ncode = "tokens"\nevent_type = "api_call"\naggregation = "sum"\nproperty = "tokens"\n')
    out.append('[[plans]]\ncode = "pro"\n')
    for metric in ("api_calls", "tokens"):
        out.append(f'[plans.entitlements.{metric}]\nincluded = {rules["included"][metric]!r}\n'
                   f'thresholds = [{thresholds}]\nenforcement = "soft"\n')
    by_key = rules.get("included_by_key", {})
    for key in subscribed:
        tenant, _, customer = key.partition("|")
        sub = f'[[subscriptions]]\ntenant_id = "{tenant}"\ncustomer_id = "{customer}"\nplan = "pro"\n' \
              f'period = "month"\nanchor = "{ANCHOR}"\n'
        inc = by_key.get(key)
        if inc:
            sub += "overrides = { " + ", ".join(f"{m} = {{ included = {v!r} }}" for m, v in inc.items()) + " }\n"
        out.append(sub)
    if bootstrap:
        t = topics or {}
        fetch = ", ".join(f'"{k}" = "{v}"' for k, v in FETCH_CONFIG.items())
        out.append(f'[kafka]\nbootstrap_servers = "{bootstrap}"\nclient_config = {{ {fetch} }}\n' + "".join(
            f'{name}_topic = "{value}"\n' for name, value in t.items()))
    if chdb:
        out.append(f'[clickhouse]\ndsn = "chdb://{chdb}"\n')
    return "\n".join(out)


def topics_for(run: str, events_topic: str = "") -> Dict[str, str]:
    """Topics of one meterflow run (the entitlements topic does not exist: the config file applies)."""
    return {"events": events_topic, "aggregated": f"bench.{run}.aggregated", "alerts": f"bench.{run}.alerts",
            "dead_letter": f"bench.{run}.dead", "entitlements": f"bench.{run}.entitlements-none"}


def _read_topic(bootstrap: str, topic: str) -> List[bytes]:
    from benchmarks.peers.common import TopicReader

    try:
        reader = TopicReader(bootstrap, topic, to_end=True)
    except KeyError:
        return []
    out = [v for batch in reader.batches() for _k, v in batch if v]
    reader.close()
    return out


def collect_outputs(bootstrap: str, run: str) -> Tuple[Dict[str, float], List[str]]:
    """meterflow's billing-period totals (highest version per row) and threshold alerts, read back from Kafka."""
    import orjson

    from meterflow.base.timeutil import parse_rfc3339_ms

    t = topics_for(run)
    best: Dict[str, Tuple[int, float]] = {}
    for raw in _read_topic(bootstrap, t["aggregated"]):
        r = orjson.loads(raw)
        if r.get("type") != "period":
            continue
        k = total_key(f"{r['tenant_id']}|{r['customer_id']}", r["metric"], r["period_start"])
        if k not in best or r["version"] >= best[k][0]:
            best[k] = (r["version"], float(r["value"]))
    alerts = []
    for raw in _read_topic(bootstrap, t["alerts"]):
        a = orjson.loads(raw)
        if a.get("type") == "threshold_crossed":
            alerts.append(alert_key(f"{a['tenant_id']}|{a['customer_id']}", a["metric"],
                                    parse_rfc3339_ms(a["period_start"]), float(a["threshold_pct"])))
    return clean_totals({k: v for k, (_ver, v) in best.items()}), sorted(set(alerts))


def store_outputs(chdb: str) -> Tuple[Dict[str, float], List[str]]:
    """meterflow's billing-period totals and threshold alerts as its ClickHouse store holds them (the
    contract's views ``usage_by_period`` and ``alerts_log``); for a process that opens no other chDB path."""
    from meterflow.schemas.config import ClickHouseConfig
    from meterflow.sinks.clickhouse import connect

    client, db = connect(ClickHouseConfig(dsn=f"chdb://{chdb}"))
    totals = {total_key(f"{t}|{c}", m, ps): float(v) for t, c, m, ps, v in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), value "
        f"FROM {db}.usage_by_period").result_rows}
    alerts = [alert_key(f"{t}|{c}", m, ps, float(pct)) for t, c, m, ps, pct in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), threshold_pct "
        f"FROM {db}.alerts_log WHERE type = 'threshold_crossed'").result_rows]
    return clean_totals(totals), sorted(set(alerts))


def parse_alert(raw: bytes) -> Tuple[Optional[str], Optional[float], Optional[float]]:
    """A meterflow alert on the alerts topic as (the benchmark's alert key, detected_at, ingested_at of the crossing
    event, both in epoch ms); (None, None, None) for anything but a threshold crossing."""
    import orjson

    from meterflow.base.timeutil import parse_rfc3339_ms

    a = orjson.loads(raw)
    if a.get("type") != "threshold_crossed":
        return None, None, None
    return (alert_key(f"{a['tenant_id']}|{a['customer_id']}", a["metric"], parse_rfc3339_ms(a["period_start"]),
                      float(a["threshold_pct"])), float(parse_rfc3339_ms(a["detected_at"])),
            float(parse_rfc3339_ms(a["ingested_at"])) if a.get("ingested_at") else None)


# -- subcommands --------------------------------------------------------------------------------------------

def _process(args: argparse.Namespace) -> int:
    """One Bytewax process of a multi-process cluster (what ``python -m bytewax.run -a ... -i N`` does)."""
    from datetime import timedelta

    from bytewax.run import cli_main

    from meterflow.base.gc_tuning import tune_gc
    from meterflow.base.stats import STATS
    from meterflow.base.timeutil import parse_duration_ms
    from meterflow.dataflows.metering import flow_from_config
    from meterflow.schemas.config import load_config

    cfg = load_config(args.config)
    addresses = args.addresses.split(";")
    flow = flow_from_config(cfg, stop_at_end=True, recoverable=False, processes=len(addresses),
                            process_id=args.process_id)
    tune_gc()  # as meter run does
    first: List[float] = []
    done = threading.Event()

    def watch() -> None:  # when this process's source delivered its first events
        while not done.wait(0.02):
            if STATS.snapshot()["read"] > 0:
                first.append(time.time())
                return

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.time()
    cli_main(flow, workers_per_process=1, process_id=args.process_id, addresses=addresses,
             epoch_interval=timedelta(milliseconds=parse_duration_ms(cfg.pipeline.epoch_interval)))
    t1 = time.time()
    done.set()
    Path(args.out).write_text(json.dumps({"t_start": t0, "t_first": first[0] if first else t0, "t_end": t1,
                                          "counters": STATS.snapshot()}))
    return 0


def _core(args: argparse.Namespace) -> int:
    import gc
    import tomllib
    import tracemalloc

    from benchmarks.core_throughput import Core, run_core, run_decode_baseline
    from meterflow.operators.dedupe import IdTable
    from meterflow.schemas.config import parse_config

    cfg = parse_config(tomllib.loads(Path(args.config).read_text()), args.config, environ={})
    lines = Path(args.events).read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    n, b = len(lines), args.batch
    batches = [[(("bench", i + j), lines[i + j]) for j in range(min(b, n - i))] for i in range(0, n, b)]
    decode_s = run_decode_baseline(lines)
    core = run_core(cfg, batches)
    # State memory: the same stream again with tracemalloc tracing every allocation of the meters.
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    core_state = Core(cfg)
    for batch in batches:
        core_state.feed(batch)
    meters = core_state.meters
    for m in meters.values():
        m.flush()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    ids = sum(len(m.seen) for m in meters.values())
    snapshot_bytes = sum(len(m.snapshot()) for m in meters.values())
    for m in meters.values():
        m.seen = IdTable()
    gc.collect()
    without_ids = tracemalloc.get_traced_memory()[0] - base
    customers = len(meters)
    meters.clear()
    gc.collect()
    tracemalloc.stop()
    out = {"events": n, "decode_eps": n / decode_s, "core_eps": core["events"] / core["seconds"],
           "core_seconds": core["seconds"], "batch_p50_ms": core["p50_ms"], "batch_p99_ms": core["p99_ms"],
           "customers": customers, "tracked_ids": ids,
           "dedupe_bytes_per_id": (held - without_ids) / ids if ids else None,
           "state_bytes_per_customer": held / customers if customers else None,
           "state_bytes_per_customer_without_ids": without_ids / customers if customers else None,
           "snapshot_bytes_per_customer": snapshot_bytes / customers if customers else None,
           "how": "tracemalloc: bytes freed when every CustomerMeter's dedupe table is replaced by an empty one / ids; "
                  "bytes held by all CustomerMeters (after a final flush) / customers; snapshot = pickle bytes"}
    expected = json.loads(Path(args.expected_alerts).read_text()) if args.expected_alerts else None
    out.update(_native_core(cfg, batches, core["alerts"], expected))
    Path(args.out).write_text(json.dumps(out))
    return 0


def _native_core(cfg: Any, batches: List[Any], python_alerts: Optional[int] = None,
                 expected_alerts: Optional[List[str]] = None) -> Dict[str, Any]:
    """The native core (issue 16) over the same batches: events/s of its batch core (decode -> validate ->
    dedupe -> aggregate, no entitlement work); events/s of the native path with threshold detection
    (``native_flow_*``: :func:`benchmarks.native_core.run_native_flow`, every customer of the workload has
    thresholds), its threshold alerts checked against ``expected_alerts`` (the workload's reference alert keys)
    or else the Python core's count ``python_alerts``; and the bytes of its dedupe tables per tracked id (as the
    native table counts them). Only ``native_error`` when meterflow_native is not built or cannot run this
    configuration."""
    from meterflow.operators import native

    if native.native_problem(cfg) is not None:
        return {"native_error": native.native_problem(cfg)}
    from benchmarks.native_core import run_native, run_native_flow
    from meterflow.base.timeutil import now_ms

    now = now_ms()
    best = min((run_native(cfg, batches, now) for _ in range(2)), key=lambda r: r["seconds"])
    core = native.NativeBatchCore(cfg, clock=lambda: now)
    for b in batches:
        core.process(b)
    raw = core._core
    ids = raw.tracked_ids()
    size = getattr(raw, "dedupe_bytes", None)
    return {"native_core_eps": best["events"] / best["seconds"], "native_python_path": best["python_path"],
            "native_tracked_ids": ids,
            "native_dedupe_bytes_per_id": size() / ids if size is not None and ids else None,
            "native_how": "NativeBatchCore.process over the same batches, best of two passes; dedupe: the native "
                          "tables' own count of their bytes (slots and side tables) / ids",
            **_native_flow(run_native_flow, cfg, batches, now, python_alerts, expected_alerts)}


def _native_flow(run: Any, cfg: Any, batches: List[Any], now: int, python_alerts: Optional[int],
                 expected_alerts: Optional[List[str]]) -> Dict[str, Any]:
    """The ``native_flow_*`` figures of :func:`_native_core` (``run``: run_native_flow), best of two passes."""
    flow = min((run(cfg, batches, now) for _ in range(2)), key=lambda r: r["seconds"])
    got = flow["threshold_alerts"]
    if expected_alerts is not None:
        ok, against = got == sorted(expected_alerts), f"the workload's {len(expected_alerts):,} expected alerts"
    elif python_alerts is not None:
        ok, against = len(got) == python_alerts, f"the Python core's {python_alerts:,} alerts (count)"
    else:
        ok, against = None, "nothing"
    return {"native_flow_core_eps": flow["events"] / flow["seconds"],
            "native_flow_cpu_s_per_m": flow["cpu_seconds"] / flow["events"] * 1e6,
            "native_flow_alerts": len(got), "native_flow_alerts_ok": ok, "native_flow_alerts_against": against,
            "native_flow_folded_native": flow["folded_native"], "native_flow_folded_python": flow["folded_python"],
            "native_flow_evaluated": flow["evaluated"],
            "native_flow_how": "the real native path with threshold detection, in process: NativeMediator.split "
                               "over each batch -> each shard's _ShardLogic (NativeMeters.fold_bundle, customers "
                               "admitted as the flow admits them), a flush tick every 50 batches (as the Python "
                               "core's run_core) and on_eof at the end; no Bytewax runtime, no sinks; best of two "
                               "passes"}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("process", help="one process of a multi-process Bytewax cluster, stopping at the topic end")
    p.add_argument("--config", required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--addresses", required=True, help="host:port;host:port")
    p.add_argument("--out", required=True)
    st = sub.add_parser("store", help="the totals and threshold alerts of a chDB store, as JSON")
    st.add_argument("--chdb", required=True)
    st.add_argument("--out", required=True)
    c = sub.add_parser("core", help="in-process core throughput and keyed-state memory")
    c.add_argument("--config", required=True)
    c.add_argument("--events", required=True, help="JSONL file of the workload")
    c.add_argument("--batch", type=int, default=4096)
    c.add_argument("--expected-alerts", help="JSON list of the workload's expected alert keys (checks the native "
                   "path's threshold alerts)")
    c.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "store":
        totals, alerts = store_outputs(args.chdb)
        Path(args.out).write_text(json.dumps({"totals": totals, "alerts": alerts}))
        return 0
    return _process(args) if args.cmd == "process" else _core(args)


if __name__ == "__main__":
    sys.exit(main())
