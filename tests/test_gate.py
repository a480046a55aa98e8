"""QuotaGate against the real redis-server: decisions, fail-open/closed, and atomic wallet holds."""

from __future__ import annotations

import doctest
import os
import signal
import threading
import time

import pytest

import meterflow.gate as gate_module
from meterflow.gate import GateUnavailable, QuotaGate, gateway_key, holds_key, wallet_key
from meterflow.schemas.gateway import GatewayState, WalletState, state_fields, wallet_fields

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
PERIOD_END = 1_796_083_200_000  # 2026-12-01T00:00:00Z
IN_PERIOD = T0 + 86_400_000


def make_gate(target, **kw) -> QuotaGate:
    """A gate whose clock stands inside the test period: no decision here may depend on today's date."""
    kw.setdefault("now_getter", lambda: IN_PERIOD)
    return QuotaGate(target, **kw)


@pytest.fixture
def gate(client) -> QuotaGate:
    return make_gate(client)


def put_state(client, tenant: str, customer: str, metric: str, used: float, state: str, *,
              included: float = 1000.0, blocked_by: str = "") -> GatewayState:
    g = GatewayState(tenant_id=tenant, customer_id=customer, metric=metric, included=included, used=used,
                     remaining=max(0.0, included - used), pct=used * 100 / included if included else None,
                     state=state, period_start=T0, period_end=PERIOD_END, updated_at=IN_PERIOD, plan="pro",
                     blocked_by=blocked_by)
    client.hset(g.redis_key, mapping=state_fields(g))
    return g


def put_wallet(client, tenant: str, customer: str, balance: float, spent: float = 0.0) -> None:
    w = WalletState(tenant_id=tenant, customer_id=customer, balance=balance, spent=spent,
                    remaining=balance - spent, state="ok", on_exhausted="block", updated_at=IN_PERIOD)
    client.hset(w.redis_key, mapping=wallet_fields(w))


def test_keys_match_the_schema():
    g = GatewayState(tenant_id="a", customer_id="b", metric="m", included=1, used=0, remaining=1, pct=0,
                     state="ok", period_start=0, period_end=1, updated_at=0)
    w = WalletState(tenant_id="a", customer_id="b", balance=1, spent=0, remaining=1, state="ok",
                    on_exhausted="block", updated_at=0)
    assert gateway_key("a", "b", "m") == g.redis_key and wallet_key("a", "b") == w.redis_key
    assert holds_key("a", "b") == "meter-wallet-holds:a:b"


@pytest.mark.parametrize("state,used,allowed", [("ok", 100, True), ("approaching", 800, True),
                                                ("over", 1200, True), ("blocked", 1000, False)])
def test_decision_follows_state(gate, client, tenant, state, used, allowed):
    put_state(client, tenant, "c1", "calls", used, state)
    d = gate.check(tenant, "c1", "calls")
    assert (d.allowed, d.state, d.known, d.reason) == (allowed, state, True, "state")
    assert d.used == used and d.included == 1000.0 and d.remaining == max(0.0, 1000.0 - used)
    assert d.pct == pytest.approx(used / 10) and d.period_end == PERIOD_END


def test_blocked_quota_rearms_when_its_period_has_ended(client, tenant):
    put_state(client, tenant, "c1", "calls", 1000, "blocked", blocked_by="quota")
    now = {"ms": PERIOD_END - 1}
    gate = make_gate(client, now_getter=lambda: now["ms"])
    assert not gate.check(tenant, "c1", "calls").allowed
    now["ms"] = PERIOD_END
    d = gate.check(tenant, "c1", "calls")
    assert d.allowed and d.known and d.state == "blocked" and d.reason == "period_ended"


def test_wallet_block_survives_the_period_end(client, tenant):
    put_state(client, tenant, "c1", "calls", 10, "blocked", blocked_by="wallet")
    gate = make_gate(client, now_getter=lambda: PERIOD_END + 1)
    d = gate.check(tenant, "c1", "calls")
    assert not d.allowed and d.blocked_by == "wallet"


def test_unknown_key_is_allowed_and_not_known(gate, tenant):
    d = gate.check(tenant, "nobody", "calls")
    assert d.allowed and not d.known and d.reason == "no_entitlement" and d.remaining is None


def test_nothing_included_has_no_pct(gate, client, tenant):
    put_state(client, tenant, "c1", "calls", 5, "over", included=0.0)
    d = gate.check(tenant, "c1", "calls")
    assert d.allowed and d.pct is None and d.included == 0.0


def test_corrupt_hash_follows_fail_policy(client, tenant):
    client.hset(gateway_key(tenant, "c1", "calls"), mapping={"state": "ok", "used": "lots"})
    assert make_gate(client, fail_open=False).check(tenant, "c1", "calls").reason == "bad_state"
    assert not make_gate(client, fail_open=False).check(tenant, "c1", "calls").allowed
    assert make_gate(client, fail_open=True).check(tenant, "c1", "calls").allowed


def test_check_many_is_one_round_trip_in_order(gate, client, tenant, monkeypatch):
    import redis.connection

    put_state(client, tenant, "c1", "calls", 10, "ok")
    put_state(client, tenant, "c2", "calls", 1000, "blocked")
    gate.check(tenant, "c1", "calls")  # connection set-up
    calls = []
    original = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(redis.connection.Connection, "send_packed_command",
                        lambda self, cmd, check_health=True: (calls.append(1), original(self, cmd, check_health))[1])
    ds = gate.check_many([(tenant, "c1", "calls"), (tenant, "c2", "calls"), (tenant, "c3", "calls")])
    assert len(calls) == 1
    assert [(d.allowed, d.known) for d in ds] == [(True, True), (False, True), (True, False)]
    assert gate.check_many([]) == []


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_down_follows_fail_policy_and_never_raises(redis_server, tenant, fail_open):
    gate = make_gate(redis_server.url, fail_open=fail_open, timeout=0.3, cooldown=0.2)
    try:
        put_state(gate.client, tenant, "c1", "calls", 1000, "blocked")
        assert not gate.check(tenant, "c1", "calls").allowed
        redis_server.kill()
        t = time.monotonic()
        d = gate.check(tenant, "c1", "calls")
        many = gate.check_many([(tenant, "c1", "calls"), (tenant, "c2", "calls")])
        assert time.monotonic() - t < 1.0
        assert (d.allowed, d.known, d.reason) == (fail_open, False, "redis_unavailable")
        assert [x.allowed for x in many] == [fail_open, fail_open]
        held = gate.hold(tenant, "c1", 1.0)
        assert not held.ok and held.reason == "redis_unavailable"
        with pytest.raises(GateUnavailable):
            gate.release(tenant, "c1", held.hold_id)
        with pytest.raises(GateUnavailable):
            gate.wallet(tenant, "c1")
    finally:
        redis_server.restart()
    time.sleep(0.25)  # past the cooldown: the gate reads Redis again (empty after the restart)
    d = gate.check(tenant, "c1", "calls")
    assert d.allowed and d.reason == "no_entitlement"


def test_hanging_redis_costs_one_timeout_per_cooldown(redis_server, client, tenant):
    put_state(client, tenant, "c1", "calls", 1, "ok")
    gate = make_gate(redis_server.url, fail_open=False, timeout=0.2, cooldown=30.0)
    assert gate.check(tenant, "c1", "calls").allowed
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        assert not gate.check(tenant, "c1", "calls").allowed
        first = time.monotonic() - t
        t = time.monotonic()
        for _ in range(100):
            assert gate.check(tenant, "c1", "calls").reason == "redis_unavailable"
        rest = time.monotonic() - t
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert first < 2 * 0.2 + 0.5 and rest < 0.05, (first, rest)


# -- holds ---------------------------------------------------------------------------------------------------

def test_concurrent_holds_never_overspend(redis_server, client, tenant):
    put_wallet(client, tenant, "c1", 100.0, 0.0)
    gate = make_gate(redis_server.url)
    barrier = threading.Barrier(20)
    results = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        r = gate.hold(tenant, "c1", 10.0)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(r.ok for r in results) == 10
    assert all(r.reason == "insufficient_funds" and r.available == 0.0 for r in results if not r.ok)
    assert sorted(r.available for r in results if r.ok) == [float(x) for x in range(0, 100, 10)]
    view = gate.wallet(tenant, "c1")
    assert view is not None and (view.held, view.available) == (100.0, 0.0)
    assert client.hlen(holds_key(tenant, "c1")) == 10


def test_hold_accounts_for_spent_and_is_idempotent_per_id(gate, client, tenant):
    put_wallet(client, tenant, "c1", 100.0, 60.0)
    assert not gate.hold(tenant, "c1", 40.5).ok
    r = gate.hold(tenant, "c1", 25.0, hold_id="h1")
    assert r.ok and r.available == 15.0 and r.hold_id == "h1"
    again = gate.hold(tenant, "c1", 25.0, hold_id="h1")  # a retried call replaces itself
    assert again.ok and again.available == 15.0
    assert gate.wallet(tenant, "c1").held == 25.0


def test_expired_holds_are_purged_with_server_time(gate, client, tenant):
    put_wallet(client, tenant, "c1", 100.0)
    first = gate.hold(tenant, "c1", 100.0, ttl=0.2)
    assert first.ok and not gate.hold(tenant, "c1", 1.0).ok
    assert 0 < client.pttl(holds_key(tenant, "c1")) <= 200
    time.sleep(0.3)
    assert gate.wallet(tenant, "c1").held == 0.0
    second = gate.hold(tenant, "c1", 100.0, ttl=60)
    assert second.ok and second.available == 0.0
    assert client.hkeys(holds_key(tenant, "c1")) == [second.hold_id.encode()]


def test_settle_keeps_the_charge_until_settle_ttl(client, tenant):
    put_wallet(client, tenant, "c1", 100.0)
    gate = make_gate(client, settle_ttl=0.3)
    h = gate.hold(tenant, "c1", 50.0)
    assert h.ok and gate.wallet(tenant, "c1").available == 50.0
    assert gate.settle(tenant, "c1", h.hold_id, 20.0) is True
    assert gate.wallet(tenant, "c1").available == 80.0
    put_wallet(client, tenant, "c1", 100.0, spent=20.0)  # the flow catches up: counted twice for a moment
    v = gate.wallet(tenant, "c1")
    assert (v.spent, v.held, v.available) == (20.0, 20.0, 60.0)
    time.sleep(0.4)
    v = gate.wallet(tenant, "c1")
    assert (v.held, v.available) == (0.0, 80.0)
    assert gate.settle(tenant, "c1", h.hold_id, 0.0) is False  # already gone: nothing to release


def test_release(gate, client, tenant):
    put_wallet(client, tenant, "c1", 10.0)
    h = gate.hold(tenant, "c1", 10.0)
    assert h.ok and not gate.hold(tenant, "c1", 0.5).ok
    assert gate.release(tenant, "c1", h.hold_id) is True
    assert gate.release(tenant, "c1", h.hold_id) is False
    assert gate.wallet(tenant, "c1").available == 10.0
    assert not client.exists(holds_key(tenant, "c1"))


def test_hold_on_missing_wallet_and_bad_amounts(gate, tenant):
    r = gate.hold(tenant, "nobody", 1.0)
    assert not r.ok and r.reason == "no_wallet" and r.available is None
    assert gate.wallet(tenant, "nobody") is None
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            gate.hold(tenant, "nobody", bad)
    with pytest.raises(ValueError):
        gate.settle(tenant, "nobody", "h", -1.0)
    with pytest.raises(ValueError):
        gate.hold(tenant, "nobody", 1.0, ttl=0)


def test_scripts_survive_a_restart(redis_server, tenant):
    """The script cache is empty after a restart; registered scripts reload themselves."""
    gate = make_gate(redis_server.url)
    put_wallet(gate.client, tenant, "c1", 5.0)
    assert gate.hold(tenant, "c1", 1.0).ok
    redis_server.restart()
    put_wallet(gate.client, tenant, "c1", 5.0)
    assert gate.hold(tenant, "c1", 5.0).ok


def test_docstring_examples():
    assert doctest.testmod(gate_module, verbose=False).failed == 0
