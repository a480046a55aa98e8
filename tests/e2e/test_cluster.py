"""A two-process Bytewax cluster writes ONE consistent store: real broker, real chDB, real `meter run`s.

Two `meter run --addresses "127.0.0.1:P0;127.0.0.1:P1" --process-id 0|1` processes (1 worker each, the
same configuration, so the same embedded chDB path) read one 3-partition events topic to its end. Process
0 alone opens chDB (``meterflow.sinks.single_writer``): if process 1 opened it too, one of the two would be
refused with the path's holder named and the test would fail on its exit code. The one store must then hold
exactly what the independent model (``tests/e2e/reference.py``) computes for usage_by_period,
usage_by_window and dead_letters, and exactly what a one-process run of the same topic writes for
usage_rated and alerts_log (their values do not depend on which process folded an event); the JSONL alert
file, also written by process 0 alone, holds each alert of the store once.

With ``core = "native"`` the cluster runs ``pipeline.core = "native"`` (native mediation: each batch's shard
bundles, ``meterflow_native.Bundle``, cross to the process owning their shard pickled), against the same
one-process run on the Python core; each cluster process's native fold tally (``METERFLOW_NATIVE_TALLY``,
written at its exit) must show customers folded natively in both processes and none left on Python.

With ``--recovery`` (one directory shared by both processes), the cluster is SIGKILLed in the middle of an epoch
after a complete snapshot, the rest of the topic is produced and both processes are restarted: the store must hold
exactly the model's totals over the whole topic, alerts and rated rows as a clean one-process run, and the restart
must have read again events the killed cluster had read (the replay that must not count twice).

The workload is the Kafka pipeline test's (``tests/e2e/test_kafka_pipeline.py``): built so that its results
do not depend on the order in which partitions are read, which differs between a cluster and one process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from meterflow.sample import sample_config_toml
from meterflow.schemas.config import DEFAULT_SHARDS
from tests.e2e import reference as ref
from tests.e2e.support import (
    REPO,
    LiveRun,
    env,
    kafka_section,
    meter_argv,
    produce,
    read_views,
    run_meter,
    run_summary,
    unique,
    write_config,
)
from tests.e2e.test_kafka_pipeline import ANCHOR, INCLUDED, PARTITIONS, SUBSCRIBED, TENANTS, workload

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(240)]

# The store's rows that are not in chread.py's output (alerts) or that the model does not compute (rated),
# compared with a one-process run; times of detection (wall clock) and free-text details are left out.
READ_MORE = r"""
import json, sys
from meterflow.schemas.config import load_config
from meterflow.sinks.clickhouse import connect
client, db = connect(load_config(sys.argv[1]).clickhouse)
rated = client.query(
    f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), plan, currency, price_model, "
    f"usage, included, overage_units, toString(charge), toString(overage_amount), toString(minimum), "
    f"toString(amount), custom_rate, final FROM {db}.usage_rated").result_rows
alerts = client.query(
    f"SELECT alert_id, type, tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), threshold_pct, "
    f"included, enforcement, action, plan, threshold_amount FROM {db}.alerts_log").result_rows
json.dump({"rated": sorted(map(list, rated)), "alerts": sorted(map(list, alerts))}, sys.stdout, default=str)
"""


def _read_more(config: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", READ_MORE, str(config)], cwd=REPO, env=env(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    return json.loads(proc.stdout)


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _config(tmp_path: Path, name: str, kcfg: dict) -> Path:
    base = sample_config_toml(TENANTS, SUBSCRIBED, "2026-03-15T00:00:00Z", included=INCLUDED, prices="every")
    cfg = write_config(tmp_path / f"{name}.toml", base, tmp_path / f"ch-{name}", kcfg)
    cfg.write_text(cfg.read_text() + f'\n[alerts]\njsonl = "{(tmp_path / f"alerts-{name}.jsonl").resolve()}"\n')
    return cfg


def _dead(views: dict) -> List[str]:
    # all but `detail` (free text: too_late's names the watermark of the moment) and received_at
    return sorted(json.dumps([r[0], *r[2:-1]]) for r in views["dead_letters"])


def _tally(path: Path) -> List[dict]:
    """The lines the meter processes appended to their METERFLOW_NATIVE_TALLY file (one per process, at exit)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("core", ["python", "native"])
def test_two_process_cluster_writes_one_store_with_exact_totals(kafka, tmp_path, core):
    if core == "native":
        from meterflow.operators.native import AVAILABLE

        if not AVAILABLE:
            pytest.skip("meterflow_native is not built (./dev setup with cargo)")
    tally = tmp_path / "native-tally.jsonl"
    # the cluster's environment: as configured (python: the session's core), or the native core with its tally
    cluster_env = env() if core == "python" else {**env(), "METER_PIPELINE_CORE": "native",
                                                  "METERFLOW_NATIVE_TALLY": str(tally)}
    events = workload()
    expected = ref.compute(events, ref.sample_spec(TENANTS, SUBSCRIBED, ANCHOR, included=INCLUDED))
    topic = kafka.create_topic(unique("e2e-cluster-events"), partitions=PARTITIONS)
    produce(kafka.bootstrap, topic, events, PARTITIONS)

    # The cluster: two processes, one configuration (one chDB path, one alert file, one set of topics).
    cluster_cfg = _config(tmp_path, "cluster", kafka_section(kafka.bootstrap, topic, unique("e2e-cluster")))
    addresses = ";".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    procs = []
    for i in range(2):
        out = (tmp_path / f"p{i}.out").open("w")
        err = (tmp_path / f"p{i}.err").open("w")
        procs.append((subprocess.Popen(
            meter_argv("run", "--config", str(cluster_cfg), "--stop-at-end", "--json", "--progress-every", "0",
                       "--addresses", addresses, "--process-id", str(i)),
            cwd=REPO, env=cluster_env, stdout=out, stderr=err, start_new_session=True), out, err))
    t0 = time.monotonic()
    try:
        rcs = [p.wait(150) for p, _o, _e in procs]
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            out.close()
            err.close()
    logs = [(tmp_path / f"p{i}.err").read_text()[-3000:] for i in range(2)]
    assert rcs == [0, 0], f"cluster exits {rcs}; stderr:\n{logs[0]}\n---\n{logs[1]}"
    summaries = [json.loads((tmp_path / f"p{i}.out").read_text().strip().splitlines()[-1]) for i in range(2)]
    cluster_s = time.monotonic() - t0
    # Both processes did part of the work, and together all of it, once.
    reads = [s["counters"]["read"] for s in summaries]
    assert sum(reads) == len(events) and min(reads) > 0, reads
    assert sum(s["counters"]["duplicates"] for s in summaries) == expected.duplicates, summaries
    if core == "native":
        assert all(s["core"].startswith("native") for s in summaries), [s["core"] for s in summaries]
        # Both processes folded customers natively (every customer of this configuration is admitted), none
        # on Python: the customers of the shards each process owns, their bundles from either reader.
        lines = {d["pid"]: d for d in _tally(tally)}
        assert set(lines) == {p.pid for p, _o, _e in procs}, lines
        assert all(d.get("native", 0) > 0 and not d.get("python") for d in lines.values()), lines
        # Every customer with usage folded natively exactly once, by the process owning its shard, while its
        # events (produced round robin over the partitions) were read by both: the other's arrived as bundles.
        customers = {k[:2] for k in expected.periods}
        assert sum(d["native"] for d in lines.values()) == len(customers) > 0, (lines, len(customers))

    # The one store holds the model's totals exactly.
    views = read_views(cluster_cfg)
    got_p = ref.views_periods(views["periods"])
    got_w = ref.views_windows(views["windows"])
    assert got_p == expected.periods, "cluster usage_by_period != reference:\n" + ref.diff(expected.periods, got_p)
    assert got_w == expected.windows, "cluster usage_by_window != reference:\n" + ref.diff(expected.windows, got_w)
    assert sorted((r, m) for _i, r, m in expected.dead_letters) == sorted((r[0], r[7]) for r in views["dead_letters"])
    more = _read_more(cluster_cfg)

    # One process over the same topic (own store, own output topics): the same rows everywhere.
    one_cfg = _config(tmp_path, "one", kafka_section(kafka.bootstrap, topic, unique("e2e-cluster-one")))
    one = run_summary(run_meter("run", "--config", str(one_cfg), "--stop-at-end", "--json", "--progress-every", "0",
                                timeout=150, extra_env={"METER_PIPELINE_CORE": "python"} if core == "native" else None))
    if core == "native":
        assert one["core"].startswith("python"), one["core"]
    assert one["counters"]["read"] == len(events)
    one_views = read_views(one_cfg)
    one_more = _read_more(one_cfg)
    assert sorted(map(json.dumps, views["periods"])) == sorted(map(json.dumps, one_views["periods"]))
    assert _dead(views) == _dead(one_views)
    assert more["rated"] and more["rated"] == one_more["rated"], "usage_rated differs from a one-process run"
    assert more["alerts"] and more["alerts"] == one_more["alerts"], "alerts_log differs from a one-process run"

    # The alert file, written by process 0 only: each alert of the store once.
    lines = [json.loads(line) for line in (tmp_path / "alerts-cluster.jsonl").read_text().splitlines()]
    assert sorted(a["alert_id"] for a in lines) == sorted(a[0] for a in more["alerts"])
    assert cluster_s < 120, f"the cluster took {cluster_s:.0f}s"


# ---- --recovery in a cluster: SIGKILL both processes mid-stream, restart both, exactly the model's totals ----

RECOVERY_EVENTS = 80_000


def _resume_front(recovery: Path) -> int:
    """The epoch a restart of the cluster would resume from, read from the recovery partitions as Bytewax does
    (the least frontier of the latest execution's workers; 0 while not every worker has recorded one)."""
    import sqlite3

    fronts: dict = {}
    latest, workers = 0, 0
    for part in recovery.glob("part-*.sqlite3"):
        con = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=5)
        try:
            for ex, count in con.execute("SELECT ex_num, worker_count FROM exs"):
                if ex >= latest:
                    latest, workers = ex, count
            for ex, w, f in con.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts"):
                fronts[(ex, w)] = max(f, fronts.get((ex, w), 0))
        except sqlite3.OperationalError:  # a table is being written: read again on the next poll
            return 0
        finally:
            con.close()
    mine = [f for (ex, _w), f in fronts.items() if ex == latest]
    return min(mine) if workers and len(mine) == workers else 0


def _recovery_workload() -> list:
    from meterflow.sample import generate_events
    from tests.e2e.test_kafka_pipeline import SPAN, START

    return list(generate_events(RECOVERY_EVENTS, tenants=3, customers=40, start_ms=START, span_ms=SPAN, seed=11,
                                dup_rate=0.05, late_rate=0.05, bad_rate=0.01, correction_rate=0.02, test_rate=0.03))


@pytest.mark.parametrize("core", ["python", "native"])
def test_two_process_cluster_with_recovery_sigkilled_mid_stream_resumes_exactly_once(kafka, tmp_path, core):
    """Both processes of a cluster, on one --recovery directory, are SIGKILLed while events are still arriving
    (after the recovery partitions hold a complete snapshot), the rest of the topic is produced, and both are
    started again with the same command plus --stop-at-end: the one store then holds exactly the model's totals
    (nothing lost, nothing counted twice), the alert file each alert of the store once, and the restart read
    only what followed the snapshot."""
    if core == "native":
        from meterflow.operators.native import AVAILABLE

        if not AVAILABLE:
            pytest.skip("meterflow_native is not built (./dev setup with cargo)")
    cluster_env = env() if core == "python" else {**env(), "METER_PIPELINE_CORE": "native"}
    events = _recovery_workload()
    expected = ref.compute(events, ref.sample_spec(TENANTS, SUBSCRIBED, ANCHOR, included=INCLUDED))
    assert not expected.latest_ties, expected.latest_ties[:3]
    topic = kafka.create_topic(unique("e2e-cluster-rec-events"), partitions=PARTITIONS)
    first = len(events) * 3 // 4  # produced before the kill; the rest after it
    produce(kafka.bootstrap, topic, events[:first], PARTITIONS)

    cfg = _config(tmp_path, "rec", kafka_section(kafka.bootstrap, topic, unique("e2e-cluster-rec")))
    # a snapshot every 500 ms; small polls, so that the kill lands while events are in flight
    cfg.write_text(cfg.read_text().replace("[pipeline]\n", '[pipeline]\nepoch_interval = "500ms"\n', 1)
                   .replace("[kafka]\n", "[kafka]\nbatch_size = 1000\n", 1))
    recovery = tmp_path / "recovery"
    addresses = ";".join(f"127.0.0.1:{p}" for p in _free_ports(2))

    def argv(i: int, *extra: str) -> List[str]:
        return ["run", "--config", str(cfg), "--recovery", str(recovery), "--addresses", addresses,
                "--process-id", str(i), "--progress-every", "0.2", "--json", *extra]

    t0 = time.monotonic()
    live = [LiveRun(argv(i), tmp_path / f"crash-p{i}.out", cluster_env) for i in range(2)]
    try:
        deadline = time.monotonic() + 90
        seen_at, last = None, None  # the resume epoch when an eighth of the events had been read; at the last poll
        armed: Optional[Tuple[int, int]] = None  # (the front of a snapshot just completed, the reads seen then)
        while True:  # tailing: once an eighth is read and a snapshot taken after those reads is complete ...
            reads = [r.last_read() for r in live]
            front = _resume_front(recovery)
            if seen_at is None and sum(reads) >= len(events) // 8:
                seen_at = front
            if armed is not None and front != armed[0]:
                armed = None  # another snapshot completed first: wait for reads after that one
            if armed is not None and sum(reads) > armed[1]:
                break  # ... and the flow read more since: those reads are in no snapshot (a fixed sleep here
                # killed, on a loaded machine, while the flow was writing a snapshot and read nothing new)
            if armed is None and seen_at is not None and front >= seen_at + 2 and last is not None and front > last:
                armed = (front, sum(reads))
            last = front
            assert all(r.proc.poll() is None for r in live) and time.monotonic() < deadline, (
                reads, [r.proc.poll() for r in live], "".join(live[0].stderr)[-2000:], "".join(live[1].stderr)[-2000:])
            time.sleep(0.05)
    finally:
        rcs = [r.kill() for r in live]
    read_at_kill = [r.last_read() for r in live]
    # process 0 was SIGKILLed; process 1 too, unless it had already stopped on losing its peer (exit 1)
    assert rcs[0] == -signal.SIGKILL and rcs[1] in (-signal.SIGKILL, 1), (
        rcs, "".join(live[0].stderr)[-2000:], "".join(live[1].stderr)[-2000:])
    assert sum(read_at_kill) < len(events), read_at_kill  # mid-stream: a quarter was not even produced yet
    # The layout the two processes agreed on (one partition per process, the shape recorded once).
    assert sorted(p.name for p in recovery.glob("part-*.sqlite3")) == ["part-0.sqlite3", "part-1.sqlite3"]
    assert json.loads((recovery / "meterflow-recovery.json").read_text()) == {
        "shards": DEFAULT_SHARDS, "processes": 2, "workers": 1}
    produce(kafka.bootstrap, topic, events[first:], PARTITIONS)

    # Restart both with the same command (to the end this time).
    procs = [LiveRun(argv(i, "--stop-at-end"), tmp_path / f"resume-p{i}.out", cluster_env) for i in range(2)]
    outs = [p.wait(150) for p in procs]
    assert [o[0] for o in outs] == [0, 0], [o[2][-2000:] for o in outs]
    summaries = [json.loads(o[1].strip().splitlines()[-1]) for o in outs]
    resumed = [s["counters"]["read"] for s in summaries]
    # resumed from the snapshot: less than the whole topic, at least what was produced after the kill
    assert len(events) - first <= sum(resumed) < len(events), (resumed, read_at_kill)
    # ... and it read again some events the killed cluster had read after that snapshot (the replay that must
    # not count twice)
    assert sum(resumed) > len(events) - sum(read_at_kill), (resumed, read_at_kill)
    if core == "native":
        assert all(s["core"].startswith("native") for s in summaries), [s["core"] for s in summaries]

    views = read_views(cfg)
    got_p = ref.views_periods(views["periods"])
    got_w = ref.views_windows(views["windows"])
    assert got_p == expected.periods, "resumed cluster usage_by_period != reference:\n" + ref.diff(expected.periods,
                                                                                                   got_p)
    assert got_w == expected.windows, "resumed cluster usage_by_window != reference:\n" + ref.diff(expected.windows,
                                                                                                   got_w)
    assert sorted((r, m) for _i, r, m in expected.dead_letters) == sorted((r[0], r[7]) for r in views["dead_letters"])
    more = _read_more(cfg)
    assert more["alerts"], "the workload crosses thresholds"
    lines = [json.loads(line) for line in (tmp_path / "alerts-rec.jsonl").read_text().splitlines()]
    assert sorted(a["alert_id"] for a in lines) == sorted(a[0] for a in more["alerts"])  # each alert once
    # None lost either, and the rated rows the same: a clean one-process run of the whole topic (Python core).
    one_cfg = _config(tmp_path, "one", kafka_section(kafka.bootstrap, topic, unique("e2e-cluster-rec-one")))
    one = run_summary(run_meter("run", "--config", str(one_cfg), "--stop-at-end", "--json", "--progress-every", "0",
                                timeout=150, extra_env={"METER_PIPELINE_CORE": "python"}))
    assert one["counters"]["read"] == len(events)
    one_more = _read_more(one_cfg)
    assert more["alerts"] == one_more["alerts"], "alerts_log differs from a clean one-process run"
    assert more["rated"] and more["rated"] == one_more["rated"], "usage_rated differs from a clean one-process run"
    print(f"cluster recovery ({core}): killed at reads {read_at_kill}, resumed reads {resumed}, "
          f"{time.monotonic() - t0:.1f}s")
