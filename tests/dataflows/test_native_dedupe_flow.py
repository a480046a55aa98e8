"""The shard's native dedupe tables (NativeMeters: fold_many over the Python Mediator's events, fold_bundle over
native bundles) against the Python fold's: after every batch of 12 days of events, the table NativeMeters copies
into a customer's meter for a snapshot holds exactly the ids (and expiries) the Python meter holds, so the
native tables are evicted where the Python ones are, and stay bounded."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from meterflow.base.stats import FlowStats
from meterflow.dataflows.metering import _ShardLogic
from meterflow.operators.mediate import Mediator, bundle_shards
from meterflow.operators.rules import Rules
from tests.dataflows.test_native_flow import BASE, DAY, config, native

HOUR = 3_600_000


def _ev(eid: str, cust: str, ts: int) -> Any:
    return (("in", eid), json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": cust,
                                     "event_type": "api_call", "timestamp": ts, "properties": {"tokens": 1}}).encode())


def _run(core: str, batches: List[List[Any]], native_mediation: bool = False) -> List[Dict[str, set]]:
    """Each batch through one shard; after each, every customer's dedupe table as a set of (fp, expiry)."""
    cfg = config(core, shards=1)
    med = native.NativeMediator(cfg, stats=FlowStats()) if native_mediation else Mediator(cfg, stats=FlowStats())
    logic = _ShardLogic(Rules(cfg), 1, None, True, med, clock=lambda: BASE + 40 * DAY,
                        native=native.NativeMeters(cfg) if core == "native" else None)
    seen = []
    for batch in batches:
        if native_mediation:
            bundles = [b for _, b in med.split(batch, False)[0]]
        else:
            bundles = [b for _, b in bundle_shards(med(batch).groups, 1)]
        logic.on_batch(bundles)
        tables = {}
        for key, meter in logic._meters.items():
            if logic._native is not None and key in logic._native.keys:
                logic._native.before_snapshot(meter)
            tables[key] = set(meter.seen.items())
        seen.append(tables)
    if core == "native":  # c3 and c2 (no entitlement) are folded natively
        assert {"acme|c3", "acme|c2"} <= logic._native.keys
    return seen


def test_native_shard_tables_hold_what_the_python_meters_hold_through_days():
    batches, k = [], 0
    for half in range(0, 2 * 24 * 12):  # 12 days, a batch every 30 minutes (so the eviction point shows), retries
        batch = []
        for j in range(9):
            cust = ("c3", "c2", "c3")[j % 3]
            batch.append(_ev(f"e{k}", cust, BASE + half * HOUR // 2 + j * 180_000))
            k += 1
        batch += [_ev(f"e{k - 20}", "c3", BASE + half * HOUR // 2), _ev(f"e{k - 13}", "c2", BASE + half * HOUR // 2)]
        batches.append(batch)
    py = _run("python", batches)
    nat = _run("native", batches)
    assert nat == py
    assert _run("native", batches, native_mediation=True) == py
    held = [len(t["acme|c2"]) for t in py]  # c2: daily periods, 2 days of grace: about 3 days of ids, not 12
    assert max(held) <= 4 * 2 * 24 * 4 and len(batches) * 4 > 2000 and any(b < a for a, b in zip(held, held[1:]))
