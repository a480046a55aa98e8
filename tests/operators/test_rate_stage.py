"""The Rate stage through the real Mediator, ChangelogMediator and CustomerMeter: rated rows and spend alerts
against an independent model written here from the contract (README: Rating), with exact fractions.

The model knows nothing of ``operators.rating``: it rates each period's final usage with its own formulas, and
replays the events in order to find the event after which each spend threshold's charge is first reached.
Streams mix every price model (per_unit, tiered, volume with a falling unit amount, staircase, package rounded
up and down, the overage_rate model), a committed minimum, a custom contract's price, duplicates,
corrections and plan changes on the changelog, with a snapshot/restore at a random point.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats
from meterflow.base.timeutil import ms_to_iso
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import RATED_DECODER, RATED_ENCODER, Emission

D = 86_400_000
T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def _CLOCK() -> int:  # the mediators' wall clock (max_clock_skew): after every event of the streams
    return T0 + 90 * D

METRICS = [
    {"code": "calls", "event_type": "api_call"},
    {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens"},
    {"code": "peak", "event_type": "api_call", "aggregation": "max", "property": "tokens"},
]

PRICES = {
    "per_unit": {"model": "per_unit", "unit_amount": 0.0003},
    "tiered": {"model": "tiered", "tiers": [{"up_to": 5, "unit_amount": 0.02}, {"up_to": 20, "unit_amount": 0.015},
                                            {"unit_amount": 0.01}], "minimum": 0.2},
    "volume": {"model": "volume", "tiers": [{"up_to": 10, "unit_amount": 1.0}, {"up_to": 30, "unit_amount": 0.4},
                                            {"unit_amount": 0.7}]},
    "staircase": {"model": "staircase", "tiers": [{"up_to": 3, "flat_amount": 5}, {"up_to": 12, "flat_amount": 9},
                                                  {"flat_amount": 4}]},
    "package_up": {"model": "package", "package_size": 4, "package_amount": 1.5},
    "package_down": {"model": "package", "package_size": 4, "package_amount": 1.5, "round_up": False},
}

PLANS = [
    {"code": "a", "currency": "EUR", "entitlements": {
        "calls": {"included": 6, "price": PRICES["tiered"], "spend_thresholds": [0.1, 0.25, 0.3]},
        "tokens": {"included": 40, "overage_rate": 0.05, "spend_thresholds": [0.5, 2.0]},
        "peak": {"price": PRICES["volume"], "spend_thresholds": [8.0, 9.5, 12.0]}}},
    {"code": "b", "entitlements": {
        "calls": {"included": 10, "price": PRICES["staircase"], "spend_thresholds": [6.0]},
        "tokens": {"price": PRICES["package_up"], "spend_thresholds": [3.0, 4.5, 30.0]},
        "peak": {"included": 20, "price": PRICES["package_down"]}}},
    {"code": "c", "entitlements": {"calls": {"price": PRICES["per_unit"], "spend_thresholds": [0.0006]}}},
]

SUBS = {
    "c1": {"plan": "a"},
    "c2": {"plan": "b", "account_name": "Beta Corp", "arr": 12000,
           "overrides": {"calls": {"price": PRICES["per_unit"], "spend_thresholds": [0.0009]}}},
    "c3": {"plan": "c"},
}


def make_config():
    raw = {"pipeline": {"late_grace": "3650d", "dedupe_window": "3650d"},
           "tenants": [{"id": "acme"}], "metrics": METRICS, "plans": PLANS,
           "subscriptions": [{"tenant_id": "acme", "customer_id": c, "period": "month",
                              "anchor": "2026-01-01T00:00:00Z", **s} for c, s in SUBS.items()]}
    return parse_config(json.loads(json.dumps(raw)), "rating.toml", environ={})


CFG = make_config()
PLAN = {p["code"]: p for p in PLANS}


# -- the independent model -------------------------------------------------------------------------------------

def F(x) -> Fraction:
    return Fraction(str(x))


def model_charge(card, u) -> Fraction:
    u = max(Fraction(0), F(u))
    m = card["model"]
    if m == "per_unit":
        return u * F(card["unit_amount"])
    if m == "package":
        n = u / F(card["package_size"])
        n = math.ceil(n) if card.get("round_up", True) else math.floor(n)
        return n * F(card["package_amount"])
    tiers = card["tiers"]
    ups = [F(t["up_to"]) if "up_to" in t and i < len(tiers) - 1 else None for i, t in enumerate(tiers)]
    if m == "tiered":
        total, lower = Fraction(0), Fraction(0)
        for up, t in zip(ups, tiers):
            top = u if up is None else min(u, up)
            if top > lower:
                total += (top - lower) * F(t["unit_amount"])
            if up is None:
                break
            lower = up
        return total
    for up, t in zip(ups, tiers):
        if up is None or u <= up:
            return u * F(t["unit_amount"]) if m == "volume" else F(t["flat_amount"])
    raise AssertionError


def entitlement(sub, metric):
    """The contract's merge: the plan's entitlement with every key of the override replaced."""
    ent = dict(PLAN[sub["plan"]]["entitlements"].get(metric, {}))
    ent.update(sub.get("overrides", {}).get(metric, {}))
    return ent


def model_rate(sub, metric, u):
    """(price_model, charge, overage_amount, minimum, amount, custom_rate) or None when the metric is not rated."""
    ent = entitlement(sub, metric)
    inc = ent.get("included")
    if inc is None and "price" not in ent:
        return None
    if "price" in ent:
        card = ent["price"]
        def charge(x):
            return model_charge(card, x)
        model, minimum = card["model"], F(card.get("minimum", 0))
    else:
        rate = F(ent.get("overage_rate", 0))
        def charge(x):
            return max(Fraction(0), F(x) - F(inc)) * rate
        model, minimum = "overage", Fraction(0)
    c = charge(u)
    over = max(Fraction(0), c - charge(min(F(u), F(inc)))) if inc is not None else Fraction(0)
    custom = any(k in sub.get("overrides", {}).get(metric, {}) for k in ("price", "overage_rate", "included"))
    return model, c, over, minimum, max(minimum, c), custom


def model_spend(ent, u):
    card = ent.get("price")
    if card is not None:
        return model_charge(card, u)
    inc = ent.get("included")
    return max(Fraction(0), F(u) - F(inc or 0)) * F(ent.get("overage_rate", 0))


def model_run(stream):
    """Final usage per (customer, metric, period start), the subscription each customer ends with, and the spend
    alerts in order as (customer, metric, period start, amount, event id)."""
    subs = {c: dict(s) for c, s in SUBS.items()}
    seen = set()
    vals = defaultdict(list)  # (cust, metric, ps) -> [(value, sign)]
    fired = defaultdict(set)
    alerts = []
    cur = {}  # (cust, metric) -> the current period: the latest any accepted event of the metric fell in

    def usage(key, agg):
        vs = vals[key]
        if agg == "count":
            return sum(s for _, s in vs)
        if agg == "sum":
            return sum(v * s for v, s in vs)
        return max(v for v, s in vs if s > 0) if any(s > 0 for _, s in vs) else None

    def check(cust, metric, ps, eid):
        ent = entitlement(subs[cust], metric)
        agg = {m["code"]: m.get("aggregation", "count") for m in METRICS}[metric]
        u = usage((cust, metric, ps), agg)
        if u is None:
            return
        c = model_spend(ent, u)
        for a in sorted(set(ent.get("spend_thresholds", []))):
            if a not in fired[(cust, metric, ps)] and c >= F(a):
                fired[(cust, metric, ps)].add(a)
                alerts.append((cust, metric, ps, float(a), eid, float(c)))

    for item in stream:
        if item["kind"] == "change":
            subs[item["cust"]] = {**subs[item["cust"]], "plan": item["plan"]}
            for (cust, metric), ps in sorted(cur.items()):
                if cust == item["cust"]:
                    check(cust, metric, ps, "")
            continue
        if item["id"] in seen:
            continue
        seen.add(item["id"])
        ps = T0 + (D * 30 if item["ts"] >= T0 + 30 * D else 0)  # November or December 2026
        sign = -1 if item["correction"] else 1
        for m in METRICS:
            code, agg = m["code"], m.get("aggregation", "count")
            if agg == "max" and sign < 0:
                continue
            v = 1 if agg == "count" else item["tokens"]
            vals[(item["cust"], code, ps)].append((v, sign))
            cur[(item["cust"], code)] = max(cur.get((item["cust"], code), ps), ps)
            check(item["cust"], code, ps, item["id"])
    final = {}
    for key in vals:
        agg = {m["code"]: m.get("aggregation", "count") for m in METRICS}[key[1]]
        final[key] = usage(key, agg) or 0
    return final, subs, alerts


# -- the code under test ---------------------------------------------------------------------------------------

def raw_event(item):
    ts = item["ts"]
    return json.dumps({"event_id": item["id"], "tenant_id": "acme", "customer_id": item["cust"],
                       "event_type": "api_call", "timestamp": ms_to_iso(ts), "correction": item["correction"],
                       "properties": {"tokens": item["tokens"]}}).encode()


def raw_change(item):
    sub = {"tenant_id": "acme", "customer_id": item["cust"], "period": "month", "anchor": "2026-01-01T00:00:00Z",
           **{**SUBS[item["cust"]], "plan": item["plan"]}}
    return json.dumps({"tenant_id": "acme", "customer_id": item["cust"], "subscription": sub}).encode()


def run(stream, data, restore_at=None):
    rules = Rules(CFG)
    stats = FlowStats()
    med, changes = Mediator(CFG, stats=stats, clock=_CLOCK), ChangelogMediator(CFG, stats=stats)
    meters = {}
    out = []
    for i, item in enumerate(stream):
        if restore_at is not None and i == restore_at:
            meters = {k: CustomerMeter(rules, k, pickle.loads(pickle.dumps(m.snapshot())), stats=stats)
                      for k, m in meters.items()}
        if item["kind"] == "change":
            res = changes([(("changes.jsonl", i + 1), raw_change(item))])
            assert not res.dead_letters
            batch = [(key, [upd]) for key, upd in res.updates]
        else:
            groups, dead = med([(("events.jsonl", i + 1), raw_event(item))])
            assert not dead
            batch = [(key, [evs]) for key, evs in groups.items()]
        for key, items in batch:
            meter = meters.get(key)
            if meter is None:
                meter = meters[key] = CustomerMeter(rules, key, stats=stats)
            out.append(meter.process(items, flush=data.draw(st.booleans())))
    for meter in meters.values():
        out.append(meter.finalize(med.watermark))
    return out


def latest_rated(emissions):
    best = {}
    for em in emissions:
        for r in em.rated:
            k = (r.customer_id, r.metric, r.period_start)
            prev = best.get(k)
            assert prev is None or r.version >= prev.version, (k, prev, r)
            if prev is None or r.version >= prev.version:
                best[k] = r
    return {k: r for k, r in best.items() if not r.deleted}  # what usage_rated shows


# -- streams -----------------------------------------------------------------------------------------------------

@st.composite
def streams(draw):
    n = draw(st.integers(1, 45))
    items, ids = [], []
    for i in range(n):
        if draw(st.integers(0, 11)) == 0:
            # (plan c rates only calls: moving to it takes the price of tokens and peak away)
            items.append({"kind": "change", "cust": draw(st.sampled_from(["c1", "c3"])),
                          "plan": draw(st.sampled_from(["a", "b", "c"]))})
            continue
        if ids and draw(st.integers(0, 7)) == 0:  # a resent duplicate
            items.append(dict(draw(st.sampled_from(ids))))
            continue
        ev = {"kind": "event", "id": f"e{i}", "cust": draw(st.sampled_from(["c1", "c2", "c3"])),
              "ts": T0 + draw(st.integers(0, 59)) * D + draw(st.integers(0, D - 1)),
              "tokens": draw(st.integers(0, 25)), "correction": draw(st.integers(0, 9)) == 0}
        ids.append(ev)
        items.append(ev)
    return items


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(stream, emissions):
    final, subs, want_alerts = model_run(stream)
    got = latest_rated(emissions)
    want = {}
    for (cust, metric, ps), u in final.items():
        r = model_rate(subs[cust], metric, u)
        if r is not None:
            want[(cust, metric, ps)] = (u, *r)
    assert set(got) == set(want), set(got) ^ set(want)
    for k, (u, model, charge, over, minimum, amount, custom) in want.items():
        r = got[k]
        assert r.usage == float(u), (k, r)
        assert (r.price_model, Fraction(r.charge), Fraction(r.overage_amount), Fraction(r.minimum),
                Fraction(r.amount), r.custom_rate) == (model, charge, over, minimum, amount, custom), (k, r)
        assert r.plan == subs[k[0]]["plan"] and r.currency == PLAN[subs[k[0]]["plan"]].get("currency", "USD")
        assert not r.final  # a grace of years: nothing is final yet
    got_alerts = [(a.customer_id, a.metric, int(Decimal(0) + _ms(a.period_start)), a.threshold_amount, a.event_id,
                   a.amount) for em in emissions for a in em.alerts if a.type == "spend_crossed"]
    assert got_alerts == want_alerts


def _ms(iso):
    from meterflow.base.timeutil import parse_rfc3339_ms
    return parse_rfc3339_ms(iso)


@settings(max_examples=200, **SETTINGS)
@given(stream=streams(), data=st.data())
def test_rated_rows_and_spend_alerts_match_the_model(stream, data):
    check(stream, run(stream, data))


@settings(max_examples=80, **SETTINGS)
@given(stream=streams(), data=st.data(), restore_at=st.integers(0, 45))
def test_a_snapshot_restore_in_the_middle_changes_nothing(stream, data, restore_at):
    emissions = run(stream, data, restore_at)
    check(stream, emissions)
    ids = [a.alert_id for em in emissions for a in em.alerts]
    assert len(ids) == len(set(ids)), "no alert fires twice across the restore"


# -- worked examples and finality --------------------------------------------------------------------------------

def _events(cust, n, tokens=0, start=T0 + D, eid="x"):
    return [{"kind": "event", "id": f"{eid}{i}", "cust": cust, "ts": start + i, "tokens": tokens,
             "correction": False} for i in range(n)]


class _Always:
    def draw(self, _strategy):
        return True


def test_one_event_that_jumps_several_amounts_fires_each_in_ascending_order():
    # c2's tokens: package_up, 4 per 1.5 -> 25 tokens = 7 packages = 10.5: crosses 3.0 and 4.5 at once
    em = run([{"kind": "event", "id": "big", "cust": "c2", "ts": T0 + D, "tokens": 25, "correction": False}],
             _Always())
    spend = [(a.metric, a.threshold_amount, a.amount, a.event_id) for e in em for a in e.alerts
             if a.type == "spend_crossed" and a.metric == "tokens"]
    assert spend == [("tokens", 3.0, 10.5, "big"), ("tokens", 4.5, 10.5, "big")]


def test_a_volume_card_that_dips_below_an_amount_fires_when_usage_climbs_back():
    # c1's peak (max of tokens) on a volume card: 10 -> $10 (fires 8 and 9.5), 11 -> $4.40, 25 -> $10: 12 not yet
    stream = [{"kind": "event", "id": f"p{i}", "cust": "c1", "ts": T0 + D + i, "tokens": t, "correction": False}
              for i, t in enumerate([7, 10, 11, 25])]
    em = run(stream, _Always())
    spend = [(a.threshold_amount, a.event_id) for e in em for a in e.alerts
             if a.type == "spend_crossed" and a.metric == "peak"]
    assert spend == [(8.0, "p1"), (9.5, "p1")]
    check(stream, em)


def test_the_worked_examples_in_exact_decimals():
    # c3 per_unit 0.0003: 340,000 calls would be 102 exactly; 7 calls are 0.0021 (not 0.0020999999999999998)
    em = run(_events("c3", 7), _Always())
    r = latest_rated(em)[("c3", "calls", T0)]
    assert r.charge == Decimal("0.0021") and r.amount == Decimal("0.0021") and r.price_model == "per_unit"
    assert RATED_ENCODER.encode(r).count(b'"charge":0.0021') == 1  # an exact JSON number on the topic
    assert RATED_DECODER.decode(RATED_ENCODER.encode(r)) == r
    # c1 calls, tiered with a minimum of 0.2: 6 calls = 5 x 0.02 + 1 x 0.015 = 0.115 -> amount 0.2, overage 0
    r = latest_rated(em := run(_events("c1", 7), _Always()))[("c1", "calls", T0)]
    assert (r.charge, r.overage_amount, r.amount) == (Decimal("0.130"), Decimal("0.015"), Decimal("0.2"))
    assert r.included == 6.0 and r.overage_units == 1.0 and r.currency == "EUR" and not r.custom_rate
    # c2 calls: the custom contract's per_unit price replaces the plan's staircase
    r = latest_rated(run(_events("c2", 3), _Always()))[("c2", "calls", T0)]
    assert r.price_model == "per_unit" and r.custom_rate and r.account_name == "Beta Corp" and r.arr == 12000.0


def test_a_plan_change_re_rates_the_open_period_at_once():
    rules = Rules(CFG)
    med, changes = Mediator(CFG, stats=FlowStats(), clock=_CLOCK), ChangelogMediator(CFG, stats=FlowStats())
    groups, _ = med([(("e", i), raw_event(x)) for i, x in enumerate(_events("c3", 12))])
    meter = CustomerMeter(rules, "acme|c3")
    first = meter.process(list(groups.values()))
    assert [(r.plan, r.charge) for r in first.rated if r.metric == "calls"] == [("c", Decimal("0.0036"))]
    res = changes([(("changes.jsonl", 1), raw_change({"cust": "c3", "plan": "b"}))])
    em = meter.process([upd for _, upd in res.updates])  # no event: the change alone re-rates
    calls = [r for r in em.rated if r.metric == "calls"]
    assert [(r.plan, r.price_model, r.charge) for r in calls] == [("b", "staircase", Decimal("9"))]
    assert calls[0].version > first.rated[0].version
    period = [p for p in em.periods if p.metric == "calls"]
    assert period and period[0].included == 10.0 and period[0].version == calls[0].version


def test_a_silent_customer_is_final_once_the_watermark_passes_period_end_plus_grace():
    raw = json.loads(json.dumps({"pipeline": {"late_grace": "1d"}, "tenants": [{"id": "acme"}], "metrics": METRICS,
                                 "plans": PLANS, "subscriptions": [
                                     {"tenant_id": "acme", "customer_id": "c3", "plan": "c", "period": "month",
                                      "anchor": "2026-01-01T00:00:00Z"}]}))
    cfg = parse_config(raw, "grace.toml", environ={})
    rules = Rules(cfg)
    med = Mediator(cfg, stats=FlowStats(), clock=_CLOCK)
    dec = T0 + 30 * D
    groups, _ = med([(("e", 1), raw_event(_events("c3", 1, start=T0 + 5 * D)[0]))])
    c3 = CustomerMeter(rules, "acme|c3")
    c3.process(list(groups.values()))
    # Another customer's events move the flow's watermark: inside the grace, then past it.
    med([(("e", 2), raw_event({"kind": "event", "id": "o1", "cust": "c1", "ts": dec + D - 1, "tokens": 1,
                               "correction": False}))])
    assert not c3.finalize_due(med.watermark)
    late, _ = med([(("e", 3), raw_event(_events("c3", 1, start=dec - 1, eid="late")[0]))])  # inside the grace
    em = c3.process(list(late.values()))
    assert [(r.usage, r.final) for r in em.rated] == [(2.0, False)]
    med([(("e", 4), raw_event({"kind": "event", "id": "o2", "cust": "c1", "ts": dec + D + 1, "tokens": 1,
                               "correction": False}))])
    assert c3.finalize_due(med.watermark)
    em = c3.finalize(med.watermark)
    assert [(r.metric, r.usage, r.final) for r in em.rated] == [("calls", 2.0, True)]
    assert [(p.metric, p.final) for p in em.periods if p.metric == "calls"] == [("calls", True)]
    assert all(p.final for p in em.periods)
    assert not c3.periods, "a final row is evicted: nothing can change it"
    # An event of that period now is too_late, and the row is not emitted again.
    toolate, _ = med([(("e", 5), raw_event(_events("c3", 1, start=dec - 2, eid="tl")[0]))])
    em2 = c3.process(list(toolate.values()))
    assert [d.reason for d in em2.dead_letters] == ["too_late"] and not em2.rated
    assert isinstance(em2, Emission)


def test_a_change_that_takes_a_metric_price_away_deletes_its_rated_row():
    rules = Rules(CFG)
    med, changes = Mediator(CFG, stats=FlowStats(), clock=_CLOCK), ChangelogMediator(CFG, stats=FlowStats())
    groups, _ = med([(("e", i), raw_event(x)) for i, x in enumerate(_events("c1", 4, tokens=3))])
    meter = CustomerMeter(rules, "acme|c1")
    first = {r.metric: r for r in meter.process(list(groups.values())).rated}
    assert set(first) == {"calls", "tokens", "peak"}
    res = changes([(("changes.jsonl", 1), raw_change({"cust": "c1", "plan": "c"}))])  # plan c prices calls only
    em = meter.process([upd for _, upd in res.updates])
    got = {r.metric: r for r in em.rated}
    assert not got["calls"].deleted and got["calls"].price_model == "per_unit"
    assert got["tokens"].deleted and got["peak"].deleted
    assert all(got[m].version > first[m].version for m in got)
    # the tombstones leave once; later flushes rate calls only
    groups, _ = med([(("e", 9), raw_event(_events("c1", 1, eid="later")[0]))])
    assert {r.metric for r in meter.process(list(groups.values())).rated} == {"calls"}


# -- the real Bytewax flow, 1 and 2 workers -------------------------------------------------------------------------

def _flow_out(stream, workers, batch_size):
    from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

    from meterflow.dataflows import metering

    items = [(("events.jsonl", i + 1), raw_event(x)) for i, x in enumerate(stream)]
    out = []
    # The mediator's wall clock (max_clock_skew) is injected the way build_flow makes it: a Mediator per flow
    # (a NativeMediator with pipeline.core = "native", pytest --core native).
    from meterflow.operators import native

    orig, orig_native = metering.Mediator, getattr(native, "NativeMediator", None)
    metering.Mediator = lambda cfg, **kw: orig(cfg, clock=_CLOCK, **kw)  # type: ignore[misc]
    if orig_native is not None:
        native.NativeMediator = lambda cfg, **kw: orig_native(cfg, clock=_CLOCK, **kw)  # type: ignore[misc]
    try:
        flow = metering.build_flow(CFG, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))])
    finally:
        metering.Mediator = orig  # type: ignore[misc]
        if orig_native is not None:
            native.NativeMediator = orig_native  # type: ignore[misc]
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return out


@settings(max_examples=12, **SETTINGS)
@given(stream=streams(), workers=st.sampled_from([1, 2]), batch_size=st.integers(1, 9))
def test_the_flow_rates_exactly_like_the_model_with_one_and_two_workers(stream, workers, batch_size):
    events = [x for x in stream if x["kind"] == "event"]  # (changelog order against events is the flow's own)
    out = _flow_out(events, workers, batch_size)
    final, subs, want_alerts = model_run(events)
    got = latest_rated(out)
    want = {k: model_rate(subs[k[0]], k[1], u) for k, u in final.items()}
    want = {k: v for k, v in want.items() if v is not None}
    assert set(got) == set(want)
    for k, (model, charge, over, minimum, amount, custom) in want.items():
        r = got[k]
        assert (r.price_model, Fraction(r.charge), Fraction(r.overage_amount), Fraction(r.minimum),
                Fraction(r.amount), r.custom_rate) == (model, charge, over, minimum, amount, custom), (k, r)
    # spend alerts: per customer the model's order (customers' shards run independently)
    got_alerts = sorted((a.customer_id, a.metric, a.threshold_amount, a.event_id) for em in out for a in em.alerts
                        if a.type == "spend_crossed")
    assert got_alerts == sorted((c, m, a, e) for c, m, _ps, a, e, _amt in want_alerts)
