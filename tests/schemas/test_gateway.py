"""The Redis hash contract: what the flow writes (state_fields) reads back exactly (decode_state_fields),
in the form HGETALL returns it, and what does not parse is refused rather than guessed."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterflow.base.timeutil import ms_to_iso
from meterflow.schemas import gateway
from meterflow.schemas.gateway import (
    GatewayHash,
    GatewayState,
    WalletState,
    decode_state_fields,
    fmt_num,
    gateway_key,
    holds_key,
    state_fields,
    wallet_fields,
    wallet_key,
)

numbers = st.floats(min_value=0, max_value=1e12, allow_nan=False) | st.integers(0, 10**12).map(float)
times = st.integers(0, 4_102_444_800_000)  # up to 2100


@given(included=numbers, used=numbers, pct=st.none() | numbers, state=st.sampled_from(["ok", "approaching", "over",
       "blocked"]), period_end=times, blocked_by=st.sampled_from(["", "quota", "wallet"]), as_bytes=st.booleans())
def test_state_fields_read_back_exactly(included, used, pct, state, period_end, blocked_by, as_bytes):
    g = GatewayState(tenant_id="acme", customer_id="c1", metric="api_calls", included=included, used=used,
                     remaining=max(0.0, included - used), pct=pct, state=state, period_start=0, period_end=period_end,
                     updated_at=period_end, plan="pro", blocked_by=blocked_by)
    fields = state_fields(g)
    assert set(fields) == {"included", "used", "remaining", "pct", "state", "period_start", "period_end",
                           "updated_at", "plan", "blocked_by"}
    raw = {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields
    assert decode_state_fields(raw) == GatewayHash(state=state, included=included, used=used,
                                                   remaining=g.remaining, pct=pct, period_end=period_end,
                                                   blocked_by=blocked_by)


def test_hash_text_is_the_contracts():
    g = GatewayState(tenant_id="acme", customer_id="c1", metric="api_calls", included=1000.0, used=901.0,
                     remaining=99.0, pct=90.1, state="approaching", period_start=1_793_491_200_000,
                     period_end=1_796_083_200_000, updated_at=1_793_491_200_250)
    assert g.redis_key == gateway_key("acme", "c1", "api_calls") == "meter:acme:c1:api_calls"
    assert state_fields(g) == {"included": "1000", "used": "901", "remaining": "99", "pct": "90.1",
                               "state": "approaching", "period_start": "2026-11-01T00:00:00Z",
                               "period_end": "2026-12-01T00:00:00Z", "updated_at": ms_to_iso(1_793_491_200_250),
                               "plan": "", "blocked_by": ""}
    w = WalletState(tenant_id="acme", customer_id="c1", balance=50.0, spent=0.1 + 0.2, remaining=50 - 0.3,
                    state="ok", on_exhausted="block", updated_at=0)
    assert w.redis_key == wallet_key("acme", "c1") == "meter-wallet:acme:c1"
    assert holds_key("acme", "c1") == "meter-wallet-holds:acme:c1"
    assert wallet_fields(w) == {"balance": "50", "spent": "0.30000000000000004", "remaining": fmt_num(50 - 0.3),
                                "state": "ok", "on_exhausted": "block", "updated_at": "1970-01-01T00:00:00Z"}


@pytest.mark.parametrize("raw", [
    {},  # no state
    {"used": "1"},
    {"state": "ok", "used": "lots"},
    {"state": "ok", "pct": "1,5"},
    {"state": "ok", "period_end": "yesterday"},
    {b"state": b"\xff\xfe"},  # not UTF-8
])
def test_a_hash_that_does_not_parse_is_refused(raw):
    with pytest.raises(ValueError):
        decode_state_fields(raw)


def test_docstring_examples():
    result = doctest.testmod(gateway)
    assert result.attempted >= 4 and result.failed == 0
