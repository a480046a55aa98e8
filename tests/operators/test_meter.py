"""Per-customer metering: dedupe, windows, billing periods, late events, corrections, exclusions,
missing properties, snapshot/restore."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from meterflow.base.stats import FlowStats
from meterflow.operators.dedupe import fingerprint
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import Emission

UTC = timezone.utc
H = 3_600_000

BASE_CFG = {
    "pipeline": {"rollup_window": "1h", "late_grace": "6h", "dedupe_window": "24h"},
    "tenants": [{"id": "acme", "exclude_when": {"environment": "test"}, "excluded_customers": ["cust_internal"]},
                {"id": "beta"}],
    "metrics": [
        {"code": "api_calls", "event_type": "api_call"},
        {"code": "large_calls", "event_type": "api_call", "where": {"model": "m-large"}},
        {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens"},
        {"code": "tokens_by_region", "event_type": "api_call", "aggregation": "sum", "property": "tokens",
         "group_by": ["region"]},
        {"code": "peak", "event_type": "api_call", "aggregation": "max", "property": "tokens"},
        {"code": "low", "event_type": "api_call", "aggregation": "min", "property": "tokens"},
        {"code": "users", "event_type": "api_call", "aggregation": "unique_count", "property": "user"},
        {"code": "lat95", "event_type": "api_call", "aggregation": "p95", "property": "latency"},
        {"code": "lat99", "event_type": "api_call", "aggregation": "p99", "property": "latency"},
        {"code": "seats", "event_type": "seats", "aggregation": "latest", "property": "seats"},
    ],
    "plans": [{"code": "pro", "entitlements": {"api_calls": {"included": 10}, "tokens": {"included": 1000}}}],
    "subscriptions": [{"tenant_id": "acme", "customer_id": "cust_456", "plan": "pro", "period": "month",
                       "anchor": "2026-01-31T00:00:00Z"}],
}
NUMERIC_TOKEN_METRICS = {"tokens", "tokens_by_region", "peak", "low"}


def make_config(**pipeline):
    raw = json.loads(json.dumps(BASE_CFG))
    raw["pipeline"].update(pipeline)
    return parse_config(raw, "test.toml", environ={})


def ms(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((dt - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1))


def ev(eid, ts, cust="cust_456", tenant="acme", etype="api_call", correction=False, **props) -> bytes:
    d = {"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
         "timestamp": ts, "properties": props}
    if correction:
        d["correction"] = True
    return json.dumps(d).encode()


# The wall clock the mediator reads in these tests (the clock-skew rule): fixed, after every event time used.
CLOCK_MS = int(datetime(2035, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)


class Run:
    """Mediator + one CustomerMeter per key, fed batch by batch like the dataflow does."""

    def __init__(self, cfg=None, clock=lambda: CLOCK_MS):
        self.cfg = cfg or make_config()
        self.rules = Rules(self.cfg)
        self.stats = FlowStats()
        self.mediator = Mediator(self.cfg, stats=self.stats, clock=clock)
        self.meters = {}
        self.emissions = []
        self.n = 0

    def feed(self, *raws):
        batch = []
        for r in raws:
            self.n += 1
            batch.append((("test.jsonl", self.n), r))
        out = []
        groups, dead = self.mediator(batch)
        for key, events in groups.items():
            meter = self.meters.get(key)
            if meter is None:
                meter = self.meters[key] = CustomerMeter(self.rules, key, stats=self.stats)
            out.append(meter.process([events]))
        if dead:
            out.append(Emission(dead_letters=dead))
        self.emissions += out
        return out

    def restore_all(self):
        self.meters = {k: CustomerMeter(self.rules, k, m.snapshot(), stats=self.stats) for k, m in self.meters.items()}

    def windows(self):
        return final_rows(self.emissions, "windows")

    def periods(self):
        return final_rows(self.emissions, "periods")

    def dead(self, missing=False):
        """Dead letters by reason (missing_property only when asked: most test events omit some properties)."""
        return Counter(d.reason for em in self.emissions for d in em.dead_letters
                       if missing or d.reason != "missing_property")


def final_rows(emissions, kind):
    rows = {}
    for em in emissions:
        for r in getattr(em, kind):
            if kind == "windows":
                k = (r.tenant_id, r.customer_id, r.metric, r.window_start, tuple(sorted(r.dimensions.items())))
            else:
                k = (r.tenant_id, r.customer_id, r.metric, r.period_start, r.period_end)
            if k in rows:
                assert r.version > rows[k].version, ("versions must grow", rows[k], r)
            rows[k] = r
    return rows


def pvalue(run, metric, cust="cust_456", tenant="acme"):
    vals = [r.value for k, r in run.periods().items() if k[:3] == (tenant, cust, metric)]
    assert len(vals) == 1, vals
    return vals[0]


# -- windows and periods -----------------------------------------------------------------------------

def test_counts_sums_windows_and_subscribed_period():
    run = Run()
    run.feed(ev("e1", "2026-02-10T10:15:00Z", tokens=100, region="us", user="u1", latency=5),
             ev("e2", "2026-02-10T10:45:00Z", tokens=250.5, region="eu", user="u2", latency=7),
             ev("e3", "2026-02-10T11:05:00Z", tokens=50, region="us", user="u1", latency=6))
    w = run.windows()
    t10, t11 = ms("2026-02-10T10:00:00Z"), ms("2026-02-10T11:00:00Z")
    assert w[("acme", "cust_456", "api_calls", t10, ())].value == 2.0
    assert w[("acme", "cust_456", "api_calls", t10, ())].window_end == t10 + H
    assert w[("acme", "cust_456", "api_calls", t11, ())].value == 1.0
    assert w[("acme", "cust_456", "tokens", t10, ())].value == 350.5
    assert w[("acme", "cust_456", "tokens_by_region", t10, (("region", "us"),))].value == 100.0
    assert w[("acme", "cust_456", "tokens_by_region", t10, (("region", "eu"),))].value == 250.5
    assert w[("acme", "cust_456", "users", t10, ())].value == 2.0
    p = run.periods()
    key = ("acme", "cust_456", "api_calls", ms("2026-01-31T00:00:00Z"), ms("2026-02-28T00:00:00Z"))
    row = p[key]
    assert (row.value, row.included, row.overage_units, row.events, row.excluded_events, row.version) == \
        (3.0, 10.0, 0.0, 3, 0, 3)
    assert pvalue(run, "tokens") == 400.5
    assert pvalue(run, "peak") == 250.5 and pvalue(run, "low") == 50.0
    assert pvalue(run, "users") == 2.0
    assert p[("acme", "cust_456", "peak", key[3], key[4])].included is None  # plan has no entitlement for it
    assert run.dead() == Counter()


def test_overage_units():
    run = Run()
    run.feed(*[ev(f"e{i}", ms("2026-03-05T00:00:00Z") + i, tokens=100) for i in range(12)])
    row = [r for k, r in run.periods().items() if k[2] == "api_calls"][0]
    assert (row.value, row.included, row.overage_units) == (12.0, 10.0, 2.0)
    tok = [r for k, r in run.periods().items() if k[2] == "tokens"][0]
    assert (tok.value, tok.included, tok.overage_units) == (1200.0, 1000.0, 200.0)


def test_customer_without_subscription_uses_calendar_months_and_no_included():
    run = Run()
    run.feed(ev("e1", "2026-03-31T23:59:59.999Z", cust="cust_new"), ev("e2", "2026-04-01T00:00:00Z", cust="cust_new"))
    p = run.periods()
    assert set(k for k in p if k[2] == "api_calls") == {
        ("acme", "cust_new", "api_calls", ms("2026-03-01T00:00:00Z"), ms("2026-04-01T00:00:00Z")),
        ("acme", "cust_new", "api_calls", ms("2026-04-01T00:00:00Z"), ms("2026-05-01T00:00:00Z"))}
    assert all(r.included is None and r.overage_units == 0.0 for r in p.values())


def test_anchor_on_the_31st_periods():
    run = Run()
    run.feed(ev("a", "2026-02-27T23:59:59.999Z"), ev("b", "2026-02-28T00:00:00Z"), ev("c", "2026-03-31T00:00:00Z"))
    got = sorted((k[3], k[4], r.value) for k, r in run.periods().items() if k[2] == "api_calls")
    assert got == [(ms("2026-01-31T00:00:00Z"), ms("2026-02-28T00:00:00Z"), 1.0),
                   (ms("2026-02-28T00:00:00Z"), ms("2026-03-31T00:00:00Z"), 1.0),
                   (ms("2026-03-31T00:00:00Z"), ms("2026-04-30T00:00:00Z"), 1.0)]


def test_utc_boundary_2359_est_jan_31_counts_in_february():
    run = Run()
    run.feed(ev("e1", "2026-01-31T23:59:00-05:00", cust="cust_new"))
    (k,) = [k for k in run.periods() if k[2] == "api_calls"]
    assert k[3:] == (ms("2026-02-01T00:00:00Z"), ms("2026-03-01T00:00:00Z"))
    (wk,) = [k for k in run.windows() if k[2] == "api_calls"]
    assert wk[3] == ms("2026-02-01T04:00:00Z")


def test_one_day_windows_start_at_midnight_utc():
    run = Run(make_config(rollup_window="1d"))
    run.feed(ev("e1", "2026-02-10T23:30:00-02:00", cust="c"))  # 2026-02-11T01:30Z
    (wk,) = [k for k in run.windows() if k[2] == "api_calls"]
    assert wk[3] == ms("2026-02-11T00:00:00Z")
    assert run.windows()[wk].window_end == ms("2026-02-12T00:00:00Z")


# -- dedupe ------------------------------------------------------------------------------------------------

def test_duplicates_count_once_in_batch_across_batches_and_after_restore():
    run = Run()
    e1 = ev("e1", "2026-03-05T10:00:00Z", tokens=10)
    run.feed(e1, e1, ev("e2", "2026-03-05T10:01:00Z", tokens=5), e1)
    run.feed(e1)
    run.restore_all()
    run.feed(e1, ev("e2", "2026-03-05T10:01:00Z", tokens=5))
    assert pvalue(run, "api_calls") == 2.0 and pvalue(run, "tokens") == 15.0
    assert run.stats.snapshot()["duplicates"] == 5


def test_resent_event_with_other_content_is_still_a_duplicate():
    run = Run()
    run.feed(ev("e1", "2026-03-05T10:00:00Z", tokens=10))
    run.feed(ev("e1", "2026-03-05T10:30:00Z", tokens=99))
    assert pvalue(run, "tokens") == 10.0


def test_dedupe_is_per_tenant():
    run = Run()
    run.feed(ev("same", "2026-03-05T10:00:00Z", tenant="acme", cust="c"),
             ev("same", "2026-03-05T10:00:00Z", tenant="beta", cust="c"))
    assert pvalue(run, "api_calls", "c", "acme") == 1.0
    assert pvalue(run, "api_calls", "c", "beta") == 1.0


def test_unmetered_event_types_produce_nothing():
    run = Run()
    out = run.feed(ev("x1", "2026-03-05T10:00:00Z", etype="page_view"))
    assert all(not em.windows and not em.periods and not em.dead_letters for em in out)
    assert run.stats.snapshot()["unmetered"] == 1


def test_dedupe_outcome_does_not_depend_on_batches_or_restore():
    # (regression) eviction used to run lazily every dedupe_window/16 and restart after a restore, so a resend
    # just past dedupe_window counted or not depending on batch boundaries and snapshots.
    cfg = make_config(dedupe_window="16h")
    t0 = ms("2026-03-02T00:00:00Z")
    e_a = ev("a", t0, cust="c")
    e_b = ev("b", t0 + 15 * H + H // 2, cust="c")
    e_c = ev("c", t0 + 16 * H + H // 6, cust="c")

    def total(restore=False, merge=False):
        run = Run(cfg)
        run.feed(e_a)
        if merge:
            run.feed(e_b, e_c)
        else:
            run.feed(e_b)
            if restore:
                run.restore_all()
            run.feed(e_c)
        run.feed(e_a)  # the resend
        return pvalue(run, "api_calls", "c")

    clean = total()
    assert total(restore=True) == clean
    assert total(merge=True) == clean


def test_ids_are_remembered_while_their_period_accepts_events():
    run = Run(make_config(dedupe_window="1h"))
    e1 = ev("e1", "2026-03-02T00:00:00Z", cust="c")
    run.feed(e1)
    run.feed(ev("e2", "2026-03-20T00:00:00Z", cust="c"))   # far more than dedupe_window later
    run.feed(e1)                                             # March still open: a duplicate
    assert pvalue(run, "api_calls", "c") == 2.0
    run.feed(ev("e3", "2026-04-01T07:00:00Z", cust="c"))   # March closed (6h grace) an hour ago
    run.feed(e1)                                             # forgotten now, but too late to count
    march = [r for k, r in run.periods().items() if k[1:3] == ("c", "api_calls") and k[3] == ms("2026-03-01T00:00:00Z")]
    assert march[0].value == 2.0
    assert run.dead() == Counter({"too_late": 1})
    assert run.stats.snapshot()["duplicates"] == 1


def test_resend_after_the_period_closed_does_not_depend_on_batches():
    cfg = make_config(dedupe_window="1h")
    e1 = ev("e1", "2026-03-02T00:00:00Z", cust="c")
    closer = ev("e2", "2026-04-01T07:00:00Z", cust="c")   # March closed (6h grace) an hour before

    def dead(split):
        run = Run(cfg)
        run.feed(e1)
        if split:
            run.feed(closer)
            run.feed(e1)
        else:
            run.feed(closer, e1)
        return run.dead()

    assert dead(split=True) == dead(split=False)


# -- late events -------------------------------------------------------------------------------------------

def test_late_event_within_grace_corrects_a_closed_window_and_its_period():
    run = Run()  # cust_456: period 2026-01-31 .. 2026-02-28, grace 6h
    run.feed(ev("e1", "2026-02-27T23:30:00Z", tokens=1))
    run.feed(ev("e2", "2026-02-28T05:00:00Z", tokens=1))
    out = run.feed(ev("late", "2026-02-27T23:45:00Z", tokens=1))
    w = [r for em in out for r in em.windows if r.metric == "api_calls"]
    assert [(r.window_start, r.value, r.version) for r in w] == [(ms("2026-02-27T23:00:00Z"), 2.0, 2)]
    p = [r for em in out for r in em.periods if r.metric == "api_calls"]
    assert [(r.period_start, r.value) for r in p] == [(ms("2026-01-31T00:00:00Z"), 2.0)]
    assert run.dead() == Counter()


def test_grace_edge_is_inclusive_then_too_late():
    run = Run()
    pend = ms("2026-02-28T00:00:00Z")
    run.feed(ev("e1", pend - 10 * 60_000))
    run.feed(ev("w1", pend + 6 * H))                   # watermark = period end + grace exactly
    run.feed(ev("ok", pend - 60_000))                  # still accepted
    run.feed(ev("w2", pend + 6 * H + 1))               # one millisecond more
    out = run.feed(ev("late", pend - 60_000 + 1, tokens=5))
    assert [d.reason for em in out for d in em.dead_letters] == ["too_late"]
    d = out[0].dead_letters[0]
    assert d.tenant_id == "acme" and d.payload == ev("late", pend - 60_000 + 1, tokens=5)
    assert not any(em.windows or em.periods for em in out)
    old = [r for k, r in run.periods().items() if k[2] == "api_calls" and k[4] == pend]
    assert old[0].value == 2.0
    # the too_late event was recorded once: a resend is a duplicate, not a second dead letter
    run.feed(ev("late", pend - 60_000 + 1, tokens=5))
    assert run.dead() == Counter({"too_late": 1})


def test_watermark_is_global_other_customers_make_events_too_late():
    run = Run()
    run.feed(ev("a1", "2026-03-10T00:00:00Z", cust="c1"))
    run.feed(ev("b1", "2026-04-01T07:00:00Z", tenant="beta", cust="c2"))  # March ended 7h ago (> 6h grace)
    out = run.feed(ev("a2", "2026-03-31T23:00:00Z", cust="c1"))
    assert [d.reason for em in out for d in em.dead_letters] == ["too_late"]


def test_invalid_and_unknown_tenant_events_do_not_advance_the_watermark():
    run = Run()
    run.feed(ev("a1", "2026-03-10T00:00:00Z", cust="c1"),
             ev("g", "2030-01-01T00:00:00Z", tenant="ghost"),
             ev("bad", "2030-01-01T00:00:00", cust="c1"))
    run.feed(ev("a2", "2026-03-09T00:00:00Z", cust="c1"))
    assert pvalue(run, "api_calls", "c1") == 2.0
    assert run.dead() == Counter({"unknown_tenant": 1, "invalid_event": 1})


def test_closed_periods_are_evicted_from_state():
    run = Run(make_config(dedupe_window="1h"))
    run.feed(ev("a1", "2026-03-10T00:00:00Z", cust="c1", user="u", tokens=1, latency=1))
    m = run.meters["acme|c1"]
    assert m.periods and m.windows and m.seen
    run.feed(ev("a2", "2026-05-10T00:00:00Z", cust="c1"))
    assert all(k[1] >= ms("2026-05-01T00:00:00Z") for k in m.periods)
    assert all(k[1] >= ms("2026-05-10T00:00:00Z") for k in m.windows)
    assert len(m.seen) == 1 and fingerprint("a2") in m.seen


# -- corrections, exclusions, filters, missing properties ----------------------------------------------

def test_corrections_negate_count_and_sum_and_are_ignored_elsewhere():
    run = Run()
    t = "2026-03-05T10:00:00Z"
    run.feed(ev("e1", t, tokens=100, user="u1", latency=10, region="us"),
             ev("e2", t, tokens=40, user="u2", latency=20, region="us"),
             ev("c1", t, correction=True, tokens=100, user="u3", latency=99, region="us"))
    assert pvalue(run, "api_calls") == 1.0
    assert pvalue(run, "tokens") == 40.0
    assert pvalue(run, "tokens_by_region") == 40.0
    assert pvalue(run, "peak") == 100.0 and pvalue(run, "low") == 40.0
    assert pvalue(run, "users") == 2.0 and pvalue(run, "lat99") == 20.0
    calls = [r for k, r in run.periods().items() if k[2] == "api_calls"][0]
    assert calls.events == 3 and calls.version == 3
    peak = [r for k, r in run.periods().items() if k[2] == "peak"][0]
    assert peak.events == 2
    assert run.stats.snapshot()["corrections_ignored"] == 5  # peak, low, users, lat95, lat99


def test_exclusions_are_counted_not_billed():
    run = Run()
    t = "2026-03-05T10:00:00Z"
    run.feed(ev("e1", t, tokens=100, model="m-large"),
             ev("x1", t, tokens=1000, environment="test", model="m-large"),
             ev("x2", t, environment="test"),                     # no tokens: excluded, not missing_property
             ev("i1", t, cust="cust_internal", tokens=7))
    p = run.periods()
    calls = [r for k, r in p.items() if k[1] == "cust_456" and k[2] == "api_calls"][0]
    assert (calls.value, calls.events, calls.excluded_events, calls.version) == (1.0, 1, 2, 3)
    large = [r for k, r in p.items() if k[1] == "cust_456" and k[2] == "large_calls"][0]
    assert (large.value, large.excluded_events) == (1.0, 1)
    assert pvalue(run, "tokens") == 100.0
    internal = {k[2]: r for k, r in p.items() if k[1] == "cust_internal"}
    assert internal["api_calls"].value == 0.0 and internal["api_calls"].excluded_events == 1
    assert internal["api_calls"].events == 0
    assert not [k for k in run.windows() if k[1] == "cust_internal"]
    assert [r.value for k, r in run.windows().items() if k[1] == "cust_456" and k[2] == "api_calls"] == [1.0]
    # e1 lacks user and latency; excluded events are never checked for properties
    assert run.dead(missing=True) == Counter({"missing_property": 3})
    assert run.stats.snapshot()["excluded"] == 3


def test_where_filter_and_group_by_dimensions():
    run = Run()
    t = "2026-03-05T10:00:00Z"
    run.feed(ev("e1", t, model="m-large", tokens=1, region="us"),
             ev("e2", t, model="m-small", tokens=2, region="us"),
             ev("e3", t, tokens=4),
             ev("e4", t, model="m-large", tokens=8, region=5),
             ev("e5", t, tokens=16, region=True),
             ev("e6", t, tokens=32, region=None))
    assert pvalue(run, "large_calls") == 2.0
    dims = {k[4]: r.value for k, r in run.windows().items() if k[2] == "tokens_by_region"}
    assert dims == {(("region", "us"),): 3.0, (("region", ""),): 36.0, (("region", "5"),): 8.0,
                    (("region", "true"),): 16.0}
    # the period total is over all dimensions
    assert pvalue(run, "tokens_by_region") == 63.0


@pytest.mark.parametrize("props, bad", [
    ({}, NUMERIC_TOKEN_METRICS | {"users", "lat95", "lat99"}),
    ({"tokens": "12", "user": "u", "latency": 1}, NUMERIC_TOKEN_METRICS),
    ({"tokens": True, "user": "u", "latency": 1}, NUMERIC_TOKEN_METRICS),
    ({"tokens": None, "user": None, "latency": "fast"}, NUMERIC_TOKEN_METRICS | {"users", "lat95", "lat99"}),
    ({"tokens": 3, "user": 42, "latency": 1.5}, set()),
    ({"tokens": 3, "user": True, "latency": 1.5}, set()),  # unique_count takes any JSON scalar
])
def test_missing_property_dead_letters_per_metric_others_still_count(props, bad):
    run = Run()
    raw = ev("e1", "2026-03-05T10:00:00Z", **props)
    run.feed(raw)
    dls = [d for em in run.emissions for d in em.dead_letters]
    assert {d.metric for d in dls} == bad and len(dls) == len(bad)
    assert all(d.reason == "missing_property" and d.payload == raw and d.tenant_id == "acme" for d in dls)
    assert len({d.dl_id for d in dls}) == len(dls)
    counted = {k[2] for k in run.periods()}
    assert "api_calls" in counted
    assert counted.isdisjoint(bad)


# -- the other aggregations over windows vs periods --------------------------------------------------------

def test_unique_count_of_a_period_is_not_the_sum_of_its_windows():
    run = Run()
    run.feed(ev("e1", "2026-03-05T10:00:00Z", user="u1"), ev("e2", "2026-03-05T11:00:00Z", user="u1"),
             ev("e3", "2026-03-05T12:00:00Z", user="u2"), ev("e4", "2026-03-05T12:10:00Z", user="1"),
             ev("e5", "2026-03-05T12:20:00Z", user=1))
    assert sorted(r.value for k, r in run.windows().items() if k[2] == "users") == [1.0, 1.0, 3.0]
    assert pvalue(run, "users") == 4.0


def test_percentiles_over_a_period():
    run = Run()
    lat = list(range(1, 101))
    run.feed(*[ev(f"e{v}", ms("2026-03-05T00:00:00Z") + v * 60_000, latency=v) for v in reversed(lat)])
    assert pvalue(run, "lat95") == 95.0 and pvalue(run, "lat99") == 99.0


def test_latest_by_event_time_not_arrival():
    run = Run()
    run.feed(ev("s1", "2026-03-05T10:00:00Z", etype="seats", seats=5),
             ev("s2", "2026-03-05T12:00:00Z", etype="seats", seats=9),
             ev("s3", "2026-03-05T11:00:00Z", etype="seats", seats=7))
    assert pvalue(run, "seats") == 9.0
    run.feed(ev("s4", "2026-03-05T12:00:00Z", etype="seats", seats=3))  # tie: later arrival wins
    assert pvalue(run, "seats") == 3.0


# -- snapshot / restore -------------------------------------------------------------------------------------

def _stream():
    t = ms("2026-02-27T20:00:00Z")
    out = []
    for i in range(40):
        ts = t + (i * 37 % 23) * H // 2
        props = {"tokens": (i * 7) % 13 + (0.1 if i % 3 else 0), "user": f"u{i % 5}", "latency": i % 11,
                 "region": ["us", "eu"][i % 2], "model": ["m-large", "m-small"][i % 3 == 0]}
        if i % 9 == 0:
            props["environment"] = "test"
        out.append(ev(f"e{i}", ts, cust=["cust_456", "c2"][i % 2], correction=(i % 7 == 6), **props))
        if i % 5 == 0:
            out.append(ev(f"e{i - 3}", ts, cust=["cust_456", "c2"][(i - 3) % 2]))
        if i % 8 == 0:
            out.append(ev(f"s{i}", ts, etype="seats", seats=i))
    return out


@pytest.mark.parametrize("cut", [1, 7, 20, 33])
def test_snapshot_restore_continue_equals_uninterrupted(cut):
    stream = _stream()
    batches = [stream[i:i + 4] for i in range(0, len(stream), 4)]
    clean = Run()
    for b in batches:
        clean.feed(*b)
    resumed = Run()
    for i, b in enumerate(batches):
        if i == cut % len(batches):
            resumed.restore_all()
        resumed.feed(*b)
    assert resumed.windows() == clean.windows()
    assert resumed.periods() == clean.periods()
    assert resumed.dead() == clean.dead()
    # the rows emitted after the restore are identical too, batch by batch
    def tail(run):
        return [(sorted(map(repr, em.windows)), sorted(map(repr, em.periods)),
                             sorted((d.dl_id, d.reason) for d in em.dead_letters)) for em in run.emissions[-4:]]
    assert tail(resumed) == tail(clean)


def test_snapshot_is_an_immutable_copy():
    run = Run()
    run.feed(ev("e1", "2026-03-05T10:00:00Z", tokens=1))
    meter = run.meters["acme|cust_456"]
    snap = meter.snapshot()
    assert isinstance(snap, bytes)
    run.feed(ev("e2", "2026-03-05T10:00:00Z", tokens=2))
    old = CustomerMeter(run.rules, "acme|cust_456", snap, stats=FlowStats())
    assert len(old.seen) == 1 and fingerprint("e1") in old.seen
    groups = run.mediator([(("x", 1), ev("e2", "2026-03-05T10:00:00Z", tokens=2))]).groups
    em = old.process([[m for ms_ in groups.values() for m in ms_]])
    assert [r.value for r in em.periods if r.metric == "tokens"] == [3.0]


def test_restore_rejects_another_state_version():
    rules = Rules(make_config())
    m = CustomerMeter(rules, "acme|c", stats=FlowStats())
    future = msgspec.msgpack.encode({**msgspec.msgpack.decode(m.snapshot()), "version": 99})
    with pytest.raises(ValueError, match="state version 99"):
        CustomerMeter(rules, "acme|c", future)
    with pytest.raises(ValueError, match="state version 99"):  # a pickled tuple of an unknown version too
        CustomerMeter(rules, "acme|c", pickle.dumps((99, "acme|c") + (None,) * 8, protocol=5))


def test_restore_of_the_previous_snapshot_layout_is_read_or_refused_clearly():
    # (regression) the layout grew while STATE_VERSION stayed 1, and the version was checked after unpacking
    rules = Rules(make_config())
    old = pickle.dumps((1, "acme|c", {"e1": 5}, 5, {}, {}, {}), protocol=5)  # layout written by 146349f
    try:
        m = CustomerMeter(rules, "acme|c", old, stats=FlowStats())
    except ValueError as exc:
        assert "version" in str(exc)
    else:
        assert len(m.seen) == 1 and fingerprint("e1") in m.seen


def test_empty_meter():
    m = CustomerMeter(Rules(make_config()), "acme|c", stats=FlowStats())
    assert m.is_empty()
    assert CustomerMeter(m.rules, "acme|c", m.snapshot()).is_empty()


# -- one bad event never stops the pipeline -----------------------------------------------------------------

@pytest.mark.parametrize("literal", [b"1e308", b"-1e308", b"1e300", b"1" + b"0" * 400, b"-" + b"9" * 320])
def test_numbers_beyond_the_double_range_are_dead_letters_not_crashes(literal):
    # (regression) 1e308 + 1e308 used to raise OverflowError in SumAcc.value(), and a 400-digit JSON integer
    # OverflowError in max/min: one event stopped the flow. Magnitudes >= 1e300 are now missing_property.
    run = Run()
    raw = ev("e1", "2026-03-05T10:00:00Z", tokens=1, user="u", latency=1)
    raw = raw.replace(b'"tokens": 1', b'"tokens": ' + literal)
    run.feed(raw, ev("e2", "2026-03-05T10:00:00Z", tokens=1e308, user="u", latency=1))
    run.feed(ev("e3", "2026-03-05T10:00:00Z", tokens=9e299, user="u", latency=1))
    assert pvalue(run, "api_calls") == 3.0
    assert pvalue(run, "tokens") == 9e299 and pvalue(run, "peak") == 9e299
    dls = [d for em in run.emissions for d in em.dead_letters]
    assert Counter(d.metric for d in dls) == Counter({m: 2 for m in NUMERIC_TOKEN_METRICS})
    assert all(d.reason == "missing_property" for d in dls)


def _pickled_v4(meter: CustomerMeter) -> tuple:
    """The version 4 tuple a build before issue 10 pickled for ``meter`` (today's classes stand in for the
    old ones: the converter maps meterflow.operators.* like operators.*)."""
    e = meter.ent
    return (4, meter.key, meter.seen, meter.wm, meter.windows, meter.periods, meter.excluded, meter.dirty_w,
            meter.dirty_p, (e.fired, e.blocked, e.overage, e.seq, e.cur, e.src, e.version, e.cancelled,
                            e.moved_plan, e.units, e.wallet_low, e.wallet_exhausted, e.wallet_blocked, e.touched,
                            e.deleted, e.wallet_dirty))


def test_a_version_3_snapshot_with_ids_in_a_dict_is_converted_on_restore():
    # Version 3 kept event ids as a dict of strings; version 4 keeps fingerprints in an IdTable.
    run = Run()
    run.feed(ev("e1", "2026-03-05T10:00:00Z", tokens=1))
    meter = run.meters["acme|cust_456"]
    state = list(_pickled_v4(meter))
    expiry = meter.seen.get(fingerprint("e1"))
    state[0], state[2] = 3, {"e1": expiry}
    old = CustomerMeter(run.rules, "acme|cust_456", pickle.dumps(tuple(state), protocol=5), stats=FlowStats())
    assert len(old.seen) == 1 and old.seen.get(fingerprint("e1")) == expiry
    assert old.next_dedupe_evict == expiry
    groups = run.mediator([(("x", 1), ev("e1", "2026-03-05T10:00:00Z", tokens=1)),
                           (("x", 2), ev("e2", "2026-03-05T10:00:00Z", tokens=2))]).groups
    feed = [m for ms_ in groups.values() for m in ms_]
    em = old.process([feed])
    assert [r.value for r in em.periods if r.metric == "tokens"] == [3.0]  # e1 a duplicate, e2 counted


def test_a_version_4_snapshot_is_converted_and_continues_like_the_live_state():
    stream = _stream()
    clean, resumed = Run(), Run()
    for b in (stream[:20], stream[20:30]):
        clean.feed(*b)
        resumed.feed(*b)
    resumed.meters = {k: CustomerMeter(resumed.rules, k, pickle.dumps(_pickled_v4(m), protocol=5),
                                       stats=resumed.stats) for k, m in resumed.meters.items()}
    for run in (clean, resumed):
        run.feed(*stream[30:])
    assert resumed.windows() == clean.windows() and resumed.periods() == clean.periods()
    assert resumed.dead() == clean.dead()


def test_a_pickle_naming_any_other_class_is_refused_not_loaded():
    rules = Rules(make_config())
    evil = pickle.dumps((4, "acme|c", __import__("collections").OrderedDict()), protocol=5)
    with pytest.raises(ValueError, match="collections.OrderedDict is not part of a meter snapshot"):
        CustomerMeter(rules, "acme|c", evil)


def test_a_snapshot_names_no_module_path():
    run = Run()
    run.feed(*_stream())
    for m in run.meters.values():
        snap = m.snapshot()
        assert snap[:1] != b"\x80" and b"operators" not in snap and b"meterflow" not in snap
        assert msgspec.msgpack.decode(snap)["version"] == 5


# -- poison at the meter step (issue 9): a dead letter, the state untouched, the batch goes on ---------------

def _metered(eid, ts, wm, key="acme|cust_456", n=1, **props):
    """A MeteredEvent as mediation would hand it over, built by hand to reach the meter with any time."""
    from meterflow.operators.mediate import MeteredEvent
    from meterflow.schemas.events import EVENT_DECODER

    raw = ev(eid, "2026-02-10T10:00:00Z", cust=key.split("|")[1], **props)  # the time that counts is ``ts``
    return MeteredEvent(EVENT_DECODER.decode(raw), ts, wm, ("m.jsonl", n), raw, False)


@pytest.mark.parametrize("anchor", ["2026-01-31T00:00:00Z", "2026-03-15T12:00:00Z"])
@pytest.mark.parametrize("ts", [ms("9999-12-31T23:59:59Z"), ms("0001-01-01T00:00:00Z"),
                                -62135600400000, 10 ** 15, 2 ** 63 - 1, 2 ** 63 + 5, 2 ** 64 + 5])
def test_a_time_without_a_billing_period_is_invalid_event_and_leaves_the_state_as_it_was(ts, anchor):
    raw = json.loads(json.dumps(BASE_CFG))
    raw["subscriptions"][0]["anchor"] = anchor
    rules = Rules(parse_config(raw, "test.toml", environ={}))
    stats = FlowStats()
    meter = CustomerMeter(rules, "acme|cust_456", stats=stats)
    t0 = ms("2026-02-10T10:00:00Z")
    meter.process([[_metered("a", t0, t0, tokens=5)]])
    before = meter.snapshot()
    out = meter.process([[_metered("poison", ts, t0, n=2, tokens=7), _metered("b", t0 + 1, t0 + 1, n=3, tokens=1)]],
                        flush=False)
    dead = [d for d in out.dead_letters if d.reason != "missing_property"]
    assert [(d.reason, d.source) for d in dead] == [("invalid_event", "m.jsonl:2")]
    assert "outside the range of billing periods" in dead[0].detail
    # the poison event left no trace: the state is the one event "b" away from the snapshot before it
    replay = CustomerMeter.from_snapshot(rules, before, stats=FlowStats())
    replay.process([[_metered("b", t0 + 1, t0 + 1, n=3, tokens=1)]], flush=False)
    assert meter.wm == replay.wm == t0 + 1 and len(meter.seen) == len(replay.seen) == 2
    # its id was not remembered: a valid event with that id counts, in both
    for m in (meter, replay):
        m.process([[_metered("poison", t0 + 2, t0 + 2, n=4, tokens=100)]], flush=False)
    rows = [sorted(map(repr, m.flush().periods)) for m in (meter, replay)]
    assert rows[0] == rows[1] and "value=106.0" in " ".join(rows[0])
    c = stats.snapshot()
    assert (c["accepted"], c["dead_lettered"], c["duplicates"]) == (3, 1, 0)


def test_a_bug_half_way_through_an_event_is_an_internal_error_and_later_events_count(monkeypatch):
    import meterflow.operators.meter as meter_mod

    real = meter_mod._dim

    def dim(v):
        if v == "boom":
            raise RuntimeError("a bug in dimension handling")
        return real(v)

    monkeypatch.setattr(meter_mod, "_dim", dim)
    run = Run()
    run.feed(ev("e1", "2026-02-10T10:00:00Z", tokens=1, region="us"),
             ev("e2", "2026-02-10T10:05:00Z", tokens=2, region="boom"),
             ev("e3", "2026-02-10T10:10:00Z", tokens=4, region="eu"))
    dead = [d for em in run.emissions for d in em.dead_letters if d.reason != "missing_property"]
    assert [(d.reason, d.source) for d in dead] == [("internal_error", "test.jsonl:2")]
    assert "meter raised RuntimeError: a bug in dimension handling" in dead[0].detail
    assert pvalue(run, "tokens_by_region") == 5.0  # e1 + e3: the flow went on
    c = run.stats.snapshot()
    assert (c["read"], c["accepted"], c["dead_lettered"]) == (3, 2, 1)


def test_summary_identity_on_a_mixed_stream():
    from meterflow.base.stats import identity

    run = Run()
    run.feed(ev("a1", "2026-02-10T10:00:00Z", tokens=1, user="u", latency=1),          # accepted
             ev("a1", "2026-02-10T10:00:00Z", tokens=1, user="u", latency=1),          # duplicate
             ev("a2", "2026-02-10T10:01:00Z", cust="cust_internal", tokens=1),         # excluded (customer)
             ev("a3", "2026-02-10T10:02:00Z", tokens=1, environment="test"),            # excluded (property)
             ev("a4", "2026-02-10T10:03:00Z", etype="heartbeat"),                       # accepted, unmetered
             ev("a5", "2026-02-10T10:04:00Z", user="u2", latency=3),                    # accepted, 4 missing_property
             b"{",                                                                      # invalid_json
             ev("a6", "2026-02-10T10:05:00Z", tenant="ghost"),                          # unknown_tenant
             ev("a7", "2999-01-01T00:00:00Z"),                                          # invalid_event (future)
             ev("w1", "2026-03-10T00:00:00Z", cust="c9", tokens=1, user="u", latency=1))  # accepted; moves watermark
    run.feed(ev("late", "2026-01-05T00:00:00Z", cust="c9", tokens=1, user="u", latency=1),  # too_late
             ev("late", "2026-01-05T00:00:00Z", cust="c9", tokens=1, user="u", latency=1))  # its retry: duplicate
    c = run.stats.snapshot()
    assert {k: c[k] for k in ("read", "accepted", "duplicates", "excluded", "dead_lettered", "missing_property",
                              "unmetered")} == {
        "read": 12, "accepted": 4, "duplicates": 2, "excluded": 2, "dead_lettered": 4, "missing_property": 4,
        "unmetered": 1}
    ok, text = identity(c)
    assert ok and text.startswith("read 12 = accepted 4 + duplicates 2 + excluded 2 + dead-lettered 4"), text
    rows = sum(len(em.dead_letters) for em in run.emissions)
    assert rows == c["dead_lettered"] + c["missing_property"]
