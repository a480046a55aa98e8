"""Property tests: random streams of usage events and entitlement changes through the real operators
(Mediator, ChangelogMediator, CustomerMeter) and the full Bytewax flow, compared exactly with the
independent reference model in ``tests/operators/alert_model.py``.

Streams: four customers of two tenants (``acme/c1`` monthly on the 15th with a blocking wallet,
``acme/c2`` daily with a hard custom contract, ``beta/c1`` weekly with an alerting wallet, ``beta/c3``
without a subscription), a count, a filtered count, a sum, a max, a second event type's sum and
sometimes a p95 metric; timestamps clustered around period boundaries, out-of-order arrivals,
resent duplicates, corrections, negative and fractional sums, missing properties, the same event id
in both tenants; changelog records with random plans, overrides, wallets and cancellations, and
versions that are sometimes stale. No exclusions and no events beyond late_grace (see the model).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from datetime import timedelta

from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from meterflow.dataflows.metering import build_flow
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import Emission
from tests.operators.alert_model import (
    CASES,
    KNOWN_DEVIATIONS,
    Change,
    Ev,
    MeterHarness,
    alerts_by_customer,
    expected_gateway,
    final_gateway,
    ms,
    run_model,
)
from tests.operators.test_meter_properties import chunk

# -- the configuration under test ------------------------------------------------------------------------

METRICS = [  # configuration order = code order
    {"code": "calls", "event_type": "api_call"},
    {"code": "lat95", "event_type": "api_call", "aggregation": "p95", "property": "latency"},
    {"code": "large", "event_type": "api_call", "where": {"model": "m-large"}},
    {"code": "peak", "event_type": "api_call", "aggregation": "max", "property": "tokens"},
    {"code": "storage", "event_type": "storage", "aggregation": "sum", "property": "gb"},
    {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens"},
]


def plans(p95: bool):
    basic = {"calls": {"included": 3, "thresholds": [50, 80, 100], "enforcement": "hard"},
             "tokens": {"included": 200, "thresholds": [75, 90, 100]},
             "peak": {"included": 100, "thresholds": [100], "enforcement": "auto_overage", "next_plan": "pro"}}
    pro = {"calls": {"included": 5, "thresholds": [50, 100, 150], "enforcement": "auto_overage", "next_plan": "scale"},
           "tokens": {"included": 400, "thresholds": [25, 100], "enforcement": "hard"},
           "peak": {"included": 300, "thresholds": [80, 100]},
           "storage": {"included": 50, "thresholds": [50, 100], "enforcement": "hard"}}
    scale = {"calls": {"included": 8, "thresholds": [90, 100], "enforcement": "auto_overage"},
             "tokens": {"included": 2000},
             "storage": {"included": 0, "thresholds": [100]}}
    if p95:
        basic["lat95"] = {"included": 100, "thresholds": [90, 100], "enforcement": "hard"}
        pro["lat95"] = {"included": 200, "thresholds": [100], "enforcement": "auto_overage"}
        scale["lat95"] = {"included": 150, "thresholds": [50, 100]}
    return [{"code": "basic", "entitlements": basic}, {"code": "pro", "entitlements": pro},
            {"code": "scale", "entitlements": scale}, {"code": "free", "entitlements": {}}]


SCHEMES = {  # customer -> (period, anchor) kept by every changelog record
    ("acme", "c1"): ("month", "2026-01-15T00:00:00Z"),
    ("acme", "c2"): ("day", "2026-01-01T06:00:00Z"),
    ("beta", "c1"): ("week", "2026-01-05T00:00:00Z"),
    ("beta", "c3"): ("month", "1970-01-01T00:00:00Z"),
}
CUSTOMERS = list(SCHEMES)
BOUNDARIES = {  # a few period boundaries per customer, where its events cluster
    ("acme", "c1"): ["2026-01-15T00:00:00Z", "2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z"],
    ("acme", "c2"): ["2026-01-20T06:00:00Z", "2026-01-21T06:00:00Z", "2026-01-22T06:00:00Z"],
    ("beta", "c1"): ["2026-01-12T00:00:00Z", "2026-01-19T00:00:00Z", "2026-01-26T00:00:00Z"],
    ("beta", "c3"): ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"],
}


def make_config(p95: bool):
    raw = {
        "pipeline": {"late_grace": "3650d", "dedupe_window": "3650d"},
        "tenants": [{"id": "acme"}, {"id": "beta"}],
        "metrics": METRICS,
        "plans": plans(p95),
        "subscriptions": [
            {"tenant_id": "acme", "customer_id": "c1", "plan": "basic", "period": "month",
             "anchor": "2026-01-15T00:00:00Z",
             "wallet": {"balance": 25, "credit_rates": {"calls": 1, "tokens": 0.05, "large": 0.5},
                        "on_exhausted": "block", "low_balance_pct": 30}},
            {"tenant_id": "acme", "customer_id": "c2", "plan": "pro", "period": "day",
             "anchor": "2026-01-01T06:00:00Z",
             "overrides": {"calls": {"included": 2, "enforcement": "hard", "thresholds": [50, 100]}}},
            {"tenant_id": "beta", "customer_id": "c1", "plan": "scale", "period": "week",
             "anchor": "2026-01-05T00:00:00Z",
             "wallet": {"balance": 5, "credit_rates": {"storage": 0.1, "peak": 0.01}, "on_exhausted": "alert"}},
        ],
    }
    return parse_config(json.loads(json.dumps(raw)), "entitlements.toml", environ={})


CONFIGS = {True: make_config(True), False: make_config(False)}

# -- stream generation -------------------------------------------------------------------------------------

H = 3_600_000
OFFSETS = st.one_of(st.sampled_from([0, -1, 1, -H, H]), st.integers(-12 * H, 12 * H))
TOKENS = st.one_of(st.integers(0, 150), st.integers(0, 150), st.integers(-60, 60),
                   st.sampled_from([0.1, 0.2, 0.3, 12.5, 99.99, 1e-3]))


@st.composite
def props_for(draw, etype):
    if etype == "storage":
        p = {"gb": draw(st.one_of(st.integers(0, 30), st.sampled_from([2.5, 0.1, -5])))}
        return {k: v for k, v in p.items() if draw(st.integers(0, 7))}
    p = {"tokens": draw(TOKENS), "latency": draw(st.integers(0, 300)),
         "model": draw(st.sampled_from(["m-large", "m-small"]))}
    return {k: v for k, v in p.items() if draw(st.integers(0, 6))}


@st.composite
def subscriptions(draw, key, p95):
    kind, anchor = SCHEMES[key]
    sub = {"plan": draw(st.sampled_from(["basic", "pro", "scale", "free"])), "period": kind, "anchor": anchor}
    overrides = {}
    codes = ["calls", "tokens", "peak", "storage", "large"] + (["lat95"] if p95 else [])
    for code in draw(st.lists(st.sampled_from(codes), unique=True, max_size=3)):
        o = {}
        if draw(st.booleans()):
            o["included"] = draw(st.sampled_from([0, 1, 2, 4, 10, 150, 300]))
        if draw(st.booleans()):
            o["thresholds"] = draw(st.lists(st.sampled_from([25, 50, 75, 90, 100, 120, 33.3]), min_size=1,
                                            max_size=3))
        if draw(st.booleans()):
            o["enforcement"] = draw(st.sampled_from(["soft", "hard", "auto_overage"]))
        if draw(st.integers(0, 3)) == 0:
            o["next_plan"] = "scale"  # overrides only point at the last plan: plan moves never loop
        overrides[code] = o
    if overrides:
        sub["overrides"] = overrides
    if draw(st.integers(0, 2)) == 0:
        rated = ["calls", "tokens", "peak", "storage", "large"] + (["lat95"] if p95 else [])
        sub["wallet"] = {
            "balance": draw(st.sampled_from([0, 2, 5, 10, 25, 100])),
            "credit_rates": {c: draw(st.sampled_from([0, 0.05, 0.1, 0.5, 1, 2.5]))
                             for c in draw(st.lists(st.sampled_from(rated), unique=True, max_size=3))},
            "on_exhausted": draw(st.sampled_from(["block", "alert", "postpaid"])),
            "low_balance_pct": draw(st.sampled_from([10, 20, 50, 100])),
        }
    return sub


@st.composite
def streams(draw, max_events=40, max_changes=4, p95=True):
    """A list of Ev/Change items in arrival order."""
    n = draw(st.integers(1, max_events))
    timed = []
    for i in range(n):
        key = draw(st.sampled_from(CUSTOMERS))
        etype = draw(st.sampled_from(["api_call"] * 4 + ["storage"]))
        b = BOUNDARIES[key]
        ts = ms(b[draw(st.sampled_from([0, 0, 1, 1, 2]))]) + draw(OFFSETS)
        ev = Ev(key[0], key[1], f"e{i}", etype, ts, draw(props_for(etype)),
                correction=draw(st.integers(0, 7)) == 0)
        arrival = ts + draw(st.one_of(st.just(0), st.just(0), st.integers(0, 36 * H)))
        timed.append((arrival, i, ev))
        if draw(st.integers(0, 9)) == 0:  # the same event id in the other tenant is another event
            other = [c for c in CUSTOMERS if c[0] != key[0]]
            t2, c2 = draw(st.sampled_from(other))
            timed.append((arrival + draw(st.integers(0, H)), i + 0.5,
                          Ev(t2, c2, ev.event_id, ev.event_type, ev.ts, ev.props, ev.correction)))
    for _ in range(draw(st.integers(0, max(1, n // 4)))):  # resends, possibly much later
        arrival, i, ev = draw(st.sampled_from(timed))
        timed.append((arrival + draw(st.integers(0, 48 * H)), i + 0.25, ev))
    timed.sort(key=lambda t: (t[0], t[1]))
    stream = [t[2] for t in timed]
    version = 0
    for _ in range(draw(st.integers(0, max_changes))):
        key = draw(st.sampled_from(CUSTOMERS))
        version += draw(st.integers(1, 3))
        v = version if draw(st.integers(0, 4)) else draw(st.integers(0, version))  # sometimes stale
        sub = None if draw(st.integers(0, 5)) == 0 else draw(subscriptions(key, p95))
        stream.insert(draw(st.integers(0, len(stream))), Change(key[0], key[1], v, sub))
    if draw(st.booleans()):  # half of the streams also play the scenario of issue 17
        scenario = draw(late_scenario(version + 1))
        merged = []
        while stream or scenario:  # interleave at random, each keeping its order
            src = stream if scenario == [] or stream and draw(st.booleans()) else scenario
            merged.append(src.pop(0))
        stream = merged
    return stream


@st.composite
def late_scenario(draw, version):
    """One hard-enforced customer around one of its period boundaries: events of the earlier period up to
    around its quota (with corrections); the first events of the later period, up to around its quota, maybe a
    correction below it and an event back above; then late events and corrections for the earlier period
    mixed with more of the later one; changelog records that raise or lower the quota (or change the
    enforcement) in between, the first one soon after the later period started (mostly a raised quota)."""
    key = draw(st.sampled_from([("acme", "c1"), ("acme", "c2")]))
    b = ms(BOUNDARIES[key][draw(st.integers(0, 2))])
    n = [0]

    def event(before: bool, correction: bool = False) -> Ev:
        n[0] += 1
        ts = b - draw(st.integers(1, 6 * H)) if before else b + draw(st.integers(0, 6 * H))
        return Ev(key[0], key[1], f"s{n[0]}", "api_call", ts, draw(props_for("api_call")), correction)

    def corr() -> bool:
        return draw(st.integers(0, 2)) == 0

    # (counts drawn from lists that start near the quotas: hypothesis favours the first elements)
    items = [event(True, corr()) for _ in range(draw(st.sampled_from([3, 4, 2, 5, 6, 1])))]
    items += [event(False, i > 2 and corr()) for i in range(draw(st.sampled_from([3, 2, 4, 5, 1])))]
    rolled = len(items)  # the later period has started (and may be blocked)
    if draw(st.booleans()):  # below its quota and back
        items += [event(False, True), event(False)]
    items += [event(draw(st.booleans()), corr()) for _ in range(draw(st.integers(1, 8)))]
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(items)))  # a resend
    kind, anchor = SCHEMES[key]
    for i in range(draw(st.integers(0, 3))):
        if i == 0:  # soon after the later period started: mostly a raised hard quota
            ent = {"included": draw(st.sampled_from([10, 10, 5, 1])), "enforcement": "hard"}
            at = draw(st.sampled_from([rolled, rolled, min(len(items), rolled + 2)]))
        else:
            ent = {"included": draw(st.sampled_from([1, 2, 3, 5, 10])),
                   "enforcement": draw(st.sampled_from(["hard"] * 4 + ["soft", "auto_overage"]))}
            at = draw(st.integers(0, len(items)))
        sub = {"plan": "basic", "period": kind, "anchor": anchor, "overrides": {"calls": ent}}
        items.insert(at, Change(key[0], key[1], version + i, sub))
    return items


def deliveries(data, stream):
    """The stream cut into consecutive deliveries of 1-6 items (one ``process`` call per customer each)."""
    return chunk(data, stream, max_size=6)


def per_customer(model):
    out = defaultdict(list)
    for key, a in model.alerts:
        out[key].append(a)
    return dict(out)


def assert_final_states(emissions, cfg, parts):
    """Final gateway states equal the model's; so do wallet states, except that a wallet nothing has
    touched yet (no rated contribution, no change applied) need not have been written. (A wallet that
    was removed keeps its last state: WalletState has no ``deleted`` flag, so that is not checked.)"""
    got_gw, got_wallets = final_gateway(emissions)
    want_gw, want_wallets = expected_gateway(cfg, parts)
    assert got_gw == want_gw
    model = run_model(cfg, parts)
    for key, want in want_wallets.items():
        cm = model.customers[key]
        if key not in got_wallets and not cm.units and cm.version < 0:
            continue
        assert got_wallets.get(key) == want, (key, got_wallets.get(key), want)


def assert_same(got_by_customer, want_by_customer, notes=()):
    """Per customer, the same alert tuples in the same order (``notes``: situations of KNOWN_DEVIATIONS the
    model went through, named in the failure message)."""
    for key in set(got_by_customer) | set(want_by_customer):
        got, want = got_by_customer.get(key, []), want_by_customer.get(key, [])
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, (key, i, "got", g, "want", w, "got so far", got[:i], "model", want, "notes", notes)
        assert len(got) == len(want), (key, "got", got[len(want):], "model", want[len(got):], "notes", notes)


# No shrink phase by default (a failing stream is printed whole); ENT_SHRINK=1 shrinks it while debugging.
SETTINGS = dict(deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("ENT_SHRINK") else []),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# Names from KNOWN_DEVIATIONS whose examples are skipped while the deviation is being fixed (pin it with an
# xfail test in test_entitlements.py meanwhile). Every deviation found so far is fixed: nothing is skipped.
SKIP_KNOWN: set = set()
assert SKIP_KNOWN <= set(KNOWN_DEVIATIONS)


def skip_known_deviations(model):
    assume(not (model.notes & SKIP_KNOWN))
    for case in sorted(model.cases):  # pytest --hypothesis-show-statistics shows how often each came up
        event(case)


@settings(max_examples=400, **SETTINGS)
@given(stream=streams(), p95=st.booleans(), data=st.data())
def _count_cases(counts, stream, p95, data):
    counts["examples"] += 1
    for case in run_model(CONFIGS[p95], deliveries(data, stream)).cases:
        counts[case] += 1


def test_the_generators_produce_the_hard_cases():
    """The streams of the property tests go through every situation of the model's CASES, each in at least
    1 % of 400 examples (typically 3-20 %): late events for a period that is over (also at or above 100 % of
    a hard quota, also for a period the roll-over unblocked), corrections that take the current period below
    100 % and back, raised quotas on the changelog. Without them a regression of issue 17 would pass
    unnoticed. (Not derandomized: hypothesis' generation also depends on timing, so a fixed seed would not
    give fixed counts either.)"""
    counts: Counter = Counter()
    _count_cases(counts)
    assert counts["examples"] >= 400
    rare = {c: counts[c] for c in CASES if counts[c] < 0.01 * counts["examples"]}
    assert not rare, f"too rare in {counts['examples']} streams: {rare}"


@settings(max_examples=150, **SETTINGS)
@given(stream=streams(), p95=st.booleans(), data=st.data())
def test_customer_meter_matches_model(stream, p95, data):
    cfg = CONFIGS[p95]
    parts = deliveries(data, stream)
    model = run_model(cfg, parts)
    skip_known_deviations(model)
    h = MeterHarness(cfg)
    for d in parts:
        h.deliver(d, flush=data.draw(st.booleans()))
    assert_same(alerts_by_customer(h.alerts()), per_customer(model), sorted(model.notes))
    assert not [d for d in h.dead_letters() if d.reason not in ("missing_property",)]
    assert_final_states(h.emissions, cfg, parts)


@settings(max_examples=80, **SETTINGS)
@given(stream=streams(), p95=st.booleans(), data=st.data(), restore_at=st.integers(0, 1000))
def test_snapshot_restore_at_a_random_point_matches_model(stream, p95, data, restore_at):
    """Every meter snapshotted and rebuilt from its bytes between two deliveries: the same alerts (no
    duplicates, none lost) and the same final gateway and wallet states as the model."""
    cfg = CONFIGS[p95]
    parts = deliveries(data, stream)
    model = run_model(cfg, parts)
    skip_known_deviations(model)
    h = MeterHarness(cfg)
    cut = restore_at % (len(parts) + 1)
    for i, d in enumerate(parts):
        if i == cut:
            h.restore_all()
        h.deliver(d)
    assert_same(alerts_by_customer(h.alerts()), per_customer(model), sorted(model.notes))
    ids = [a.alert_id for a in h.alerts()]
    assert len(ids) == len(set(ids)), "an alert id was emitted twice"
    assert_final_states(h.emissions, cfg, parts)


@settings(max_examples=40, **SETTINGS)
@given(stream=streams(max_events=15, p95=False), data=st.data())
def test_batching_does_not_change_alerts_without_percentiles(stream, data):
    """Without p95 entitlements alerts are evaluated per event: any batch split gives the same alerts."""
    cfg = CONFIGS[False]
    skip_known_deviations(run_model(cfg, [stream]))
    a, b = MeterHarness(cfg), MeterHarness(cfg)
    for d in deliveries(data, stream):
        a.deliver(d)
    for it in stream:
        b.deliver([it])
    assert alerts_by_customer(a.alerts()) == alerts_by_customer(b.alerts())


# -- end to end through Bytewax --------------------------------------------------------------------------------

GAP = timedelta(milliseconds=120)


def flow_inputs(stream):
    """Two TestingSources (events, changelog) whose runs alternate in time: PAUSEs put each run of
    changes after the events before it and before the events after it (one epoch, processed eagerly)."""
    runs = []
    for it in stream:
        kind = "c" if isinstance(it, Change) else "e"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(it)
        else:
            runs.append((kind, [it]))
    events, changes = [], []
    line = 0
    for i, (kind, items) in enumerate(runs):
        target = events if kind == "e" else changes
        other = changes if kind == "e" else events
        for it in items:
            if kind == "e":
                line += 1
                target.append((("events.jsonl", line), it.raw()))
            else:
                target.append((("changes.jsonl", it.version), it.raw()))
        if i < len(runs) - 1:  # both inputs wait one gap per run boundary: runs keep their order in time
            target.append(TestingSource.PAUSE(GAP))
            other.append(TestingSource.PAUSE(GAP))
    return events, changes


def run_flow(cfg, stream, batch_size, workers):
    out = []
    events, changes = flow_inputs(stream)
    flow = build_flow(cfg, TestingSource(events, batch_size=batch_size), [("out", TestingSink(out))],
                      recoverable=False, entitlements=TestingSource(changes, batch_size=batch_size),
                      gateway_states=True)  # no [redis] here, but the test reads the gateway states
    if workers == 1:
        run_main(flow, epoch_interval=timedelta(seconds=60))
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers, epoch_interval=timedelta(seconds=60))
    assert all(isinstance(em, Emission) for em in out)
    return out


def check_flow(stream, batch_size, workers):
    cfg = CONFIGS[False]
    # Bytewax batches are not ours: judge known deviations as if all of a customer's events came at once
    notes = run_model(cfg, [stream]).notes
    assume(not (notes & SKIP_KNOWN))
    out = run_flow(cfg, stream, batch_size, workers)
    alerts = [a for em in out for a in em.alerts]
    model = run_model(cfg, [[it] for it in stream])
    for case in sorted(model.cases):
        event(case)
    want = per_customer(model)
    assert {a.alert_id for a in alerts} == {a[0] for al in want.values() for a in al}, sorted(notes)
    assert_same(alerts_by_customer(alerts), want, sorted(notes))
    assert_final_states(out, cfg, [[it] for it in stream])


@settings(max_examples=12, **SETTINGS)
@given(stream=streams(max_events=30, max_changes=2, p95=False), batch_size=st.integers(1, 8))
def test_full_flow_one_worker_matches_model(stream, batch_size):
    check_flow(stream, batch_size, 1)


@settings(max_examples=8, **SETTINGS)
@given(stream=streams(max_events=30, max_changes=2, p95=False), batch_size=st.integers(1, 8))
def test_full_flow_two_workers_matches_model(stream, batch_size):
    check_flow(stream, batch_size, 2)
