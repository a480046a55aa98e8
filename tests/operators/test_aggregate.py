"""Accumulators: exact sums in any order, nearest-rank percentiles, latest, unique, corrections."""

from __future__ import annotations

import math
import pickle
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.operators.aggregate import (
    ADDITIVE,
    NEEDS_NUMBER,
    CountAcc,
    LatestAcc,
    MaxAcc,
    MinAcc,
    PercentileAcc,
    SumAcc,
    UniqueAcc,
    nearest_rank,
    new_acc,
)

FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
TRICKY = st.sampled_from([0.1, 0.2, 0.3, 1e16, -1e16, 1.0, -1.0, 5e-324, -5e-324, 1e-300, 2.0 ** 53, 0.0, -0.0])


def fold(acc, values, sign=1):
    for i, v in enumerate(values):
        acc.add(v, i, sign)
    return acc


def exact_ceil(p: Fraction, n: int) -> int:
    return -((-p.numerator * n) // p.denominator)


# -- percentiles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values, p, expected", [
    (list(range(1, 21)), 0.95, 19),       # ceil(19.0) = 19th
    (list(range(1, 22)), 0.95, 20),       # ceil(19.95) = 20th
    (list(range(1, 11)), 0.95, 10),       # ceil(9.5) = 10th
    (list(range(1, 101)), 0.99, 99),
    (list(range(1, 102)), 0.99, 100),     # ceil(99.99) = 100th
    (list(range(1, 201)), 0.95, 190),
    ([7], 0.99, 7),
    ([5, 1, 4, 2, 3], 0.95, 5),
    ([10] * 19 + [99], 0.95, 10),
    ([10] * 18 + [99, 99], 0.95, 99),
    ([3.5, 1, 2.25, 3.5], 0.95, 3.5),
])
def test_nearest_rank_examples(values, p, expected):
    acc = fold(PercentileAcc(p), random.Random(len(values)).sample(values, len(values)))
    assert acc.value() == float(expected)
    assert type(acc.value()) is float


@pytest.mark.parametrize("p, exact", [(0.95, Fraction(95, 100)), (0.99, Fraction(99, 100))])
def test_nearest_rank_index_is_exact_ceil_for_every_n(p, exact):
    # values 1..n: the percentile equals its rank, so this checks ceil(p*n) with no float drift.
    for n in list(range(1, 3001)) + [10 ** 6, 10 ** 6 + 1, 123_456_789]:
        counts = {i: 1 for i in range(1, n + 1)} if n <= 3000 else None
        if counts is None:
            # one distinct value per rank would be too big: use two values split at the expected rank
            r = exact_ceil(exact, n)
            counts = {1.0: r, 2.0: n - r} if r < n else {1.0: n}
            assert nearest_rank(counts, n, p) == 1.0
            if r > 1:
                assert nearest_rank({1.0: r - 1, 2.0: n - r + 1}, n, p) == 2.0
        else:
            assert nearest_rank(counts, n, p) == float(exact_ceil(exact, n)), n


def test_percentile_of_nothing_is_zero():
    assert PercentileAcc(0.95).value() == 0.0


@settings(max_examples=200, deadline=None, database=None)
@given(values=st.lists(st.one_of(st.integers(-1000, 1000), FINITE), min_size=1, max_size=60),
       p=st.sampled_from([(0.95, Fraction(95, 100)), (0.99, Fraction(99, 100))]), data=st.data())
def test_percentile_matches_sorted_reference(values, p, data):
    order = data.draw(st.permutations(values))
    acc = fold(PercentileAcc(p[0]), order)
    expected = sorted(values)[exact_ceil(p[1], len(values)) - 1]
    assert acc.value() == float(expected)


# -- exact sums -------------------------------------------------------------------------------------

def test_sum_of_tenths_is_correctly_rounded():
    acc = fold(SumAcc(), [0.1] * 10)
    assert acc.value() == 1.0 == math.fsum([0.1] * 10)
    assert sum([0.1] * 10) != 1.0  # the naive running sum would be wrong


@pytest.mark.parametrize("values, expected", [
    ([1e16, 1.0, -1e16], 1.0),
    ([1.0, 1e16, -1e16], 1.0),
    ([1e100, 1.0, -1e100, 1e-100], 1.0),
    ([2 ** 60, 1, 1], float(2 ** 60 + 2)),          # ints add exactly as ints
    ([2 ** 53, 1, 0.5], float(2 ** 53 + 2)),         # 2**53 + 1.5 rounds half-even to 2**53 + 2
    ([5e-324, 5e-324], 1e-323),
    ([3, 0.25, -1], 2.25),
    ([], 0.0),
])
def test_sum_exact_examples(values, expected):
    for perm in (values, list(reversed(values))):
        assert fold(SumAcc(), perm).value() == expected


@settings(max_examples=300, deadline=None, database=None)
@given(values=st.lists(st.one_of(FINITE, TRICKY, st.integers(-10 ** 6, 10 ** 6)), max_size=40),
       signs=st.lists(st.sampled_from([1, 1, 1, -1]), min_size=40, max_size=40), data=st.data())
def test_sum_is_correctly_rounded_and_order_independent(values, signs, data):
    items = list(zip(values, signs))
    exact = sum((Fraction(v) * s for v, s in items), Fraction(0))
    expected = float(exact)
    assert expected == math.fsum(v * s for v, s in items)  # |ints| < 2**53: fsum is the correctly rounded sum
    for _ in range(2):
        order = data.draw(st.permutations(items))
        acc = SumAcc()
        for i, (v, s) in enumerate(order):
            acc.add(v, i, s)
        assert acc.value() == expected
        assert acc.events == len(items)


@pytest.mark.parametrize("values, expected", [([1.7e308, 1.7e308], math.inf), ([-1.7e308, -1.7e308], -math.inf),
                                              ([10 ** 400], math.inf), ([1.7e308, 1.7e308, -1.7e308], 1.7e308)])
def test_sum_beyond_the_double_range_is_infinite_not_an_exception(values, expected):
    assert fold(SumAcc(), values).value() == expected


def test_sum_of_ints_only_stays_exact_beyond_float_precision():
    acc = fold(SumAcc(), [10 ** 20, 1, -10 ** 20])
    assert acc.value() == 1.0


# -- count, max, min, latest, unique ---------------------------------------------------------------

def test_count_and_corrections():
    acc = CountAcc()
    for _ in range(5):
        acc.add(None, 0, 1)
    acc.add(None, 0, -1)
    assert acc.value() == 4.0 and acc.events == 6
    s = SumAcc()
    s.add(10, 0, 1)
    s.add(2.5, 0, 1)
    s.add(10, 0, -1)
    assert s.value() == 2.5 and s.events == 3


def test_additive_and_numeric_sets():
    assert ADDITIVE == {"count", "sum"}
    assert NEEDS_NUMBER == {"sum", "max", "min", "latest", "p95", "p99"}


def test_max_min():
    assert fold(MaxAcc(), [3, -1.5, 7, 7.0, 2]).value() == 7.0
    assert fold(MinAcc(), [3, -1.5, 7, 2]).value() == -1.5
    assert MaxAcc().value() == 0.0 and MinAcc().value() == 0.0
    assert fold(MaxAcc(), [-5, -3]).value() == -3.0


def test_latest_by_event_time_tie_goes_to_later_arrival():
    acc = LatestAcc()
    acc.add(1, 1000, 1)
    acc.add(2, 3000, 1)
    acc.add(3, 2000, 1)    # older event arriving later does not win
    assert acc.value() == 2.0
    acc.add(4, 3000, 1)    # same time, later arrival wins
    assert acc.value() == 4.0
    acc.add(5, 0, 1)
    assert acc.value() == 4.0
    assert LatestAcc().value() == 0.0


def test_latest_at_epoch_zero():
    acc = LatestAcc()
    acc.add(9, 0, 1)
    assert acc.value() == 9.0


def test_latest_before_1970():
    acc = LatestAcc()
    acc.add(9, -1000, 1)
    assert acc.value() == 9.0


def test_unique_distinguishes_json_types():
    acc = fold(UniqueAcc(), ["a", "b", "a", "1", 1, True, 2, 2])
    # "a", "b", "1" (string), 1 (number), true (bool), 2
    assert acc.value() == 6.0
    assert UniqueAcc().value() == 0.0


# -- factory and state -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("count", CountAcc), ("sum", SumAcc), ("max", MaxAcc), ("min", MinAcc),
                                       ("latest", LatestAcc), ("unique_count", UniqueAcc), ("p95", PercentileAcc),
                                       ("p99", PercentileAcc)])
def test_new_acc(name, cls):
    acc = new_acc(name)
    assert isinstance(acc, cls)
    assert acc.events == 0 and acc.value() == 0.0


def test_new_acc_rejects_unknown():
    with pytest.raises(ValueError, match="median"):
        new_acc("median")


@pytest.mark.parametrize("name", ["count", "sum", "max", "min", "latest", "unique_count", "p95", "p99"])
def test_accumulators_pickle_round_trip_and_continue(name):
    values = [3, 0.1, 7, 0.1, 2, 11.5]
    a = new_acc(name)
    b = new_acc(name)
    for i, v in enumerate(values[:3]):
        a.add(v, i, 1)
        b.add(v, i, 1)
    a.expires = 123
    a = pickle.loads(pickle.dumps(a))
    assert a.expires == 123
    for i, v in enumerate(values[3:], 3):
        a.add(v, i, 1)
        b.add(v, i, 1)
    assert a.value() == b.value() and a.events == b.events == len(values)
