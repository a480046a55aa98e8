"""How `meter charges` writes money: exact digits, at least two decimals, in the table and as JSON numbers."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from meterflow.reports import charges_json_line, exact_money

# what Decimal(38, 9) holds: up to 29 integer digits and 9 decimals
money = st.decimals(min_value=Decimal(0), max_value=Decimal(10) ** 29 - 1, places=9, allow_nan=False,
                    allow_infinity=False)


@given(money)
def test_exact_money_keeps_the_value_and_shows_at_least_cents(d):
    shown = exact_money(d)
    assert shown == d
    assert -shown.as_tuple().exponent >= 2 or shown != shown.quantize(Decimal("0.01"))
    assert "E" not in format(shown, "f")


@given(money)
def test_a_json_line_carries_the_amount_as_a_number_with_exact_digits(d):
    line = charges_json_line({"customer_id": "c", "charge": Decimal(f"{d:.9f}"), "usage": 340000.0, "final": True})
    doc = json.loads(line, parse_float=Decimal)
    assert doc["charge"] == d and doc["usage"] == 340000 and doc["final"] is True
    assert b'"charge":"' not in line  # a number, not a string


def test_the_worked_examples_print_as_billing_expects():
    assert charges_json_line({"amount": Decimal("102.000000000")}) == b'{"amount":102.00}'
    assert charges_json_line({"amount": Decimal("0.000400000")}) == b'{"amount":0.0004}'
    assert charges_json_line({"amount": Decimal("250.000")}) == b'{"amount":250.00}'
