"""meterflow side by side with the pipelines users would pick instead: throughput, breach-to-alert
latency, memory and CPU, in one run on this machine.

    python -m benchmarks                      # the default run (a few minutes on 2 cores)
    python -m benchmarks --quick              # a small smoke run (about a minute)
    python -m benchmarks --only raw,meterflow-1w,redis-counters
    meter bench ...                           # the same, through the CLI

What happens:
 1. A workload is generated with meterflow.sample (tenants x customers, Zipf-skewed customers, 2 %
    duplicates, 1 % late, bad events, corrections, test traffic) and loaded ONCE into a real Kafka broker
    (meterflow.devservices; 2 partitions, keyed tenant|customer). Redis is started too.
 2. Every contender reads that same topic from the beginning to its end, in its own process(es):
      raw                    bare confluent-kafka consumer, msgspec decode only: the ceiling
      meterflow-1w           meter run --stop-at-end, 1 worker, recovery off
      meterflow-1w-recovery  the same with --recovery (SQLite snapshots every 2 s)
      meterflow-1w-native    meterflow-1w with pipeline.core = "native" (README: Native core: mediation and
                             the fold in Rust, thresholds checked in Python at the events that reach them)
      meterflow-2p           2 Bytewax processes (-a host:port;host:port -i 0/1), 1 worker each, one chDB
                             store written by process 0 (its totals and alerts are read from that store)
      poll-clickhouse-60s    events batch-inserted into ClickHouse (chDB), a job aggregating and comparing
      poll-clickhouse-1s       with quotas every 60 s (Lago's clock) / 1 s (the best case)
      redis-counters         one Lua call per event (SET NX dedupe + HINCRBY + threshold check),
                             pipelined per consumed batch
      quixstreams            Quix Streams app with RocksDB state (own venv under
                             ${METERFLOW_CACHE:-~/.cache/meterflow}/bench-venvs/quix, made on first use)
    All do the same work: decode and validate, deduplicate by event id, api_calls (count) and tokens (sum)
    per customer per billing month, thresholds 75/90/100 % of the plan's quota fired once. Their final
    totals and alerts are checked against an independent in-memory model (so against each other); a
    contender with wrong totals is reported as such and not ranked.
 3. Figures: events/s from the consumer's first poll to final outputs (meterflow: from its last progress
    line before any event was read, so Bytewax start-up is left out) and the ratio to raw; peak RSS of
    the process tree (psutil, 10 Hz; the Redis server is counted for redis-counters); CPU seconds per
    million events over that window; the contender's and the whole machine's CPU % (noise); state bytes
    per tracked event id; meterflow's in-process core events/s and keyed-state memory (tracemalloc).
    Every consumer reads with the same librdkafka fetch settings (benchmarks.peers.common.FETCH_CONFIG).
 4. Breach-to-alert latency: each latency contender tails a fresh topic while the harness produces
    api_call events at a fixed rate (default half of meterflow-1w's measured events/s) with wall-clock
    timestamps; customers' quotas are spread so crossings happen all through the run. Latency = alert
    consumed from the contender's alerts topic - the crossing event produced (the harness knows which
    event crosses each threshold). poll-clickhouse-60s runs long enough for two polls.
 5. Output: a table, benchmarks/results/latest.json, benchmarks/results/latest.png (needs matplotlib:
    pip install -e '.[bench]'), benchmarks/results/latest.md (the table for the README).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.peers.report import (
    HEADERS,
    Row,
    agreement,
    chart,
    compare,
    compare_alerts,
    fmt,
    lat_text,
    machine,
    markdown,
    pcts,
    table_rows,
    targets,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

CONTENDERS = ["raw", "meterflow-1w", "meterflow-1w-recovery", "meterflow-1w-native", "meterflow-2p",
              "poll-clickhouse-60s", "poll-clickhouse-1s", "redis-counters", "quixstreams"]
LATENCY_CONTENDERS = ["meterflow-1w", "meterflow-1w-native", "poll-clickhouse-60s", "poll-clickhouse-1s",
                      "redis-counters", "quixstreams"]
POLL_INTERVAL = {"poll-clickhouse-60s": 60.0, "poll-clickhouse-1s": 1.0}


# -- helpers ---------------------------------------------------------------------------------------------------

def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _startup_seconds(log: Path) -> float:
    """Seconds from ``meter run``'s clock start to its last progress line that had read nothing yet (the
    progress lines come every 0.1 s; taking the last empty one never overstates meterflow's speed)."""
    last = 0.0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("progress:") and " read=0 " in line:
            last = float(line.rsplit("elapsed=", 1)[1].rstrip("s"))
    return last


# -- the harness -----------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, console) -> None:
        self.args = args
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="meterflow-bench-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.py = sys.executable
        self.rows: Dict[str, Row] = {}
        self.totals: Dict[str, Dict[str, float]] = {}  # each contender's final totals, compared with each other
        self.core: Optional[Dict[str, Any]] = None
        self.quix_python: Optional[Path] = None

    def log(self, text: str) -> None:
        self.console.log(text)

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, kafka, redis_server, topic: str = "bench.events") -> None:
        """Generate the workload and load it into ``topic`` on ``kafka``; ``redis_server`` needs ``url``/``pid``."""
        from benchmarks.workload import build_workload, load_topic

        a = self.args
        self.kafka, self.redis = kafka, redis_server
        t = time.perf_counter()
        self.wl = build_workload(a.events, a.customers, a.tenants, a.seed, a.included)
        self.log(f"workload: {len(self.wl.items):,} events ({self.wl.size_bytes / 2**20:.1f} MiB), "
                 f"{a.tenants} tenants x "
                 f"{a.customers} customers (Zipf), seed {a.seed}; reference model: "
                 f"{self.wl.counts['billable_unique_api_calls']:,} billable unique api_calls, "
                 f"{len(self.wl.expected_totals):,} total rows, {len(self.wl.expected_alerts)} threshold alerts "
                 f"({time.perf_counter() - t:.1f}s)")
        self.rules_path = self.work / "rules.json"
        self.rules_path.write_text(json.dumps(self.wl.rules))
        (self.work / "events.jsonl").write_bytes(b"\n".join(v for _, v in self.wl.items) + b"\n")
        self.topic = topic
        kafka.create_topic(self.topic, partitions=a.partitions)
        t = time.perf_counter()
        n = load_topic(kafka.bootstrap, self.topic, self.wl.items)
        self.log(f"loaded {n:,} events into {self.topic} ({a.partitions} partitions, keyed tenant|customer) "
                 f"in {time.perf_counter() - t:.1f}s")
        # One unmeasured read of the whole topic, so that no contender pays for a cold broker (JIT, page cache).
        from benchmarks.peers.common import TopicReader

        t = time.perf_counter()
        reader = TopicReader(kafka.bootstrap, self.topic, to_end=True)
        for _batch in reader.batches():
            pass
        reader.close()
        self.log(f"warm-up read of the topic ({reader.count:,} messages, not measured) in "
                 f"{time.perf_counter() - t:.1f}s")

    def mf_config(self, run: str, topic: Optional[str] = None, rules: Optional[Dict[str, Any]] = None,
                  subscribed: Optional[List[str]] = None) -> str:
        """meterflow's configuration for one run: the rules, its own output topics and chDB path."""
        from benchmarks.peers.meterflow import config_toml, topics_for

        return config_toml(rules or self.wl.rules, subscribed or self.wl.subscribed, bootstrap=self.kafka.bootstrap,
                           topics=topics_for(run, topic or self.topic), chdb=str(self.work / f"chdb-{run}"))

    # -- throughput ------------------------------------------------------------------------------------------
    def _peer_cmd(self, name: str, out: Path, topic: str, rules: Path, alerts_topic: Optional[str] = None,
                  tail: bool = False, ready: Optional[Path] = None) -> Tuple[List[str], Dict[str, str]]:
        module = {"raw": "raw", "redis-counters": "redis_counters", "quixstreams": "quix"}.get(name, "clickhouse_poll")
        py = str(self.quix_python) if name == "quixstreams" else self.py
        argv = [py, "-m", f"benchmarks.peers.{module}", "--bootstrap", self.kafka.bootstrap, "--topic", topic,
                "--rules", str(rules), "--out", str(out)]
        if alerts_topic:
            argv += ["--alerts-topic", alerts_topic]
        if tail:
            argv += ["--tail"]
        if ready:
            argv += ["--ready-file", str(ready)]
        if name in POLL_INTERVAL:
            argv += ["--interval", f"{POLL_INTERVAL[name]:g}", "--chdb", str(self.work / f"chdb-{out.stem}")]
        if name == "redis-counters":
            argv += ["--redis-url", self.redis.url]
        env = {"PYTHONPATH": str(ROOT)} if name == "quixstreams" else {}
        return argv, env

    def ensure_quix(self) -> Optional[str]:
        if self.quix_python is not None:
            return None
        from benchmarks.peers.quix import ensure_venv

        try:
            self.quix_python = ensure_venv(self.log)
        except Exception as exc:  # reported in the table, the other contenders still run
            return f"Quix Streams venv unavailable: {exc}"
        return None

    def run_throughput(self, name: str) -> Row:
        from benchmarks.peers.measure import Procs
        from benchmarks.peers.meterflow import collect_outputs

        row = Row(name)
        out = self.work / f"tp-{name}.json"
        extra: List[int] = []
        timeout = 120 + len(self.wl.items) / 1000
        if name == "quixstreams":
            err = self.ensure_quix()
            if err:
                row.error = err
                return row
        if name.startswith("meterflow"):
            cfg = self.work / f"{name}.toml"
            text = self.mf_config(name)
            if name.endswith("-native"):
                text = text.replace("[pipeline]\n", '[pipeline]\ncore = "native"\n', 1)
            cfg.write_text(text)
            if name == "meterflow-2p":
                p0, p1 = _free_ports(2)
                addrs = f"127.0.0.1:{p0};127.0.0.1:{p1}"
                # One configuration, so one chDB path: process 0 alone writes it (README: Running a cluster).
                cmds = [([self.py, "-m", "benchmarks.peers.meterflow", "process", "--config", str(cfg), "--process-id",
                          str(i), "--addresses", addrs, "--out", str(self.work / f"tp-{name}-{i}.json")], {})
                        for i in range(2)]
            else:
                argv = [self.py, "-m", "meterflow.cli", "run", "--config", str(cfg), "--stop-at-end", "--json",
                        "--progress-every", "0.1"]
                if name.endswith("recovery"):
                    argv += ["--recovery", str(self.work / f"recovery-{name}")]
                cmds = [(argv, {})]
        else:
            cmds = [self._peer_cmd(name, out, self.topic, self.rules_path)]
            if name == "redis-counters" and self.redis.pid:
                extra = [self.redis.pid]
        procs = Procs(cmds, self.logs, f"tp-{name}", str(ROOT), extra)
        run = procs.wait(timeout)
        row.wall_s = run.wall
        row.peak_rss_mib = run.sampler.peak_rss / 2**20
        row.cpu_total_s = run.sampler.cpu_total
        if run.timed_out or any(rc != 0 for rc in run.returncodes):
            row.error = f"exit {run.returncodes}{' (timed out)' if run.timed_out else ''}: {run.tail(6)}"
            return row
        totals = alerts = None
        try:
            if name == "meterflow-2p":
                parts = [json.loads((self.work / f"tp-{name}-{i}.json").read_text()) for i in range(2)]
                t_first = min(p["t_first"] for p in parts)
                t_end = max(p["t_end"] for p in parts)
                row.events = sum(p["counters"]["read"] for p in parts)
                row.counters = {k: sum(p["counters"][k] for p in parts) for k in parts[0]["counters"]}
                totals, alerts = self.store_outputs(self.work / f"chdb-{name}")
                row.notes = (f"clock from the first events read (cluster start-up "
                             f"{t_first - min(p['t_start'] for p in parts):.1f}s before, excluded); totals and "
                             "alerts read from the cluster's one chDB store (written by process 0)")
            elif name.startswith("meterflow"):
                line_t, line = next((t, s) for t, s in reversed(run.stdout) if s.startswith("{"))
                doc = json.loads(line)
                t_end = line_t
                startup = _startup_seconds(run.logs[0])
                t_first = t_end - doc["seconds"] + startup
                row.events = doc["counters"]["read"]
                row.counters = doc["counters"]
                totals, alerts = collect_outputs(self.kafka.bootstrap, name)
                row.notes = (f"clock from meter run's last progress line before any event was read (start-up "
                             f"{startup:.1f}s excluded) to its end")
            else:
                doc = json.loads(out.read_text())
                t_first, t_end = doc["t_first"], doc["t_end"]
                row.events = doc["events"]
                row.counters = doc["counters"]
                totals, alerts = doc["totals"], doc["alerts"]
                if doc.get("state_bytes") is not None and doc.get("tracked_ids"):
                    row.state_bytes_per_id = doc["state_bytes"] / doc["tracked_ids"]
                    row.state_how = doc["state_how"]
                row.notes = doc.get("notes") or "clock from the consumer's first poll to final outputs"
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            row.error = f"no result: {exc!r}; {run.tail(6)}"
            return row
        row.ran = True
        row.seconds = max(1e-9, t_end - t_first)
        row.eps = row.events / row.seconds
        cpu = run.sampler.cpu_at(t_end) - run.sampler.cpu_at(t_first)
        row.cpu_s_per_m = cpu / row.events * 1e6 if row.events else None
        cores = (os.cpu_count() or 1) * row.seconds
        row.tree_cpu_pct = 100 * cpu / cores
        row.machine_busy_pct = 100 * run.sampler.busy_between(t_first, t_end) / cores
        if name != "raw":
            self.totals[name] = totals
            row.totals_ok, row.totals = compare(totals, self.wl.expected_totals)
            row.alerts = compare_alerts(alerts, self.wl.expected_alerts)
        else:
            row.totals = "n/a (decode only)"
        if row.events != len(self.wl.items):
            row.notes += f"; consumed {row.events:,} of {len(self.wl.items):,}"
        return row

    def store_outputs(self, chdb: Path) -> Tuple[Dict[str, float], List[str]]:
        """Totals and threshold alerts of a meterflow chDB store, read in a process of their own."""
        import subprocess

        out = self.work / f"{chdb.name}-store.json"
        proc = subprocess.run([self.py, "-m", "benchmarks.peers.meterflow", "store", "--chdb", str(chdb), "--out",
                               str(out)], cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ValueError(f"reading the store {chdb} failed ({proc.returncode}): {proc.stderr[-600:]}")
        doc = json.loads(out.read_text())
        return doc["totals"], doc["alerts"]

    def run_core(self) -> Dict[str, Any]:
        from benchmarks.peers.measure import Procs

        cfg = self.work / "core.toml"
        from benchmarks.peers.meterflow import config_toml

        cfg.write_text(config_toml(self.wl.rules, self.wl.subscribed))
        out = self.work / "core.json"
        expected = self.work / "expected_alerts.json"
        expected.write_text(json.dumps(self.wl.expected_alerts))
        procs = Procs([([self.py, "-m", "benchmarks.peers.meterflow", "core", "--config", str(cfg), "--events",
                         str(self.work / "events.jsonl"), "--out", str(out), "--expected-alerts", str(expected)], {})],
                      self.logs, "core", str(ROOT))
        run = procs.wait(600 + len(self.wl.items) / 500)
        if any(rc != 0 for rc in run.returncodes):
            return {"error": f"exit {run.returncodes}: {run.tail(6)}"}
        return json.loads(out.read_text())

    # -- latency ---------------------------------------------------------------------------------------------
    def run_latency(self, name: str, rate: int, seconds: float) -> Dict[str, Any]:
        from confluent_kafka import Consumer, Producer

        from benchmarks.peers.common import month_start_ms
        from benchmarks.peers.measure import Procs
        from benchmarks.peers.meterflow import parse_alert, topics_for
        from benchmarks.workload import WARM_KEY, LatencyPlan

        plan = LatencyPlan(rate, seconds, self.args.latency_customers)
        run_id = f"lat-{name}"
        ev_topic = f"bench.{run_id}.events"
        self.kafka.create_topic(ev_topic, partitions=self.args.partitions)
        if name.startswith("meterflow-1w"):
            alerts_topic = topics_for(run_id)["alerts"]
            cfg = self.work / f"{run_id}.toml"
            text = self.mf_config(run_id, ev_topic, plan.rules(), plan.subscribed())
            if name.endswith("-native"):
                text = text.replace("[pipeline]\n", '[pipeline]\ncore = "native"\n', 1)
            cfg.write_text(text)
            cmds = [([self.py, "-m", "meterflow.cli", "run", "--config", str(cfg), "--progress-every", "0"], {})]
            parse = parse_alert
            stop_sig = signal.SIGINT
        else:
            if name == "quixstreams":
                err = self.ensure_quix()
                if err:
                    return {"error": err}
            alerts_topic = f"bench.{run_id}.alerts"
            rules = self.work / f"{run_id}-rules.json"
            rules.write_text(json.dumps(plan.rules()))
            ready = self.work / f"{run_id}.ready"
            cmds = [self._peer_cmd(name, self.work / f"{run_id}.json", ev_topic, rules, alerts_topic, tail=True,
                                   ready=ready)]
            def parse(raw: bytes) -> Tuple[Optional[str], Optional[float], Optional[float]]:
                a = json.loads(raw)
                return a["k"], float(a["at"]), None
            stop_sig = signal.SIGTERM
        self.kafka.create_topic(alerts_topic, partitions=1)
        received: Dict[str, float] = {}  # alert key -> consumed at (epoch s)
        detected: Dict[str, float] = {}  # alert key -> detected at, as the contender stamped it (epoch ms)
        ingested: Dict[str, float] = {}  # alert key -> its crossing event's ingested_at (meterflow's stamp, epoch ms)
        stop = threading.Event()

        def consume() -> None:
            c = Consumer({"bootstrap.servers": self.kafka.bootstrap, "group.id": f"bench-{run_id}",
                          "auto.offset.reset": "earliest", "fetch.wait.max.ms": 5, "log_level": 2})
            c.subscribe([alerts_topic])
            while not stop.is_set():
                first = c.poll(0.05)  # returns as soon as one alert is there (consume() would wait its timeout)
                if first is None:
                    continue
                for msg in [first] + c.consume(500, 0):
                    if msg.error():
                        continue
                    now = time.time()
                    k, at, ing = parse(msg.value())
                    if k is not None and k not in received:
                        received[k] = now
                        detected[k] = at
                        if ing is not None:
                            ingested[k] = ing
            c.close()

        th = threading.Thread(target=consume, daemon=True)
        th.start()
        procs = Procs(cmds, self.logs, run_id, str(ROOT))
        producer = Producer({"bootstrap.servers": self.kafka.bootstrap, "linger.ms": 1, "enable.idempotence": True,
                             "log_level": 2})
        result: Dict[str, Any] = {"rate": rate, "seconds": seconds}
        try:
            deadline = time.time() + 180
            if name in POLL_INTERVAL:  # a poll cannot answer a warm-up event sooner than its clock
                while not ready.exists() and time.time() < deadline and procs.alive():
                    time.sleep(0.1)
                time.sleep(1.0)
                ok = ready.exists()
            else:
                n = 0
                while not any(k.startswith(WARM_KEY + "|") for k in received) and time.time() < deadline \
                        and procs.alive():
                    key, value = plan.warm_event(n)
                    producer.produce(ev_topic, value, key=key)
                    producer.flush()
                    n += 1
                    time.sleep(0.2)
                ok = any(k.startswith(WARM_KEY + "|") for k in received)
            if not ok:
                result["error"] = f"contender not ready within 180 s: {procs.stop(signal.SIGKILL, 5).tail(6)}"
                return result
            period = month_start_ms(int(time.time() * 1000))
            sent_at: List[float] = []
            t0 = time.time()
            sent = 0
            while True:
                el = time.time() - t0
                if el >= seconds:
                    break
                due = min(plan.n_events, int(el * rate))
                while sent < due:
                    key, value = plan.event(sent, int(time.time() * 1000))
                    try:
                        producer.produce(ev_topic, value, key=key)
                    except BufferError:
                        producer.poll(0.01)
                        continue
                    sent_at.append(time.time())
                    sent += 1
                producer.poll(0)
                time.sleep(0.005)
            producer.flush(30)
            expected = plan.crossings(sent, period)
            wait = POLL_INTERVAL.get(name, 0.0) + 15.0
            end = time.time() + wait
            while time.time() < end and not all(k in received for k in expected):
                time.sleep(0.1)
            got = [(k, i) for k, i in expected.items() if k in received]
            lat = [(received[k] - sent_at[i]) * 1000 for k, i in got]
            # Where the time goes: produced -> detected (the contender's own stamp, same clock) and
            # detected -> consumed (its output path: sinks before the alert, producer, broker).
            split = {"produced_to_detected_ms": pcts([detected[k] - sent_at[i] * 1000 for k, i in got]),
                     "detected_to_consumed_ms": pcts([received[k] * 1000 - detected[k] for k, _i in got])}
            if ingested:  # meterflow: the first part split at the crossing event's ingested_at (its source's clock)
                split["produced_to_ingested_ms"] = pcts([ingested[k] - sent_at[i] * 1000 for k, i in got
                                                         if k in ingested])
                split["ingested_to_detected_ms"] = pcts([detected[k] - ingested[k] for k, _i in got if k in ingested])
            # each alert's (produced, detected, consumed[, ingested]) epoch ms, for a look at the tail (--keep)
            (self.work / f"{run_id}-alerts.json").write_text(
                json.dumps([(sent_at[i] * 1000, detected[k], received[k] * 1000, *([ingested[k]] if k in ingested
                                                                                   else [])) for k, i in got]))
            extra = [k for k in received if k not in expected and not k.startswith(WARM_KEY + "|")]
            rate = sent / max(1e-9, sent_at[-1] - sent_at[0]) if sent > 1 else 0
            result.update({"events": sent, "achieved_rate": rate,
                           "expected_alerts": len(expected), "received_alerts": len(lat),
                           "unexpected_alerts": len(extra), **{f"{k}_ms": v for k, v in pcts(lat).items() if k != "n"},
                           **split})
        finally:
            stop.set()
            producer.flush(10)
            run = procs.stop(stop_sig, 30)
            th.join(5)
            if any(rc not in (0, 130, -2, -15) for rc in run.returncodes) and "error" not in result:
                result["note"] = f"exit {run.returncodes}"
        return result


# -- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, help="events in the workload (default 300000; --quick 20000)")
    ap.add_argument("--customers", type=int, help="customers per tenant (default 2000; --quick 200)")
    ap.add_argument("--tenants", type=int, default=3, help="tenants (default 3)")
    ap.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    ap.add_argument("--included", type=float, default=2000,
                    help="api_calls included per month (tokens: 400x); default 2000, the sample plan's")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of the events topic (default 2)")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(CONTENDERS)}")
    ap.add_argument("--quick", action="store_true", help="small smoke run: 20k events, 5 s latency runs, "
                    "poll-clickhouse-60s latency not measured")
    ap.add_argument("--no-latency", action="store_true", help="skip the breach-to-alert latency runs")
    ap.add_argument("--latency-rate", type=int, help="events/s for the latency runs (default: half of "
                    "meterflow-1w's measured events/s; 5000 if it did not run)")
    ap.add_argument("--latency-seconds", type=float, help="seconds of load per latency run (default 20; --quick 5)")
    ap.add_argument("--poll60-latency-seconds", type=float, default=130.0,
                    help="seconds of load for poll-clickhouse-60s's latency run (default 130: two polls; 0 skips)")
    ap.add_argument("--latency-customers", type=int, default=200, help="customers crossing thresholds (default 200)")
    ap.add_argument("--results", default=str(RESULTS), help="output directory (default benchmarks/results)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs, chDB data)")
    args = ap.parse_args(argv)
    args.events = args.events or (20_000 if args.quick else 300_000)
    args.customers = args.customers or (200 if args.quick else 2000)
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    if args.quick:
        args.poll60_latency_seconds = 0.0
    chosen = CONTENDERS if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [c for c in chosen if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contender(s) {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    args.chosen = [c for c in CONTENDERS if c in chosen]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("psutil") is None:  # the process measurements need it
        print("benchmarks: psutil is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    from meterflow.devservices import DevServiceError, KafkaBroker, RedisServer

    console = Console(stderr=True)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    bench = Bench(args, console)
    t_all = time.time()
    load_start = os.getloadavg()
    try:
        with console.status("starting Kafka and Redis ...") as status, KafkaBroker() as kafka, RedisServer() as rsrv:
            bench.log(f"Kafka {kafka.bootstrap} (started in {kafka.startup_seconds:.1f}s), Redis {rsrv.url}; "
                      f"work dir {bench.work}")
            status.update("generating and loading the workload ...")
            bench.setup(kafka, rsrv)
            for name in args.chosen:
                status.update(f"throughput: {name} over {len(bench.wl.items):,} events ...")
                row = bench.run_throughput(name)
                bench.rows[name] = row
                if row.ran:
                    bench.log(f"[bold]{name}[/]: {row.events:,} events in {row.seconds:.2f}s = {row.eps:,.0f} ev/s; "
                              f"totals {row.totals}; alerts {row.alerts}; peak RSS {row.peak_rss_mib:,.0f} MiB; "
                              f"CPU {fmt(row.cpu_s_per_m, ',.1f')} s/M events; machine busy "
                              f"{row.machine_busy_pct:.0f}% of which this contender {row.tree_cpu_pct:.0f}%")
                else:
                    bench.log(f"[bold red]{name}[/]: {row.error or 'not run'}")
            groups = agreement(bench.totals)
            if len(groups) > 1:
                bench.log(f"[red]contenders disagree on the totals: {groups}[/]")
            elif groups:
                bench.log(f"totals: all {len(groups[0])} contenders that report totals agree with each other")
            raw = bench.rows.get("raw")
            for row in bench.rows.values():
                if row.ran and raw is not None and raw.ran and raw.eps:
                    row.ratio_to_raw = row.eps / raw.eps
            if any(c.startswith("meterflow") for c in args.chosen):
                status.update("meterflow in-process core and keyed-state memory (tracemalloc) ...")
                bench.core = bench.run_core()
                c = bench.core
                if c.get("error"):
                    bench.log(f"[red]core: {c['error']}[/]")
                else:
                    bench.log(f"core: {c['core_eps']:,.0f} ev/s in process (decode alone {c['decode_eps']:,.0f}/s); "
                              f"dedupe {c['dedupe_bytes_per_id']:,.0f} B/id; "
                              f"state {c['state_bytes_per_customer']:,.0f} B/customer")
                    if c.get("native_flow_core_eps"):
                        bench.log(f"native core: {c['native_flow_core_eps']:,.0f} ev/s with threshold detection "
                                  f"({c['native_flow_alerts']:,} alerts, "
                                  f"{'as expected' if c['native_flow_alerts_ok'] else 'NOT AS EXPECTED'}), batch core "
                                  f"{c['native_core_eps']:,.0f} ev/s")
                    mf = bench.rows.get("meterflow-1w")
                    if mf is not None and mf.ran:
                        mf.state_bytes_per_id = c["dedupe_bytes_per_id"]
                        mf.state_how = "tracemalloc: CustomerMeter dedupe tables (IdTable) / ids"
                    nat = bench.rows.get("meterflow-1w-native")
                    if nat is not None and nat.ran and c.get("native_dedupe_bytes_per_id"):
                        nat.state_bytes_per_id = c["native_dedupe_bytes_per_id"]
                        nat.state_how = "the native dedupe tables' own byte count / ids"
            if not args.no_latency:
                mf = bench.rows.get("meterflow-1w")
                base_rate = args.latency_rate or (int(mf.eps / 2) if mf is not None and mf.ran else 5000)
                for name in [c for c in LATENCY_CONTENDERS if c in args.chosen]:
                    secs = args.poll60_latency_seconds if name == "poll-clickhouse-60s" else args.latency_seconds
                    if secs <= 0:
                        bench.rows[name].latency = {"error": "not measured (--quick or --poll60-latency-seconds 0): "
                                                    "expect about half the poll interval plus the query"}
                        continue
                    rate = base_rate
                    row = bench.rows[name]
                    note = ""
                    if not args.latency_rate and row.ran and row.eps and rate > 0.8 * row.eps:
                        rate, note = int(row.eps / 2), "its own half saturation (the common rate would saturate it)"
                    elif not args.latency_rate and name == "meterflow-1w-native" and row.ran and row.eps:
                        rate, note = int(row.eps / 2), "its own half saturation (issue 16's load for this figure)"
                    status.update(f"latency: {name} at {rate:,} events/s for {secs:g}s ...")
                    lat = bench.run_latency(name, rate, secs)
                    if note:
                        lat["note"] = note
                    row.latency = lat
                    if lat.get("error"):
                        bench.log(f"[red]latency {name}: {lat['error']}[/]")
                    else:
                        bench.log(f"latency [bold]{name}[/]: p50 / p99 / max {lat_text(lat)} ("
                                  f"{lat['received_alerts']}/{lat['expected_alerts']} alerts, "
                                  f"{lat['events']:,} events at {lat['achieved_rate']:,.0f}/s)"
                                  + (f"; p99 produced -> ingested {lat['produced_to_ingested_ms']['p99']:,.0f} ms, "
                                     f"ingested -> detected {lat['ingested_to_detected_ms']['p99']:,.0f} ms"
                                     if (lat.get("produced_to_ingested_ms") or {}).get("p99") is not None else ""))
    except DevServiceError as exc:
        console.print(f"[red]benchmarks: {exc}[/]")
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    rows = [bench.rows[c] for c in args.chosen if c in bench.rows]
    doc = {"command": command, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "duration_s": round(time.time() - t_all, 1),
           "machine": {**machine(), "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
           "workload": {"events": args.events, "tenants": args.tenants, "customers_per_tenant": args.customers,
                        "seed": args.seed, "partitions": args.partitions, "included_api_calls": args.included,
                        **(bench.wl.counts if hasattr(bench, "wl") else {})},
           "contenders": [asdict(r) for r in rows], "core": bench.core,
           "totals_agreement": agreement(bench.totals),
           "targets": targets(bench.rows, bench.core if bench.core and not bench.core.get("error") else None)}
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2))
    (out_dir / "latest.md").write_text(markdown(rows, doc))
    title = (f"{args.events:,} events, {args.tenants}x{args.customers} customers, {doc['machine']['cpus']} cores "
             f"({doc['finished_at']})")
    chart_err = chart(rows, out_dir / "latest.png", title)
    t = Table(title=f"meterflow vs peers — {title}")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("contender", "totals", "alerts") else "right", overflow="fold")
    for cells in table_rows(rows):
        t.add_row(*cells)
    wide = Console(width=None if sys.stdout.isatty() else 220)
    wide.print(t)
    for r in rows:
        if r.error:
            console.print(f"[red]{r.name}: {r.error}[/]")
    tt = Table(title="targets (issues 4 and 16)")
    for h in ("issue", "target", "goal", "measured", "gap", "how"):
        tt.add_column(h, overflow="fold")
    for x in doc["targets"]:
        v = x["value"]
        tt.add_row(str(x.get("issue", 4)), x["target"], f"{x['goal']:,g} {x.get('unit', '')}",
                   "—" if v is None else f"{v:,.2f}", x["gap"], x["how"])
    wide.print(tt)
    console.print(f"results: {out_dir / 'latest.json'}, {out_dir / 'latest.md'}"
                  + (f", {out_dir / 'latest.png'}" if not chart_err else f" ({chart_err})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
