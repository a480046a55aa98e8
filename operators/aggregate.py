"""Accumulators for the contract's aggregations, shared by windows and billing periods.

Each accumulator folds one event's numeric (or, for unique_count, any) value and
reports its current value. Each converts to and from its named snapshot record
(``to_state()``, :func:`acc_from_state`; ``meterflow.schemas.state``). All are small:

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
from typing import Any, Callable, Dict, Optional, Set

from meterflow.schemas import state as S

ADDITIVE = frozenset({"count", "sum"})
NEEDS_NUMBER = frozenset({"sum", "max", "min", "latest", "p95", "p99"})


class Acc:
    """Base: ``events`` counts folded events (corrections included); it doubles as the row version."""

    __slots__ = ("events", "expires")

    def __init__(self) -> None:
        self.events = 0
        self.expires = 0  # epoch ms of watermark after which nothing can change this row

    def add(self, v: Any, ts: int, sign: int) -> None:  # pragma: no cover - overridden
        """Fold one event's value (``sign`` -1 for a correction) at event time ``ts``."""
        raise NotImplementedError

    def value(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_state(self) -> Any:  # pragma: no cover - overridden
        """This accumulator as its snapshot record (``meterflow.schemas.state``)."""
        raise NotImplementedError


class CountAcc(Acc):
    __slots__ = ("total",)

    def __init__(self) -> None:
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
        self.total = 0

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.total += sign

    def value(self) -> float:
        return float(self.total)

    def to_state(self) -> S.CountState:
        return S.CountState(events=self.events, expires=self.expires, total=self.total)


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
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
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

    def to_state(self) -> S.SumState:
        return S.SumState(events=self.events, expires=self.expires, total=S.int_bytes(self.total),
                          fscaled=S.int_bytes(self.fscaled))


class MaxAcc(Acc):
    __slots__ = ("best",)

    def __init__(self) -> None:
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
        self.best: Optional[float] = None

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.best is None or v > self.best:
            self.best = v

    def value(self) -> float:
        return float(self.best) if self.best is not None else 0.0

    def to_state(self) -> Any:
        return S.MaxState(events=self.events, expires=self.expires, best=self.best)


class MinAcc(MaxAcc):
    __slots__ = ()

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.best is None or v < self.best:
            self.best = v

    def to_state(self) -> S.MinState:
        return S.MinState(events=self.events, expires=self.expires, best=self.best)


class LatestAcc(Acc):
    """Value of the event with the greatest timestamp; a tie goes to the later arrival."""

    __slots__ = ("ts", "last")

    def __init__(self) -> None:
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
        self.ts: Optional[int] = None
        self.last: Optional[float] = None

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        if self.ts is None or ts >= self.ts:
            self.ts = ts
            self.last = v

    def value(self) -> float:
        return float(self.last) if self.last is not None else 0.0

    def to_state(self) -> S.LatestState:
        return S.LatestState(events=self.events, expires=self.expires, ts=self.ts, last=self.last)


class UniqueAcc(Acc):
    """Distinct JSON values: the string "1" and the number 1 are different values."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
        self.seen: Set[Any] = set()

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.seen.add(v if type(v) is str else (type(v).__name__, v))

    def value(self) -> float:
        return float(len(self.seen))

    def to_state(self) -> S.UniqueState:
        return S.UniqueState(events=self.events, expires=self.expires, values=list(self.seen))


class PercentileAcc(Acc):
    """Exact nearest-rank percentile over a multiset of values."""

    __slots__ = ("counts", "n", "p")

    def __init__(self, p: float) -> None:
        self.events = 0  # (Acc.__init__ inline: one call less per new row)
        self.expires = 0
        self.counts: Dict[float, int] = {}
        self.n = 0
        self.p = p

    def add(self, v: Any, ts: int, sign: int) -> None:
        self.events += 1
        self.n += 1
        self.counts[v] = self.counts.get(v, 0) + 1

    def value(self) -> float:
        return nearest_rank(self.counts, self.n, self.p)

    def to_state(self) -> Any:
        counts = self.counts
        return (S.P99State if self.p == 0.99 else S.P95State)(
            events=self.events, expires=self.expires, n=self.n, values=list(counts), counts=list(counts.values()))


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


def _count(r: S.CountState) -> Acc:
    a = CountAcc()
    a.total = r.total
    return a


def _sum(r: S.SumState) -> Acc:
    a = SumAcc()
    a.total = S.bytes_int(r.total)
    a.fscaled = S.bytes_int(r.fscaled)
    return a


def _extreme(cls: type) -> Callable[[Any], Acc]:
    def make(r: Any) -> Acc:
        a = cls()
        a.best = r.best
        return a
    return make


def _latest(r: S.LatestState) -> Acc:
    a = LatestAcc()
    a.ts, a.last = r.ts, r.last
    return a


def _unique(r: S.UniqueState) -> Acc:
    a = UniqueAcc()
    a.seen = set(r.values)
    return a


def _percentile(cls: type) -> Callable[[Any], Acc]:
    def make(r: Any) -> Acc:
        if len(r.values) != len(r.counts):
            raise ValueError(f"{r.__struct_config__.tag} state: {len(r.values)} values but {len(r.counts)} counts")
        a = cls()
        a.n = r.n
        a.counts = dict(zip(r.values, r.counts))
        return a
    return make


_FROM_STATE: Dict[type, Callable[[Any], Acc]] = {
    S.CountState: _count, S.SumState: _sum, S.MaxState: _extreme(MaxAcc), S.MinState: _extreme(MinAcc),
    S.LatestState: _latest, S.UniqueState: _unique, S.P95State: _percentile(P95Acc), S.P99State: _percentile(P99Acc)}


def acc_from_state(record: Any) -> Acc:
    """The accumulator a snapshot record (``to_state()``) describes."""
    acc = _FROM_STATE[type(record)](record)
    acc.events = record.events
    acc.expires = record.expires
    return acc
