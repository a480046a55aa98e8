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
from meterflow.dataflows.metering import _ShardLogic, build_flow
from meterflow.gateway_sync import current_states, latest_snapshots, sync_gateway
from meterflow.operators.mediate import Mediator
from meterflow.operators.rules import Rules
from meterflow.schemas.config import RedisConfig
from meterflow.schemas.gateway import GatewayState, WalletState, state_fields, wallet_fields
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
