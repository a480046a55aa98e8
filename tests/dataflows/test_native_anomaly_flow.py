"""Anomaly detection on the native fold (issue 16): ``pipeline.core = "native"`` against ``"python"`` with an
``[anomaly]`` section, through the whole dataflow (1 and 2 workers, aborts with resume) and through one shard
(resumed from a snapshot, changelog records moving a customer between the folds). The customers with anomaly
detection fold natively (FOLD_TALLY, ``NativeMeters.keys``) and every output is the Python core's: rows,
dead letters, alerts (anomaly alerts by id with their usage, baseline and event), gateway state, counters,
and the snapshots (``MeterState.anomaly``: each day's usage with its type, ``first``, the fired days).

The streams: spiky days (a quiet history, then a burst), several anomaly metrics (a count, a sum, a sum with a
``where``), events crossing UTC days and late events (into an older day's cell, and older than the days kept:
a throwaway cell), corrections, duplicates, excluded events, floats, ints beyond 64 and 128 bits (the cell
Python holds), and rollup windows that do not divide a day (a window spanning two UTC days)."""

from __future__ import annotations

import json
import tempfile
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.stats import STATS, FlowStats
from meterflow.dataflows.metering import _ShardLogic, build_flow
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.mediate import Mediator, bundle_shards
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.state import decode_meter_state

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)

from tests.dataflows.test_native_flow import BASE, CONFIG, DAY, SETTINGS, _state, outcome, sourced  # noqa: E402

HOUR = 3_600_000
# Who folds where: beta|c4 (a wallet) and beta|c5 (an auto_overage upgrade) on Python, every other one native.
PYTHON_FOLD = {"beta|c4", "beta|c5"}
CUSTOMERS = [("acme", "c3"), ("acme", "c3"), ("acme", "c1"), ("acme", "c4"), ("acme", "c2"), ("beta", "c2"),
             ("beta", "c3"), ("beta", "c3"), ("beta", "c4"), ("beta", "c5")]


def config(core: str, shards: int = 3, window: str = "1h", factor: float = 1.5, baseline: int = 3,
           history: int = 1, metrics: Any = ("api_calls", "tokens", "gpu_seconds")):
    raw = tomllib.loads(CONFIG)
    raw["pipeline"].update(core=core, shards=shards, rollup_window=window)
    raw["anomaly"] = {"factor": factor, "baseline_days": baseline, "min_history_days": history}
    if metrics is not None:
        raw["anomaly"]["metrics"] = list(metrics)
    return parse_config(raw, "native_anomaly.toml", environ={})


def _line(eid: str, tenant: str, cust: str, etype: str, ts: int, correction: bool = False, **props: Any) -> bytes:
    body: Dict[str, Any] = {"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                            "timestamp": ts, "properties": props}
    if correction:
        body.update(correction=True, corrects="x")
    return json.dumps(body).encode()


amounts = st.one_of(st.integers(0, 6), st.sampled_from([0.5, 2.5, -1, 1e299, 2**53 + 1, "x"]))
# Ints beyond 64 bits (the native cell leaves such a day's usage to Python): only where no snapshot is read back,
# since a day's usage beyond 64 bits does not decode from a snapshot (MeterState.anomaly, schemas/state.py) on
# either core.
big_amounts = st.one_of(amounts, st.sampled_from([2**63, 10**40, -(10**40)]))


@st.composite
def spiky(draw, max_size: int = 80, big: bool = False) -> List[bytes]:
    """A stream over about ten UTC days, mostly in time order: each event on the current day (which moves on
    by 0 or 1 day), a burst of 2-12 events now and then (a spike), some late (1, 2 or 7 days: an older day's
    cell; beyond the kept days), at the day's first or last millisecond or in between."""
    out: List[bytes] = []
    day = 0
    n = draw(st.integers(1, max_size))
    while len(out) < n:
        day += draw(st.sampled_from([0, 0, 0, 1]))
        tenant, cust = draw(st.sampled_from(CUSTOMERS))
        etype = draw(st.sampled_from(["api_call", "api_call", "gpu", "other"]))
        burst = draw(st.sampled_from([1, 1, 1, 1, 2, 5, 12]))
        for _ in range(burst):
            late = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 7]))
            ts = BASE + (day - late) * DAY + draw(st.sampled_from([0, 1, 5 * HOUR, 13 * HOUR + 7, DAY - 1]))
            values = big_amounts if big else amounts
            props: Dict[str, Any] = {"tokens": draw(values), "seconds": draw(values),
                                     "kind": draw(st.sampled_from(["a100", "a100", "h100"]))}
            if draw(st.integers(0, 9)) == 0:
                props["environment"] = "test"  # acme: excluded
            eid = f"d{draw(st.integers(0, 40))}" if draw(st.integers(0, 5)) == 0 else f"u{len(out)}"
            out.append(_line(eid, tenant, cust, etype, ts, correction=draw(st.integers(0, 7)) == 0, **props))
    return out


def run_flow(cfg_of, items: List[Any], batch_size: int, workers: int = 1, aborts: int = 0) -> Dict[str, Any]:
    """The flow's outcome, its counters, and how many customers the native fold took (FOLD_TALLY)."""
    before, tally = STATS.snapshot(), native.FOLD_TALLY.snapshot()
    out: List[Any] = []
    cfg = cfg_of()
    if not aborts:
        flow = build_flow(cfg, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))],
                          recoverable=False, gateway_states=True)
        if workers == 1:
            run_main(flow)
        else:
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            init_db_dir(Path(tmp), 1)
            for _ in range(aborts + 1):
                flow = build_flow(cfg, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))])
                run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
    got = outcome(out)
    after, tally_after = STATS.snapshot(), native.FOLD_TALLY.snapshot()
    got["counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    folded = {k: tally_after.get(k, 0) - tally.get(k, 0) for k in ("native", "python")}
    return got, folded


def _customers(stream: List[bytes]) -> set:
    """The customers of known tenants in ``stream`` (acme|internal aside: excluded at mediation)."""
    keys = set()
    for raw in stream:
        ev = json.loads(raw)
        if ev["tenant_id"] in ("acme", "beta"):
            keys.add(f"{ev['tenant_id']}|{ev['customer_id']}")
    return keys


@settings(max_examples=25, **SETTINGS)
@given(stream=spiky(big=True), batch_size=st.integers(1, 12), workers=st.sampled_from([1, 2]),
       window=st.sampled_from(["1h", "1h", "7h"]), factor=st.sampled_from([1.5, 1.1, 3.0]))
def test_anomaly_customers_fold_natively_and_alert_as_the_python_core(stream, batch_size, workers, window, factor):
    items = sourced(stream)
    want, on_python = run_flow(lambda: config("python", window=window, factor=factor), items, batch_size, workers)
    got, folded = run_flow(lambda: config("native", window=window, factor=factor), items, batch_size, workers)
    assert got == want
    keys = _customers(stream)
    assert on_python["native"] == 0
    # every customer with anomaly detection folds natively but those with a wallet or an upgrade
    assert folded == {"native": len(keys - PYTHON_FOLD), "python": len(keys & PYTHON_FOLD)}


@settings(max_examples=12, **SETTINGS)
@given(stream=spiky(max_size=50), batch_size=st.integers(1, 6),
       cuts=st.lists(st.integers(0, 200), min_size=1, max_size=2), window=st.sampled_from(["1h", "7h"]))
def test_anomaly_customers_agree_through_abort_and_resume(stream, batch_size, cuts, window):
    """Aborts anywhere: the cells folded natively are in the snapshot (``MeterState.anomaly``), a resumed customer
    comes back to the native fold with no cell (its first event of each metric stops for Python)."""
    def items() -> List[Any]:
        out: List[Any] = sourced(stream)
        for c in sorted(set(cuts), reverse=True):
            out.insert(c % (len(out) + 1), TestingSource.ABORT())
        return out

    n = len(set(cuts))
    got, folded = run_flow(lambda: config("native", window=window), items(), batch_size, aborts=n)
    want, _ = run_flow(lambda: config("python", window=window), items(), batch_size, aborts=n)
    assert got == want
    assert folded["native"] >= len(_customers(stream) - PYTHON_FOLD)


def _history(tenant: str, cust: str, day: int, n: int, prefix: str, etype: str = "api_call", **props: Any):
    return [_line(f"{prefix}{day}_{i}", tenant, cust, etype, BASE + day * DAY + i * 60_000, **props)
            for i in range(n)]


def _shard(core: str, items: List[Any], batch: int, state: Any = None, read_back: bool = True, **kw: Any):
    """``items`` (event lines, ("change", raw) changelog records, or "snap" to take the shard's snapshot) through
    one shard's _ShardLogic in batches of ``batch``: the outcome, the snapshots compared as ``_state`` does
    (the last one, and each one taken at a "snap"), the customers the native fold holds at the end, and the
    native core's count of events read (``read_back`` False: the snapshots are taken, not compared)."""
    cfg = config(core, shards=1, **kw)
    nm = native.NativeMeters(cfg) if core == "native" else None
    med = Mediator(cfg, FlowStats())
    logic = _ShardLogic(Rules(cfg), 1, state, True, med, clock=lambda: BASE + 40 * DAY, native=nm)
    changes = ChangelogMediator(cfg, stats=FlowStats())
    out: List[Any] = []
    snaps: List[Any] = []
    n = 0
    for i in range(0, len(items), batch):
        parts: List[Any] = []
        run: List[Any] = []
        for item in items[i:i + batch]:
            if item == "snap":
                snaps.append(None)
                continue
            src, raw = item
            if src[0] == "change":
                n += 1
                ((_key, update),), dead = changes([(("changes", n), raw)])
                assert dead == []
                if run:
                    parts += [b for _, b in bundle_shards(med(run).groups, 1)]
                parts.append(update)
                run = []
            else:
                run.append((src, raw))
        if run:
            parts += [b for _, b in bundle_shards(med(run).groups, 1)]
        got, _ = logic.on_batch(parts)
        out += got
        while None in snaps:
            taken = logic.snapshot()[2]
            snaps[snaps.index(None)] = _state(taken) if read_back else None
    out += logic.on_eof()[0]
    final = logic.snapshot()
    return (outcome(out), _state(final[2]) if read_back else None, snaps), set(nm.keys) if nm else set(), \
        nm._core.counters()["read"] if nm and nm._core_obj is not None else 0, final


def _anomalies(got: Dict[str, Any]) -> List[Any]:
    return sorted((a["customer_id"], a["metric"], a["period_start"], a["event_id"], a["usage"], a["baseline"])
                  for a in got["alerts"].values() if a["type"] == "anomaly")


def test_a_spike_a_late_event_and_a_day_crossing_alert_as_the_python_core():
    """Pinned: acme|c3 (no subscription) and beta|c2 (soft thresholds on tokens), interleaved, with 10 calls a day
    for three days, then a spike; a late event into the day before the spike (it raises that day, and the spike
    day's baseline), an event older than the days kept (acme|c3: a throwaway cell; beta|c2: too_late), a
    correction, a float and an int beyond 64 bits in the tokens sum, and a spike the next day. The anomaly
    alerts are the Python core's, for every batch size, and those customers fold natively."""
    per: List[List[bytes]] = []
    for cust, tenant in (("c3", "acme"), ("c2", "beta")):
        s: List[bytes] = []
        for d in range(8, 11):
            s += _history(tenant, cust, d, 10, f"{cust}h", tokens=2)
        s += _history(tenant, cust, 11, 14, f"{cust}s", tokens=2.5)  # 14 calls: not above 1.5 x 10; 32.5 tokens
        s.append(_line(f"{cust}late", tenant, cust, "api_call", BASE + 10 * DAY + 5, tokens=2**63))
        s += _history(tenant, cust, 11, 3, f"{cust}t", tokens=1)  # the 16th call: above 1.5 x 31 / 3
        s.append(_line(f"{cust}old", tenant, cust, "api_call", BASE + 2 * DAY, tokens=3))  # not kept
        s.append(_line(f"{cust}c", tenant, cust, "api_call", BASE + 11 * DAY + 9, correction=True, tokens=1))
        s += _history(tenant, cust, 12, 20, f"{cust}x", tokens=1)  # the next day: 19 above 1.5 x 37 / 3
        per.append(s)
    stream = [raw for pair in zip(*per) for raw in pair]
    items = [(("in", i + 1), raw) for i, raw in enumerate(stream)]
    want = _shard("python", items, 5)[0][0]
    fired = [(c, m, e, u, b) for c, m, _, e, u, b in _anomalies(want)]
    assert fired == [(c, m, f"{c}{e}", u, b) for c in ("c2", "c3") for m, e, u, b in (
        ("api_calls", "t11_1", 16.0, 31 / 3), ("api_calls", "x12_18", 19.0, 37 / 3),
        ("tokens", "late", float(20 + 2**63), 20.0), ("tokens", "s11_12", 32.5, 20.0))], fired
    assert [d[0] for d in want["dead"].values()] == ["too_late"]  # beta|c2's old event
    for batch in (1, 3, 7, 200):
        got, keys, read, _ = _shard("native", items, batch)
        assert got == _shard("python", items, batch)[0]
        assert {"acme|c3", "beta|c2"} <= keys and read >= len(stream)


@settings(max_examples=30, **SETTINGS)
@given(before=spiky(max_size=40), after=spiky(max_size=40), batch=st.integers(1, 8),
       snap_at=st.integers(0, 40), window=st.sampled_from(["1h", "7h"]))
def test_resumed_anomaly_customers_fold_natively_and_agree(before, after, batch, snap_at, window):
    """A shard resumed from a snapshot the Python core took: the customers with anomaly detection come back to
    the native fold with their state, and the outputs and every snapshot (one taken mid-stream too: the cells
    folded natively mirrored into it) are the Python core's resumed from the same snapshot."""
    first = [(("a", i), raw) for i, raw in enumerate(before)]
    then: List[Any] = [(("b", i), raw) for i, raw in enumerate(after)]
    then.insert(snap_at % (len(then) + 1), "snap")
    state = _shard("python", first, batch, window=window)[3]
    got, keys, read, _ = _shard("native", then, batch, state=state, window=window)
    want = _shard("python", then, batch, state=state, window=window)[0]
    assert got == want
    resumed = {k for k in state[2]} - PYTHON_FOLD
    assert resumed <= keys


def test_a_resumed_customer_whose_batch_changed_nothing_is_finalized_by_the_flows_watermark():
    """Found by the test above: acme|c3 resumes with an open October row (excluded events only), then sends a
    duplicate in November, in a batch whose tick is not due. Its own watermark passed October's close, but it
    changed no row, so the Python fold does not flush it at the next tick: the flow's watermark (beta|c2's later
    event) finalizes it, and its watermark becomes the flow's. The native fold flushed it at the tick (evicting at
    its own watermark), so its snapshot kept the older watermark."""
    nov1 = 1793491200000
    before = [_line("d0", "acme", "c3", "api_call", nov1, tokens=0, environment="test"),
              _line("u21", "acme", "c3", "api_call", nov1 - 2 * DAY, tokens=0, environment="test")]
    after = [_line("d0", "acme", "c3", "api_call", nov1 + 3 * DAY, tokens=0, environment="test"),
             _line("u27", "beta", "c2", "api_call", nov1 + 3 * DAY + 13 * HOUR + 7, tokens=0, environment="test")]
    state = _shard("python", [(("a", i), raw) for i, raw in enumerate(before)], 1)[3]
    then: List[Any] = ["snap"] + [(("b", i), raw) for i, raw in enumerate(after)]
    want = _shard("python", then, 1, state=state)[0]
    assert f"'watermark': {nov1 + 3 * DAY + 13 * HOUR + 7}," in want[1]["acme|c3"][1]  # the final snapshot's
    for batch in (1, 2, 3):
        assert _shard("native", then, batch, state=state)[0] == _shard("python", then, batch, state=state)[0]


@settings(max_examples=30, **SETTINGS)
@given(steps=st.lists(st.one_of(
    st.tuples(st.sampled_from(["c3", "c3", "c5"]), st.integers(0, 6), st.integers(0, 3), st.integers(0, 8),
              st.one_of(st.integers(0, 4), st.sampled_from([0.5, 2**53 + 1, 10**40]))),
    st.tuples(st.just("change"), st.sampled_from(["c3", "c5"]), st.sampled_from(["spendy", "climb", "soft", None]))),
    min_size=1, max_size=60), batch=st.integers(1, 8))
def test_anomaly_customers_moving_between_the_folds_agree(steps, batch):
    """Changelog records move beta|c3 and beta|c5 between the native fold and the Python one (an upgrade, a
    wallet-free plan, cancelled) mid-day: the cells go with them (mirrored on release, none on the way back),
    and the alerts, rows and state are the Python core's."""
    items: List[Any] = []
    for n, s in enumerate(steps):
        if s[0] == "change":
            plan = s[2]
            body = ({"tenant_id": "beta", "customer_id": s[1], "cancelled": True} if plan is None else
                    {"tenant_id": "beta", "customer_id": s[1], "subscription": {
                        "tenant_id": "beta", "customer_id": s[1], "plan": plan, "period": "day",
                        "anchor": "2026-11-01T00:00:00Z"}})
            items.append((("change", n), json.dumps(body).encode()))
            continue
        cust, day, late, burst, v = s
        for k in range(burst + 1):
            ts = BASE + (day - (2 if late == 3 else 0)) * DAY + k * HOUR
            items.append((("in", n * 20 + k), _line(f"m{n}_{k}", "beta", cust, "api_call", ts, tokens=v)))
    big = any(s[0] != "change" and s[4] == 10**40 for s in steps)  # (a snapshot that does not decode)
    got = _shard("native", items, batch, read_back=not big)
    want = _shard("python", items, batch, read_back=not big)
    assert got[0] == want[0]


def test_the_snapshot_holds_the_cells_folded_natively():
    """The usage of the days folded natively is in the snapshot exactly (ints stay ints, a float sum its
    float), so a resume with either core continues from it."""
    stream = _history("acme", "c3", 0, 5, "a", tokens=2) + _history("acme", "c3", 1, 4, "b", tokens=0.1)
    items = [(("in", i + 1), raw) for i, raw in enumerate(stream)]
    got, keys, _read, final = _shard("native", items, 3)
    assert got == _shard("python", items, 3)[0] and "acme|c3" in keys
    rows = {r.metric: r for r in decode_meter_state(final[2]["acme|c3"]).anomaly}
    assert rows["api_calls"].usage == [5, 4] and [type(v) for v in rows["api_calls"].usage] == [int, int]
    assert rows["tokens"].usage == [10, 0.1 + 0.1 + 0.1 + 0.1] and type(rows["tokens"].usage[1]) is float


def test_a_native_customer_whose_batch_only_moves_its_watermark_evicts_at_that_tick():
    """A resumed customer's batch has nothing to emit (an excluded earlier event, now only an unmetered one) but
    moves its watermark past the end + late_grace of a period it holds: the Python fold flushes it at that tick
    (process with flush) and evicts the period; the native path did not flush a customer with nothing dirty, so its
    meter kept the closed rows until the flow's watermark finalized them, and the snapshot taken after that batch
    differed (found by hypothesis in test_resumed_anomaly_customers_fold_natively_and_agree)."""
    def line(eid, etype, ts):
        return json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c2", "event_type": etype,
                           "timestamp": ts, "properties": {"tokens": 0, "environment": "test"}}).encode()

    test_resumed_anomaly_customers_fold_natively_and_agree.hypothesis.inner_test(  # type: ignore[attr-defined]
        before=[line("u4", "api_call", BASE)], after=[line("u5", "other", BASE + 2 * DAY + 15 * HOUR + 7)], batch=7,
        snap_at=0, window="1h")
