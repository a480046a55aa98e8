"""The overage review queue from the rated rows (README: Overage review queue). Pure: no I/O, the clock is passed.

:func:`route_for` routes an overage amount by ``[review] bands`` (exact decimal comparisons);
:class:`ReviewTracker` is one customer's part of the queue: given the rated rows of a flush it returns the review
items to write and the notifications to send. An item exists from the first rated row of its period with
``overage_amount > 0``, follows that row (figures, route, ``final``) and is forgotten once the row is final. A
notification (an :class:`~meterflow.schemas.alerts.Alert` of type ``review_opened`` or ``review_routed``) goes
out when an item opens, and when it moves to a route whose people have not heard of it yet; only when the
configuration has a ``[review]`` section (``ReviewPolicy.notify``).

Memory bound: one small record per open period of the customer that has an item (dropped at finality or when
the period is evicted).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Dict, List, Optional, Sequence, Tuple

from meterflow.base.timeutil import ms_to_iso
from meterflow.operators.rating import to_decimal
from meterflow.schemas import state as S
from meterflow.schemas.alerts import Alert, alert_id
from meterflow.schemas.config import Config, ReviewConfig
from meterflow.schemas.records import RatedRow
from meterflow.schemas.reviews import ReviewItem, review_id

ZERO = Decimal(0)
OPENED, ROUTED = "review_opened", "review_routed"


def route_index(amount: Decimal, bands: Sequence[Decimal]) -> int:
    """The index of the route of ``amount``: the first ``i`` with ``amount < bands[i]``, else ``len(bands)``.

    >>> bands = [Decimal(50), Decimal(500), Decimal(2000)]
    >>> [route_index(Decimal(a), bands) for a in ("49.999999999", "50", "499.99", "500", "2000", "1e9")]
    [0, 1, 1, 2, 3, 3]
    """
    for i, b in enumerate(bands):
        if amount < b:
            return i
    return len(bands)


def route_for(overage_amount: Decimal, bands: Sequence[Decimal], routes: Sequence[str]) -> str:
    """``routes[i]`` for the first ``i`` with ``overage_amount < bands[i]``, else the last route.

    >>> route_for(Decimal("50"), [Decimal(50), Decimal(500)], ["auto_apply", "approve", "sales"])
    'approve'
    """
    return routes[route_index(overage_amount, bands)]


class ReviewPolicy:
    """``[review]`` compiled: bands as exact decimals (from the numbers' shortest repr), the routes, and whether
    notifications go out (only with a ``[review]`` section: configurations without one keep their alerts)."""

    __slots__ = ("bands", "routes", "notify")

    def __init__(self, review: Optional[ReviewConfig]) -> None:
        cfg = review if review is not None else ReviewConfig()
        self.bands: Tuple[Decimal, ...] = tuple(to_decimal(b) for b in cfg.bands)
        self.routes: Tuple[str, ...] = tuple(cfg.routes)
        self.notify = review is not None

    @classmethod
    def of(cls, cfg: Config) -> "ReviewPolicy":
        return cls(cfg.review)


def review_item(row: RatedRow, route: str) -> ReviewItem:
    """The review item of a rated row on ``route``."""
    return ReviewItem(
        review_id=review_id(row.tenant_id, row.customer_id, row.metric, row.period_start),
        tenant_id=row.tenant_id, customer_id=row.customer_id, account_name=row.account_name, arr=row.arr,
        metric=row.metric, period_start=row.period_start, period_end=row.period_end, plan=row.plan,
        included=row.included, usage=row.usage, overage_units=row.overage_units, overage_amount=row.overage_amount,
        currency=row.currency, contract="custom" if row.custom_rate else "standard", route=route, final=row.final,
        version=row.version)


def money(d: Decimal) -> str:
    """An exact amount as text without trailing zeros: ``Decimal('62.500000000')`` -> ``'62.5'``."""
    text = format(d.normalize(), "f")
    return text


def notification(kind: str, item: ReviewItem, index: int, policy: ReviewPolicy, now_ms: int) -> Alert:
    """The notification of ``item`` on its route ``index`` (README: Overage review queue, the record).

    ``action`` is the route; ``amount`` the overage amount, ``threshold_amount`` the band the route starts at (0
    for the first route); ``detail`` starts with ``review <review_id>:`` and says who is asked to do what:
    ``auto_apply`` is a notice for the customer side, the other routes name the account."""
    route = item.route
    amt = f"{money(item.overage_amount)} {item.currency}"
    who = f"{item.account_name or item.customer_id} ({item.tenant_id}/{item.customer_id})"
    what = f"overage of {amt} on {item.metric}"
    if route == "auto_apply":
        text = f"customer notice: an {what} ({_num(item.overage_units)} units above the included " \
               f"{_num(item.included or 0.0)}) is applied to the invoice of the period"
    elif route == "approve":
        text = f"{who}: {what} awaits approval (meter review approve|reject {item.review_id})"
    elif route == "review":
        text = f"{who}: {what} needs a human review before invoicing; CSM notice for {item.account_name or who}"
    else:
        text = f"{who}: {what} needs a sales/CSM conversation with {item.account_name or who} (ARR " \
               f"{_num(item.arr)}) before invoicing"
    inc = item.included
    return Alert(
        alert_id=alert_id(kind, item.tenant_id, item.customer_id, item.metric, item.period_start, None, index),
        type=kind, tenant_id=item.tenant_id, customer_id=item.customer_id, metric=item.metric,
        period_start=ms_to_iso(item.period_start), period_end=ms_to_iso(item.period_end), threshold_pct=None,
        included=inc, usage=item.usage, usage_pct=100.0 * item.usage / inc if inc else None, enforcement="",
        action=route, event_id="", event_time="", ingested_at="", detected_at=ms_to_iso(now_ms), plan=item.plan,
        account_name=item.account_name, detail=f"review {item.review_id}: {text}",
        threshold_amount=float(policy.bands[index - 1]) if index else 0.0, amount=float(item.overage_amount))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


class ReviewTracker:
    """One customer's open review items: ``(metric, period_start, period_end) -> [route index, notified mask]``."""

    __slots__ = ("policy", "open")

    def __init__(self, policy: ReviewPolicy) -> None:
        self.policy = policy
        self.open: Dict[Tuple[str, int, int], List[int]] = {}

    def observe(self, rated: Sequence[RatedRow], now_ms: int) -> Tuple[List[ReviewItem], List[Alert]]:
        """The review items of a flush's rated rows and the notifications they cause (in the rows' order)."""
        items: List[ReviewItem] = []
        notes: List[Alert] = []
        policy, opened = self.policy, self.open
        for row in rated:
            key = (row.metric, row.period_start, row.period_end)
            st = opened.get(key)
            amount = row.overage_amount
            if st is None and not amount > ZERO:
                continue  # within the entitlement: no item
            idx = route_index(amount, policy.bands)
            item = review_item(row, policy.routes[idx])
            items.append(item)
            bit = 1 << idx
            if st is None:
                st = opened[key] = [idx, bit]
                if policy.notify:
                    notes.append(notification(OPENED, item, idx, policy, now_ms))
            else:
                if amount > ZERO and not st[1] & bit:  # a route whose people have not heard of the item
                    st[1] |= bit
                    if policy.notify:
                        notes.append(notification(ROUTED, item, idx, policy, now_ms))
                st[0] = idx
            if row.final:
                del opened[key]
        return items, notes

    def evict(self, limit: int) -> None:
        """Forget the items of periods that ended before ``limit`` (their rows are evicted)."""
        for key in [k for k in self.open if k[2] < limit]:
            del self.open[key]

    def to_state(self) -> List[S.ReviewRow]:
        return [S.ReviewRow(metric=k[0], start=k[1], end=k[2], route=v[0], notified=v[1]) for k, v in self.open.items()]

    def restore(self, rows: Sequence[S.ReviewRow]) -> None:
        self.open = {(r.metric, r.start, r.end): [r.route, r.notified] for r in rows}
