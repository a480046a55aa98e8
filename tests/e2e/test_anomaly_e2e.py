"""Anomaly alerts end to end: `meter run` (JSONL embedded mode, 1 and 2 workers) over a randomised history fires
exactly the independent model's anomaly alerts, into the alert JSONL file and ClickHouse's alerts_log (read back
with `meter alerts --type anomaly --json`), with the baseline and factor."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from meterflow.base.timeutil import ms_to_iso
from tests.e2e.alert_support import read_jsonl
from tests.e2e.support import run_meter, run_summary, write_jsonl
from tests.operators.anomaly_model import DAY, config_dict, make_events, model_anomalies

pytestmark = pytest.mark.timeout(300)

FACTOR, BASELINE_DAYS, MIN_HISTORY = 2.0, 4, 2


def toml_of(d: dict, chdb, alerts) -> str:
    p, t, a = d["pipeline"], d["tenants"][0], d["anomaly"]
    out = ['[pipeline]\n' + "".join(f'{k} = "{v}"\n' for k, v in p.items()),
           f'[[tenants]]\nid = "{t["id"]}"\nexclude_when = {{ environment = "test" }}\n'
           f'excluded_customers = ["internal"]\n']
    for m in d["metrics"]:
        out.append("[[metrics]]\n" + "".join(f'{k} = "{v}"\n' for k, v in m.items() if k != "where")
                   + ("".join(f'where = {{ {k} = "{v}" }}\n' for k, v in m["where"].items()) if "where" in m else ""))
    out.append(f'[anomaly]\nfactor = {a["factor"]}\nbaseline_days = {a["baseline_days"]}\n'
               f'min_history_days = {a["min_history_days"]}\n')
    out.append(f'[clickhouse]\ndsn = "chdb://{chdb}"\n[alerts]\njsonl = "{alerts}"\n')
    return "\n".join(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_anomalies_through_the_dataflow_match_the_model(tmp_path, workers):
    events = make_events(random.Random(1301).randint, 700)
    expected = model_anomalies(events, FACTOR, BASELINE_DAYS, MIN_HISTORY, 1, None)
    assert len(expected) >= 20 and {m for _, _, m, _ in expected} == {"calls", "large", "tokens"}
    cfg = tmp_path / "meterflow.toml"
    alerts = tmp_path / "alerts.jsonl"
    cfg.write_text(toml_of(config_dict(FACTOR, BASELINE_DAYS, MIN_HISTORY, "6h", None), (tmp_path / "ch").resolve(),
                           alerts.resolve()))
    # Two inputs with 2 workers (one partition each); each customer's events stay in one file, in order.
    if workers == 1:
        inputs = [write_jsonl(tmp_path / "events.jsonl", [e.raw() for e in events])]
    else:
        inputs = [write_jsonl(tmp_path / "a.jsonl", [e.raw() for e in events if e.customer == "c1"]),
                  write_jsonl(tmp_path / "b.jsonl", [e.raw() for e in events if e.customer != "c1"])]
    argv = ["run", "--config", str(cfg), "--workers", str(workers), "--json", "--progress-every", "0"]
    for p in inputs:
        argv += ["--input", str(p)]
    counters = run_summary(run_meter(*argv, timeout=240))["counters"]
    assert counters["read"] == len(events)

    want = sorted((eid, c, m, ms_to_iso(d * DAY)) for eid, c, m, d in expected)
    got = [a for a in read_jsonl(alerts) if a["type"] == "anomaly"]
    assert sorted((a["event_id"], a["customer_id"], a["metric"], a["period_start"]) for a in got) == want
    assert len({a["alert_id"] for a in got}) == len(got)
    for a in got:
        assert a["factor"] == FACTOR and a["threshold_pct"] == 200.0 and a["action"] == "notify"
        assert Fraction(a["usage"]) > FACTOR * Fraction(a["baseline"]) > 0
        assert a["usage_pct"] == round(a["usage"] * 100 / a["baseline"], 6)

    proc = run_meter("alerts", "--config", str(cfg), "--type", "anomaly", "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert sorted((r["event_id"], r["customer_id"], r["metric"], r["period_start"]) for r in rows) == want
    by_id = {a["alert_id"]: a for a in got}
    assert all(r["baseline"] == by_id[r["alert_id"]]["baseline"] and r["factor"] == FACTOR for r in rows)
