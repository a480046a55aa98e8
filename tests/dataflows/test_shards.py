"""The meter step's shards (``pipeline.shards``): routing, the flush tick, snapshots and resume.

Unit tests drive ``_ShardLogic`` directly with a fake clock; the property tests run the whole Bytewax flow
with few shards (so that many customers share one) against the independent reference models of
``tests/operators``: the usage rows and dead letters of ``test_meter_properties`` (1 and 2 workers, and
crashes with resume from the recovery store) and the alerts and gateway state of
``test_entitlement_properties`` (changelog records routed to their customer's shard).
"""

from __future__ import annotations

import json
import tempfile
import zlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import bytewax.operators as op
import msgspec
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.errors import ConfigError, MeterError
from meterflow.base.keys import customer_key
from meterflow.base.stats import FlowStats
from meterflow.dataflows.mediation import mediate, mediate_changelog
from meterflow.dataflows.metering import SHARD_STATE_VERSION, _ShardLogic, build_flow
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.mediate import Mediator, bundle_shards, shard_of
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import DEFAULT_SHARDS, parse_config
from meterflow.schemas.records import Emission
from tests.operators import test_entitlement_properties as ent_props
from tests.operators.test_meter_properties import (
    CONFIGS,
    SETTINGS,
    assert_matches,
    config_for,
    expected,
    final_rows,
    make_config,
    streams,
)

T0 = 1_800_000_000_000  # a wall-clock instant on the flush grid of 1 s


def with_shards(cfg, shards):
    return msgspec.structs.replace(cfg, pipeline=msgspec.structs.replace(cfg.pipeline, shards=shards))


def event(i, cust, ts="2026-02-10T10:00:00Z", tenant="acme", **props):
    return (("events.jsonl", i), json.dumps({
        "event_id": f"e{i}", "tenant_id": tenant, "customer_id": cust, "event_type": "api_call",
        "timestamp": ts, "properties": {"tokens": 10, "latency": 5, "region": "eu", "user": "u1", **props}}).encode())


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def new_logic(cfg, shards=1, resume=None, recoverable=True, clock=None, mediator=None):
    mediator = mediator or Mediator(cfg, stats=FlowStats())
    return _ShardLogic(Rules(cfg), shards, resume, recoverable, mediator, clock=clock or Clock()), mediator


def shard_values(mediator, batch, shard="0", shards=1):
    """What Bytewax hands one shard's on_batch for this mediated batch (its dead letters go to the sinks)."""
    return [bundle for k, bundle in bundle_shards(mediator(batch).groups, shards) if k == shard]


def merged(out):
    emitted, _retain = out
    assert len(emitted) <= 1, "a shard answers a batch with at most one Emission"
    return emitted[0] if emitted else Emission()


def state_of(meter):
    """What a meter's snapshot must carry, comparable (pickled bytes of equal states may differ)."""
    return (meter.key, meter.wm, {k: (a.value(), a.events) for k, a in meter.windows.items()},
            {k: (a.value(), a.events) for k, a in meter.periods.items()}, meter.excluded, meter.dirty_w,
            meter.dirty_p, meter.ent.rule)


def rows_of(em):
    return dict(zip(row_keys(em), [(r.value, r.version) for r in em.windows + em.periods]))


def row_keys(em):
    return ([("w", r.tenant_id, r.customer_id, r.metric, r.window_start, tuple(r.dimensions.items()))
             for r in em.windows] +
            [("p", r.tenant_id, r.customer_id, r.metric, r.period_start) for r in em.periods])


# -- routing ------------------------------------------------------------------------------------------------

def test_the_shard_count_is_a_validated_pipeline_setting():
    assert parse_config({}, environ={}).pipeline.shards == DEFAULT_SHARDS == 64
    assert parse_config({}, environ={"METER_PIPELINE_SHARDS": "16"}).pipeline.shards == 16
    # whether the shard count was given (a recovery directory's recorded count is used when it was not)
    assert [parse_config(raw, environ=environ).pipeline.shards_given for raw, environ in (
        ({}, {}), ({"pipeline": {"flush_interval": "2s"}}, {}), ({"pipeline": {"shards": 64}}, {}),
        ({}, {"METER_PIPELINE_SHARDS": "64"}), ({"pipeline": {"shards_given": True}}, {}))] == [
        False, False, True, True, False]
    for bad in (0, -1, "many"):
        with pytest.raises(ConfigError, match=r"pipeline\.shards"):
            parse_config({"pipeline": {"shards": bad}}, "meter.toml", environ={})


def test_shard_of_is_a_stable_hash_of_the_customer_key():
    key = customer_key("acme", "cust_456")
    assert shard_of(key, 64) == str(zlib.crc32(b"acme|cust_456") % 64) == "8"  # pinned: state depends on it
    assert shard_of(key, 1) == "0"
    assert {shard_of(customer_key("acme", f"c{i}"), 16) for i in range(400)} == {str(i) for i in range(16)}
    # the tenant is part of the key: the same customer id of two tenants is routed independently
    assert [shard_of(customer_key(t, "c1"), 1024) for t in ("acme", "beta")] == ["124", "856"]


def test_mediation_bundles_each_customer_in_its_shard():
    cfg = make_config()
    batch = [event(i, f"c{i % 7}", tenant=("acme", "beta")[i % 2]) for i in range(40)] + [(("events.jsonl", 99), b"{")]
    groups, dead = Mediator(cfg, stats=FlowStats())(batch)
    assert [d.reason for d in dead] == ["invalid_json"]
    bundles = bundle_shards(groups, 4)
    assert len({shard for shard, _ in bundles}) == len(bundles), "one bundle per shard and batch"
    seen = {}
    for shard, bundle in bundles:
        for key, events in bundle.items():
            assert shard_of(key, 4) == shard
            assert all(customer_key(m.event.tenant_id, m.event.customer_id) == key for m in events)
            seen[key] = [m.event.event_id for m in events]
    assert seen == {k: [m.event.event_id for m in v] for k, v in groups.items()}
    assert bundle_shards({}, 4) == []


def test_the_mediate_operators_have_typed_outputs_per_batch():
    """events: (shard, bundle) items, one per shard and batch; dead_letters: one Emission per batch that had
    any, nothing else in it; changelog records keyed by their customer's shard, in log order."""
    cfg = make_config()
    bad = [(("events.jsonl", 90 + i), raw) for i, raw in enumerate([b"{", b"", b"[1]", b"x"])]
    # batches of 3: two good and a bad one / three bad ones / three good ones
    items = [event(1, "c1"), event(2, "c2"), bad[0], *bad[1:], event(3, "c1"), event(4, "c3"), event(5, "c4")]
    change = json.dumps({"tenant_id": "acme", "customer_id": "free", "cancelled": True}).encode()
    changes = [(("changes.jsonl", 1), change), (("changes.jsonl", 2), b"nope"), (("changes.jsonl", 3), change)]
    flow = Dataflow("typed")
    events = mediate("mediate", op.input("in", flow, TestingSource(items, batch_size=3)), Mediator(cfg, FlowStats()), 4)
    log = mediate_changelog("log", op.input("log_in", flow, TestingSource(changes, batch_size=3)),
                            ChangelogMediator(cfg, FlowStats()), 4)
    got = {name: [] for name in ("events", "dead", "changes", "bad_changes")}
    for name, stream in (("events", events.events), ("dead", events.dead_letters), ("changes", log.events),
                         ("bad_changes", log.dead_letters)):
        op.output(name, stream, TestingSink(got[name]))
    run_main(flow)
    assert all(type(k) is str and type(v) is dict for k, v in got["events"])
    expected = [(shard, list(bundle)) for keys in (("acme|c1", "acme|c2"), ("acme|c1", "acme|c3", "acme|c4"))
                for shard, bundle in bundle_shards(dict.fromkeys(keys), 4)]  # the first batch, then the third
    assert [(shard, list(bundle)) for shard, bundle in got["events"]] == expected
    assert sorted(m.event.event_id for _, b in got["events"] for ms in b.values() for m in ms) == [
        "e1", "e2", "e3", "e4", "e5"]
    assert [type(e) for e in got["dead"]] == [Emission, Emission]
    assert [[d.source for d in e.dead_letters] for e in got["dead"]] == [
        ["events.jsonl:90"], ["events.jsonl:91", "events.jsonl:92", "events.jsonl:93"]]
    assert all(e == Emission(dead_letters=e.dead_letters) for e in got["dead"]), "dead letters only"
    assert [(k, u.version) for k, u in got["changes"]] == [(shard_of("acme|free", 4), 1), (shard_of("acme|free", 4), 3)]
    assert [[d.reason for d in e.dead_letters] for e in got["bad_changes"]] == [["invalid_entitlement"]]


def _meter_snapshots(tmp):
    import sqlite3

    with sqlite3.connect(next(Path(tmp).glob("*.sqlite3"))) as db:
        return db.execute("SELECT count(*) FROM snaps WHERE step_id = 'meterflow.meter'").fetchone()[0]


def test_dead_letters_reach_the_sinks_without_the_meter_step():
    """A batch of bad lines only: its dead letters leave in one Emission and no shard is created for them."""
    cfg = with_shards(make_config(), 4)
    for lines, shards_with_state in (([(("events.jsonl", 1), b"{"), (("events.jsonl", 2), b"")], 0),
                                     ([(("events.jsonl", 1), b"{"), event(2, "c31")], 1)):
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            init_db_dir(Path(tmp), 1)
            run_main(build_flow(cfg, TestingSource(lines, batch_size=2), [("out", TestingSink(out))]),
                     recovery_config=RecoveryConfig(Path(tmp)))
            assert _meter_snapshots(tmp) == shards_with_state
        dead = [[(d.reason, d.source) for d in em.dead_letters] for em in out if em.dead_letters]
        second = [("invalid_json", "events.jsonl:2")] if shards_with_state == 0 else []
        assert dead == [[("invalid_json", "events.jsonl:1")] + second]


# -- the flush tick -----------------------------------------------------------------------------------------

def test_rows_leave_once_per_tick_while_alerts_and_dead_letters_leave_with_their_batch():
    cfg = make_config()  # flush_interval 1 s; acme/c31 has calls included 20 (thresholds 75/90/100 %)
    clock = Clock(T0 + 300)
    logic, med = new_logic(cfg, clock=clock)
    # The first batch flushes at once (no tick yet) and schedules the next tick on the grid.
    first = merged(logic.on_batch(shard_values(med, [event(1, "c31"), event(2, "free")])))
    assert {k[2] for k in row_keys(first)} == {"c31", "free"}
    # Nothing pending: the next tick only checks whether the flow's watermark closed a row (finality).
    assert logic.notify_at() == datetime.fromtimestamp((T0 + 1000) / 1000, timezone.utc)

    clock.now = T0 + 400  # 16 calls for c31: crosses 75 % (15 of 20) now, its rows wait for the tick
    em = merged(logic.on_batch(shard_values(med, [event(i, "c31") for i in range(10, 26)])))
    assert not em.windows and not em.periods
    assert [a.threshold_pct for a in em.alerts if a.type == "threshold_crossed" and a.metric == "calls"] == [75.0]
    assert logic.notify_at() == datetime.fromtimestamp((T0 + 1000) / 1000, timezone.utc)

    clock.now = T0 + 700  # another customer, a missing property (a meter dead letter) and a bad payload
    groups, dead = med([event(30, "free", tokens=None), event(31, "cq"), (("events.jsonl", 32), b"not json")])
    assert [d.reason for d in dead] == ["invalid_json"]  # mediation's: to the sinks with the batch, not to a shard
    em = merged(logic.on_batch([bundle for _, bundle in bundle_shards(groups, 1)]))
    assert not em.windows and not em.periods
    assert Counter(d.reason for d in em.dead_letters) == {"missing_property": 2}

    clock.now = T0 + 1000  # the tick: every changed row of the shard once, with its latest value
    tick = merged(logic.on_notify())
    keys = row_keys(tick)
    assert len(keys) == len(set(keys))
    assert {k[2] for k in keys} == {"c31", "free", "cq"}
    calls = {r.customer_id: r for r in tick.periods if r.metric == "calls"}
    assert calls["c31"].value == 17.0 and calls["c31"].version == 17 and calls["free"].value == 2.0
    assert merged(logic.on_notify()) == Emission()

    # A batch after a missed tick flushes the whole shard at once: its own rows and the others' pending ones.
    clock.now = T0 + 1500
    merged(logic.on_batch(shard_values(med, [event(40, "cw", tenant="beta")])))  # before the 2 s tick
    clock.now = T0 + 2300
    late = merged(logic.on_batch(shard_values(med, [event(41, "c31")])))
    assert {k[2] for k in row_keys(late)} == {"cw", "c31"}
    assert logic.notify_at() == datetime.fromtimestamp((T0 + 3000) / 1000, timezone.utc)


def test_every_tick_falls_on_the_flush_grid():
    cfg = make_config()
    clock = Clock(T0 + 1234)
    logic, med = new_logic(cfg, clock=clock)
    logic.on_batch(shard_values(med, [event(1, "c31")]))
    clock.now = T0 + 1300
    logic.on_batch(shard_values(med, [event(2, "c31")]))
    assert logic.notify_at() == datetime.fromtimestamp((T0 + 2000) / 1000, timezone.utc)


def test_shards_tick_in_their_slot_of_the_interval():
    """With several shards, a shard ticks once per interval at its slot (shard number mod TICK_SLOTS, times
    interval / TICK_SLOTS), so the shards' ticks are spread over the interval, not all in one pass of the flow."""
    from meterflow.dataflows.metering import TICK_SLOTS
    from meterflow.operators.mediate import shard_of

    cfg = with_shards(make_config(), 16)  # flush_interval 1 s: slots of 125 ms
    custs = {}
    for i in range(200):  # a customer of every slot
        custs.setdefault(int(shard_of(f"acme|s{i}", 16)) % TICK_SLOTS, f"s{i}")
    assert len(custs) == TICK_SLOTS
    for slot, cust in sorted(custs.items()):
        clock = Clock(T0 + 10)
        logic, med = new_logic(cfg, shards=16, clock=clock)
        shard = shard_of(f"acme|{cust}", 16)
        first = merged(logic.on_batch(shard_values(med, [event(1, cust)], shard=shard, shards=16)))
        assert {k[2] for k in row_keys(first)} == {cust}  # the first batch flushes at once
        tick = T0 + slot * 125 if slot else T0 + 1000  # the next instant of its slot after T0 + 10
        assert logic.notify_at() == datetime.fromtimestamp(tick / 1000, timezone.utc), slot
        clock.now = tick - 1
        assert not merged(logic.on_batch(shard_values(med, [event(2, cust)], shard=shard, shards=16))).periods
        clock.now = tick
        assert {r.customer_id for r in merged(logic.on_notify()).periods} == {cust}
        assert logic.notify_at() == datetime.fromtimestamp((tick + 1000) / 1000, timezone.utc), slot


def test_eof_drains_pending_rows():
    cfg = make_config()
    clock = Clock()
    logic, med = new_logic(cfg, clock=clock)
    logic.on_batch(shard_values(med, [event(1, "c31")]))
    clock.now += 10
    logic.on_batch(shard_values(med, [event(2, "c31"), event(3, "free")]))
    em = merged(logic.on_eof())
    assert {(r.customer_id, r.version) for r in em.periods if r.metric == "calls"} == {("c31", 2), ("free", 1)}


# -- changelog records ----------------------------------------------------------------------------------------

def test_a_changelog_record_reaches_its_customer_in_order_with_its_events():
    cfg = make_config()
    clock = Clock()
    logic, med = new_logic(cfg, clock=clock)
    change = json.dumps({"tenant_id": "acme", "customer_id": "free", "subscription": {
        "tenant_id": "acme", "customer_id": "free", "plan": "pro", "period": "month",
        "anchor": "2026-01-01T00:00:00Z", "overrides": {"calls": {"included": 4}}}}).encode()
    ((key, update),), dead = ChangelogMediator(cfg, stats=FlowStats())([(("changes.jsonl", 1), change)])
    assert dead == []
    assert key == "acme|free"
    before = shard_values(med, [event(1, "free"), event(2, "c31")])
    after = shard_values(med, [event(3, "free"), event(4, "free"), event(5, "free")])
    em = merged(logic.on_batch(before + [update] + after))
    # free was unsubscribed for event 1, then has 4 calls included: 4 calls in the period cross 100 %
    crossed = [(a.customer_id, a.threshold_pct, a.event_id) for a in em.alerts if a.type == "threshold_crossed"
               and a.metric == "calls"]
    assert crossed == [("free", 75.0, "e4"), ("free", 90.0, "e5"), ("free", 100.0, "e5")]
    assert logic._meters["acme|free"].ent.rule.included("calls") == 4
    assert logic._meters["acme|c31"].ent.rule.included("calls") == 20  # its neighbour in the shard: untouched


# -- snapshots and resume ------------------------------------------------------------------------------------

def test_snapshot_repickles_only_changed_customers_and_resume_rebuilds_every_one():
    cfg = make_config()
    clock = Clock()
    logic, med = new_logic(cfg, clock=clock)
    logic.on_batch(shard_values(med, [event(1, "c31"), event(2, "free"), event(3, "cw", "2026-02-10T12:00:00Z",
                                                                              tenant="beta")]))
    version, shards, snaps1 = logic.snapshot()
    assert (version, shards) == (SHARD_STATE_VERSION, 1) and set(snaps1) == {"acme|c31", "acme|free", "beta|cw"}

    clock.now += 100  # before the tick: only c31 changes (its rows stay pending, in the snapshot)
    logic.on_batch(shard_values(med, [event(4, "c31", "2026-02-10T11:00:00Z")]))
    _v, _s, snaps2 = logic.snapshot()
    assert snaps2["acme|free"] is snaps1["acme|free"] and snaps2["beta|cw"] is snaps1["beta|cw"]
    assert snaps2["acme|c31"] != snaps1["acme|c31"]
    assert logic.snapshot()[2] == snaps2 and logic.snapshot()[2] is not snaps2  # a copy each time

    mediator = Mediator(cfg, stats=FlowStats())
    resumed, _ = new_logic(cfg, resume=(version, shards, snaps2), mediator=mediator, clock=Clock(clock.now))
    assert {k: state_of(m) for k, m in resumed._meters.items()} == {k: state_of(m) for k, m in logic._meters.items()}
    assert mediator.watermark == max(m.wm for m in logic._meters.values()) == med.watermark
    # c31's pending rows survive the resume and leave at the next tick, as they would have without it
    assert resumed.notify_at() is not None
    assert rows_of(merged(resumed.on_notify())) == rows_of(merged(logic.on_notify())) != {}


def test_resume_with_another_shard_count_is_refused_with_the_setting_named():
    cfg = make_config()
    logic, med = new_logic(cfg, shards=1)
    logic.on_batch(shard_values(med, [event(1, "c31")]))
    snap = logic.snapshot()
    with pytest.raises(MeterError, match=r"pipeline.shards = 1, but this flow has pipeline.shards = 2"):
        new_logic(cfg, shards=2, resume=snap)
    old = CustomerMeter(Rules(cfg), "acme|c31").snapshot()  # a per-customer snapshot of the build before shards
    with pytest.raises(MeterError, match="pipeline.shards"):
        new_logic(cfg, resume=old)


def test_without_recovery_nothing_is_snapshotted():
    cfg = make_config()
    logic, med = new_logic(cfg, recoverable=False)
    logic.on_batch(shard_values(med, [event(1, "c31")]))
    assert logic.snapshot() is None and not logic._changed


def _causes(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_flow_refuses_a_recovery_store_written_with_another_shard_count():
    cfg = make_config()
    items = [event(1, "c31"), event(2, "free"), TestingSource.EOF(), event(3, "c31")]
    with tempfile.TemporaryDirectory() as tmp:
        init_db_dir(Path(tmp), 1)
        run_main(build_flow(with_shards(cfg, 4), TestingSource(items), [("out", TestingSink([]))]),
                 epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
        with pytest.raises(Exception) as info:
            run_main(build_flow(with_shards(cfg, 8), TestingSource(items), [("out", TestingSink([]))]),
                     epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
    assert any("pipeline.shards = 4, but this flow has pipeline.shards = 8" in str(e) for e in _causes(info.value)), \
        info.value


# -- the whole flow with few shards, against the reference models ---------------------------------------------

@settings(max_examples=25, **SETTINGS)
@given(stream=streams(max_events=25), conf=CONFIGS, batch_size=st.integers(1, 10), shards=st.sampled_from([1, 2, 3]),
       workers=st.sampled_from([1, 1, 2]))
def test_full_flow_with_shared_shards_matches_reference(stream, conf, batch_size, shards, workers):
    window, grace = conf
    out = []
    items = [(("events.jsonl", i + 1), it["raw"]) for i, it in enumerate(stream)]
    flow = build_flow(with_shards(config_for(window, grace), shards), TestingSource(items, batch_size=batch_size),
                      [("out", TestingSink(out))])
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert all(isinstance(em, Emission) for em in out)
    assert_matches(final_rows(out, strict_versions=False), expected(stream, window, grace))


@settings(max_examples=15, **SETTINGS)
@given(stream=streams(max_events=25), conf=CONFIGS, batch_size=st.integers(1, 4), shards=st.sampled_from([1, 2]),
       cuts=st.lists(st.integers(0, 200), min_size=1, max_size=2))
def test_crash_and_resume_with_shared_shards_matches_reference(stream, conf, batch_size, shards, cuts):
    """Aborts at random points, each followed by a new flow (a fresh Mediator) resuming from the store."""
    window, grace = conf
    cfg = with_shards(config_for(window, grace), shards)
    items = [(("events.jsonl", i + 1), it["raw"]) for i, it in enumerate(stream)]
    for c in sorted(set(cuts), reverse=True):
        items.insert(c % (len(items) + 1), TestingSource.ABORT())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        init_db_dir(Path(tmp), 1)
        for _ in range(len(set(cuts)) + 1):
            flow = build_flow(cfg, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))])
            run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
    assert_matches(final_rows(out, strict_versions=False), expected(stream, window, grace))


@settings(max_examples=10, **ent_props.SETTINGS)
@given(stream=ent_props.streams(max_events=30, max_changes=2, p95=False), batch_size=st.integers(1, 8),
       workers=st.sampled_from([1, 2]))
def test_changelog_and_events_of_customers_sharing_one_shard_match_the_alert_model(stream, batch_size, workers):
    """All four customers of the entitlement model in one shard: each changelog record reaches its customer,
    in order with its events; alerts and gateway state equal the model's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ent_props.CONFIGS, False, with_shards(ent_props.CONFIGS[False], 1))
        ent_props.check_flow(stream, batch_size, workers)


def test_an_unset_shard_count_takes_the_recovery_directory_s_and_a_given_one_is_kept(tmp_path):
    """A directory records its shard count; a configuration without pipeline.shards resumes it with that count
    (one line says so), one that sets a count keeps it (and prepare_recovery refuses a mismatch)."""
    import io

    from meterflow.runner import adopt_recorded_shards, prepare_recovery

    d = tmp_path / "rec"
    unset = parse_config({}, environ={})
    assert adopt_recorded_shards(unset, str(d)) is unset  # (no directory yet: the default)
    prepare_recovery(str(d), shards=256)
    out = io.StringIO()
    adopted = adopt_recorded_shards(unset, str(d), out)
    assert adopted.pipeline.shards == 256 and unset.pipeline.shards == DEFAULT_SHARDS
    assert out.getvalue() == (f"meter: {d} holds snapshots taken with pipeline.shards = 256; resuming with 256 shards "
                              f"(pipeline.shards is unset; its default is {DEFAULT_SHARDS} for new recovery "
                              "directories)\n")
    given = parse_config({"pipeline": {"shards": DEFAULT_SHARDS}}, environ={})
    assert adopt_recorded_shards(given, str(d), out) is given
    (d / "meterflow-recovery.json").write_text("not json")
    assert adopt_recorded_shards(unset, str(d)) is unset  # (prepare_recovery says what is wrong with it)


def test_the_runner_refuses_a_recovery_directory_of_another_shard_count_before_bytewax_starts(tmp_path):
    from meterflow.base.errors import MeterError
    from meterflow.runner import RECOVERY_MARKER, prepare_recovery

    d = tmp_path / "rec"
    prepare_recovery(str(d), shards=4)
    assert json.loads((d / RECOVERY_MARKER).read_text()) == {"shards": 4}
    prepare_recovery(str(d), shards=4)  # the same count resumes
    with pytest.raises(MeterError, match=r"pipeline.shards = 4.*pipeline.shards = 8"):
        prepare_recovery(str(d), shards=8)
    for bad in ("garbage{", "[4]"):  # a marker that is not the layout: one line naming the file, not a traceback
        (d / RECOVERY_MARKER).write_text(bad)
        with pytest.raises(MeterError, match=rf"{RECOVERY_MARKER} is not the layout meterflow writes.*new recovery"):
            prepare_recovery(str(d), shards=4)
    (d / RECOVERY_MARKER).unlink()  # as a directory written before shards existed
    with pytest.raises(MeterError, match="without pipeline.shards"):
        prepare_recovery(str(d), shards=4)
