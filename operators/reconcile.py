"""Three-way reconciliation (README: Reconciliation), the pure part: invoice lines validated one record at a
time, the invoice lines of a key netted, and the classification of a key's five figures in the contract's
order (the first class that applies). No I/O: :mod:`meterflow.reconcile` reads the files and ClickHouse.

Figures of a key (tenant, customer, metric, period_start), all in metered units and the plan's currency:

- ``raw_units``: recomputed from ``raw_events`` by the reconciler's own SQL;
- ``metered_units`` / ``metered_amount``: ``usage_by_period.value`` / ``usage_rated.amount``;
- ``invoiced_units`` / ``invoiced_amount``: the usage lines minus the credit lines.

A figure a source does not have for the key is 0 (no metered row, no invoice line, no rated row).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import msgspec

from meterflow.base.timeutil import parse_rfc3339_ms

UNIT_TOLERANCE = 1e-6  # metered units this close are equal (the contract's 1e-6 units)

INVOICE_FIELDS = ("invoice_id", "tenant_id", "customer_id", "metric", "period_start", "quantity", "amount",
                  "invoiced_at", "kind")
KINDS = ("usage", "credit")


class InvoiceLine(msgspec.Struct, frozen=True, kw_only=True):
    """One validated invoice line; ``units`` is ``quantity`` converted to metered units (``[reconcile] units``)."""

    line: int
    invoice_id: str
    tenant_id: str
    customer_id: str
    metric: str
    period_start: int  # epoch ms
    quantity: Decimal
    units: float
    amount: Decimal
    invoiced_at: int  # epoch ms
    kind: str


def _text(rec: Mapping[str, Any], field: str) -> str:
    v = rec.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"{field} is missing")
    if not isinstance(v, str):
        raise ValueError(f"{field} must be a string, got {v!r}")
    return v.strip()


def _number(rec: Mapping[str, Any], field: str) -> Decimal:
    v = rec.get(field)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"{field} is missing")
    if type(v) is bool or not isinstance(v, (str, int, float)):
        raise ValueError(f"{field} must be a number, got {v!r}")
    try:
        d = Decimal(v.strip()) if isinstance(v, str) else Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    except InvalidOperation:
        raise ValueError(f"{field} must be a number, got {v!r}") from None
    if not d.is_finite():
        raise ValueError(f"{field} must be a finite number, got {v!r}")
    return d


def _time(rec: Mapping[str, Any], field: str) -> int:
    text = _text(rec, field)
    try:
        return parse_rfc3339_ms(text)
    except ValueError as exc:
        raise ValueError(f"{field} {text!r} is not an RFC 3339 time with a zone: {exc}") from None


def parse_invoice_line(rec: Any, line: int, metrics: Sequence[str], units: Mapping[str, float]) -> InvoiceLine:
    """Validate one invoice record (a CSV row as a dict of strings, or a decoded JSON object).

    Raises ``ValueError`` with a message naming the field and the bad value.

    >>> parse_invoice_line({"invoice_id": "i1", "tenant_id": "t", "customer_id": "c", "metric": "api_calls",
    ...     "period_start": "2026-11-01T00:00:00Z", "quantity": "12", "amount": "2.40",
    ...     "invoiced_at": "2026-12-01T00:00:00Z", "kind": "usage"}, 2, ["api_calls"], {"api_calls": 1000}).units
    12000.0
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with the fields {', '.join(INVOICE_FIELDS)}, got {type(rec).__name__}")
    metric = _text(rec, "metric")
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r} (not in [[metrics]])")
    kind = _text(rec, "kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be usage or credit, got {kind!r}")
    quantity = _number(rec, "quantity")
    amount = _number(rec, "amount")
    if quantity < 0 or amount < 0:
        raise ValueError("quantity and amount must be >= 0 (a credit line is subtracted: give it kind = credit)")
    return InvoiceLine(line=line, invoice_id=_text(rec, "invoice_id"), tenant_id=_text(rec, "tenant_id"),
                       customer_id=_text(rec, "customer_id"), metric=metric,
                       period_start=_time(rec, "period_start"), quantity=quantity,
                       units=float(quantity) * units.get(metric, 1.0), amount=amount,
                       invoiced_at=_time(rec, "invoiced_at"), kind=kind)


Key = Tuple[str, str, str, int]  # (tenant_id, customer_id, metric, period_start ms)


class InvoicedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key's invoice lines netted: usage lines minus credit lines."""

    units: float
    amount: Decimal
    usage_units: float
    usage_amount: Decimal
    credit_units: float
    credit_amount: Decimal
    cut: int  # the latest invoiced_at of the key's lines (epoch ms)
    invoice_ids: List[str]
    credits: List[Dict[str, Any]]  # the credit lines: invoice_id, line, quantity, amount


def net_invoices(lines: Sequence[InvoiceLine]) -> Dict[Key, InvoicedKey]:
    """The invoice lines per key, netted (a credit line's quantity and amount subtracted).

    Units are summed with ``math.fsum`` (exact rounding), amounts as decimals.
    """
    by_key: Dict[Key, List[InvoiceLine]] = {}
    for ln in lines:
        by_key.setdefault((ln.tenant_id, ln.customer_id, ln.metric, ln.period_start), []).append(ln)
    out = {}
    for key, lns in by_key.items():
        usage = [ln for ln in lns if ln.kind == "usage"]
        credit = [ln for ln in lns if ln.kind == "credit"]
        uu, cu = math.fsum(ln.units for ln in usage), math.fsum(ln.units for ln in credit)
        ua, ca = sum((ln.amount for ln in usage), Decimal(0)), sum((ln.amount for ln in credit), Decimal(0))
        out[key] = InvoicedKey(units=uu - cu, amount=ua - ca, usage_units=uu, usage_amount=ua, credit_units=cu,
                               credit_amount=ca, cut=max(ln.invoiced_at for ln in lns),
                               invoice_ids=sorted({ln.invoice_id for ln in lns}),
                               credits=[{"invoice_id": ln.invoice_id, "line": ln.line, "quantity": str(ln.quantity),
                                         "amount": str(ln.amount)} for ln in credit])
    return out


class Figures(msgspec.Struct, frozen=True, kw_only=True):
    """What the classification reads for one key (0 where a source has nothing)."""

    raw_units: float
    metered_units: float
    metered_amount: Decimal
    invoiced: Optional[InvoicedKey] = None
    raw_units_at_cut: Optional[float] = None  # raw units of the events ingested at or before the cut
    plan_changed: bool = False  # a subscription change took effect inside the period

    @property
    def invoiced_units(self) -> float:
        return self.invoiced.units if self.invoiced is not None else 0.0

    @property
    def invoiced_amount(self) -> Decimal:
        return self.invoiced.amount if self.invoiced is not None else Decimal(0)


def units_equal(a: float, b: float) -> bool:
    """Equal within the contract's 1e-6 units.

    >>> units_equal(1.0, 1.0000009), units_equal(1.0, 1.0000011)
    (True, False)
    """
    return abs(a - b) <= UNIT_TOLERANCE + 1e-12 * max(abs(a), abs(b))


def amounts_equal(a: Decimal, b: Decimal, tolerance: Union[Decimal, float]) -> bool:
    """Equal within ``tolerance`` (currency), inclusive.

    >>> amounts_equal(Decimal("10.00"), Decimal("10.01"), 0.01), amounts_equal(Decimal("10"), Decimal("10.011"), 0.01)
    (True, False)
    """
    tol = tolerance if isinstance(tolerance, Decimal) else Decimal(repr(float(tolerance)))
    return abs(a - b) <= tol


def classify(f: Figures, tolerance: Union[Decimal, float]) -> str:
    """The first class of the contract's order (section 8) that applies to a key's figures."""
    if not units_equal(f.raw_units, f.metered_units):
        return "metering_gap"
    inv_u, inv_a = f.invoiced_units, f.invoiced_amount
    same_units = units_equal(inv_u, f.metered_units)
    same_amount = amounts_equal(inv_a, f.metered_amount, tolerance)
    if same_units and same_amount:
        return "match"
    inv = f.invoiced
    if inv is not None and inv.usage_units > 0 and f.raw_units_at_cut is not None \
            and units_equal(inv_u, f.raw_units_at_cut) and not same_units:
        return "timing"
    if inv is not None and inv.credits and units_equal(inv.usage_units, f.metered_units):
        return "credit"
    if same_units and not same_amount and f.plan_changed:
        return "plan_change"
    if not same_units:
        return "under_bill" if inv_u < f.metered_units else "over_bill"
    return "under_bill" if inv_a < f.metered_amount else "over_bill"
