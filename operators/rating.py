"""Rating: from a metric's period usage to money (README: Rating (prices)). Pure, no I/O.

A :class:`Price` is compiled once from a validated price card (``schemas.config.PriceConfig``, see
``price_problem``) or, without a card, from the entitlement's ``overage_rate`` and ``included``
(model ``overage``). Every number is a :class:`~decimal.Decimal` made from the shortest repr of the
configured or metered number (``Decimal(repr(0.0004)) == Decimal("0.0004")``), and the arithmetic is
exact: products and sums only, packages counted with an exact integer division. So 340,000 × 0.0003 is
exactly 102, where binary floats give 101.99999999999999.

Formulas (``u`` the period usage; a negative ``u``, a correction overshoot, rates as 0):

* ``per_unit``  u × unit_amount
* ``tiered``    Σ_i max(0, min(u, up_to_i) − up_to_{i−1}) × unit_amount_i, up_to_0 = 0, the last tier unbounded
* ``volume``    u × unit_amount of the first tier with u ≤ up_to (the last tier if none)
* ``staircase`` flat_amount of the first tier with u ≤ up_to (the last tier if none)
* ``package``   ceil(u / package_size) × package_amount (floor when ``round_up`` is false)
* ``overage``   max(0, u − included) × overage_rate (no price card)

``overage_amount(u, included) = max(0, charge(u) − charge(min(u, included)))`` (0 without included) and
``amount(u) = max(minimum, charge(u))``.

>>> card = Price.tiered([(5000, 0.02), (20000, 0.015), (None, 0.01)])
>>> card.charge(15000), card.overage_amount(15000, 10000)
(Decimal('250.000'), Decimal('75.000'))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Context, Decimal, DivisionByZero, InvalidOperation, Overflow, localcontext
from math import copysign
from typing import Dict, Optional, Sequence, Tuple, Union

from meterflow.base.errors import MeterError
from meterflow.schemas.config import EntitlementConfig, EntitlementOverride, PriceConfig

Number = Union[int, float, Decimal]
PRICE_MODELS = ("per_unit", "tiered", "volume", "staircase", "package", "overage")
ZERO = Decimal(0)
# Wide enough that no product or sum of configured numbers and period values is ever rounded.
_CTX = Context(prec=80, traps=[InvalidOperation, DivisionByZero, Overflow])


# Price.rate's results by (id(price), usage, included), with the price (floats only; see Price.rate). Bounded: at
# _RATED_MAX entries it starts again (a few MiB at most).
_RATED: Dict[Tuple[int, float, Optional[float]], Tuple["Price", Decimal, Decimal]] = {}
_RATED_MAX = 16_384


class RatingError(MeterError):
    """A usage value that cannot be rated (not a finite number)."""


def to_decimal(x: Number) -> Decimal:
    """The exact decimal of a configured or metered number: an int as is, a float by its shortest repr.

    >>> to_decimal(0.0004), to_decimal(340000), to_decimal(0.1 + 0.2)
    (Decimal('0.0004'), Decimal('340000'), Decimal('0.30000000000000004'))
    """
    if type(x) is float:  # (the usual case: a metered value)
        d = Decimal(repr(x))
    elif isinstance(x, Decimal):
        d = x
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        raise RatingError(f"cannot rate {x!r}: expected a number")
    elif isinstance(x, int):
        d = Decimal(x)
    else:
        d = Decimal(repr(x))
    if not d.is_finite():
        raise RatingError(f"cannot rate {x!r}: not a finite number")
    return d


def _opt(x: Optional[Number]) -> Optional[Decimal]:
    return None if x is None else to_decimal(x)


Tiers = Tuple[Tuple[Optional[Decimal], Decimal], ...]  # (up_to or None for unbounded, unit or flat amount)


@dataclass(frozen=True)
class Price:
    """A compiled price card; build it with :func:`compile_price` / :func:`price_of` or the constructors."""

    model: str
    unit_amount: Decimal = ZERO  # per_unit; overage: the overage_rate
    tiers: Tiers = ()  # tiered, volume: unit_amount per tier; staircase: flat_amount per tier
    package_size: Decimal = Decimal(1)
    package_amount: Decimal = ZERO
    round_up: bool = True
    included: Decimal = ZERO  # overage only: usage up to this is free
    minimum: Decimal = ZERO
    _bounds: Tuple[Decimal, ...] = field(default=(), repr=False, compare=False)
    _monotone: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model not in PRICE_MODELS:
            raise ValueError(f"unknown price model {self.model!r}")
        if self.model in ("tiered", "volume", "staircase") and not self.tiers:
            raise ValueError(f"model {self.model!r} needs at least one tier")
        if self.model == "package" and self.package_size <= 0:
            raise ValueError("package_size must be > 0")
        # Upper bounds per tier, the last one unbounded whatever it says (the contract's up_to = ∞).
        bounds = tuple(Decimal("Infinity") if up is None or i == len(self.tiers) - 1 else up
                       for i, (up, _amt) in enumerate(self.tiers))
        object.__setattr__(self, "_bounds", bounds)
        amounts = [amt for _up, amt in self.tiers]
        object.__setattr__(self, "_monotone", self.model not in ("volume", "staircase") or
                           all(a <= b for a, b in zip(amounts, amounts[1:])))

    # -- constructors from plain numbers (tests, doctests) ---------------------------------------------

    @classmethod
    def per_unit(cls, unit_amount: Number, minimum: Number = 0) -> "Price":
        return cls("per_unit", unit_amount=to_decimal(unit_amount), minimum=to_decimal(minimum))

    @classmethod
    def tiered(cls, tiers: Sequence[Tuple[Optional[Number], Number]], minimum: Number = 0,
               model: str = "tiered") -> "Price":
        """``tiers`` as ``(up_to, amount)`` pairs; ``model`` may also be ``volume`` or ``staircase``."""
        return cls(model, tiers=tuple((_opt(up), to_decimal(a)) for up, a in tiers), minimum=to_decimal(minimum))

    @classmethod
    def package(cls, size: Number, amount: Number, round_up: bool = True, minimum: Number = 0) -> "Price":
        return cls("package", package_size=to_decimal(size), package_amount=to_decimal(amount), round_up=round_up,
                   minimum=to_decimal(minimum))

    @classmethod
    def overage(cls, rate: Number, included: Optional[Number] = None) -> "Price":
        return cls("overage", unit_amount=to_decimal(rate), included=to_decimal(included or 0))

    # -- rating ------------------------------------------------------------------------------------------

    def charge(self, u: Number) -> Decimal:
        """The price of the period usage ``u`` (exact; ``u`` below zero rates as zero)."""
        return self._charge(max(ZERO, to_decimal(u)))

    def _charge(self, u: Decimal) -> Decimal:
        # The operations of _CTX itself (not a `with localcontext` per call, which costs more than the
        # arithmetic of a per-unit card): the same exact results.
        m = self.model
        mul = _CTX.multiply
        if m == "per_unit":
            return mul(u, self.unit_amount)
        if m == "overage":
            return mul(max(ZERO, _CTX.subtract(u, self.included)), self.unit_amount)
        if m == "package":
            packages, rest = _CTX.divmod(u, self.package_size)
            if rest and self.round_up:
                packages = _CTX.add(packages, 1)
            return mul(packages, self.package_amount)
        if m == "tiered":
            total, lower = ZERO, ZERO
            add, sub = _CTX.add, _CTX.subtract
            for bound, (_up, amt) in zip(self._bounds, self.tiers):
                if u <= lower:
                    break
                total = add(total, mul(sub(min(u, bound), lower), amt))
                lower = bound
            return total
        for bound, (_up, amt) in zip(self._bounds, self.tiers):  # volume, staircase
            if u <= bound:
                return mul(u, amt) if m == "volume" else amt
        raise AssertionError("the last tier is unbounded")  # pragma: no cover

    def overage_amount(self, u: Number, included: Optional[Number]) -> Decimal:
        """``max(0, charge(u) − charge(min(u, included)))``; 0 without ``included``."""
        if included is None:
            return ZERO
        d = max(ZERO, to_decimal(u))
        with localcontext(_CTX):
            return max(ZERO, self._charge(d) - self._charge(min(d, to_decimal(included))))

    def rate(self, u: Number, included: Optional[Number]) -> Tuple[Decimal, Decimal]:
        """``(charge(u), overage_amount(u, included))``, the charge computed once (a rated row needs both).

        Pure (a frozen card, exact operations of one context whose traps never change), so the result of a float
        ``u`` and ``included`` is remembered (:data:`_RATED`): every flush re-rates each changed row, and the rows
        of one plan's customers repeat values (counts above all). Floats that are equal have the same shortest
        repr, hence the same decimal, except 0.0 and -0.0: a negative zero is never remembered."""
        if type(u) is float and (included is None or type(included) is float):
            key = (id(self), u, included)
            hit = _RATED.get(key)
            if hit is not None and hit[0] is self:  # (the entry keeps self alive: its id is not reused)
                return hit[1], hit[2]
            charge, overage = self._rate(u, included)
            if (u or copysign(1.0, u) > 0) and (included is None or included or copysign(1.0, included) > 0):
                if len(_RATED) >= _RATED_MAX:
                    _RATED.clear()
                _RATED[key] = (self, charge, overage)
            return charge, overage
        return self._rate(u, included)

    def _rate(self, u: Number, included: Optional[Number]) -> Tuple[Decimal, Decimal]:
        d = Decimal(repr(u)) if type(u) is float else to_decimal(u)  # (to_decimal's float case inline)
        if not d.is_finite():
            to_decimal(u)  # raises its RatingError
        if not d > ZERO:  # max(ZERO, d): ZERO itself for a zero too, as max keeps its first argument
            d = ZERO
        charge = self._charge(d)
        if included is None:
            return charge, ZERO
        inc = to_decimal(included)
        if d <= inc:  # min(d, inc) is d: max(0, charge - charge) is ZERO itself (max keeps its first argument)
            return charge, ZERO
        return charge, max(ZERO, _CTX.subtract(charge, self._charge(inc)))

    def amount(self, u: Number) -> Decimal:
        """What the period costs: ``max(minimum, charge(u))`` (the committed spend is the floor)."""
        return max(self.minimum, self.charge(u))

    # -- spend thresholds ----------------------------------------------------------------------------------

    @property
    def monotone(self) -> bool:
        """Whether ``charge`` never falls as usage grows: every model but a volume card whose unit amount falls
        at a bracket, or a staircase whose flat amount does."""
        return self._monotone

    def units_for(self, amount: Number, above: Optional[Number] = None) -> Optional[Decimal]:
        """The least usage (at or above ``above``, for a card that is not monotone) whose charge reaches
        ``amount``, None if none does: the unit level at which a spend threshold can first fire. Where the least
        usage is an open bound (just above a bracket or package boundary) the boundary itself is returned, so
        the level is never above the true one; callers confirm with :meth:`charge`. ``above`` is ignored for a
        monotone card (its least usage is the answer above any usage below it)."""
        a = to_decimal(amount)
        floor = ZERO if above is None or self.monotone else max(ZERO, to_decimal(above))
        if a <= 0:
            return floor
        with localcontext(_CTX):
            m = self.model
            if m == "per_unit":
                return a / self.unit_amount if self.unit_amount > 0 else None
            if m == "overage":
                return self.included + a / self.unit_amount if self.unit_amount > 0 else None
            if m == "package":
                if self.package_amount <= 0:
                    return None
                n = -(-a // self.package_amount)  # packages needed, rounded up
                return (n - 1) * self.package_size if self.round_up else n * self.package_size
            lower, total = ZERO, ZERO
            for bound, (_up, amt) in zip(self._bounds, self.tiers):
                if m == "tiered":
                    if amt > 0 and (bound.is_infinite() or total + (bound - lower) * amt >= a):
                        return lower + (a - total) / amt
                    if not bound.is_infinite():
                        total += (bound - lower) * amt
                elif m == "volume":
                    if amt > 0:
                        u = max(lower, a / amt, floor)
                        if u <= bound:
                            return u
                elif amt >= a and floor <= bound:  # staircase: any usage of this bracket
                    return max(lower, floor)
                lower = bound
            return None


def compile_price(card: PriceConfig) -> Price:
    """A validated price card (``schemas.config.price_problem`` is None) as a :class:`Price`.

    Keys the model does not use are ignored (a card restored from an older snapshot may carry them).
    """
    minimum = to_decimal(card.minimum)
    if card.model == "per_unit":
        return Price("per_unit", unit_amount=to_decimal(card.unit_amount or 0), minimum=minimum)
    if card.model == "package":
        return Price("package", package_size=to_decimal(card.package_size or 0),
                     package_amount=to_decimal(card.package_amount or 0), round_up=card.round_up, minimum=minimum)
    key = "flat_amount" if card.model == "staircase" else "unit_amount"
    tiers = tuple((_opt(t.up_to), to_decimal(getattr(t, key) or 0)) for t in card.tiers)
    return Price(card.model, tiers=tiers, minimum=minimum)


def price_of(ent: EntitlementConfig) -> Price:
    """The price in effect for a resolved entitlement (plan merged with the custom contract, see
    ``operators.rules.merge_entitlement``): its price card, or without one ``overage_rate`` above ``included``."""
    if ent.price is not None:
        return compile_price(ent.price)
    return Price.overage(ent.overage_rate, ent.included)


def sets_custom_rate(override: Optional[EntitlementOverride]) -> bool:
    """Whether a custom contract changes what the metric costs: it sets price, overage_rate or included."""
    return override is not None and any(v is not None for v in (override.price, override.overage_rate,
                                                                  override.included))

