"""End to end: a recovery directory written with the old default shard count resumes after the default changed.

``pipeline.shards`` defaults to 64 (256 before): a directory records the count its snapshots were taken with.
A run whose configuration leaves ``pipeline.shards`` unset resumes such a directory with the recorded count
(one line on stderr says so) and its outputs equal one clean run's; a configuration that sets another count is
refused at start in one line, as before. Real ``meter run`` subprocesses, embedded chDB, a JSONL input that grows
between the runs (the file source resumes after the last line it read).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from meterflow.runner import RECOVERY_MARKER
from meterflow.sample import sample_config_toml
from meterflow.schemas.config import DEFAULT_SHARDS
from tests.e2e import reference as ref
from tests.e2e.support import read_views, run_meter, run_summary, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TENANTS = ["acme", "globex"]
SUBSCRIBED = {"acme": ["cust_1"]}
ANCHOR = "2026-03-15T00:00:00Z"


def _events(start: int, n: int):
    return [orjson.dumps({"event_id": f"e{i}", "tenant_id": TENANTS[i % 2], "customer_id": f"cust_{i % 7}",
                          "event_type": "api_call", "timestamp": f"2026-04-{1 + i % 20:02d}T{i % 24:02d}:00:00Z",
                          "properties": {"tokens": i % 13, "region": "eu", "model": "m", "latency_ms": 10,
                                         "user_id": f"u{i % 5}"}})
            for i in range(start, start + n)]


def test_a_directory_of_the_old_default_resumes_with_its_shard_count_and_another_count_is_refused(tmp_path):
    assert DEFAULT_SHARDS != 256
    cfg = write_config(tmp_path / "meterflow.toml", sample_config_toml(TENANTS, SUBSCRIBED, ANCHOR, 5), tmp_path / "ch")
    assert "shards" not in cfg.read_text()
    path, recovery = tmp_path / "events.jsonl", tmp_path / "recovery"
    first, second = _events(0, 40), _events(40, 30)
    path.write_bytes(b"".join(e + b"\n" for e in first))
    run = ("run", "--config", str(cfg), "--input", str(path), "--recovery", str(recovery), "--json",
           "--progress-every", "0")
    old = run_meter(*run, extra_env={"METER_PIPELINE_SHARDS": "256"})  # (what a run of the old default left)
    assert run_summary(old)["counters"]["read"] == 40
    assert json.loads((recovery / RECOVERY_MARKER).read_text()) == {"shards": 256}

    with path.open("ab") as f:
        f.write(b"".join(e + b"\n" for e in second))
    refused = run_meter(*run, check=False, extra_env={"METER_PIPELINE_SHARDS": str(DEFAULT_SHARDS)})
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"pipeline.shards = 256, but the configuration has pipeline.shards = {DEFAULT_SHARDS}" in refused.stderr

    resumed = run_meter(*run)  # pipeline.shards unset: the directory's count
    assert "holds snapshots taken with pipeline.shards = 256; resuming with 256 shards" in resumed.stderr
    assert run_summary(resumed)["counters"]["read"] == 30  # after the first run's last line: none read twice
    assert json.loads((recovery / RECOVERY_MARKER).read_text()) == {"shards": 256}
    spec = ref.sample_spec(TENANTS, SUBSCRIBED, datetime.fromisoformat(ANCHOR), included=5)
    want = ref.compute(first + second, spec)
    views = read_views(cfg)
    got_p, got_w = ref.views_periods(views["periods"]), ref.views_windows(views["windows"])
    assert got_p == want.periods, "usage_by_period != reference:\n" + ref.diff(want.periods, got_p)
    assert got_w == want.windows, "usage_by_window != reference:\n" + ref.diff(want.windows, got_w)


def test_a_new_directory_records_the_default(tmp_path: Path):
    cfg = write_config(tmp_path / "meterflow.toml", sample_config_toml(TENANTS, SUBSCRIBED, ANCHOR, 5), tmp_path / "ch")
    path, recovery = tmp_path / "events.jsonl", tmp_path / "recovery"
    path.write_bytes(b"".join(e + b"\n" for e in _events(0, 5)))
    proc = run_meter("run", "--config", str(cfg), "--input", str(path), "--recovery", str(recovery), "--json",
                     "--progress-every", "0")
    assert "resuming with" not in proc.stderr
    assert json.loads((recovery / RECOVERY_MARKER).read_text()) == {"shards": DEFAULT_SHARDS}
