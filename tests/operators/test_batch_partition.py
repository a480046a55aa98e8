"""Property test: a customer's outputs depend on its item sequence only, never on how that sequence is cut
into batches (``CustomerMeter.process`` calls) or where the flushes fall.

One customer's events and changelog records are mediated once (the real ``Mediator`` and ``ChangelogMediator``)
and fed to fresh ``CustomerMeter`` objects twice: all at once, and cut into random batches, each flushed or
not (``flush=False`` keeps rows pending as the dataflow does between ticks), with a final ``flush``. The alerts
by id (every field but the wall-clock ones), the final window, period and rated rows per key (the last row of
the highest version, as the ClickHouse tables and the Kafka consumers keep them), the last gateway state per
metric and the final snapshot must be identical.

The plans chain ``auto_overage`` upgrades (``next_plan``: starter -> growth -> top) and mix soft, hard and
``auto_overage`` without a next plan, prices and spend thresholds on metrics the first plan does not rate, so a
move re-rates rows that were flushed before it. Changelog records (other plans, a cancellation) reset the moves.
p95/p99 metrics are metered here but carry no entitlement: those are checked once per batch by design
(README: Entitlements, alerts and enforcement), so their alerts do depend on the batches. Two configurations: a
late_grace longer than the streams (no period closes) and one of 2h, where periods close within a stream, so a
flush evicts a closed period's rows while later items still read it: a plan change after the event that closed it
(its final rows keep the plan they closed under), the unblocked alert of the blocked period before a new one, the
gateway state of a metric whose current period closed (its final usage, kept with the entitlements).
"""

from __future__ import annotations

import json
from array import array
from decimal import Decimal
from typing import Any, Dict, List, Tuple

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.entitlements import EntitlementUpdate
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.state import decode_meter_state

DAY = 86_400_000
H = 3_600_000
BASE = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KEY = "acme|c1"

PLANS = [
    {"code": "starter", "entitlements": {
        "calls": {"included": 3, "thresholds": [50, 100], "enforcement": "auto_overage", "next_plan": "growth"},
        "tokens": {"included": 20, "thresholds": [50, 100], "price": {"model": "per_unit", "unit_amount": 0.5}},
        "peak": {"included": 8, "thresholds": [100], "enforcement": "hard"}}},
    {"code": "growth", "entitlements": {
        "calls": {"included": 6, "thresholds": [80, 100], "enforcement": "auto_overage", "next_plan": "top"},
        "tokens": {"included": 40, "thresholds": [100], "enforcement": "hard",
                   "price": {"model": "tiered", "tiers": [{"up_to": 10, "unit_amount": 1}, {"unit_amount": 0.5}]},
                   "spend_thresholds": [4, 12]},
        "gpu": {"price": {"model": "per_unit", "unit_amount": 2}, "spend_thresholds": [3, 10]},
        "peak": {"included": 12, "thresholds": [50, 100], "price": {"model": "per_unit", "unit_amount": 0.1}}}},
    {"code": "top", "entitlements": {
        "calls": {"included": 10, "thresholds": [100], "enforcement": "auto_overage", "overage_rate": 0.5,
                  "price": {"model": "volume", "tiers": [{"up_to": 5, "unit_amount": 1}, {"unit_amount": 0.5}]}},
        "gpu": {"included": 5, "thresholds": [100], "enforcement": "hard",
                "price": {"model": "package", "package_size": 2, "package_amount": 3}},
        "uniq": {"included": 3, "thresholds": [100], "price": {"model": "per_unit", "unit_amount": 1}}}},
    {"code": "flat", "entitlements": {
        "calls": {"included": 2, "thresholds": [100], "enforcement": "auto_overage", "next_plan": "top"},
        "lat95": {"price": {"model": "per_unit", "unit_amount": 0.01}}}},
]


def _config(late_grace: str) -> Any:
    return parse_config(json.loads(json.dumps({
        "pipeline": {"late_grace": late_grace, "dedupe_window": "1d", "rollup_window": "1h"},
        "tenants": [{"id": "acme", "exclude_when": {"environment": "test"}}],
        "metrics": [
            {"code": "calls", "event_type": "api_call"},
            {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens"},
            {"code": "peak", "event_type": "api_call", "aggregation": "max", "property": "tokens"},
            {"code": "uniq", "event_type": "api_call", "aggregation": "unique_count", "property": "tokens"},
            {"code": "lat95", "event_type": "api_call", "aggregation": "p95", "property": "tokens"},
            {"code": "gpu", "event_type": "gpu", "aggregation": "sum", "property": "seconds"},
        ],
        "plans": PLANS,
        "subscriptions": [{"tenant_id": "acme", "customer_id": "c1", "plan": "starter", "period": "day",
                           "anchor": "2026-01-01T06:00:00Z"}],
    })), "partition.toml", environ={})


CONFIG = _config("10d")  # no period closes within a stream
# Periods close within a stream (06:00 + 2h): a day's 20:00 event closes the period that ended at its 06:00, so a
# plan change after it meets a closed period that no flush has sent yet.
SHORT = _config("2h")


@st.composite
def sequences(draw) -> List[Tuple[str, bytes]]:
    """One customer's items in order: events over about three daily periods (some late, some duplicates,
    corrections, excluded ones) and now and then a changelog record."""
    out: List[Tuple[str, bytes]] = []
    version = 0
    for i in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 11)) == 0:
            version += draw(st.sampled_from([1, 1, 2]))
            plan = draw(st.sampled_from(["starter", "growth", "top", "flat", None]))
            body: Dict[str, Any] = {"tenant_id": "acme", "customer_id": "c1"}
            if plan is None:
                body["cancelled"] = True
            else:
                body["subscription"] = {"tenant_id": "acme", "customer_id": "c1", "plan": plan, "period": "day",
                                        "anchor": "2026-01-01T06:00:00Z"}
            out.append(("change", json.dumps(body).encode()))
            continue
        etype = draw(st.sampled_from(["api_call", "api_call", "api_call", "gpu"]))
        ts = BASE + draw(st.sampled_from([0, 1, 5 * H, 6 * H, 6 * H + 1, 20 * H])) + draw(st.integers(0, 2)) * DAY
        props: Dict[str, Any] = {"tokens": draw(st.one_of(st.integers(0, 9), st.sampled_from([0.5, -2]))),
                                 "seconds": draw(st.integers(0, 4))}
        if draw(st.integers(0, 12)) == 0:
            props["environment"] = "test"
        eid = f"d{draw(st.integers(0, 5))}" if draw(st.integers(0, 6)) == 0 else f"e{i}"
        ev: Dict[str, Any] = {"event_id": eid, "tenant_id": "acme", "customer_id": "c1", "event_type": etype,
                              "timestamp": ts, "properties": props}
        if draw(st.integers(0, 9)) == 0:
            ev.update(correction=True, corrects="x")
        out.append(("event", json.dumps(ev).encode()))
    return out


def mediated(seq: List[Tuple[str, bytes]], config: Any = CONFIG) -> List[Any]:
    """The items the meter step receives for the customer: mediated events and ``EntitlementUpdate`` records."""
    stats = FlowStats()
    events, changes = Mediator(config, stats=stats), ChangelogMediator(config, stats=stats)
    out: List[Any] = []
    for i, (kind, raw) in enumerate(seq):
        if kind == "change":
            res, _ = changes([(("changes.jsonl", i), raw)])
            out += [v for _, v in res]
        else:
            groups, _ = events([(("events.jsonl", i), raw)])
            for _, v in groups.items():
                out += list(v)
    return out


def groups_of(items: List[Any]) -> List[Any]:
    """``process``'s argument: consecutive events in one list, changelog records between them."""
    out: List[Any] = []
    for it in items:
        if type(it) is EntitlementUpdate:
            out.append(it)
        elif out and type(out[-1]) is list:
            out[-1].append(it)
        else:
            out.append([it])
    return out


_WALL_CLOCK = ("detected_at", "ingested_at", "updated_at")


def run(items: List[Any], cuts: List[Tuple[int, bool]], config: Any = CONFIG) -> Dict[str, Any]:
    """Feed ``items`` in batches of the ``cuts`` sizes (each flushed or not), then flush: the outcome."""
    meter = CustomerMeter(Rules(config), KEY, stats=FlowStats())
    emissions = []
    i = 0
    for size, flush in cuts:
        emissions.append(meter.process(groups_of(items[i:i + size]), flush=flush))
        i += size
    emissions.append(meter.flush())
    rows: Dict[Tuple[Any, ...], Tuple[int, Any]] = {}
    alerts: Dict[str, Any] = {}
    gateway: Dict[str, Any] = {}

    def keep(k: Tuple[Any, ...], r: Any) -> None:
        prev = rows.get(k)
        if prev is None or r.version >= prev[0]:
            rows[k] = (r.version, msgspec.structs.asdict(r))

    for em in emissions:
        for w in em.windows:
            keep(("w", w.metric, w.window_start, tuple(w.dimensions.items())), w)
        for p in em.periods:
            keep(("p", p.metric, p.period_start), p)
        for r in em.rated or ():
            keep(("r", r.metric, r.period_start), r)
        for a in em.alerts:
            # (an alert of a changelog record's re-evaluation has no event: its event_time is the wall clock)
            skip = _WALL_CLOCK + (("event_time",) if not a.event_id else ())
            alerts[a.alert_id] = {k: v for k, v in msgspec.structs.asdict(a).items() if k not in skip}
        for g in em.gateway or ():
            # a removed state is a DEL of the metric's hash (sinks/redis.py): its other fields reach no one
            gateway[g.metric] = {"deleted": True} if g.deleted else \
                {k: v for k, v in msgspec.structs.asdict(g).items() if k not in _WALL_CLOCK}
    # A rated row's removal (a change took the metric's price away) leaves no row to read; it carries the plan and
    # version of the flush that sent it, and is sent only if a rated row was, so it is left out.
    rows = {k: v for k, v in rows.items() if not v[1].get("deleted")}
    # (the gateway keeps a metric's last removal: a DEL that one run sends and the other not is a difference too)
    st = decode_meter_state(meter.snapshot())
    # The dedupe table as the set of its live ids: its slot order follows its resizes and evictions.
    fps, exps = array("Q", st.seen.fingerprints), array("Q", st.seen.expiries)
    seen = sorted((f, e) for f, e in zip(fps, exps) if e > st.watermark)
    # The review queue samples the rated rows at flushes by design (README: Limits, review routes are decided at
    # flush ticks): an overage seen at one flush opens an item that a later upgrade does not close. Left out.
    state = _unordered(msgspec.to_builtins(msgspec.structs.replace(st, seen=None, reviews=[])))
    return {"rows": rows, "alerts": alerts, "gateway": gateway, "plan": meter.ent.rule.plan, "state": state,
            "seen": seen}


def _unordered(v: Any) -> Any:
    """A snapshot's lists hold dicts and sets in insertion order, which follows the emissions: sorted here."""
    if isinstance(v, dict):
        return {k: _unordered(x) for k, x in v.items()}
    if isinstance(v, list):
        return sorted((_unordered(x) for x in v), key=repr)
    return v


@pytest.mark.parametrize("config", [CONFIG, SHORT], ids=["open-periods", "closing-periods"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=sequences(), data=st.data())
def test_outputs_do_not_depend_on_how_the_items_are_batched(config, seq, data):
    items = mediated(seq, config)
    whole = run(items, [(len(items), True)], config)
    cuts: List[Tuple[int, bool]] = []
    left = len(items)
    while left:
        size = data.draw(st.integers(1, max(1, min(left, 6))))
        cuts.append((size, data.draw(st.booleans())))
        left -= size
    batched = run(items, cuts, config)
    assert batched["plan"] == whole["plan"]
    assert batched["rows"] == whole["rows"]
    assert batched["seen"] == whole["seen"]
    assert batched["gateway"] == whole["gateway"]
    assert batched["alerts"] == whole["alerts"]
    assert batched["state"] == whole["state"]


def test_an_upgrade_re_rates_the_rows_flushed_before_it():
    """starter rates tokens only; the third call moves the customer to growth, which prices gpu and peak. The gpu
    row was flushed under starter (no price, no rated row) in the first batch: the move re-emits it with growth's
    price, as one batch does."""
    def ev(eid: str, etype: str, **props: Any) -> Tuple[str, bytes]:
        return "event", json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c1", "event_type": etype,
                                    "timestamp": BASE + 7 * H, "properties": props}).encode()

    items = mediated([ev("g1", "gpu", seconds=2), ev("c1", "api_call", tokens=1), ev("c2", "api_call", tokens=1),
                      ev("c3", "api_call", tokens=1)])
    whole, batched = run(items, [(4, True)]), run(items, [(1, True), (3, True)])
    period = ("r", "gpu", BASE + 6 * H)  # the daily period from 06:00
    assert whole["plan"] == batched["plan"] == "growth"
    rated = batched["rows"][period][1]
    assert (rated["plan"], rated["price_model"], rated["usage"], rated["charge"]) == ("growth", "per_unit", 2.0,
                                                                                      Decimal("4.00"))
    assert batched["rows"] == whole["rows"]
    assert batched["alerts"] == whole["alerts"]


def test_a_plan_change_keeps_the_plan_of_the_periods_closed_before_it():
    """late_grace 2h: the 20:00 call closes the daily period that ended at 06:00 (06:00 + 2h before the watermark).
    The plan changes after it twice: the third call of the new period moves the customer from starter to growth
    (auto_overage), then a changelog record moves it to top. The closed period's final rows keep starter's rating,
    in one batch as with a flush after the closing call; the open period is rated under top."""
    def ev(eid: str, ts: int, **props: Any) -> Tuple[str, bytes]:
        return "event", json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c1", "event_type": "api_call",
                                    "timestamp": ts, "properties": props}).encode()

    top = {"tenant_id": "acme", "customer_id": "c1", "subscription": {
        "tenant_id": "acme", "customer_id": "c1", "plan": "top", "period": "day", "anchor": "2026-01-01T06:00:00Z"}}
    seq = [ev("a1", BASE + H, tokens=30), ev("a2", BASE + 2 * H, tokens=4),  # the period from Dec 31 06:00
           ev("b1", BASE + 20 * H, tokens=1), ev("b2", BASE + 20 * H, tokens=1), ev("b3", BASE + 20 * H, tokens=1),
           ("change", json.dumps(top).encode())]
    items = mediated(seq, SHORT)
    whole = run(items, [(len(items), True)], SHORT)
    for cuts in ([(3, True), (3, True)], [(3, False), (3, True)], [(2, True), (1, True), (2, False), (1, True)],
                 [(5, False), (1, False)], [(5, True), (1, True)]):
        batched = run(items, cuts, SHORT)
        assert batched["rows"] == whole["rows"], cuts
        assert batched["alerts"] == whole["alerts"], cuts
    closed, current = BASE - 18 * H, BASE + 6 * H
    rated = whole["rows"][("r", "tokens", closed)][1]
    assert (rated["plan"], rated["final"], rated["included"], rated["usage"], rated["price_model"], rated["charge"],
            rated["version"]) == ("starter", True, 20.0, 34.0, "per_unit", Decimal("17.00"), 3)
    period = whole["rows"][("p", "tokens", closed)][1]
    assert (period["included"], period["overage_units"], period["final"], period["version"]) == (20.0, 14.0, True, 3)
    assert whole["plan"] == "top"
    # the open period: three calls under top, rated (calls has a price under top only), re-rated twice (version 3 + 2)
    calls = whole["rows"][("r", "calls", current)][1]
    assert (calls["plan"], calls["final"], calls["usage"], calls["included"], calls["version"]) == ("top", False, 3.0,
                                                                                                  10.0, 5)
    plans = {(k[1], k[2]): (v[1]["plan"], v[1]["final"]) for k, v in whole["rows"].items() if k[0] == "r"}
    assert plans == {("calls", closed): ("starter", True), ("peak", closed): ("starter", True),
                     ("tokens", closed): ("starter", True), ("calls", current): ("top", False),
                     ("uniq", current): ("top", False)}


def _call(eid: str, ts: int, etype: str = "api_call", **props: Any) -> Tuple[str, bytes]:
    return "event", json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c1", "event_type": etype,
                                "timestamp": ts, "properties": props}).encode()


def _change(plan: str) -> Tuple[str, bytes]:
    return "change", json.dumps({"tenant_id": "acme", "customer_id": "c1", "subscription": {
        "tenant_id": "acme", "customer_id": "c1", "plan": plan, "period": "day", "anchor": "2026-01-01T06:00:00Z"}})\
        .encode()


def test_the_unblocked_alert_of_a_new_period_reports_the_closed_period_final_usage():
    """late_grace 2h. A call of Jan 2 05:00 (the period from Jan 1 06:00) peaks at 9 > 8: peak (hard) blocks. A gpu
    event of Jan 3 20:00 closes that period; a flush after it evicts its rows. The next call (Jan 3 20:00) starts a
    new period: the unblocked alert reports the closed period's usage, 9 (112.5 %), not 0, as in one batch; and the
    closed period's alert sequence numbers go with it (no entry left in the snapshot's seq)."""
    closed = BASE + 6 * H  # Jan 1 06:00 .. Jan 2 06:00
    items = mediated([_call("a", BASE + 29 * H, tokens=9), _call("g", BASE + 68 * H, "gpu", seconds=1),
                      _call("b", BASE + 68 * H, tokens=1)], SHORT)
    whole = run(items, [(3, True)], SHORT)
    batched = run(items, [(2, True), (1, True)], SHORT)
    unblocked = [a for a in batched["alerts"].values() if a["type"] == "unblocked"]
    assert [(a["metric"], a["usage"], a["usage_pct"], a["detail"], a["event_id"]) for a in unblocked] == [
        ("peak", 9.0, 112.5, "a new billing period started", "b")]
    assert unblocked[0]["period_start"] == "2026-01-01T06:00:00Z"
    assert batched["alerts"] == whole["alerts"]
    assert [r for r in batched["state"]["entitlements"].get("seq", []) if r["start"] == closed] == []
    assert batched["state"] == whole["state"]


def test_a_closed_current_period_keeps_its_gateway_state():
    """late_grace 2h. gpu's only period (from Jan 1 06:00) has 2 seconds; top rates it (included 5, hard), starter
    not. A call of Jan 3 20:00 closes the period, and the change to starter evicts its rows (a closed period's final
    rows leave before a change). Back on top, gpu's current period is still that closed one: its gateway state is
    the state of those 2 seconds under top, whether each item was its own batch or all were one (before: the batched
    run's last word was the removal sent under starter, the closed period having no usage left to report)."""
    items = mediated([_call("g", BASE + 29 * H, "gpu", seconds=2), _change("top"), _call("a", BASE + 68 * H, tokens=3),
                      _change("starter"), _change("top")], SHORT)
    whole = run(items, [(5, True)], SHORT)
    batched = run(items, [(1, False)] * 5, SHORT)
    gpu = {"tenant_id": "acme", "customer_id": "c1", "metric": "gpu", "included": 5.0, "used": 2.0, "remaining": 3.0,
           "pct": 40.0, "state": "ok", "period_start": BASE + 6 * H, "period_end": BASE + 30 * H, "plan": "top",
           "blocked_by": "", "deleted": False}
    assert whole["gateway"]["gpu"] == batched["gateway"]["gpu"] == gpu
    assert batched["gateway"] == whole["gateway"]
    assert batched["state"] == whole["state"]


def test_no_gateway_removal_for_a_metric_whose_state_one_run_never_sent():
    """late_grace 2h. gpu has a period (from Jan 1 06:00) under starter, which does not rate it; a call of Jan 3
    20:00 closes it and a flush evicts its rows. Then top (gpu rated), starter (gpu's state removed), top again, a
    batch each. In one batch the removal is undone before the batch ends, so no DEL is sent: the batched run ends
    with gpu's state too, not with a removal of a hash that it never wrote (before: the closed period had no usage,
    so neither run wrote a state, and only the batched run sent a DEL)."""
    items = mediated([_call("g", BASE + 29 * H, "gpu", seconds=2), _call("a", BASE + 68 * H, tokens=3),
                      _change("top"), _change("starter"), _change("top")], SHORT)
    whole = run(items, [(5, True)], SHORT)
    batched = run(items, [(2, True), (1, True), (1, True), (1, True)], SHORT)
    assert batched["gateway"] == whole["gateway"]
    assert whole["gateway"]["gpu"]["used"] == 2.0 and whole["gateway"]["gpu"]["plan"] == "top"
