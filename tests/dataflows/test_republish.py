"""Gateway state is derived from the meter state: a resumed flow republishes it, and ``meter gateway sync``
writes it from a recovery directory (issue 9, part 6: states unsent when Redis was down at the end of a run
were lost, because a rerun that changes no customer wrote nothing).

Unit tests drive ``_ShardLogic`` directly; the property tests run the whole Bytewax flow twice on one
recovery store — a first run whose gateway output is thrown away (Redis down), then a resume with no new
input — and compare what the resume emits with the first run's final states and the entitlement model.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.errors import MeterError
from meterflow.base.stats import FlowStats
from meterflow.base.timeutil import ms_to_iso
from meterflow.dataflows.metering import _ShardLogic, build_flow
from meterflow.gateway_sync import current_states, latest_snapshots, sync_gateway
from meterflow.operators.mediate import Mediator
from meterflow.operators.rules import Rules
from meterflow.schemas.config import RedisConfig
from meterflow.schemas.gateway import AnomalyMarker, GatewayState, WalletState, state_fields, wallet_fields
from tests.dataflows.test_shards import Clock, event, make_config, merged, new_logic, shard_values, with_shards
from tests.operators import test_entitlement_properties as ent_props
from tests.operators.alert_model import Ev, final_gateway


def _view(states):
    return sorted((g.customer_id, g.metric, g.used, g.included, g.state, g.deleted) for g in states)


# -- the shard logic ---------------------------------------------------------------------------------------

def test_a_resumed_shard_republishes_every_customer_once_without_waiting_for_an_event():
    cfg = make_config()
    clock = Clock()
    logic, med = new_logic(cfg, clock=clock)
    first = merged(logic.on_batch(shard_values(med, [event(i, "c31") for i in range(1, 17)] + [event(17, "free")])))
    assert first.gateway, "the first run emitted gateway state (which Redis never received)"
    snap = logic.snapshot()

    clock2 = Clock(clock.now + 5_000)
    resumed, _ = new_logic(cfg, resume=snap, clock=clock2)
    assert resumed.notify_at() is not None, "a resumed shard asks to be woken at once"
    em = merged(resumed.on_notify())
    assert _view(em.gateway) == _view(first.gateway)  # the latest state of each of the shard's metrics
    assert {g.updated_at for g in em.gateway} == {clock2.now}
    assert not em.alerts and not em.dead_letters
    # Once: nothing more at the next notification (a later tick, which checks the rows' finality) or at EOF.
    nxt = resumed.notify_at()
    assert nxt is None or nxt.timestamp() * 1000 > clock2.now
    assert merged(resumed.on_notify()).gateway == []
    assert merged(resumed.on_eof()).gateway == []


def test_the_first_batch_after_a_resume_carries_every_state_and_then_its_own_later():
    cfg = make_config()
    logic, med = new_logic(cfg)
    logic.on_batch(shard_values(med, [event(i, "c31") for i in range(1, 11)]))
    resumed, med2 = new_logic(cfg, resume=logic.snapshot())
    em = merged(resumed.on_batch(shard_values(med2, [event(11, "c31")])))
    used = [g.used for g in em.gateway if g.customer_id == "c31" and g.metric == "calls"]
    assert used == [10.0, 11.0], "republished first, so the batch's own (newer) state wins in Redis"
    em2 = merged(resumed.on_batch(shard_values(med2, [event(12, "c31")])))
    assert [g.used for g in em2.gateway if g.metric == "calls"] == [12.0]


def test_without_gateway_state_a_resume_republishes_nothing():
    cfg = make_config()
    logic, med = new_logic(cfg)
    logic.on_batch(shard_values(med, [event(1, "c31")]))
    rules = Rules(cfg)
    rules.gateway_states = False  # what build_flow sets without [redis]
    off = _ShardLogic(rules, 1, logic.snapshot(), True, Mediator(cfg, stats=FlowStats()), clock=Clock())
    assert merged(off.on_notify()).gateway == []
    assert merged(off.on_eof()).gateway == []


# -- the whole flow: run, lose the gateway output, resume with no new input ----------------------------------

def _run_twice(stream, batch_size, shards, tmp):
    cfg = with_shards(ent_props.CONFIGS[False], shards)
    events, changes = ent_props.flow_inputs(stream)
    init_db_dir(Path(tmp), 1)
    runs = []
    for _ in range(2):
        out = []
        flow = build_flow(cfg, TestingSource(events, batch_size=batch_size), [("out", TestingSink(out))],
                          entitlements=TestingSource(changes, batch_size=batch_size), gateway_states=True)
        run_main(flow, epoch_interval=timedelta(seconds=60), recovery_config=RecoveryConfig(Path(tmp)))
        runs.append(out)
    return cfg, runs


@settings(max_examples=10, **ent_props.SETTINGS)
@given(stream=ent_props.streams(max_events=30, max_changes=2, p95=False), batch_size=st.integers(1, 8),
       shards=st.sampled_from([1, 2, 4]))
def test_a_resume_with_no_new_input_republishes_the_final_state_of_every_customer(stream, batch_size, shards):
    with tempfile.TemporaryDirectory() as tmp:
        cfg, (first, second) = _run_twice(stream, batch_size, shards, tmp)
        assert not any(em.alerts or em.windows or em.periods for em in second), "the resume re-did work"
        assert final_gateway(second)[0] == final_gateway(first)[0]
        # Wallets too, as the model has them (a cancelled wallet is not republished: WalletState has no
        # deleted flag, so the first run's last state of it may linger in its output).
        ent_props.assert_final_states(second, cfg, [[it] for it in stream])
        # meter gateway sync reads the same states from the store, without running the flow
        synced = [s for items in current_states(cfg, Path(tmp), 0) for s in items]
        assert final_gateway([_as_emission(synced)]) == final_gateway(second)


def _as_emission(states):
    from meterflow.schemas.records import Emission

    return Emission(gateway=[s for s in states if isinstance(s, GatewayState)],
                    wallets=[s for s in states if isinstance(s, WalletState)])


# -- meter gateway sync -----------------------------------------------------------------------------------

def test_latest_snapshots_of_a_store_that_never_ran_and_of_no_store(tmp_path):
    with pytest.raises(MeterError, match="no part-"):
        latest_snapshots(tmp_path)
    init_db_dir(tmp_path, 2)
    assert latest_snapshots(tmp_path) == {}


@pytest.mark.redis
def test_sync_writes_gateway_and_wallet_hashes_from_the_store(redis_server, client, tmp_path):
    t = 1_768_903_200_000  # 2026-01-20T10:00:00Z: inside a period of each customer
    stream = [Ev("acme", "c1", f"a{i}", "api_call", t + i, {"tokens": 30}) for i in range(4)] + \
             [Ev("beta", "c1", f"b{i}", "storage", t + i, {"gb": 20}) for i in range(3)] + \
             [Ev("acme", "c2", "c0", "api_call", t, {"tokens": 1})]
    cfg, (first, _second) = _run_twice(stream, 2, 2, tmp_path)
    gw, wallets = final_gateway(first)
    assert len(gw) >= 4 and len(wallets) == 2
    cfg = msgspec.structs.replace(cfg, redis=RedisConfig(url=redis_server.url, timeout=1.0))
    keys = [f"meter:{t}:{c}:{m}" for t, c, m in gw] + [f"meter-wallet:{t}:{c}" for t, c in wallets]
    client.delete(*keys)
    result = sync_gateway(cfg, tmp_path, at_ms=1_800_000_000_000)
    assert (result.states, result.wallets, result.removed) == (len(gw), len(wallets), 0)
    states = [s for items in current_states(cfg, tmp_path, 1_800_000_000_000) for s in items]
    for s in states:
        want = wallet_fields(s) if isinstance(s, WalletState) else state_fields(s)
        got = {k.decode(): v.decode() for k, v in client.hgetall(s.redis_key).items()}
        assert got == want, s.redis_key
    before = {k: client.hgetall(k) for k in keys}
    sync_gateway(cfg, tmp_path, at_ms=1_800_000_000_000)
    assert {k: client.hgetall(k) for k in keys} == before, "idempotent"


# -- anomaly markers (issue 13): republished with the gateway state, so a Redis restarted empty gets them back ---

def _anomaly_stream():
    from tests.operators.test_anomaly import at
    from tests.operators.test_meter import ev

    per_day = {0: 10, 1: 10, 2: 10, 3: 10, 4: 40, 5: 10, 6: 10, 7: 60}  # spikes on days 4 and 7
    out = []
    for cust in ("cust_456", "c2"):  # with an api_calls entitlement, and without a subscription (marker-only hash)
        for day, n in per_day.items():
            out += [ev(f"{cust}-{day}-{i}", ms_to_iso(at(day, i % 24, i // 24)), cust=cust) for i in range(n)]
    return [(("events.jsonl", i), raw) for i, raw in enumerate(out)]


def _anomaly_run_twice(tmp):
    from tests.operators.test_anomaly import make_config as anomaly_config

    cfg = anomaly_config({"factor": 3.0, "baseline_days": 7, "min_history_days": 3, "metrics": ["api_calls"]})
    init_db_dir(Path(tmp), 1)
    runs = []
    for events in (_anomaly_stream(), []):
        out = []
        flow = build_flow(cfg, TestingSource(events, batch_size=16), [("out", TestingSink(out))], gateway_states=True)
        run_main(flow, epoch_interval=timedelta(seconds=60), recovery_config=RecoveryConfig(Path(tmp)))
        runs.append(out)
    return cfg, runs


def _latest_anomaly_days(emissions):
    latest = {}
    for em in emissions:
        for a in em.alerts:
            if a.type == "anomaly":
                k = (a.tenant_id, a.customer_id, a.metric)
                latest[k] = max(latest.get(k, ""), a.period_start)
    return latest


def test_a_resume_republishes_the_latest_anomaly_marker_of_every_customer_and_metric(tmp_path):
    cfg, (first, second) = _anomaly_run_twice(tmp_path)
    latest = _latest_anomaly_days(first)
    fired = sorted((a.customer_id, a.period_start) for em in first for a in em.alerts if a.type == "anomaly")
    assert fired == [(c, f"2026-11-0{d}T00:00:00Z") for c in ("c2", "cust_456") for d in (5, 8)]
    assert not any(em.markers for em in first), "a run sets markers from its alerts, not as republished markers"
    markers = [m for em in second for m in em.markers]
    assert not any(em.alerts for em in second), "the resume fired nothing again"
    assert {(m.tenant_id, m.customer_id, m.metric): m.value for m in markers} == latest
    assert len(markers) == len(latest) == 2
    # meter gateway sync reads the same markers from the store
    synced = [s for items in current_states(cfg, tmp_path, 0) for s in items if isinstance(s, AnomalyMarker)]
    assert sorted(synced, key=lambda m: m.customer_id) == sorted(markers, key=lambda m: m.customer_id)


@pytest.mark.redis
def test_sync_and_a_resumed_flow_give_an_emptied_redis_its_anomaly_markers(redis_server, client, tmp_path):
    from meterflow.sinks.redis import GatewayStateSink

    cfg, (first, second) = _anomaly_run_twice(tmp_path)
    latest = _latest_anomaly_days(first)
    cfg = msgspec.structs.replace(cfg, redis=RedisConfig(url=redis_server.url, timeout=1.0))
    keys = [f"meter:{t}:{c}:{m}" for t, c, m in latest]
    client.delete(*keys)  # a Redis restarted empty
    result = sync_gateway(cfg, tmp_path, at_ms=1_800_000_000_000)
    assert result.markers == 2
    for (t, c, m), day in latest.items():
        assert client.hget(f"meter:{t}:{c}:{m}", "anomaly").decode() == day
    assert set(client.hgetall("meter:acme:c2:api_calls")) == {b"anomaly"}  # no entitlement: the marker alone
    assert client.hget("meter:acme:cust_456:api_calls", "state") is not None  # beside the synced state
    # The resumed flow's own output through the real Redis sink does the same.
    client.delete(*keys)
    part = GatewayStateSink(cfg.redis).build("redis_gateway", 0, 1)
    part.write_batch(second)
    part.close()
    for (t, c, m), day in latest.items():
        assert client.hget(f"meter:{t}:{c}:{m}", "anomaly").decode() == day
