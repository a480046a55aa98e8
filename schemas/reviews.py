"""The overage review queue's records (README: Overage review queue).

:class:`ReviewItem` is one customer-metric-period whose ``overage_amount`` is above 0, as the flow writes it to
ClickHouse (``review_item_rows``, read through the ``overage_reviews`` view) and to the ``usage.reviews`` topic
(keyed by ``review_id``; keep the highest ``version``). ``version`` is the rated row's, so it grows with every
change of the item. :class:`ReviewDecision` is one approve/reject of ``meter review``, made on the item's
``overage_amount`` at that moment; decisions are data outside the flow (the ``review_decision_rows`` table and
the ``usage.review-decisions`` topic), never flow state.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Optional

import msgspec

from meterflow.schemas.config import REVIEW_ROUTES

ROUTES = REVIEW_ROUTES  # the route names [review] routes may use
DECISIONS = ("approved", "rejected")
STATUSES = ("auto_applied", "pending", "approved", "rejected")


def review_id(tenant_id: str, customer_id: str, metric: str, period_start_ms: int) -> str:
    """Deterministic id of the review item of a customer-metric-period: 32 hex digits of BLAKE2b-128 over
    ``review, tenant, customer, metric, period_start (epoch ms)`` joined with ``\\x1f``.

    >>> review_id("acme", "c1", "api_calls", 1793491200000) == review_id("acme", "c1", "api_calls", 1793491200000)
    True
    """
    text = "\x1f".join(("review", tenant_id, customer_id, metric, str(period_start_ms)))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def decision_id(rid: str, overage_amount: Decimal) -> str:
    """Deterministic id of a decision: one per item and amount (a second decision on the same amount is refused,
    and a replayed one rewrites the same row)."""
    text = "\x1f".join(("decision", rid, format(overage_amount.normalize(), "f")))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class ReviewItem(msgspec.Struct, frozen=True, kw_only=True, tag="review"):
    """One review item: the figures of its rated row (``meterflow.schemas.records.RatedRow``) and its route.

    ``contract`` is ``custom`` when the subscription overrides this metric's price, rate or included (the rated
    row's ``custom_rate``), else ``standard``. ``route`` is ``routes[i]`` for the first ``i`` with
    ``overage_amount < bands[i]``, else the last route. ``final``: the rated row is final (period_end +
    late_grace before the watermark), the figure no longer changes."""

    review_id: str
    tenant_id: str
    customer_id: str
    account_name: str
    arr: float
    metric: str
    period_start: int
    period_end: int
    plan: str
    included: Optional[float]
    usage: float
    overage_units: float
    overage_amount: Decimal
    currency: str
    contract: str  # standard | custom
    route: str
    final: bool
    version: int


class ReviewDecision(msgspec.Struct, frozen=True, kw_only=True):
    """One decision on a review item (``meter review approve|reject``): who, when (epoch ms), the note, and the
    item's ``overage_amount`` it was made on. The item is ``pending`` again once its amount differs from it."""

    decision_id: str
    review_id: str
    status: str  # approved | rejected
    decided_by: str
    decided_at: int
    note: str
    overage_amount: Decimal


REVIEW_ENCODER = msgspec.json.Encoder(decimal_format="number")
REVIEW_DECODER = msgspec.json.Decoder(ReviewItem)
DECISION_DECODER = msgspec.json.Decoder(ReviewDecision)
