"""The native dedupe table (native/src/dedupe.rs, ``meterflow_native.IdTable``) against operators/dedupe.py
``IdTable`` on the same (fingerprint, expiry, watermark) sequences: identical decisions, evictions, smallest
expiries and exported contents (as sets), through growth, eviction, snapshots both ways, fingerprints that
share their low (or high) bits and fingerprint 0; its memory per id; and BatchCore's tables against the
Python meters' on event streams: the same ids, evicted at the same points."""

from __future__ import annotations

import json
import random
import tomllib
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats
from meterflow.operators.dedupe import NO_EXPIRY, IdTable, fingerprint
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.state import DedupeState

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)
import meterflow_native  # noqa: E402

NativeTable = meterflow_native.IdTable
SEG = 1 << 28  # an expiry segment of the native table (ms)
U64 = (1 << 64) - 1

# fingerprints: random; sharing the low 20 bits (IdTable's home slot); sharing the high bits (the native home
# slot); small; the extremes; and 0, the empty marker of both
fps = st.one_of(
    st.integers(1, U64),
    st.integers(0, 40).map(lambda k: (k << 20) | 0x5A5A5),
    st.integers(0, 40).map(lambda k: (0xABCD << 48) | k),
    st.integers(0, 64),
    st.sampled_from([0, 1, 2, U64, U64 - 1, 1 << 63, NO_EXPIRY]),
)
W0 = 1_793_491_200_000
expiries = st.one_of(
    st.integers(W0 - 10_000, W0 + 10_000),
    st.integers(0, 40).map(lambda k: W0 + k * SEG + 7),  # more segments than the table keeps: the side map
    st.integers(0, U64),
    st.sampled_from([0, 1, SEG - 1, SEG, U64, NO_EXPIRY - 1, NO_EXPIRY, NO_EXPIRY + 1]),
)
wms = st.one_of(st.integers(W0 - 10_000, W0 + 10_000), st.integers(-5, (1 << 63) - 1),
                st.sampled_from([0, -1, W0, NO_EXPIRY, NO_EXPIRY + 1]))
ops = st.lists(st.one_of(
    st.tuples(st.just("check"), fps, expiries, wms),
    st.tuples(st.just("check"), fps, expiries, wms),
    st.tuples(st.just("check"), fps, expiries, wms),
    st.tuples(st.just("evict"), wms),
    st.tuples(st.just("snapshot")),
), max_size=400)


def _items(t: Any) -> set:
    return set(t.items())


def _roundtrip(py: IdTable, nat: Any) -> Tuple[IdTable, Any]:
    """Each table's snapshot read by the other implementation (the formats are one)."""
    fk, fe = nat.to_state()
    st_py = py.to_state()
    return IdTable.from_state(DedupeState(fingerprints=fk, expiries=fe)), NativeTable.from_state(
        st_py.fingerprints, st_py.expiries)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_native_table_decides_exactly_as_idtable(ops: List[Tuple[Any, ...]]) -> None:
    py, nat = IdTable(), NativeTable()
    for op in ops:
        if op[0] == "check":
            _, fp, e, wm = op
            assert nat.check_add(fp, e, wm) == py.check_add(fp, e, wm), op
        elif op[0] == "evict":
            assert nat.evict(op[1]) == py.evict(op[1]), op
        else:
            py, nat = _roundtrip(py, nat)
        assert nat.min_expiry() == py.min_expiry()
    nat.check()
    assert _items(nat) == _items(py)
    assert len(nat) == len(_items(py))  # (IdTable's len counts a check_add(0) it did not store)
    assert all(nat.get(fp) == e for fp, e in py.items())
    assert nat.get(0) is None


@settings(max_examples=100, deadline=None)
@given(seq=st.lists(st.tuples(fps, st.integers(0, 30), st.integers(0, 20)), max_size=300),
       cuts=st.lists(st.integers(0, 299), max_size=12))
def test_eviction_at_any_point_changes_no_decision(seq, cuts) -> None:
    """The meter's watermark only grows, and an id whose expiry < wm behaves as an absent one from then on:
    evicting at the current watermark at any moment changes no decision (and only drops expired ids)."""
    kept, evicting = NativeTable(), NativeTable()
    wm = W0
    for k, (fp, ttl, step) in enumerate(seq):
        wm += step
        e = wm + ttl * 5
        assert evicting.check_add(fp, e, wm) == kept.check_add(fp, e, wm)
        if k in cuts:
            evicting.evict(wm)
            assert _items(evicting) == {(f, x) for f, x in kept.items() if x >= wm}
    assert {(f, x) for f, x in kept.items() if x >= wm} == {(f, x) for f, x in evicting.items() if x >= wm}


def test_growth_low_bit_collisions_and_memory_against_idtable() -> None:
    rng = random.Random(5)
    py, nat = IdTable(), NativeTable()
    pool = [rng.getrandbits(64) | 1 for _ in range(30_000)] + [(k << 24) | 0xABCDEF for k in range(1, 10_000)]
    rng.shuffle(pool)
    wm = W0
    worst = 0.0
    for n, fp in enumerate(pool, 1):
        e = W0 + 30 * 86_400_000 if n % 3 else wm + 86_400_000  # a period's end, or the dedupe window's
        assert nat.check_add(fp, e, wm) is False is py.check_add(fp, e, wm)
        if n >= 1000:
            worst = max(worst, nat.nbytes() / len(nat))
        wm += 1
    assert worst <= 16.0, worst
    assert nat.wide() == 0
    for fp in pool[::7]:
        assert nat.check_add(fp, 0, wm) is True is py.check_add(fp, 0, wm)
    assert _items(nat) == _items(py)
    cut = W0 + 86_400_000 + 20_000
    assert nat.evict(cut) == py.evict(cut)
    assert _items(nat) == _items(py) and len(nat) < len(pool)
    assert nat.nbytes() / len(nat) <= 16.0
    nat.check()


def test_expiries_a_year_apart_and_fingerprint_zero() -> None:
    year = 365 * 86_400_000
    py, nat = IdTable(), NativeTable()
    for k in range(3000):
        fp = fingerprint(f"evt_{k}")
        e = W0 + (k % 2) * year + k % 5  # last year's period end and this year's: two segments
        assert nat.check_add(fp, e, W0) is False is py.check_add(fp, e, W0)
    assert nat.check_add(0, W0, W0) is False is py.check_add(0, W0, W0)
    assert nat.check_add(0, W0, W0) is False is py.check_add(0, W0, W0)  # never held: never a duplicate
    assert _items(nat) == _items(py) and nat.wide() == 0
    assert nat.evict(W0 + 10) == py.evict(W0 + 10) == W0 + year
    assert _items(nat) == _items(py) and len(nat) == 1500
    with pytest.raises(ValueError, match="zero fingerprint"):
        NativeTable.from_state((0).to_bytes(8, "little"), (5).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="differ in length"):
        NativeTable.from_state(b"\x01" * 8, b"")


# -- BatchCore's tables against the Python meters' (the eviction points) -------------------------------------

DAY = 86_400_000
CONFIG = """
[pipeline]
late_grace = "2h"
dedupe_window = "3h"
max_clock_skew = "1h"

[[tenants]]
id = "acme"

[[metrics]]
code = "api_calls"
event_type = "api_call"
aggregation = "count"

[[plans]]
code = "pro"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c1"
plan = "pro"
period = "day"
anchor = "2026-11-03T07:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c2"
plan = "pro"
period = "year"
anchor = "2026-11-02T00:00:00Z"
"""
CFG = parse_config(tomllib.loads(CONFIG), "test", environ={})
NOW = W0 + 60 * DAY


def _line(eid: str, cust: str, ts: int) -> bytes:
    return json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": cust, "event_type": "api_call",
                       "timestamp": ts}).encode()


def _compare(batches: List[List[Tuple[Any, bytes]]]) -> int:
    """Feed both paths batch by batch; after each, every customer's native table holds exactly the ids (and
    expiries) of its CustomerMeter's. Returns how many evictions dropped ids."""
    rules = Rules(CFG)
    rules.gateway_states = False
    stats = FlowStats()
    med = Mediator(CFG, stats, clock=lambda: NOW)
    meters: Dict[str, CustomerMeter] = {}
    core = native.NativeBatchCore(CFG, clock=lambda: NOW)
    peak, evictions = 0, 0
    for batch in batches:
        core.process(batch)
        for key, events in med(batch).groups.items():
            m = meters.get(key)
            if m is None:
                m = meters[key] = CustomerMeter(rules, key, stats=stats)
            m.process([events], flush=False)
        held = 0
        for key, m in meters.items():
            fk, fe = core._core.export_seen(key)
            nat = IdTable.from_state(DedupeState(fingerprints=fk, expiries=fe))
            assert set(nat.items()) == set(m.seen.items()), key
            held += len(nat)
        assert core._core.tracked_ids() == held
        if held < peak:
            evictions += 1
        peak = held
    assert core.counters()["duplicates"] == stats.snapshot().get("duplicates", 0)
    return evictions


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["c1", "c2", "c3"]), st.integers(0, 90),
                                 st.integers(-8, 3)), max_size=150),
       size=st.integers(1, 25))
def test_batchcore_tables_hold_what_the_python_meters_hold(events, size) -> None:
    # time moves forward an hour per step on average (late ones too), over days: ids expire and are evicted
    lines, t = [], W0
    for eid, cust, step, late in events:
        t += step * 60_000
        lines.append(_line(f"e{eid}", cust, t + late * 3_600_000))
    items = [(("t", i), raw) for i, raw in enumerate(lines)]
    _compare([items[i:i + size] for i in range(0, len(items), size)])


def test_long_run_native_table_stays_bounded() -> None:
    """Ten days of one customer with daily periods: the native table evicts as the Python one does, so it holds
    about a day of ids, not ten."""
    items, k = [], 0
    for hour in range(240):
        batch = []
        for j in range(50):
            ts = W0 + hour * 3_600_000 + j * 60_000
            batch.append((("t", k), _line(f"h{hour}_{j}", "c1", ts)))
            k += 1
        if hour:
            batch.append((("t", k), _line(f"h{hour - 1}_0", "c1", W0 + hour * 3_600_000)))  # a retry: duplicate
            k += 1
        items.append(batch)
    assert _compare(items) >= 9
