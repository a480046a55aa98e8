"""Smoke test of the benchmark harness's plumbing (``python -m benchmarks``) on tiny sizes.

Runs the ``raw`` and ``redis-counters`` contenders as the harness runs them (their own processes,
measured with psutil) over a few thousand events on the real broker, checks that the totals and alerts
agree with the reference model, and runs a short breach-to-alert latency measurement. The benchmark's
figures themselves are never asserted here (2-core CI is noisy); the Quix venv is not needed.
"""

from __future__ import annotations

import io
import shutil
from types import SimpleNamespace

import pytest

from benchmarks.__main__ import Bench, compare, markdown, parse_args, table_rows, targets
from benchmarks.peers.common import ReferenceMeter, Rules, month_start_ms, parse_usage
from benchmarks.peers.meterflow import config_toml
from benchmarks.workload import LatencyPlan, build_workload
from meterflow.schemas.config import parse_config

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.timeout(120)]


def test_latency_plan_crossings_match_the_reference_model():
    plan = LatencyPlan(rate=400, seconds=2.0, customers=8)
    ts = 1_793_491_200_000 + 5
    ref = ReferenceMeter(Rules(plan.rules()))
    for i in range(plan.n_events):
        ref.feed(plan.event(i, ts)[1])
    assert ref.fired == plan.crossings(plan.n_events, month_start_ms(ts))
    assert ref.fired  # the quotas are spread so that crossings happen


def test_meterflow_config_of_the_rules_is_valid():
    import tomllib

    wl = build_workload(500, customers=10, tenants=2)
    cfg = parse_config(tomllib.loads(config_toml(wl.rules, wl.subscribed)), "bench", environ={})
    assert [m.code for m in cfg.metrics] == ["api_calls", "tokens"]
    assert len(cfg.subscriptions) == 20
    plan = LatencyPlan(rate=100, seconds=1.0, customers=3)
    cfg = parse_config(tomllib.loads(config_toml(plan.rules(), plan.subscribed())), "bench", environ={})
    over = {s.customer_id: s.overrides["api_calls"].included for s in cfg.subscriptions}
    assert over["c0"] == plan.included[0] and over["warm"] == 1


def test_workload_has_duplicates_bad_and_excluded_events():
    wl = build_workload(3000, customers=30, tenants=3)
    rules = Rules(wl.rules)
    usable = [parse_usage(v, rules) for _k, v in wl.items]
    assert sum(u is None for u in usable) > 0  # bad, unknown tenant, test traffic, seat counts
    ids = [(u.key, u.event_id) for u in usable if u is not None]
    assert len(set(ids)) < len(ids)  # retried duplicates
    assert {k for k, _v in wl.items} & {b"bad", b"ghost|c"}  # broken JSON, schema violations, unknown tenant


def test_raw_and_redis_counters_agree_with_the_reference(kafka, redis_server, tmp_path, request):
    args = parse_args(["--events", "3000", "--customers", "30", "--included", "100", "--only", "raw,redis-counters",
                       "--latency-customers", "20", "--results", str(tmp_path)])
    from rich.console import Console

    bench = Bench(args, Console(file=io.StringIO()))
    request.addfinalizer(lambda: shutil.rmtree(bench.work, ignore_errors=True))
    # A database of its own: the contender flushes it.
    redis_db = SimpleNamespace(url=redis_server.url.rsplit("/", 1)[0] + "/15", pid=redis_server.pid)
    bench.setup(kafka, redis_db, topic="bench-smoke.events")
    assert len(bench.wl.expected_alerts) > 0
    raw = bench.run_throughput("raw")
    assert raw.ran, raw.error
    assert raw.events == 3000 and raw.eps > 0 and raw.peak_rss_mib > 0
    counters = bench.run_throughput("redis-counters")
    assert counters.ran, counters.error
    assert counters.events == 3000
    assert counters.totals_ok, counters.totals
    assert counters.alerts.startswith("ok"), counters.alerts
    assert counters.cpu_s_per_m is not None and counters.state_bytes_per_id > 0

    lat = bench.run_latency("redis-counters", rate=1000, seconds=1.5)
    assert "error" not in lat, lat
    assert lat["received_alerts"] == lat["expected_alerts"] > 0
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]

    counters.latency = lat
    raw.ratio_to_raw, counters.ratio_to_raw = 1.0, counters.eps / raw.eps
    rows = [raw, counters]
    cells = table_rows(rows)
    assert cells[1][0] == "redis-counters" and cells[1][3].startswith("ok")
    doc = {"targets": targets({r.name: r for r in rows}, None)}
    assert "redis-counters" in markdown(rows, doc)


def test_compare_reports_wrong_totals():
    ok, text = compare({"a|x|api_calls|0": 2.0}, {"a|x|api_calls|0": 2.0})
    assert ok and text.startswith("ok")
    ok, text = compare({"a|x|api_calls|0": 3.0, "b": 1.0}, {"a|x|api_calls|0": 2.0, "c": 1.0})
    assert not ok and "1 differ" in text and "1 missing" in text and "1 extra" in text


def test_issue16_targets_are_marked_met_or_missed_from_the_native_figures():
    from benchmarks.peers.report import Row

    rows = {"raw": Row("raw", ran=True, eps=800_000.0), "quixstreams": Row("quixstreams", ran=True, eps=40_000.0),
            "meterflow-1w-native": Row("meterflow-1w-native", ran=True, eps=440_000.0, cpu_s_per_m=5.0,
                                       latency={"p99_ms": 80.0})}
    core = {"core_eps": 100_000.0, "decode_eps": 1_600_000.0, "dedupe_bytes_per_id": 33.0,
            "native_core_eps": 2_000_000.0, "native_flow_core_eps": 1_800_000.0, "native_flow_alerts": 45,
            "native_flow_alerts_ok": True, "native_flow_alerts_against": "the workload's 45 expected alerts",
            "native_dedupe_bytes_per_id": 15.5}
    got = {t["target"]: t for t in targets(rows, core) if t["issue"] == 16}
    # the goal's core includes threshold detection: the native path's figure, the batch core beside it
    assert got["native core events/s per worker"]["value"] == 1_800_000.0
    assert got["native core events/s per worker"]["gap"] == "met"
    assert got["native batch core events/s per worker (no threshold detection)"]["value"] == 2_000_000.0
    vs_decode = got["native core / bare msgspec decode"]
    assert vs_decode["value"] == 1.125 and vs_decode["met"]
    short = {t["target"]: t for t in targets(rows, dict(core, native_flow_core_eps=800_000.0)) if t["issue"] == 16}
    assert short["native core events/s per worker"]["gap"] == "1.2x short"
    assert short["native batch core events/s per worker (no threshold detection)"]["gap"] == "met"
    assert short["native core / bare msgspec decode"]["gap"] == "2.0x short"
    wrong = {t["target"]: t for t in targets(rows, dict(core, native_flow_alerts_ok=False)) if t["issue"] == 16}
    assert wrong["native core events/s per worker"]["met"] is None
    assert wrong["native core events/s per worker"]["gap"].startswith("WRONG ALERTS (45 against")
    assert wrong["native core / bare msgspec decode"]["gap"] == "not measured"
    old = {t["target"]: t for t in targets(rows, {k: v for k, v in core.items() if not k.startswith("native_flow")})
           if t["issue"] == 16}  # a result file of the build before: the batch core alone is no figure for the goal
    assert old["native core events/s per worker"]["gap"] == "not measured"
    assert got["end to end / raw ceiling (native)"]["gap"] == "met"  # 0.55
    assert got["CPU s per million events (native)"]["gap"] == "1.2x over"
    assert got["breach-to-alert p99 at half saturation (native)"]["met"]
    assert got["throughput vs Quix Streams (native)"]["gap"] == "met"  # 11x
    assert got["native dedupe bytes per tracked id"]["met"]
    slow = dict(rows, **{"meterflow-1w-native": Row("meterflow-1w-native", ran=True, eps=80_000.0, cpu_s_per_m=12.0)})
    got = {t["target"]: t for t in targets(slow, dict(core, native_dedupe_bytes_per_id=None)) if t["issue"] == 16}
    assert got["end to end / raw ceiling (native)"]["gap"] == "5.0x short"
    assert got["breach-to-alert p99 at half saturation (native)"]["gap"] == "not measured"
    assert got["native dedupe bytes per tracked id"]["gap"] == "not measured"
    doc = {"targets": targets(slow, core)}
    text = markdown([], doc)
    assert "| 16 | end to end / raw ceiling (native) | 0.5 x | 0.10 x | 5.0x short |" in text


def test_the_core_step_times_the_native_path_with_threshold_detection_and_checks_its_alerts(tmp_path):
    """``python -m benchmarks.peers.meterflow core`` as the harness runs it (tiny workload): the native path's
    figure with threshold detection is there, its threshold alerts are exactly the workload's, and every
    customer was folded natively (none left on Python: the bench rules are soft thresholds only)."""
    import json

    from benchmarks.peers.meterflow import main
    from meterflow.operators.native import AVAILABLE

    if not AVAILABLE:
        pytest.skip("meterflow_native is not built")
    wl = build_workload(6000, 40, 3)
    assert wl.expected_alerts  # (the tiny workload crosses thresholds)
    cfg, events, expected, out = (tmp_path / n for n in ("core.toml", "events.jsonl", "expected.json", "core.json"))
    cfg.write_text(config_toml(wl.rules, wl.subscribed))
    events.write_bytes(b"".join(v + b"\n" for _, v in wl.items))
    expected.write_text(json.dumps(wl.expected_alerts))
    assert main(["core", "--config", str(cfg), "--events", str(events), "--batch", "512", "--out", str(out),
                 "--expected-alerts", str(expected)]) == 0
    doc = json.loads(out.read_text())
    assert doc["native_flow_core_eps"] > 0 and doc["native_core_eps"] > 0
    assert doc["native_flow_alerts"] == len(wl.expected_alerts) and doc["native_flow_alerts_ok"] is True
    customers = wl.counts["customers_with_usage"]
    assert doc["native_flow_folded_native"] >= customers and doc["native_flow_folded_python"] == 0
    assert doc["native_flow_evaluated"] == doc["native_flow_folded_native"]
    # a wrong expectation is reported, not hidden
    expected.write_text(json.dumps(wl.expected_alerts[1:]))
    assert main(["core", "--config", str(cfg), "--events", str(events), "--batch", "512", "--out", str(out),
                 "--expected-alerts", str(expected)]) == 0
    assert json.loads(out.read_text())["native_flow_alerts_ok"] is False


def test_a_meterflow_alert_gives_its_crossing_event_s_ingested_at_and_the_report_splits_the_latency_there():
    import orjson

    from benchmarks.peers.meterflow import parse_alert
    from benchmarks.peers.report import Row

    alert = {"type": "threshold_crossed", "tenant_id": "acme", "customer_id": "c1", "metric": "api_calls",
             "period_start": "2026-12-01T00:00:00.000Z", "threshold_pct": 75.0,
             "ingested_at": "2026-12-03T10:00:00.040Z", "detected_at": "2026-12-03T10:00:00.052Z"}
    key, detected, ingested = parse_alert(orjson.dumps(alert))
    assert key is not None and detected - ingested == 12.0
    assert parse_alert(orjson.dumps(dict(alert, type="blocked"))) == (None, None, None)
    lat = {"rate": 40_000, "p50_ms": 9.0, "p99_ms": 60.0, "max_ms": 70.0,
           "produced_to_detected_ms": {"p50": 8.0, "p99": 50.0}, "detected_to_consumed_ms": {"p50": 1.0, "p99": 9.0},
           "produced_to_ingested_ms": {"p50": 5.0, "p99": 41.0}, "ingested_to_detected_ms": {"p50": 3.0, "p99": 12.0}}
    peer = {k: v for k, v in lat.items() if not k.startswith(("produced_to_ingested", "ingested_to"))}
    text = markdown([Row("meterflow-1w-native", ran=True, eps=80_000.0, latency=lat),
                     Row("quixstreams", ran=True, eps=8_000.0, latency=peer)], {"targets": []})
    assert "| meterflow-1w-native @ 40,000/s | 8 / 50 | 5 / 41 | 3 / 12 | 1 / 9 |" in text
    assert "| quixstreams @ 40,000/s | 8 / 50 | — | — | 1 / 9 |" in text
