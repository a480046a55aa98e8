"""Accumulators for the contract's aggregations, shared by windows and billing periods.

Each accumulator folds one event's numeric (or, for unique_count, any) value and
reports its current value. All are picklable and small:

- count / sum / max / min / latest: O(1) memory;
- unique_count: one entry per distinct value;
- p95 / p99: one entry per distinct value with its multiplicity (exact
  nearest-rank: the ceil(p x n)-th smallest value).

Corrections (``sign = -1``) negate count and sum contributions. The other
aggregations are not additive, so a correction leaves them unchanged (the caller
counts it as ``corrections_ignored``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Set, Tuple

ADDITIVE = frozenset({"count", "sum"})
NEEDS_NUMBER = frozenset({"sum", "max", "min", "latest", "p95", "p99"})


class Acc:
    """Base: ``events`` counts folded events (corrections included); it doubles as the row version."""

    __slots__ = ("events", "expires")

    def __init__(self) -> None:
        self.events = 0
        self.expires = 0  # epoch ms of watermark after which nothing can change this row

    def value(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    # Snapshots pickle many accumulators: a flat tuple of slot values is the cheapest state.
    def __getstate__(self):
        return tuple([getattr(self, s) for s in _slots(type(self))])

    def __setstate__(self, state):
        for k, v in zip(_slots(type(self)), state):
            setattr(self, k, v)


_SLOTS: Dict[type, Tuple[str, ...]] = {}


def _slots(cls: type) -> Tuple[str, ...]:
    names = _SLOTS.get(cls)
    if names is None:
        names = _SLOTS[cls] = tuple(s for c in reversed(cls.__mro__) for s in getattr(c, "__slots__", ()))
    return names


class CountAcc(Acc):
    __slots__ = ("total",)

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.total += sign

    def value(self) -> float:
        return float(self.total)


_SCALE_BITS = 1074  # every finite double is an integer multiple of 2**-1074


def _scaled(v: float) -> int:
    num, den = v.as_integer_ratio()
    return num * ((1 << _SCALE_BITS) // den)


class SumAcc(Acc):
    """Exact and order-independent: integers add as Python ints; floats add as exact
    integer multiples of 2**-1074, so the result is the correctly rounded true sum
    whatever order events arrive in."""

    __slots__ = ("total", "fscaled")

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.fscaled = 0

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if type(v) is int:
            self.total += v if sign > 0 else -v
        else:
            s = _scaled(v)
            self.fscaled += s if sign > 0 else -s

    def value(self) -> float:
        try:
            if not self.fscaled:
                return float(self.total)
            return ((self.total << _SCALE_BITS) + self.fscaled) / (1 << _SCALE_BITS)
        except OverflowError:  # beyond the double range: report it as such, never crash the flow
            return math.inf if (self.total << _SCALE_BITS) + self.fscaled > 0 else -math.inf


class MaxAcc(Acc):
    __slots__ = ("best",)

    def __init__(self) -> None:
        super().__init__()
        self.best: Optional[float] = None

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.best is None or v > self.best:
            self.best = v

    def value(self) -> float:
        return float(self.best) if self.best is not None else 0.0


class MinAcc(MaxAcc):
    __slots__ = ()

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.best is None or v < self.best:
            self.best = v


class LatestAcc(Acc):
    """Value of the event with the greatest timestamp; a tie goes to the later arrival."""

    __slots__ = ("ts", "last")

    def __init__(self) -> None:
        super().__init__()
        self.ts: Optional[int] = None
        self.last: Optional[float] = None

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.ts is None or ts >= self.ts:
            self.ts = ts
            self.last = v

    def value(self) -> float:
        return float(self.last) if self.last is not None else 0.0


class UniqueAcc(Acc):
    """Distinct JSON values: the string "1" and the number 1 are different values."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: Set[Any] = set()

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.seen.add(v if type(v) is str else (type(v).__name__, v))

    def value(self) -> float:
        return float(len(self.seen))


class PercentileAcc(Acc):
    """Exact nearest-rank percentile over a multiset of values."""

    __slots__ = ("counts", "n", "p")

    def __init__(self, p: float) -> None:
        super().__init__()
        self.counts: Dict[float, int] = {}
        self.n = 0
        self.p = p

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.n += 1
        self.counts[v] = self.counts.get(v, 0) + 1

    def value(self) -> float:
        return nearest_rank(self.counts, self.n, self.p)


def nearest_rank(counts: Dict[float, int], n: int, p: float) -> float:
    """The ceil(p x n)-th smallest value of a multiset given as value -> multiplicity.

    >>> nearest_rank({1: 1, 2: 1, 3: 1, 4: 1}, 4, 0.95)
    4.0
    >>> nearest_rank({10: 19, 99: 1}, 20, 0.95)
    10.0
    """
    if n == 0:
        return 0.0
    rank = max(1, math.ceil(round(p * n, 9)))
    seen = 0
    for v in sorted(counts):
        seen += counts[v]
        if seen >= rank:
            return float(v)
    return float(max(counts))  # pragma: no cover - rank <= n always


class P95Acc(PercentileAcc):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.95)


class P99Acc(PercentileAcc):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.99)


ACC_TYPES = {"count": CountAcc, "sum": SumAcc, "max": MaxAcc, "min": MinAcc, "latest": LatestAcc,
             "unique_count": UniqueAcc, "p95": P95Acc, "p99": P99Acc}


def new_acc(aggregation: str) -> Acc:
    """A fresh accumulator for a contract aggregation name."""
    try:
        return ACC_TYPES[aggregation]()
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None
