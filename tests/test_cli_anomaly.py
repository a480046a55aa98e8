"""`meter alerts --type anomaly` reads well (the baseline and the multiple next to the usage), and `meter demo`
produces and shows an anomaly from its sample workload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from meterflow.schemas.alerts import Alert, alert_id
from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import Emission
from meterflow.sinks.clickhouse import ClickHouseSink
from tests.sinks.test_alert_sinks import make_alert
from tests.test_cli_alerts import BASE_TOML, run

DAY = 1_793_491_200_000 + 7 * 86_400_000  # 2026-11-08T00:00:00Z


def anomaly_alert() -> Alert:
    return Alert(alert_id=alert_id("anomaly", "acme", "cust_1", "api_calls", DAY), type="anomaly", tenant_id="acme",
                 customer_id="cust_1", metric="api_calls", period_start="2026-11-08T00:00:00Z",
                 period_end="2026-11-09T00:00:00Z", threshold_pct=300.0, included=None, usage=931.0,
                 usage_pct=310.333333, enforcement="", action="notify", event_id="evt_spike",
                 event_time="2026-11-08T09:30:00Z", ingested_at="2026-11-08T09:30:00.010Z",
                 detected_at="2026-11-08T09:30:00.040Z", account_name="Acme One", baseline=300.0, factor=3.0)


def test_alerts_type_anomaly_shows_usage_baseline_and_multiple(capsys, tmp_path, chdb_path, ch_database):
    part = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database)).build("ch", 0, 1)
    part.write_batch([Emission(alerts=[anomaly_alert(), make_alert("cust_1", 75.0)])])
    part.close()
    path = tmp_path / "meterflow.toml"
    path.write_text(BASE_TOML + f'\n[clickhouse]\ndsn = "chdb://{chdb_path}"\ndatabase = "{ch_database}"\n')
    rc, out, err = run(capsys, "alerts", "--config", str(path), "--type", "anomaly")
    assert rc == 0, err
    for header in ("day (UTC)", "usage that day", "baseline / day", "multiple", "alert above", "account"):
        assert header in out, header
    row = next(line for line in out.splitlines() if "evt_spike" in line)
    for cell in ("2026-11-08", "acme", "cust_1", "Acme One", "api_calls", "931", "300", "3.10x", "3x", "30"):
        assert cell in row, (cell, row)
    assert "threshold_crossed" not in out and "evt_cust_1_75" not in out
    rc, out, err = run(capsys, "alerts", "--config", str(path), "--type", "anomaly", "--json")
    (rec,) = [json.loads(line) for line in out.splitlines()]
    assert (rec["baseline"], rec["factor"], rec["usage"], rec["threshold_pct"]) == (300.0, 3.0, 931.0, 300.0)
    # In the table of every type, an anomaly reads against its baseline, not a quota.
    rc, out, err = run(capsys, "alerts", "--config", str(path))
    row = next(line for line in out.splitlines() if "evt_spike" in line)
    assert "3x baseline" in row and "931 / baseline 300" in row


def test_demo_produces_and_shows_anomalies(tmp_path):
    # In its own process (chDB opens one path per process; the demo has its own), with the clock injected
    # (2026-12-01T05:00:00Z): the demo never depends on today's date here.
    now = 1_796_083_200_000 + 5 * 3_600_000
    code = (f"import sys, meterflow.demo as d; d.now_ms = lambda: {now}; "
            f"sys.exit(d.run_demo(3000, {str(tmp_path / 'demo')!r}, 7))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "anomaly=2" in out  # api_calls and tokens of the spiking customer
    assert "anomalies: a day's usage above 3x" in out and "cust_spike" in out
    alerts = [json.loads(line) for line in (tmp_path / "demo" / "alerts.jsonl").read_text().splitlines()]
    spikes = sorted((a["metric"], a["period_start"], a["customer_id"]) for a in alerts if a["type"] == "anomaly")
    assert spikes == [("api_calls", "2026-12-01T00:00:00Z", "cust_spike"), ("tokens", "2026-12-01T00:00:00Z",
                                                                             "cust_spike")]
