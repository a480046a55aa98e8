"""`meter charges` after a real `meter run` (embedded: JSONL in, chDB out): the rated rows of every price model,
read back from `usage_rated` with exact amounts, as a table with totals per currency and as JSON lines."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from tests.e2e.support import run_meter, write_config

CONFIG = """
[pipeline]
late_grace = "6h"

[[tenants]]
id = "acme"

[[metrics]]
code = "tokens"
event_type = "api_call"
aggregation = "sum"
property = "tokens"

[[metrics]]
code = "api_calls"
event_type = "api_call"

[[plans]]
code = "unit"
[plans.entitlements.tokens]
price = { model = "per_unit", unit_amount = 0.0003 }

[[plans]]
code = "grad"
[plans.entitlements.tokens]
included = 10000
price = { model = "tiered", tiers = [{ up_to = 5000, unit_amount = 0.02 }, { up_to = 20000, unit_amount = 0.015 }, { unit_amount = 0.01 }] }
[plans.entitlements.api_calls]
included = 2
overage_rate = 0.0004

[[plans]]
code = "vol"
currency = "EUR"
[plans.entitlements.tokens]
price = { model = "volume", tiers = [{ up_to = 5000, unit_amount = 0.02 }, { up_to = 20000, unit_amount = 0.015 }, { unit_amount = 0.01 }] }

[[plans]]
code = "commit"
[plans.entitlements.tokens]
price = { model = "package", package_size = 1000, package_amount = 5, minimum = 100.0 }

[[subscriptions]]
tenant_id = "acme"
customer_id = "c_unit"
plan = "unit"
anchor = "2026-10-01T00:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c_grad"
plan = "grad"
anchor = "2026-10-01T00:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c_vol"
plan = "vol"
anchor = "2026-10-01T00:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c_min"
plan = "commit"
anchor = "2026-10-01T00:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c_custom"
plan = "grad"
anchor = "2026-10-01T00:00:00Z"
[subscriptions.overrides.tokens]
price = { model = "per_unit", unit_amount = 0.0004 }
"""  # noqa: E501 - price cards on one line, as in the contract


def _event(n: int, customer: str, ts: str, tokens: int) -> bytes:
    return orjson.dumps({"event_id": f"e{n}", "tenant_id": "acme", "customer_id": customer, "event_type": "api_call",
                         "timestamp": ts, "properties": {"tokens": tokens}})


@pytest.fixture(scope="module")
def charged(tmp_path_factory):
    """One run: October usage of five customers, then one November event of another customer whose watermark
    (past 2026-11-01 + late_grace) makes every October row final; its own November row stays open."""
    tmp: Path = tmp_path_factory.mktemp("charges")
    cfg = write_config(tmp / "meterflow.toml", CONFIG, tmp / "ch")
    plan = [("c_unit", 200000), ("c_unit", 140000),  # 340,000 x 0.0003 = 102 exactly
            ("c_grad", 5000), ("c_grad", 5000), ("c_grad", 5000),  # 15,000 tiered = 250.00, 3 calls over 2
            ("c_vol", 15000),  # volume: 15,000 x 0.015 = 225.00 (EUR)
            ("c_min", 1001),  # package: 2 x 5 = 10, minimum 100
            ("c_custom", 15000)]  # override: 15,000 x 0.0004 = 6
    lines = [_event(i, c, f"2026-10-{5 + i:02d}T12:00:00Z", tok) for i, (c, tok) in enumerate(plan)]
    lines.append(_event(99, "c_unit", "2026-11-02T00:00:00Z", 10))
    events = tmp / "events.jsonl"
    events.write_bytes(b"".join(line + b"\n" for line in lines))
    run_meter("run", "--config", str(cfg), "--input", str(events), "--progress-every", "0")
    return cfg


def _charges(cfg: Path, *args: str):
    proc = run_meter("charges", "--config", str(cfg), *args)
    return proc.stdout


def test_charges_json_has_exact_amounts_for_every_model(charged):
    out = _charges(charged, "--json")
    rows = [json.loads(line, parse_float=Decimal) for line in out.splitlines()]
    by = {(r["customer_id"], r["metric"], r["period_start"]): r for r in rows}
    oct_, nov = "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"
    assert set(by) == {("c_unit", "tokens", oct_), ("c_unit", "tokens", nov), ("c_grad", "tokens", oct_),
                       ("c_grad", "api_calls", oct_), ("c_vol", "tokens", oct_), ("c_min", "tokens", oct_),
                       ("c_custom", "tokens", oct_), ("c_custom", "api_calls", oct_)}
    money = ("charge", "overage_amount", "minimum", "amount")

    def pick(key):
        r = by[key]
        return (r["plan"], r["currency"], r["price_model"], r["usage"], r["included"], r["overage_units"],
                *(r[m] for m in money), r["custom_rate"], r["final"])

    D = Decimal
    assert pick(("c_unit", "tokens", oct_)) == ("unit", "USD", "per_unit", D(340000), None, D(0), D("102.00"),
                                                D("0.00"), D("0.00"), D("102.00"), False, True)
    assert pick(("c_grad", "tokens", oct_)) == ("grad", "USD", "tiered", D(15000), D(10000), D(5000),
                                                D("250.00"), D("75.00"), D("0.00"), D("250.00"), False, True)
    assert pick(("c_grad", "api_calls", oct_)) == ("grad", "USD", "overage", D(3), D(2), D(1), D("0.0004"),
                                                   D("0.0004"), D("0.00"), D("0.0004"), False, True)
    assert pick(("c_vol", "tokens", oct_)) == ("vol", "EUR", "volume", D(15000), None, D(0), D("225.00"),
                                               D("0.00"), D("0.00"), D("225.00"), False, True)
    assert pick(("c_min", "tokens", oct_)) == ("commit", "USD", "package", D(1001), None, D(0), D("10.00"),
                                               D("0.00"), D("100.00"), D("100.00"), False, True)
    assert pick(("c_custom", "tokens", oct_))[2:] == ("per_unit", D(15000), D(10000), D(5000), D("6.00"),
                                                      D("2.00"), D("0.00"), D("6.00"), True, True)
    assert by[("c_custom", "api_calls", oct_)]["custom_rate"] is False  # the override prices tokens only
    assert pick(("c_unit", "tokens", nov))[-1] is False  # November is still open
    # the exact digits are in the JSON text itself: numbers, not strings, no binary-float tail
    unit = next(line for line in out.splitlines() if '"c_unit"' in line and oct_ in line)
    assert '"charge":102.00,' in unit and '"amount":102.00,' in unit
    assert '"charge":0.0004,' in next(line for line in out.splitlines() if '"c_grad"' in line and "api_calls" in line)


def test_charges_filters_by_customer_and_period_start(charged):
    rows = [json.loads(line) for line in _charges(charged, "--json", "--customer", "c_unit",
                                                  "--period-start", "2026-11-01T00:00:00Z").splitlines()]
    assert [(r["customer_id"], r["period_start"], r["usage"]) for r in rows] == \
        [("c_unit", "2026-11-01T00:00:00Z", 10.0)]


def test_charges_table_shows_every_column_and_totals_per_currency(charged):
    out = _charges(charged, "--tenant", "acme", "--period-start", "2026-10-01T00:00:00Z")
    head = " ".join(w for w in out[:out.index("┡")].replace("┃", " ").split() if not w.startswith("┏"))
    assert head == ("charges (7 rated rows), tenant acme overage overage customer period metric plan currency model "
                    "usage included units charge amount minimum amount custom final"), head
    unit = next(line for line in out.splitlines() if "c_unit" in line)
    assert "per_unit" in unit and "340,000" in unit and "102.00" in unit and "final" in unit
    totals = out[out.index("totals per currency"):]
    cells = {line.split()[1]: line.split()[1::2] for line in totals.splitlines() if "USD" in line or "EUR" in line}
    # currency, rows, final rows, charge, overage amount, amount
    assert cells["EUR"] == ["EUR", "1", "1", "225.00", "0.00", "225.00"]
    # USD charge 102 + 250 + 0.0004 + 10 + 6 + 0 (c_custom's one call is inside its 2), overage 75 + 0.0004 + 2,
    # amount with c_min's minimum 100 instead of its 10
    assert cells["USD"] == ["USD", "6", "6", "368.0004", "77.0004", "458.0004"]


def test_charges_help_explains_the_columns():
    out = run_meter("charges", "--help").stdout
    assert "overage amount = charge(usage) - charge(min(usage, included))" in out.replace("\n", " ")
    assert "--period-start" in out and "--json" in out


def test_a_bad_period_start_is_one_line(charged):
    proc = run_meter("charges", "--config", str(charged), "--period-start", "October", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("meter: error: --period-start:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
