"""`meter demo` on the native core: its configuration has anomaly detection (every customer) and its customers
fold natively (operators/native.py FOLD_TALLY, written by the meter process at exit), all but the prepaid ones
with a wallet, and the spiking customer's anomaly alert still fires."""

from __future__ import annotations

import json

import pytest

from tests.e2e.support import run_meter

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)


def _demo(work, core: str, tally=None):
    extra = {"METER_PIPELINE_CORE": core}
    if tally is not None:
        extra["METERFLOW_NATIVE_TALLY"] = str(tally)
    run_meter("demo", "--events", "4000", "--dir", str(work), timeout=300, extra_env=extra)
    return [json.loads(line) for line in (work / "alerts.jsonl").read_text().splitlines()]


def _spikes(alerts):
    return sorted((a["metric"], a["event_id"], a["usage"], a["baseline"], a["period_start"]) for a in alerts
                  if a["type"] == "anomaly" and a["customer_id"] == "cust_spike")


def test_the_demo_folds_its_anomaly_customers_natively(tmp_path):
    tally = tmp_path / "tally.jsonl"
    alerts = _demo(tmp_path / "native", "native", tally)
    counts = [json.loads(line) for line in tally.read_text().splitlines()]
    folded = {k: sum(c.get(k, 0) for c in counts) for k in ("native", "python", "released")}
    wallets = {(a["tenant_id"], a["customer_id"]) for a in alerts if a["type"].startswith("wallet")}
    # 3 tenants x 60 sample customers and cust_spike, of which at most the 15 prepaid ones (a wallet) on Python
    assert folded["native"] >= 100 and folded["python"] <= 15 and folded["released"] == 0, folded
    assert folded["python"] >= len(wallets)
    # the spike (its history before the period, then ten times its daily average): the Python core's alerts
    spikes = _spikes(alerts)
    assert [m for m, *_ in spikes] == ["api_calls", "tokens"], spikes
    assert spikes == _spikes(_demo(tmp_path / "python", "python"))
