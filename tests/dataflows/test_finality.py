"""Finality through the real Bytewax flow: a period row (and its rated row) becomes ``final`` once the flow's
watermark passes period_end + late_grace, also for a customer that sends nothing after its period ends,
with one worker and with two (the customers' shards on different workers than the events that move the
watermark), and across an abort-and-resume from the recovery store."""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from meterflow.base.timeutil import ms_to_iso
from meterflow.dataflows.metering import build_flow
from meterflow.schemas.config import parse_config

D = 86_400_000
NOV = 1_761_955_200_000  # 2025-11-01T00:00:00Z: in the past (the mediator rejects times beyond max_clock_skew)
DEC = NOV + 30 * D

CFG = parse_config(json.loads(json.dumps({
    "pipeline": {"late_grace": "2d", "flush_interval": "50ms", "shards": 8},
    "tenants": [{"id": "acme"}],
    "metrics": [{"code": "calls", "event_type": "api_call"}],
    "plans": [{"code": "pro", "entitlements": {"calls": {"included": 3, "overage_rate": 0.5}}}],
    "subscriptions": [{"tenant_id": "acme", "customer_id": f"c{i}", "plan": "pro", "period": "month",
                       "anchor": "2026-01-01T00:00:00Z"} for i in range(6)],
})), "finality.toml", environ={})


def ev(i, cust, ts):
    return (("events.jsonl", i), json.dumps({"event_id": f"e{i}", "tenant_id": "acme", "customer_id": cust,
                                             "event_type": "api_call", "timestamp": ms_to_iso(ts)}).encode())


def stream():
    items = []
    # November: every customer c0..c5 uses 5 calls (2 over the 3 included), then falls silent.
    for i in range(30):
        items.append(ev(i + 1, f"c{i % 6}", NOV + D + i * 1000))
    # December: only "busy" sends; its events move the watermark inside the grace, then past it.
    items.append(ev(100, "busy", DEC + D))  # Nov's period_end + 1 d: inside the 2 d grace
    items.append(ev(101, "c0", DEC - 5))  # a late November event inside the grace: counts
    items.append(ev(102, "busy", DEC + 2 * D + 1))  # past period_end + grace: November closes
    items.append(ev(103, "c1", DEC - 7))  # too late now
    return items


def latest(out, attr):
    best = {}
    for em in out:
        for r in getattr(em, attr):
            k = (r.customer_id, r.metric, r.period_start)
            if k not in best or r.version >= best[k].version:
                best[k] = r
    return best


def check(out):
    periods, rated = latest(out, "periods"), latest(out, "rated")
    for i in range(6):
        p, r = periods[(f"c{i}", "calls", NOV)], rated[(f"c{i}", "calls", NOV)]
        calls = 6.0 if i == 0 else 5.0
        assert (p.value, p.final) == (calls, True), p
        assert (r.usage, r.final, float(r.overage_amount)) == (calls, True, (calls - 3) * 0.5), r
        assert r.version == p.version
    assert not periods[("busy", "calls", DEC)].final
    assert ("busy", "calls", DEC) not in rated  # no subscription: metered, not rated
    dead = [d.reason for em in out for d in em.dead_letters]
    assert dead == ["too_late"]


@pytest.mark.parametrize("workers", [1, 2])
def test_silent_customers_become_final_when_the_watermark_passes(workers):
    out = []
    flow = build_flow(CFG, TestingSource(stream(), batch_size=3), [("out", TestingSink(out))])
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    check(out)


def test_finality_survives_an_abort_and_resume():
    items = stream()
    items.insert(32, TestingSource.ABORT())  # after the first December event
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        init_db_dir(Path(tmp), 1)
        for _ in range(2):
            flow = build_flow(CFG, TestingSource(items, batch_size=3), [("out", TestingSink(out))])
            run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
    check(out)
