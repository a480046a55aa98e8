"""Alerts and entitlement changes (README: Running it, Outputs).

An :class:`Alert` is the same JSON on the alerts topic, the alert JSONL file, webhooks and the
``alerts_log`` ClickHouse view. Its ``alert_id`` is deterministic (:func:`alert_id`), so a replay
after a crash produces the same ids and every consumer can deduplicate by it. The record's field list
is the Struct's (:data:`ALERT_FIELDS`): the ClickHouse columns and ``meter alerts`` derive from it.

The live gateway state in Redis is :mod:`meterflow.schemas.gateway`.

:class:`EntitlementMessage` is one record of the ``usage.entitlements`` changelog topic (compacted,
keyed ``tenant|customer``): the customer's whole current subscription, or ``cancelled``.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import msgspec

from meterflow.schemas.config import SubscriptionConfig

ALERT_TYPES = ("threshold_crossed", "blocked", "unblocked", "plan_changed", "wallet_low", "wallet_exhausted",
               "anomaly", "spend_crossed")


def fmt_pct(pct: Optional[float]) -> str:
    """The canonical text of a threshold in alert ids: integers without a fraction.

    >>> fmt_pct(90.0), fmt_pct(92.5), fmt_pct(None)
    ('90', '92.5', '')
    """
    if pct is None:
        return ""
    return str(int(pct)) if float(pct).is_integer() else repr(float(pct))


def alert_id(type_: str, tenant_id: str, customer_id: str, metric: str, period_start_ms: int,
             threshold_pct: Optional[float] = None, seq: int = 0) -> str:
    """Deterministic alert id: 32 hex digits of BLAKE2b-128 over the alert's identity.

    The identity is ``type, tenant, customer, metric, period_start (epoch ms), threshold, seq`` joined
    with the unit separator ``\\x1f``. ``threshold_crossed`` uses its threshold and seq 0 (it fires once
    per customer, metric and period); ``blocked``/``unblocked``/``plan_changed`` use the n-th occurrence
    of that type in the customer/metric/period as seq; wallet alerts use metric ``""``, period 0 and the
    n-th occurrence for the customer. Anyone can recompute an id from an alert's fields.

    >>> a = alert_id("threshold_crossed", "acme", "c1", "api_calls", 1793491200000, 90.0)
    >>> len(a), a == alert_id("threshold_crossed", "acme", "c1", "api_calls", 1793491200000, 90)
    (32, True)
    """
    text = "\x1f".join((type_, tenant_id, customer_id, metric, str(period_start_ms), fmt_pct(threshold_pct),
                        str(seq)))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert. Times are RFC 3339 UTC strings: ``event_time`` is the crossing event's time,
    ``ingested_at`` when meterflow read that event, ``detected_at`` when it evaluated it, so
    breach-to-alert latency is ``detected_at - ingested_at`` (or ``- event_time`` end to end).

    ``event_id`` is empty when no event caused the alert (an entitlement change, a period roll-over).
    ``usage_pct`` is None when nothing is included (``included`` 0).
    """

    alert_id: str
    type: str
    tenant_id: str
    customer_id: str
    metric: str
    period_start: str
    period_end: str
    threshold_pct: Optional[float]
    included: Optional[float]
    usage: float
    usage_pct: Optional[float]
    enforcement: str
    action: str
    event_id: str
    event_time: str
    ingested_at: str
    detected_at: str
    plan: str = ""
    previous_plan: str = ""
    account_name: str = ""
    wallet_balance: Optional[float] = None
    wallet_remaining: Optional[float] = None
    detail: str = ""
    threshold_amount: Optional[float] = None  # spend_crossed: the configured amount (README: Rating)
    amount: Optional[float] = None  # spend_crossed: the period charge just after the crossing event
    baseline: Optional[float] = None  # anomaly: the trailing daily average (README: Anomaly alerts)
    factor: Optional[float] = None  # anomaly: the configured multiple of the baseline


ALERT_FIELDS: Tuple[str, ...] = Alert.__struct_fields__  # the record's fields, in its JSON order
ALERT_TIME_FIELDS = ("period_start", "period_end", "event_time", "ingested_at", "detected_at")  # RFC 3339 text

ALERT_ENCODER = msgspec.json.Encoder()
ALERT_DECODER = msgspec.json.Decoder(Alert)


class EntitlementMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One record of the entitlements changelog (key ``tenant|customer``).

    ``subscription`` is the customer's complete subscription as in the config file's
    ``[[subscriptions]]`` (plan, period, anchor, overrides, wallet, ...); ``cancelled = true`` ends it
    (the customer is then metered without entitlements, like a customer with no subscription).
    """

    tenant_id: str
    customer_id: str
    subscription: Optional[SubscriptionConfig] = None
    cancelled: bool = False
    published_at: Optional[str] = None


ENTITLEMENT_DECODER = msgspec.json.Decoder(EntitlementMessage)
ENTITLEMENT_ENCODER = msgspec.json.Encoder()
