"""Rating: the DOMAIN's worked examples exactly, and properties against an independent model in fractions."""

from __future__ import annotations

import math
import tomllib
from decimal import Decimal
from fractions import Fraction
from typing import List, Optional, Tuple

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.errors import MeterError
from meterflow.base.stats import FlowStats
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.rating import Price, RatingError, compile_price, price_of, sets_custom_rate, to_decimal
from meterflow.operators.rules import CALENDAR_MONTH, Rules
from meterflow.schemas.config import (
    EntitlementConfig,
    EntitlementOverride,
    PriceConfig,
    Tier,
    parse_config,
)

CARD = [(5000, 0.02), (20000, 0.015), (None, 0.01)]  # DOMAIN: 0-5,000 @ 0.02, 5,001-20,000 @ 0.015, 20,001+ @ 0.01
STAIRS = [(1000, 100), (5000, 200), (None, 300)]


# -- the worked examples ----------------------------------------------------------------------------

def test_per_unit():
    assert Price.per_unit(0.01).charge(50_000) == Decimal("500")


def test_tiered_and_volume_on_the_domain_card():
    assert Price.tiered(CARD).charge(15_000) == Decimal("250.00")  # 5,000 x 0.02 + 10,000 x 0.015
    assert Price.tiered(CARD, model="volume").charge(15_000) == Decimal("225.00")  # all at 0.015
    assert Price.tiered(CARD).charge(30_000) == Decimal("425")  # + 10,000 x 0.01
    assert Price.tiered(CARD, model="volume").charge(30_000) == Decimal("300")
    # up_to is inclusive: 5,000 is still in the first tier
    assert Price.tiered(CARD, model="volume").charge(5000) == Decimal("100")
    assert Price.tiered(CARD, model="volume").charge(5001) == Decimal("75.015")
    assert Price.tiered(CARD).charge(5001) == Decimal("100.015")


def test_staircase_steps():
    stairs = Price.tiered(STAIRS, model="staircase")
    assert [stairs.charge(u) for u in (0, 1, 1000, 1001, 5000, 5001, 10**9)] == [100, 100, 100, 200, 200, 300, 300]


def test_package_round_up_and_down():
    up, down = Price.package(1000, 5), Price.package(1000, 5, round_up=False)
    assert [up.charge(u) for u in (0, 1, 1000, 1001, 2500)] == [0, 5, 5, 10, 15]
    assert [down.charge(u) for u in (0, 999, 1000, 1001, 2500)] == [0, 0, 5, 5, 10]
    # a fractional usage and package size divide exactly: 0.3 / 0.1 is 3 packages, not 3.0000000000000004
    assert Price.package(0.1, 2).charge(0.3) == Decimal("6")


def test_overage_is_exact_decimal():
    price = Price.overage(0.0004, 0)
    assert price.charge(340_000) == Decimal("136") and price.charge(340_000.0) == Decimal("136")
    assert str(price.overage_amount(340_000, 0)) == "136.0000"
    with_included = Price.overage(0.0004, 300_000)
    assert with_included.charge(340_000) == Decimal("16") and with_included.charge(200_000) == 0


def test_overage_amount_on_a_card():
    tiered = Price.tiered(CARD)
    assert tiered.overage_amount(15_000, 10_000) == Decimal("75")  # 250 - 175
    assert tiered.overage_amount(8_000, 10_000) == 0
    assert tiered.overage_amount(15_000, None) == 0  # no included: nothing is overage


def test_committed_minimum():
    tiered = Price.tiered(CARD, minimum=100)
    assert tiered.amount(1_000) == Decimal("100")  # charge 20 < the committed 100
    assert tiered.amount(15_000) == Decimal("250")
    assert Price.per_unit(0.01, minimum=10_000).amount(0) == Decimal("10000")


def test_negative_usage_rates_as_zero_and_non_numbers_are_refused():
    assert Price.per_unit(0.01).charge(-50) == 0 and Price.tiered(STAIRS, model="staircase").charge(-1) == 100
    for bad in (float("nan"), float("inf"), "12", True, None):
        with pytest.raises(RatingError):
            Price.per_unit(1).charge(bad)  # type: ignore[arg-type]
    assert issubclass(RatingError, MeterError)


def test_to_decimal_is_the_shortest_repr():
    assert to_decimal(0.0004) == Decimal("0.0004") and to_decimal(10**20) == Decimal("100000000000000000000")
    assert to_decimal(Decimal("1.5")) == Decimal("1.5")


# -- compiled from the configuration ----------------------------------------------------------------

RATED_CONFIG = '''
[[tenants]]
id = "acme"
[[metrics]]
code = "api_calls"
event_type = "api_call"
[[metrics]]
code = "tokens"
event_type = "api_call"
aggregation = "sum"
property = "tokens"
[[metrics]]
code = "storage"
event_type = "store"
aggregation = "max"
property = "gb"
[[plans]]
code = "pro"
currency = "EUR"
[plans.entitlements.api_calls]
included = 500000
overage_rate = 0.0004
price = { model = "tiered", tiers = [{ up_to = 5000, unit_amount = 0.02 }, { up_to = 20000, unit_amount = 0.015 }, { unit_amount = 0.01 }], minimum = 100.0 }
spend_thresholds = [100.0, 1000.0]
[plans.entitlements.tokens]
included = 0
overage_rate = 0.0004
[[subscriptions]]
tenant_id = "acme"
customer_id = "std"
plan = "pro"
[[subscriptions]]
tenant_id = "acme"
customer_id = "custom"
plan = "pro"
[subscriptions.overrides.api_calls]
price = { model = "per_unit", unit_amount = 0.0003 }
[subscriptions.overrides.tokens]
thresholds = [50]
[subscriptions.overrides.storage]
included = 10
'''  # noqa: E501 - the contract's rating example


def rules() -> Rules:
    return Rules(parse_config(tomllib.loads(RATED_CONFIG), "meter.toml", environ={}))


def test_plan_card_compiles_exactly():
    std = rules().subscription("acme|std")
    price = std.price("api_calls")
    assert price is not None and price.model == "tiered" and price.minimum == Decimal("100")
    assert price.charge(15_000) == Decimal("250") and price.amount(1000) == Decimal("100")
    assert price.overage_amount(600_000, std.included("api_calls")) == Decimal("1000")  # 100,000 x 0.01
    assert std.price("tokens") == Price.overage(0.0004, 0)
    assert std.price("tokens").charge(340_000) == Decimal("136")
    assert std.price("storage") is None and std.currency == "EUR" and not std.custom_rates


def test_override_price_replaces_the_plan_card_and_marks_custom_rate():
    custom = rules().subscription("acme|custom")
    price = custom.price("api_calls")
    assert price == Price.per_unit(0.0003)  # no tiers, no minimum left over from the plan's card
    assert 0.0003 * 340_000 == 101.99999999999999  # what binary floats give
    assert price.charge(340_000) == Decimal("102")
    # price and included mark custom_rate; thresholds alone do not change what the metric costs
    assert custom.custom_rate("api_calls") and custom.custom_rate("storage") and not custom.custom_rate("tokens")
    assert custom.price("storage") == Price.overage(0.0, 10)
    assert not CALENDAR_MONTH.custom_rate("api_calls") and CALENDAR_MONTH.price("api_calls") is None


def test_sets_custom_rate():
    assert not sets_custom_rate(None) and not sets_custom_rate(EntitlementOverride(thresholds=[10.0]))
    assert sets_custom_rate(EntitlementOverride(overage_rate=0.0))  # even a rate of 0 is a custom rate
    assert sets_custom_rate(EntitlementOverride(included=0)) and sets_custom_rate(
        EntitlementOverride(price=PriceConfig(model="per_unit", unit_amount=1.0)))


def test_a_changelog_record_with_a_bad_override_price_is_a_dead_letter():
    cfg = rules().config
    good = {"tenant_id": "acme", "customer_id": "c9", "plan": "pro",
            "overrides": {"api_calls": {"price": {"model": "package", "package_size": 100, "package_amount": 5}}}}
    bad = {**good, "overrides": {"api_calls": {"price": {"model": "package", "package_amount": 5}}}}
    batch = [(("changes.jsonl", i), msgspec.json.encode({"tenant_id": "acme", "customer_id": "c9", "subscription": s}))
             for i, s in enumerate((good, bad))]
    updates, dead = ChangelogMediator(cfg, stats=FlowStats())(batch)
    assert len(updates) == 1 and updates[0][1].message.subscription.overrides["api_calls"].price.package_size == 100
    assert [d.reason for d in dead] == ["invalid_entitlement"]
    assert "key 'subscription.overrides.api_calls.price.package_size': model 'package' needs package_size" in \
        dead[0].detail, dead[0]
    assert Rules(cfg).resolve(updates[0][1].message.subscription).price("api_calls").charge(101) == Decimal("10")


def test_compile_ignores_keys_the_model_does_not_use():
    # an older snapshot's card may carry defaults of another model (unit_amount = 0.0 on a staircase)
    card = PriceConfig(model="staircase", unit_amount=0.0, tiers=[Tier(up_to=10, flat_amount=1.0, unit_amount=0.0),
                                                                  Tier(flat_amount=2.0)])
    assert compile_price(card).charge(11) == Decimal("2")
    assert price_of(EntitlementConfig(included=5, overage_rate=0.5)).charge(7) == Decimal("1")


# -- properties against an independent model --------------------------------------------------------

def F(x) -> Fraction:  # noqa: N802 - the exact rational of a float as Python prints it
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


def model_charge(model: str, u, tiers: List[Tuple[Optional[float], float]] = (), unit=0.0, size=1, pkg=0.0,
                 round_up=True, included=0) -> Fraction:
    """The contract's table, written again over fractions."""
    uf = max(Fraction(0), F(u))
    if model == "per_unit":
        return uf * F(unit)
    if model == "overage":
        return max(Fraction(0), uf - F(included)) * F(unit)
    if model == "package":
        q = uf / F(size)
        return (math.ceil(q) if round_up else math.floor(q)) * F(pkg)
    ups = [math.inf if i == len(tiers) - 1 else F(up) for i, (up, _a) in enumerate(tiers)]
    if model == "tiered":
        total = Fraction(0)
        for i, (_up, a) in enumerate(tiers):
            prev = Fraction(0) if i == 0 else ups[i - 1]
            top = uf if ups[i] == math.inf else min(uf, ups[i])
            total += max(Fraction(0), top - prev) * F(a)
        return total
    k = next(i for i, up in enumerate(ups) if uf <= up)
    return uf * F(tiers[k][1]) if model == "volume" else F(tiers[k][1])


amounts = st.decimals(min_value=0, max_value=100, places=4).map(float)
usage = st.one_of(st.integers(min_value=0, max_value=10**9),
                  st.decimals(min_value=0, max_value=10**7, places=3).map(float))


@st.composite
def cards(draw, descending: bool = False, ascending_flats: bool = False):
    bounds = sorted(draw(st.sets(st.integers(min_value=1, max_value=10**7), min_size=0, max_size=4)))
    vals = draw(st.lists(amounts, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    if descending:
        vals.sort(reverse=True)
    if ascending_flats:
        vals.sort()
    return list(zip([*bounds, None], vals))


@settings(max_examples=300, deadline=None)
@given(model=st.sampled_from(["tiered", "volume", "staircase"]), tiers=cards(), u=usage,
       included=st.none() | usage, minimum=amounts)
def test_tier_models_equal_the_model(model, tiers, u, included, minimum):
    price = Price.tiered(tiers, model=model, minimum=minimum)
    expect = model_charge(model, u, tiers)
    assert Fraction(price.charge(u)) == expect
    assert Fraction(price.amount(u)) == max(F(minimum), expect) >= F(minimum)
    over = price.overage_amount(u, included)
    if included is None:
        assert over == 0
    else:
        assert Fraction(over) == max(Fraction(0), expect - model_charge(model, min(F(u), F(included)), tiers))


@settings(max_examples=200, deadline=None)
@given(unit=amounts, u=usage, size=st.one_of(st.integers(1, 10**4), amounts.filter(lambda x: x > 0)),
       pkg=amounts, round_up=st.booleans(), included=usage)
def test_per_unit_package_and_overage_equal_the_model(unit, u, size, pkg, round_up, included):
    assert Fraction(Price.per_unit(unit).charge(u)) == model_charge("per_unit", u, unit=unit)
    assert Fraction(Price.package(size, pkg, round_up).charge(u)) == model_charge(
        "package", u, size=size, pkg=pkg, round_up=round_up)
    overage = Price.overage(unit, included)
    assert Fraction(overage.charge(u)) == model_charge("overage", u, unit=unit, included=included)
    assert overage.overage_amount(u, included) == overage.charge(u)  # the whole charge is above included


@settings(max_examples=300, deadline=None)
@given(tiers=cards(descending=True), u=usage)
def test_tiered_is_at_least_volume_when_unit_amounts_descend(tiers, u):
    # Precondition: unit amounts do not rise from tier to tier (a volume discount card). Then every slice of the
    # graduated charge costs at least the rate of the tier u falls in, which volume applies to all units.
    assert Price.tiered(tiers).charge(u) >= Price.tiered(tiers, model="volume").charge(u)


def test_tiered_below_volume_is_possible_when_unit_amounts_rise():
    # why the precondition is needed: 0-10 @ 1, 11+ @ 2, 20 units: tiered 10 + 20 = 30, volume 40
    rising = [(10, 1), (None, 2)]
    assert Price.tiered(rising).charge(20) == 30 < Price.tiered(rising, model="volume").charge(20) == 40


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["per_unit", "tiered", "staircase", "package_up", "package_down"]),
       tiers=cards(ascending_flats=True), unit=amounts, size=st.integers(1, 10**4), a=usage, b=usage,
       included=st.none() | usage)
def test_charge_is_monotone_and_overage_at_most_charge(kind, tiers, unit, size, a, b, included):
    price = {"per_unit": Price.per_unit(unit), "tiered": Price.tiered(tiers),
             "staircase": Price.tiered(tiers, model="staircase"), "package_up": Price.package(size, unit),
             "package_down": Price.package(size, unit, round_up=False)}[kind]
    lo, hi = min(a, b), max(a, b)
    assert price.charge(lo) <= price.charge(hi)
    assert 0 <= price.overage_amount(hi, included) <= price.charge(hi)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["per_unit", "tiered", "volume", "staircase", "package", "overage"]), tiers=cards(),
       unit=amounts, size=st.integers(1, 10**4), u=usage | st.floats(-1e6, 0), included=st.none() | usage)
def test_rate_is_charge_and_overage_amount(kind, tiers, unit, size, u, included):
    # rated_row takes both from Price.rate, which computes the charge once: the same Decimals, digit for digit
    price = {"per_unit": Price.per_unit(unit), "tiered": Price.tiered(tiers), "package": Price.package(size, unit),
             "volume": Price.tiered(tiers, model="volume"), "staircase": Price.tiered(tiers, model="staircase"),
             "overage": Price.overage(unit, included)}[kind]
    charge, over = price.rate(u, included)
    want_charge, want_over = price.charge(u), price.overage_amount(u, included)
    assert (str(charge), str(over)) == (str(want_charge), str(want_over))


zeros = st.sampled_from([0.0, -0.0, 0, 5, 5.0, 5000.0, 5000])  # equal values, different decimals


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["per_unit", "tiered", "volume", "staircase", "package", "overage"]), tiers=cards(),
       unit=amounts, size=st.integers(1, 10**4), us=st.lists(usage | st.floats(-1e6, 0) | zeros, min_size=1,
                                                             max_size=8),
       included=st.none() | usage | st.sampled_from([0.0, -0.0, 5000.0]))
def test_a_remembered_rate_is_the_rate_digit_for_digit(kind, tiers, unit, size, us, included):
    # Price.rate remembers the results of float arguments (rating._RATED): every call, computed or remembered, in
    # any order (-0.0 after 0.0, 5 after 5.0), gives the Decimals of charge and overage_amount, digit for digit
    price = {"per_unit": Price.per_unit(unit), "tiered": Price.tiered(tiers), "package": Price.package(size, unit),
             "volume": Price.tiered(tiers, model="volume"), "staircase": Price.tiered(tiers, model="staircase"),
             "overage": Price.overage(unit, included)}[kind]
    for u in us + us[::-1]:
        charge, over = price.rate(u, included)
        assert (str(charge), str(over)) == (str(price.charge(u)), str(price.overage_amount(u, included)))


def test_the_remembered_rates_are_bounded_and_refuse_what_cannot_be_rated(monkeypatch):
    from meterflow.operators import rating
    monkeypatch.setattr(rating, "_RATED", {})
    monkeypatch.setattr(rating, "_RATED_MAX", 3)
    price = Price.per_unit(0.0003)
    for u in (1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0):
        assert price.rate(u, 2.0) == (price.charge(u), price.overage_amount(u, 2.0))
        assert len(rating._RATED) <= 3
    assert rating._RATED[(id(price), 2.0, 2.0)] == (price, Decimal("0.00060"), Decimal("0E-5"))
    for bad in (math.inf, math.nan):
        with pytest.raises(RatingError):
            price.rate(bad, 2.0)
        with pytest.raises(RatingError):  # (not remembered either)
            price.rate(bad, 2.0)
    with pytest.raises(RatingError):
        price.rate(1.0, math.nan)


def test_rated_rows_from_a_template_are_the_rows_built_whole():
    # rated_row keeps the first row of each subscription and metric (Rules.row_templates) and replaces the fields
    # that vary in the next ones: the same records, field for field and byte for byte
    from meterflow.operators.meter import rated_row
    from meterflow.schemas.records import RATED_ENCODER
    r = rules()
    templates = r.row_templates
    cases = [(0.0, 500000.0, False, 1), (7000.0, 500000.0, False, 2), (600000.5, 500000.0, True, 3),
             (12.0, None, False, 4), (-1.0, 0.0, True, 5)]
    seen = set()
    for key in ("acme|std", "acme|custom"):
        sub = r.subscriptions[key]
        t, c = key.split("|")
        for code in ("api_calls", "tokens", "storage"):
            price = sub.price(code)
            if price is None:
                continue
            price = r.price_cache.get(id(sub.entitlements[code]), (None, price))[1]
            for value, included, final, version in cases:
                args = (t, c, code, 100, 200, sub, price, value, included, max(0.0, value - (included or 0.0)),
                        final, version)
                got, want = rated_row(*args, templates), rated_row(*args)
                assert got == want and RATED_ENCODER.encode(got) == RATED_ENCODER.encode(want)
                seen.add((key, code, got.plan, got.custom_rate, got.price_model))
    assert len(templates) == len({(k, code) for k, code, *_ in seen}) >= 5
    assert ("acme|custom", "api_calls", "pro", True, "per_unit") in seen
    assert ("acme|std", "api_calls", "pro", False, "tiered") in seen
    # another price for the same subscription and metric is never rated with the template of the first
    sub = r.subscriptions["acme|std"]
    other = Price.per_unit(1)
    row = rated_row("acme", "std", "api_calls", 100, 200, sub, other, 3.0, 500000.0, 0.0, False, 9, templates)
    assert (row.price_model, row.charge, row.minimum) == ("per_unit", Decimal("3.0"), Decimal(0))


def test_customers_of_one_plan_share_what_their_entitlements_derive():
    from meterflow.operators.entitlements import Entitlements, infos_of, prices_of, spends_of
    r = rules()
    std, custom = Entitlements(r, "acme|std"), Entitlements(r, "acme|custom")
    again = Entitlements(r, "acme|std")
    assert again.infos is std.infos and again.prices is std.prices and again.spends is std.spends
    assert custom.infos is not std.infos
    for ent in (std, custom):
        sub = r.subscriptions[ent.key]
        assert {c: (i.included, i.thresholds, i.enforcement) for c, i in ent.infos.items()} == \
            {c: (i.included, i.thresholds, i.enforcement) for c, i in infos_of(sub).items()}
        assert ent.prices == prices_of(sub)
        assert {c: (s.price, s.amounts) for c, s in ent.spends.items()} == \
            {c: (s.price, s.amounts) for c, s in spends_of(sub, prices_of(sub)).items()}
    assert custom.infos["tokens"].thresholds == (50.0,) and std.infos["tokens"].thresholds == (75.0, 90.0, 100.0)
    assert isinstance(custom.prices["api_calls"], Price) and custom.prices["api_calls"].model == "per_unit"
    # a customer without a subscription evaluates nothing
    assert Entitlements(r, "acme|nobody").evaluated is False


def test_docstring_examples_run():
    import doctest

    from meterflow.operators import rating
    from meterflow.schemas import config
    for module in (rating, config):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
