"""`meter demo` end to end on a small sample: units, money and alerts in its summary, and a configuration that
uses every price model (the wallet's metric has no price card, so the config loads)."""

from __future__ import annotations

import re

from meterflow.schemas.config import load_config
from tests.e2e.support import run_meter


def test_demo_shows_units_money_and_spend_alerts(tmp_path):
    work = tmp_path / "demo"
    out = run_meter("demo", "--events", "30000", "--dir", str(work), timeout=300).stdout

    spike = int(re.search(r"30,000 events for 3 tenants and ([\d,]+) of cust_spike", out).group(1).replace(",", ""))
    assert f"read {30_000 + spike:,} = accepted" in out
    assert "top customers by share of included api_calls this period" in out
    money = out[out.index("top customers by overage amount"):out.index("totals per currency")]
    rows = [line for line in money.splitlines() if "cust_" in line]
    assert len(rows) == 10, money
    # sorted by overage amount, largest first; the heaviest customer (Zipf rank 0) leads
    amounts = [float(line.split("│")[9].strip().replace(",", "")) for line in rows]
    assert amounts == sorted(amounts, reverse=True) and amounts[0] > 0, amounts
    assert "cust_00000" in rows[0]
    totals = out[out.index("totals per currency"):out.index("dead letters by reason")]
    assert re.search(r"│ EUR\s+│\s+30 │", totals) and re.search(r"│ USD\s+│", totals), totals
    assert re.search(r"spend_crossed=\d+", out) and "spend_crossed: tenant" in out and "passed 10.00" in out
    cfg = load_config(work / "meterflow.toml", environ={})
    models = {e.price.model for p in cfg.plans for e in p.entitlements.values() if e.price is not None}
    models |= {o.price.model for s in cfg.subscriptions for o in s.overrides.values() if o.price is not None}
    assert models == {"tiered", "volume", "package", "staircase", "per_unit"}
    assert any(e.price is not None and e.price.minimum > 0 for p in cfg.plans for e in p.entitlements.values())
    assert any(s.wallet is not None for s in cfg.subscriptions)
    assert "meter charges --config" in out
