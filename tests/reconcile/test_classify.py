"""Classification of a key's figures in the contract's order (section 8), tolerance edges, and invoice lines
validated one by one (operators/reconcile.py, no ClickHouse)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterflow.operators.reconcile import Figures, InvoiceLine, classify, net_invoices, parse_invoice_line

D = Decimal


def line(kind="usage", q=100, amount="10.00", at=1000, inv="i1", n=2) -> InvoiceLine:
    return InvoiceLine(line=n, invoice_id=inv, tenant_id="t", customer_id="c", metric="m", period_start=0,
                       quantity=D(q), units=float(q), amount=D(amount), invoiced_at=at, kind=kind)


def figs(raw=100.0, metered=100.0, amount="10.00", lines=(), at_cut=None, plan_changed=False) -> Figures:
    inv = net_invoices(list(lines)).get(("t", "c", "m", 0)) if lines else None
    return Figures(raw_units=raw, metered_units=metered, metered_amount=D(amount), invoiced=inv,
                   raw_units_at_cut=at_cut, plan_changed=plan_changed)


def test_every_class():
    assert classify(figs(raw=101.0, lines=[line()]), 0.01) == "metering_gap"
    assert classify(figs(lines=[line()]), 0.01) == "match"
    # invoiced 80 = what was ingested by the cut; 20 units came after it
    assert classify(figs(lines=[line(q=80, amount="8.00")], at_cut=80.0), 0.01) == "timing"
    assert classify(figs(lines=[line(), line("credit", q=10, amount="1.00", inv="cr1", n=3)]), 0.01) == "credit"
    assert classify(figs(lines=[line(amount="12.00")], plan_changed=True), 0.01) == "plan_change"
    assert classify(figs(lines=[line(q=90, amount="9.00")]), 0.01) == "under_bill"
    assert classify(figs(), 0.01) == "under_bill"  # metered usage, no invoice line
    assert classify(figs(lines=[line(q=110, amount="11.00")]), 0.01) == "over_bill"
    assert classify(figs(raw=0.0, metered=0.0, amount="0", lines=[line()]), 0.01) == "over_bill"  # no usage
    assert classify(figs(lines=[line(amount="9.00")]), 0.01) == "under_bill"  # same units, amount short
    assert classify(figs(lines=[line(amount="11.00")]), 0.01) == "over_bill"


def test_order_of_precedence():
    # a metering gap wins over everything, even an invoice that equals the metered figures
    assert classify(figs(raw=99.0, lines=[line()]), 0.01) == "metering_gap"
    # match before timing: the invoice equals metered even though the cut saw the same units
    assert classify(figs(lines=[line()], at_cut=100.0), 0.01) == "match"
    # timing before credit: usage lines equal what was ingested by the cut
    lines = [line(q=80, amount="8.00"), line("credit", q=0, amount="0.50", inv="cr", n=3)]
    assert classify(figs(lines=lines, at_cut=80.0), 0.01) == "timing"
    # credit before plan_change and under_bill
    lines = [line(), line("credit", q=5, amount="0.50", inv="cr", n=3)]
    assert classify(figs(lines=lines, plan_changed=True), 0.01) == "credit"
    # a plan change needs agreeing units: different units are under/over bills
    assert classify(figs(lines=[line(q=90, amount="12.00")], plan_changed=True), 0.01) == "under_bill"
    # without a plan change, agreeing units with a different amount are an under/over bill
    assert classify(figs(lines=[line(amount="12.00")]), 0.01) == "over_bill"


def test_tolerance_edges():
    assert classify(figs(lines=[line(amount="10.01")]), 0.01) == "match"
    assert classify(figs(lines=[line(amount="9.99")]), 0.01) == "match"
    assert classify(figs(lines=[line(amount="10.011")]), 0.01) == "over_bill"
    assert classify(figs(lines=[line(amount="10.00")]), 0.0) == "match"
    assert classify(figs(lines=[line(amount="10.001")]), 0.0) == "over_bill"
    assert classify(figs(raw=100.000001, lines=[line()]), 0.01) == "match"  # within 1e-6 units
    assert classify(figs(raw=100.0000011, lines=[line()]), 0.01) == "metering_gap"
    assert classify(figs(metered=100.0000009, raw=100.0000009, lines=[line()]), 0.01) == "match"


def test_credit_lines_are_netted():
    inv = net_invoices([line(), line("credit", q=10, amount="1.25", inv="cr1", n=3)])[("t", "c", "m", 0)]
    assert (inv.units, inv.amount, inv.usage_units, inv.credit_amount) == (90.0, D("8.75"), 100.0, D("1.25"))
    assert inv.credits == [{"invoice_id": "cr1", "line": 3, "quantity": "10", "amount": "1.25"}]
    assert inv.invoice_ids == ["cr1", "i1"] and inv.cut == 1000


GOOD = {"invoice_id": "i1", "tenant_id": "t", "customer_id": "c", "metric": "api_calls",
        "period_start": "2026-11-01T00:00:00Z", "quantity": "12", "amount": "2.40",
        "invoiced_at": "2026-12-01T00:00:00Z", "kind": "usage"}


@pytest.mark.parametrize("change, why", [
    ({"metric": "bogus"}, "unknown metric 'bogus'"),
    ({"quantity": "x"}, "quantity must be a number, got 'x'"),
    ({"amount": "NaN"}, "amount must be a finite number"),
    ({"quantity": ""}, "quantity is missing"),
    ({"period_start": "2026-11-01T00:00:00"}, "period_start '2026-11-01T00:00:00' is not an RFC 3339 time"),
    ({"invoiced_at": "yesterday"}, "invoiced_at 'yesterday' is not an RFC 3339 time"),
    ({"kind": "refund"}, "kind must be usage or credit, got 'refund'"),
    ({"amount": "-1"}, "must be >= 0"),
    ({"invoice_id": None}, "invoice_id is missing"),
])
def test_bad_invoice_lines_say_which_field(change, why):
    with pytest.raises(ValueError, match=None) as exc:
        parse_invoice_line({**GOOD, **change}, 7, ["api_calls"], {})
    assert why in str(exc.value)


def test_units_conversion_and_json_numbers():
    ln = parse_invoice_line({**GOOD, "quantity": 1.5, "amount": 0.3}, 2, ["api_calls"], {"api_calls": 1000})
    assert (ln.units, ln.quantity, ln.amount, ln.period_start) == (1500.0, D("1.5"), D("0.3"), 1793491200000)
