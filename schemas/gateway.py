"""Live gateway state in Redis (README: Outputs): the key names and each hash's fields, written once.

The flow writes these hashes (:mod:`meterflow.sinks.redis`, ``meter gateway sync``) and API gateways read
them (:class:`meterflow.gate.QuotaGate`); both go through this module, so the writer and the reader cannot
drift apart:

- ``meter:{tenant}:{customer}:{metric}`` (:func:`gateway_key`): a :class:`GatewayState` as
  :func:`state_fields`, read back by :func:`decode_state_fields`;
- the same hash's ``anomaly`` field (:data:`ANOMALY_FIELD`): the UTC day start (RFC 3339) of the latest day whose
  anomaly alert fired for the customer and metric (README: Anomaly alerts), written by :func:`anomaly_script`
  only if later than the one there (an :class:`AnomalyMarker`), never removed by the state's HSET; a metric
  without an entitlement gets a hash with this field alone (gateways read it as untracked, plus the marker);
- ``meter-wallet:{tenant}:{customer}`` (:func:`wallet_key`): a :class:`WalletState` as :func:`wallet_fields`
  (the gate's Lua scripts read its ``balance``, ``spent`` and ``state``);
- ``meter-wallet-holds:{tenant}:{customer}`` (:func:`holds_key`): the gate's own hash of wallet holds, which
  the flow never writes.

Numbers are text without a fraction when integral, else exact (``repr``); times are RFC 3339 UTC; a
``pct`` of nothing included is the empty string.
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Union

import msgspec

from meterflow.base.timeutil import ms_to_iso, parse_rfc3339_ms


def gateway_key(tenant: str, customer: str, metric: str) -> str:
    """The hash of a customer's standing on one metric.

    >>> gateway_key("acme", "c1", "api_calls")
    'meter:acme:c1:api_calls'
    """
    return f"meter:{tenant}:{customer}:{metric}"


def wallet_key(tenant: str, customer: str) -> str:
    """The hash of a prepaid wallet's balance (fields owned by the flow)."""
    return f"meter-wallet:{tenant}:{customer}"


def holds_key(tenant: str, customer: str) -> str:
    """The gate's own hash of a wallet's holds (the flow never writes it)."""
    return f"meter-wallet-holds:{tenant}:{customer}"


class GatewayState(msgspec.Struct, frozen=True, kw_only=True):
    """A customer's live standing on one metric in its current billing period (Redis, for gateways).

    ``state``: ``ok`` below the first threshold, ``approaching`` from it up to 100 %, ``over`` above
    100 %, ``blocked`` when hard enforcement (or an exhausted wallet with ``on_exhausted = "block"``)
    stops the customer. ``deleted`` means the customer's subscription was cancelled: remove the hash.
    Times are epoch milliseconds.
    """

    tenant_id: str
    customer_id: str
    metric: str
    included: float
    used: float
    remaining: float
    pct: Optional[float]
    state: str
    period_start: int
    period_end: int
    updated_at: int
    plan: str = ""
    blocked_by: str = ""  # "quota" or "wallet" when state is blocked
    deleted: bool = False

    @property
    def redis_key(self) -> str:
        return gateway_key(self.tenant_id, self.customer_id, self.metric)


ANOMALY_FIELD = "anomaly"
# KEYS[1] the gateway hash, ARGV[1] a day start: set the field unless it holds that day or a later one (RFC 3339
# UTC text of one format sorts as time), so a replay or a late day's alert never moves the marker back.
ANOMALY_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], 'anomaly')
if (not cur) or cur < ARGV[1] then redis.call('HSET', KEYS[1], 'anomaly', ARGV[1]) end
return 1
"""


class AnomalyMarker(msgspec.Struct, frozen=True, kw_only=True):
    """The ``anomaly`` field of a gateway hash: an anomaly alert fired for the day starting at ``day_start``
    (epoch ms)."""

    tenant_id: str
    customer_id: str
    metric: str
    day_start: int

    @property
    def redis_key(self) -> str:
        return gateway_key(self.tenant_id, self.customer_id, self.metric)

    @property
    def value(self) -> str:
        return ms_to_iso(self.day_start)


class WalletState(msgspec.Struct, frozen=True, kw_only=True):
    """A prepaid wallet's live balance: ``remaining = balance - spent`` (holds are kept by gateways)."""

    tenant_id: str
    customer_id: str
    balance: float
    spent: float
    remaining: float
    state: str  # ok | low | exhausted
    on_exhausted: str
    updated_at: int

    @property
    def redis_key(self) -> str:
        return wallet_key(self.tenant_id, self.customer_id)


def fmt_num(x: float) -> str:
    """A number as Redis hash text: integers without a fraction, others exactly (``repr``).

    >>> fmt_num(400.0), fmt_num(12.5)
    ('400', '12.5')
    """
    f = float(x)
    return str(int(f)) if f.is_integer() else repr(f)


def state_fields(g: GatewayState) -> Dict[str, str]:
    """The Redis hash fields of a gateway state (README: Outputs, plus ``period_start``, ``plan`` and
    ``blocked_by``)."""
    return {"included": fmt_num(g.included), "used": fmt_num(g.used), "remaining": fmt_num(g.remaining),
            "pct": "" if g.pct is None else fmt_num(g.pct), "state": g.state,
            "period_start": ms_to_iso(g.period_start), "period_end": ms_to_iso(g.period_end),
            "updated_at": ms_to_iso(g.updated_at), "plan": g.plan, "blocked_by": g.blocked_by}


def wallet_fields(w: WalletState) -> Dict[str, str]:
    """The wallet hash fields the flow owns (never the gate's holds); numbers as in :func:`state_fields`.

    >>> wallet_fields(WalletState(tenant_id="t", customer_id="c", balance=100.0, spent=12.5, remaining=87.5,
    ...                           state="ok", on_exhausted="block", updated_at=1793491200000))["spent"]
    '12.5'
    """
    return {"balance": fmt_num(w.balance), "spent": fmt_num(w.spent), "remaining": fmt_num(w.remaining),
            "state": w.state, "on_exhausted": w.on_exhausted, "updated_at": ms_to_iso(w.updated_at)}


class GatewayHash(NamedTuple):
    """A gateway hash as read back: numbers as floats (None when absent or empty), ``period_end`` in epoch
    milliseconds (None when absent)."""

    state: str
    included: Optional[float]
    used: Optional[float]
    remaining: Optional[float]
    pct: Optional[float]
    period_end: Optional[int]
    blocked_by: str
    anomaly: str = ""  # the day start (RFC 3339) of the latest anomaly alert, "" when none


def decode_state_fields(raw: Mapping[Union[bytes, str], Union[bytes, str]]) -> GatewayHash:
    """The inverse of :func:`state_fields`, from what ``HGETALL`` returns (bytes or text). Only ``state`` is
    required, except in a hash holding only the ``anomaly`` marker (a metric without an entitlement: ``state``
    is then ""). Raises ``ValueError`` for a hash that does not parse (no ``state``, a number or time that is
    not one, bytes that are not UTF-8).

    >>> decode_state_fields({b"state": b"over", b"used": b"12.5", b"pct": b"", b"period_end": b"1970-01-01T00:00:01Z"})
    ... # doctest: +NORMALIZE_WHITESPACE
    GatewayHash(state='over', included=None, used=12.5, remaining=None, pct=None, period_end=1000, blocked_by='',
                anomaly='')
    >>> decode_state_fields({"anomaly": "2026-11-08T00:00:00Z"}).anomaly
    '2026-11-08T00:00:00Z'
    """
    h: Dict[str, str] = {_text(k): _text(v) for k, v in raw.items()}
    if "state" not in h:
        if h and set(h) == {ANOMALY_FIELD}:
            return GatewayHash(state="", included=None, used=None, remaining=None, pct=None, period_end=None,
                               blocked_by="", anomaly=h[ANOMALY_FIELD])
        raise ValueError("gateway hash has no state field")
    period_end = h.get("period_end")
    return GatewayHash(state=h["state"], included=_num(h.get("included")), used=_num(h.get("used")),
                       remaining=_num(h.get("remaining")), pct=_num(h.get("pct")),
                       period_end=parse_rfc3339_ms(period_end) if period_end else None,
                       blocked_by=h.get("blocked_by", ""), anomaly=h.get(ANOMALY_FIELD, ""))


def _text(x: Union[bytes, str]) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _num(x: Optional[str]) -> Optional[float]:
    return None if x is None or x == "" else float(x)
