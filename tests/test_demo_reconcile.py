"""`meter demo --reconcile` (a smoke test, as a subprocess): the demo's sample reconciled against the invoice file
it generates; then `meter reconcile --json` over the same file finds exactly what was planted."""

from __future__ import annotations

import csv
import json

import pytest

from tests.e2e.support import run_meter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_reconcile_finds_what_it_planted(tmp_path):
    wd = tmp_path / "demo"
    proc = run_meter("demo", "--events", "6000", "--dir", str(wd), "--reconcile", timeout=240)
    out = proc.stdout
    assert "planted on api_calls: 1 timing, 2 under_bill, 2 over_bill, 1 credit" in out
    assert "totals per class" in out and "raw vs metered accuracy: 100.00 %" in out
    for cls, owner in (("timing", "watchlist"), ("under_bill", "revops"), ("over_bill", "csm"),
                       ("credit", "finance")):
        assert any(cls in line and owner in line for line in out.splitlines()), (cls, out[-3000:])

    invoices = wd / "invoices.csv"
    with invoices.open(newline="") as f:
        lines = list(csv.DictReader(f))
    doc = json.loads(run_meter("reconcile", "--config", str(wd / "meterflow.toml"), "--invoices", str(invoices),
                               "--json").stdout)
    found = {}
    for r in doc["rows"]:
        found.setdefault(r["class"], []).append(r)
    assert {c: len(v) for c, v in found.items() if c != "match"} == \
        {"timing": 1, "under_bill": 2, "over_bill": 2, "credit": 1}
    assert all(r["metric"] == "api_calls" for c, v in found.items() if c != "match" for r in v)
    assert all(r["raw_units"] == r["metered_units"] for r in doc["rows"]) and doc["accuracy_pct"] == 100.0
    assert all(r["diff_units"] < 0 for r in found["under_bill"] + found["timing"] + found["credit"])
    assert all(r["diff_units"] > 0 for r in found["over_bill"])
    credit = found["credit"][0]
    assert [c["invoice_id"] for c in credit["evidence"]["credits"]] == \
        [ln["invoice_id"] for ln in lines if ln["kind"] == "credit"]
    timing = found["timing"][0]
    assert timing["evidence"]["late_events"] > 0 and timing["invoiced_units"] == timing["evidence"]["raw_units_at_cut"]
    # one row per key (with its period: the demo's spiking customer also has last month's history)
    assert len(doc["rows"]) == len({(ln["tenant_id"], ln["customer_id"], ln["metric"], ln["period_start"])
                                    for ln in lines})
