"""The overage review queue (README: Overage review queue): routing on exact band boundaries against an
independent model, ``[review]`` validation, and random streams through Mediator + CustomerMeter (with a
snapshot/restore in the middle) that must yield exactly the model's review items and notifications."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meterflow.base.errors import ConfigError
from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.review import route_for
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import Emission
from meterflow.schemas.reviews import review_id

ROUTES4 = ["auto_apply", "approve", "review", "sales"]


def model_route(amount: Fraction, bands, routes) -> str:
    """The contract's rule, restated: the first band the amount is below, else the last route."""
    below = [i for i, b in enumerate(bands) if amount < Fraction(str(b))]
    return routes[below[0]] if below else routes[-1]


@pytest.mark.parametrize("amount,route", [
    ("0.000000001", "auto_apply"), ("49.999999999", "auto_apply"), ("50", "approve"), ("50.000000000", "approve"),
    ("499.999999999", "approve"), ("500", "review"), ("1999.999999999", "review"), ("2000", "sales"),
    ("1e12", "sales")])
def test_route_on_the_contract_default_bands(amount, route):
    bands = [Decimal(50), Decimal(500), Decimal(2000)]
    assert route_for(Decimal(amount), bands, ROUTES4) == route
    assert model_route(Fraction(amount), [50, 500, 2000], ROUTES4) == route


@settings(max_examples=300, deadline=None)
@given(bands=st.lists(st.decimals(min_value="0.01", max_value="10000", places=2), min_size=1, max_size=3,
                      unique=True).map(sorted),
       pick=st.integers(0, 5), delta=st.sampled_from(["-0.000000001", "0", "0.000000001", "0.01"]))
def test_route_matches_the_model_around_every_boundary(bands, pick, delta):
    routes = ROUTES4[:len(bands) + 1]
    amount = max(Decimal(0), bands[pick % len(bands)] + Decimal(delta))
    assert route_for(amount, bands, routes) == model_route(Fraction(amount), bands, routes)


BASE = {"tenants": [{"id": "acme"}], "metrics": [{"code": "calls", "event_type": "api_call"}],
        "plans": [{"code": "pro", "entitlements": {"calls": {"included": 10, "overage_rate": 2.5}}}]}


@pytest.mark.parametrize("review,key,why", [
    ({"bands": [50.0, 50.0], "routes": ["auto_apply", "approve", "sales"]}, "review.bands[1]", "ascending"),
    ({"bands": [0.0], "routes": ["auto_apply", "approve"]}, "review.bands[0]", "> 0"),
    ({"bands": [-5.0, 10.0], "routes": ["auto_apply", "approve", "sales"]}, "review.bands[0]", "> 0"),
    ({"bands": [50.0], "routes": ["auto_apply", "approve", "sales"]}, "review.routes", "one more route than bands"),
    ({"bands": [50.0], "routes": ["auto_apply", "escalate"]}, "review.routes[1]", "unknown route 'escalate'"),
    ({"bands": [50.0], "routes": ["approve", "approve"]}, "review.routes[1]", "listed twice"),
    ({"bands": [50.0], "routes": ["approve", "auto_apply"]}, "review.routes[1]", "first route"),
    ({"bands": 50}, "review.bands", "Expected `array`"),
])
def test_bad_review_sections_are_one_line_errors_naming_the_key(review, key, why):
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "review": review}, "meter.toml", environ={})
    msg = str(exc.value)
    assert "\n" not in msg and f"'{key}'" in msg and why in msg and "meter.toml" in msg, msg


def test_review_defaults_are_the_contract_s():
    cfg = parse_config({**BASE, "review": {}}, environ={})
    assert cfg.review.bands == [50.0, 500.0, 2000.0] and cfg.review.routes == ROUTES4
    assert parse_config(BASE, environ={}).review is None


# -- random streams through Mediator + CustomerMeter -------------------------------------------------------

H = 3_600_000
NOV = 1793491200000  # 2026-11-01T00:00:00Z
DEC = 1796083200000  # 2026-12-01T00:00:00Z
JAN = 1798761600000  # 2027-01-01T00:00:00Z
BANDS = [25.0, 50.0, 100.0]
# customer: (included, rate, contract); c2's overrides make it a custom contract (custom_rate), c3 stays within.
CUSTOMERS = {"c1": (10, Fraction("2.5"), "standard"), "c2": (5, Fraction("12.5"), "custom"),
             "c3": (10_000, Fraction("2.5"), "standard")}


def make_config(with_review: bool):
    raw = {"pipeline": {"late_grace": "1h", "max_clock_skew": "1000d"},
           **BASE,
           "subscriptions": [
               {"tenant_id": "acme", "customer_id": "c1", "plan": "pro", "anchor": "2026-11-01T00:00:00Z",
                "account_name": "One Inc", "arr": 1200.0},
               {"tenant_id": "acme", "customer_id": "c2", "plan": "pro", "anchor": "2026-11-01T00:00:00Z",
                "account_name": "Two Ltd", "arr": 90000.0,
                "overrides": {"calls": {"included": 5, "overage_rate": 12.5}}},
               {"tenant_id": "acme", "customer_id": "c3", "plan": "pro", "anchor": "2026-11-01T00:00:00Z",
                "overrides": {"calls": {"included": 10_000}}}]}
    if with_review:
        raw["review"] = {"bands": BANDS, "routes": ROUTES4}
    return parse_config(raw, environ={})


@st.composite
def streams(draw):
    """Events of c1..c3 in time order through November into December (duplicates resent), so the November
    period is final when the stream reaches December + late_grace."""
    n = draw(st.integers(1, 80))
    times = sorted(draw(st.lists(st.integers(NOV, DEC + 3 * H), min_size=n, max_size=n)))
    out, ids = [], []
    for i, ts in enumerate(times):
        if ids and draw(st.integers(0, 9)) == 0:
            out.append(dict(draw(st.sampled_from(ids)), ts=ts))  # a resent duplicate (the first one counts)
            continue
        ev = {"id": f"e{i}", "customer": draw(st.sampled_from(sorted(CUSTOMERS))), "ts": ts}
        ids.append(ev)
        out.append(ev)
    return out


def raw(ev) -> bytes:
    return json.dumps({"event_id": ev["id"], "tenant_id": "acme", "customer_id": ev["customer"],
                       "event_type": "api_call", "timestamp": ev["ts"]}).encode()


def model(stream, bands=BANDS):
    """review_id -> (customer, period_start, amount, route, contract, final), for the items whose amount > 0."""
    seen, counts = set(), defaultdict(int)
    for ev in stream:
        if ev["id"] in seen:
            continue
        seen.add(ev["id"])
        counts[(ev["customer"], NOV if ev["ts"] < DEC else DEC)] += 1
    wm = max(ev["ts"] for ev in stream)
    out = {}
    for (c, start), n in counts.items():
        included, rate, contract = CUSTOMERS[c]
        amount = max(0, n - included) * rate
        if amount > 0:
            end = DEC if start == NOV else JAN
            out[review_id("acme", c, "calls", start)] = (c, start, amount, model_route(amount, bands, ROUTES4),
                                                         contract, end + H < wm)
    return out


def run(cfg, stream, data, restore_at=None):
    rules, stats = Rules(cfg), FlowStats()
    mediator = Mediator(cfg, stats=stats, clock=lambda: JAN)
    meters, emissions = {}, []
    items = [(("events.jsonl", i + 1), raw(ev)) for i, ev in enumerate(stream)]
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=len(items), max_size=len(items)))
    batches, i = [], 0
    for k in sizes:
        if i < len(items):
            batches.append(items[i:i + k])
            i += k
    for bi, batch in enumerate(batches):
        if restore_at is not None and bi == restore_at % len(batches):
            snaps = {k: m.snapshot() for k, m in meters.items()}
            meters = {k: CustomerMeter(rules, k, pickle.loads(pickle.dumps(s)), stats=stats) for k, s in snaps.items()}
        groups, dead = mediator(batch)
        assert not dead
        for key, evs in groups.items():
            meter = meters.get(key)
            if meter is None:
                meter = meters[key] = CustomerMeter(rules, key, stats=stats)
            emissions.append(meter.process([evs], flush=data.draw(st.booleans())))
    for meter in meters.values():
        emissions.append(meter.finalize(mediator.watermark))
    return emissions


def latest_items(emissions):
    latest = {}
    for e in emissions:
        for it in e.reviews:
            prev = latest.get(it.review_id)
            assert prev is None or it.version >= prev.version
            latest[it.review_id] = it
    return latest


def check(emissions, stream, with_review):
    got = latest_items(emissions)
    want = model(stream, BANDS if with_review else [50, 500, 2000])  # without [review]: the default bands
    assert {k: (it.customer_id, it.period_start, Fraction(it.overage_amount), it.route, it.contract, it.final)
            for k, it in got.items()} == want
    for it in got.values():
        assert it.account_name == {"c1": "One Inc", "c2": "Two Ltd"}[it.customer_id]
        assert it.currency == "USD" and it.metric == "calls" and it.period_end in (DEC, JAN)
    notes = [a for e in emissions for a in e.alerts if a.type.startswith("review_")]
    if not with_review:
        assert notes == []
        return
    by_item = defaultdict(list)
    for a in notes:
        by_item[a.detail.split()[1].rstrip(":")].append(a)
    assert set(by_item) == set(want)
    for rid, alerts in by_item.items():
        assert [a.type for a in alerts][:1] == ["review_opened"]
        assert all(a.type == "review_routed" for a in alerts[1:])
        routes = [a.action for a in alerts]
        assert len(set(routes)) == len(routes)  # the people of a route hear of an item once
        assert want[rid][3] in routes  # ... and those of its final route did
        assert [ROUTES4.index(r) for r in routes] == sorted(ROUTES4.index(r) for r in routes)  # usage only grows
        assert all(a.amount > 0 and a.account_name == got[rid].account_name for a in alerts)


SETTINGS = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CFG = {True: make_config(True), False: make_config(False)}


@settings(max_examples=150, **SETTINGS)
@given(stream=streams(), data=st.data(), with_review=st.booleans())
def test_review_items_match_the_model(stream, data, with_review):
    check(run(CFG[with_review], stream, data), stream, with_review)


@settings(max_examples=100, **SETTINGS)
@given(stream=streams(), data=st.data(), restore_at=st.integers(0, 1000))
def test_review_items_survive_a_snapshot_and_restore_in_the_middle(stream, data, restore_at):
    check(run(CFG[True], stream, data, restore_at=restore_at), stream, True)


def test_an_item_escalating_mid_period_notifies_each_new_route_once():
    cfg = CFG[True]
    rules = Rules(cfg)
    mediator = Mediator(cfg, clock=lambda: JAN)
    meter = CustomerMeter(rules, "acme|c1")
    seen = []
    for upto in (12, 20, 20, 30, 60):  # overage 5, 25 (exactly on the first band), 25, 50 (the second), 125
        groups, _ = mediator([(("f", i), raw({"id": f"e{i}", "customer": "c1", "ts": NOV + i})) for i in range(upto)])
        e: Emission = meter.process([groups["acme|c1"]])
        seen.append(([(it.overage_amount, it.route) for it in e.reviews], [(a.type, a.action) for a in e.alerts
                                                                           if a.type.startswith("review_")]))
    assert seen == [
        ([(Decimal("5.0"), "auto_apply")], [("review_opened", "auto_apply")]),
        ([(Decimal("25.0"), "approve")], [("review_routed", "approve")]),
        ([], []),  # nothing new: no row, no item
        ([(Decimal("50.0"), "review")], [("review_routed", "review")]),
        ([(Decimal("125.0"), "sales")], [("review_routed", "sales")])]
    note = meter.process([mediator([(("f", 99), raw({"id": "e99", "customer": "c1", "ts": NOV + 99}))])[0]
                          ["acme|c1"]]).reviews
    assert [(it.overage_amount, it.route) for it in note] == [(Decimal("127.5"), "sales")]
    restored = CustomerMeter.from_snapshot(rules, meter.snapshot())
    assert restored.reviews.open == meter.reviews.open and restored.reviews.open
