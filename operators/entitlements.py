"""Entitlement evaluation for one customer: thresholds, enforcement, wallets and gateway state.

Pure logic with no I/O, owned by the customer's :class:`meterflow.operators.meter.CustomerMeter` and saved in
the same snapshot, so alert state can never disagree with the totals after a resume.

Semantics (the README's "Entitlements and alerts" section says the same for users):

* A metric is *evaluated* for a customer when its subscription (config file, or the latest record of
  the entitlements changelog) gives it an ``included`` amount. Usage is the metric's billing-period
  value after the event. Threshold ``t`` is crossed when ``usage * 100 >= t * included``.
* Each threshold fires ``threshold_crossed`` exactly once per customer, metric and period, in
  ascending order, on the event that crosses it; thresholds already fired never fire again in that
  period (plan changes and corrections included). p95/p99 metrics are evaluated once per batch, on
  the batch's last event of that metric (their value is not monotonic and costs a sort).
* ``hard``: blocking concerns the metric's *current period*, the latest period any of its accepted
  events fell in (tracked for every metric, evaluated or not, so a late event never moves it back).
  ``blocked`` fires each time the current period's usage reaches ``included`` while it is not blocked;
  when usage falls below it again (a raised quota, a correction) or enforcement stops being hard,
  ``unblocked``. The metric's first accepted event in a later period fires ``unblocked`` for the
  earlier one if it was blocked (gateways already allow calls once ``period_end`` passed, see
  ``meterflow.gate``); that period never blocks again: a late event for it still counts and still
  fires the thresholds it crosses, nothing more. The alert reports the earlier period's usage: its final usage
  (:attr:`Entitlements.final`) when it closed and the meter evicted its rows before that event.
* ``auto_overage``: when usage reaches ``included`` the customer moves to ``next_plan``
  (``plan_changed``, action ``upgrade``, then the new plan is evaluated at once) or, without a next
  plan, overage starts accruing at ``overage_rate`` (``plan_changed``, action ``overage``, once per
  period).
* Wallet: ``spent`` is the sum over rated metrics (in code order) of ``rate x units``, where units are
  summed exactly: 1 per event for count, the value for sum, the change of the period value for other
  aggregations (p95/p99: the batch's change); ``remaining = balance - spent``. ``wallet_low`` when remaining falls to
  ``low_balance_pct`` % of the balance or below, ``wallet_exhausted`` at zero or below (``block``
  blocks every rated metric). Both re-arm when a top-up (a larger ``balance`` on the changelog) lifts
  remaining above their level; lifting a wallet block fires ``unblocked`` (metric ``""``).
* Spend thresholds (``spend_thresholds``, currency amounts of the metric's period ``charge``): the event after
  which ``charge(usage)`` first reaches an amount fires ``spend_crossed``, once per customer, metric, period and
  amount, in ascending order. The hot path compares usage with a unit level (:meth:`Price.units_for` of the
  next unfired amount, a hair low); only at or above it is the exact decimal charge computed. A non-monotone
  price (volume, a falling staircase) can dip below an amount above that level, so there every event at or
  above it is checked exactly until the amount fires.
* Entitlement changes apply at once: every metric's current period is re-evaluated under the new
  entitlement (an upgrade can unblock, a downgrade fires only thresholds not fired yet). A change is
  applied only if its version (changelog offset) is newer than the one in effect, so a replayed or
  out-of-date record never rolls a customer back.

* A closed period's alerts are final: a changelog record re-evaluates the current periods that still accept events
  (the meter sends and evicts the closed ones before the change takes effect). The gateway state of a metric whose
  current period closed is that period's, with its final usage, until the metric's next period starts; so the
  alerts, the last gateway state per metric and this state never depend on where the flushes that evict rows fall.

Memory: per customer, a few entries per open billing period and metric; evicted with the period; and per metric
whose current period closed, its final usage (one number) until the next period starts.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set, Tuple, cast

import msgspec

from meterflow.base.keys import split_key
from meterflow.base.timeutil import ms_to_iso, now_ms
from meterflow.operators.aggregate import SumAcc, acc_from_state
from meterflow.operators.rating import Price, price_of, to_decimal
from meterflow.operators.rules import CALENDAR_MONTH, Rules, SubscriptionRule
from meterflow.schemas import state as S
from meterflow.schemas.alerts import Alert, EntitlementMessage, alert_id
from meterflow.schemas.gateway import GatewayState, WalletState

PeriodKey = Tuple[str, int, int]  # metric, period_start, period_end
_WALLET_PK: PeriodKey = ("", 0, 0)
_INF = float("inf")
_SLACK = 1e-9  # the fast check's level sits a hair low; the exact test is usage * 100 >= t * included
_EXHAUSTED_ACTION = {"block": "block", "alert": "notify", "postpaid": "postpaid"}


class EntitlementUpdate(msgspec.Struct, frozen=True):
    """A changelog record on its way to the customer's state; ``version`` orders records of one key."""

    message: EntitlementMessage
    version: int
    src: Any


class EntInfo:
    """One metric's resolved entitlement, in the shape the hot path wants."""

    __slots__ = ("code", "included", "thresholds", "enforcement", "next_plan", "overage_rate")

    def __init__(self, code: str, included: float, thresholds: Tuple[float, ...], enforcement: str,
                 next_plan: Optional[str], overage_rate: float) -> None:
        self.code = code
        self.included = included
        self.thresholds = thresholds
        self.enforcement = enforcement
        self.next_plan = next_plan
        self.overage_rate = overage_rate


class SpendInfo:
    """One metric's spend thresholds and the price they are measured with."""

    __slots__ = ("code", "price", "amounts", "monotone")

    def __init__(self, code: str, price: Price, amounts: Tuple[float, ...]) -> None:
        self.code = code
        self.price = price
        self.amounts = amounts  # ascending, distinct
        self.monotone = price.monotone


def prices_of(sub: SubscriptionRule, cache: Optional[Dict[int, Tuple[Any, Price]]] = None) -> Dict[str, Price]:
    """The price in effect of every metric the subscription rates: those with an entitlement (``included``) or
    a price card (the contract's rated rows). ``cache`` (``Rules.price_cache``) compiles each entitlement object
    once: customers on the same plan share it."""
    out = {}
    for code, e in sub.entitlements.items():
        if e.included is None and e.price is None:
            continue
        hit = cache.get(id(e)) if cache is not None else None
        if hit is not None and hit[0] is e:
            out[code] = hit[1]
            continue
        out[code] = price = price_of(e)
        if cache is not None:
            if len(cache) > 100_000:  # changelog subscriptions make new objects: keep the cache bounded
                cache.clear()
            cache[id(e)] = (e, price)  # the entry keeps e alive, so its id is not reused
    return out


def spends_of(sub: SubscriptionRule, prices: Dict[str, Price]) -> Dict[str, SpendInfo]:
    out = {}
    for code, e in sub.entitlements.items():
        if e.spend_thresholds:
            out[code] = SpendInfo(code, prices.get(code) or price_of(e), tuple(sorted(set(e.spend_thresholds))))
    return out


def infos_of(sub: SubscriptionRule) -> Dict[str, EntInfo]:
    return {code: EntInfo(code, float(e.included), tuple(sorted(set(e.thresholds))), e.enforcement, e.next_plan,
                          e.overage_rate)
            for code, e in sub.entitlements.items() if e.included is not None}


Derived = Tuple[Dict[str, EntInfo], Dict[str, Price], Dict[str, SpendInfo]]
_NO_CREDIT: Dict[str, float] = {}  # (shared: read-only, as derived_of's)
_NO_RATED: List[Tuple[str, float]] = []


def derived_of(sub: SubscriptionRule, cache: Optional[Dict[Any, Tuple[Any, Derived]]] = None,
               price_cache: Optional[Dict[int, Tuple[Any, Price]]] = None) -> Derived:
    """:func:`infos_of`, :func:`prices_of` and :func:`spends_of` of a subscription. ``cache``
    (``Rules.derived_cache``) builds them once per set of entitlement objects: customers on the same plan share
    them (their rules hold the plan's entitlement objects). Shared, so read-only: nothing mutates these dicts or
    their entries (an :class:`Entitlements` only replaces them)."""
    ents = sub.entitlements
    key = None
    if cache is not None:
        key = tuple([(code, id(e)) for code, e in ents.items()])
        hit = cache.get(key)
        if hit is not None:  # the entry keeps its objects alive, so their ids are not reused
            return hit[1]
    infos = infos_of(sub)
    prices = prices_of(sub, price_cache)
    out = (infos, prices, spends_of(sub, prices))
    if cache is not None:
        if len(cache) > 100_000:  # changelog subscriptions make new objects: keep the cache bounded
            cache.clear()
        cache[key] = (tuple(ents.values()), out)
    return out


def _level_of(info: EntInfo, fired: Any, block_level: bool) -> float:
    """The next unfired threshold of ``info`` as usage (``included`` too if ``block_level``: a hard block or an
    auto_overage crossing still to come), a hair low; infinity when nothing is left."""
    inc = info.included
    lvl = _INF
    for t in info.thresholds:
        if t not in fired:
            lvl = t * inc / 100.0
            break
    if block_level:
        lvl = min(lvl, inc)
    return lvl - abs(lvl) * _SLACK - 1e-12 if lvl != _INF else _INF


class Entitlements:
    """Alert and enforcement state of one customer (see the module docstring for the semantics)."""

    __slots__ = ("rules", "key", "tenant_id", "customer_id",
                 # state (snapshotted)
                 "fired", "blocked", "overage", "seq", "cur", "src", "version", "cancelled", "moved_plan",
                 "units", "wallet_low", "wallet_exhausted", "wallet_blocked", "sfired", "changes", "unrated",
                 "final",
                 # derived (rebuilt after restore)
                 "rule", "infos", "credit", "rated", "next_level", "touched", "deleted", "wallet_dirty",
                 "prices", "spends", "spend_next",
                 # (not state) called with the alert list before an auto_overage move takes effect
                 "before_move")

    def __init__(self, rules: Rules, key: str) -> None:
        self.rules = rules
        self.key = key
        self.tenant_id, self.customer_id = split_key(key)
        self.fired: Dict[PeriodKey, Set[float]] = {}
        self.blocked: Set[PeriodKey] = set()
        self.overage: Set[PeriodKey] = set()
        self.seq: Dict[Tuple[str, PeriodKey], int] = {}
        self.cur: Dict[str, PeriodKey] = {}
        self.src: Optional[EntitlementMessage] = None
        self.version = -1
        self.cancelled: Optional[Tuple[str, int]] = None  # (period kind, anchor) kept after a cancellation
        self.moved_plan: Optional[str] = None
        self.units: Dict[str, SumAcc] = {}
        self.wallet_low = False
        self.wallet_exhausted = False
        self.wallet_blocked = False
        self.sfired: Dict[PeriodKey, Set[float]] = {}
        self.changes = 0
        self.unrated: Set[str] = set()
        # The final usage of each metric's current period once it closed and the meter evicted its rows
        # (closed_period): what the unblocked alert of its successor and the gateway state report for it, whether
        # a flush evicted the rows before or not. Dropped when the metric's current period advances.
        self.final: Dict[str, float] = {}
        self.prices: Dict[str, Price] = {}
        self.touched: Set[PeriodKey] = set()
        self.deleted: Set[str] = set()
        self.wallet_dirty = False
        self.infos: Dict[str, EntInfo] = {}
        self.before_move: Optional[Callable[[List[Alert]], None]] = None
        self._resolve()

    # -- state --------------------------------------------------------------------------
    def to_state(self) -> S.EntitlementState:
        """The snapshotted part of this state as its named record (``meterflow.schemas.state``)."""
        ref = S.PeriodRef
        c = self.cancelled
        return S.EntitlementState(
            fired=[S.FiredRow(metric=pk[0], start=pk[1], end=pk[2], thresholds=sorted(ts))
                   for pk, ts in self.fired.items()],
            blocked=[ref(metric=m, start=a, end=b) for m, a, b in self.blocked],
            overage=[ref(metric=m, start=a, end=b) for m, a, b in self.overage],
            seq=[S.SeqRow(type=t, metric=pk[0], start=pk[1], end=pk[2], n=n) for (t, pk), n in self.seq.items()],
            current=[ref(metric=m, start=a, end=b) for m, a, b in self.cur.values()],
            subscription=self.src, version=self.version,
            cancelled=S.Cancelled(period=c[0], anchor=c[1]) if c is not None else None,
            moved_plan=self.moved_plan, units={code: acc.to_state() for code, acc in self.units.items()},
            wallet_low=self.wallet_low, wallet_exhausted=self.wallet_exhausted, wallet_blocked=self.wallet_blocked,
            touched=[ref(metric=m, start=a, end=b) for m, a, b in self.touched], deleted=sorted(self.deleted),
            wallet_dirty=self.wallet_dirty,
            spend_fired=[S.FiredRow(metric=pk[0], start=pk[1], end=pk[2], thresholds=sorted(ts))
                         for pk, ts in self.sfired.items()],
            changes=self.changes, unrated=sorted(self.unrated), final_usage=dict(self.final))

    def restore_state(self, st: S.EntitlementState) -> None:
        """Take the state of a record :meth:`to_state` made (or a converted older snapshot)."""
        self.fired = {(r.metric, r.start, r.end): set(r.thresholds) for r in st.fired}
        self.blocked = {(r.metric, r.start, r.end) for r in st.blocked}
        self.overage = {(r.metric, r.start, r.end) for r in st.overage}
        self.seq = {(r.type, (r.metric, r.start, r.end)): r.n for r in st.seq}
        self.cur = {r.metric: (r.metric, r.start, r.end) for r in st.current}
        self.src = st.subscription
        self.version = st.version
        self.cancelled = (st.cancelled.period, st.cancelled.anchor) if st.cancelled is not None else None
        self.moved_plan = st.moved_plan
        self.units = {code: cast(SumAcc, acc_from_state(r)) for code, r in st.units.items()}
        self.wallet_low, self.wallet_exhausted = st.wallet_low, st.wallet_exhausted
        self.wallet_blocked = st.wallet_blocked
        self.touched = {(r.metric, r.start, r.end) for r in st.touched}
        self.deleted = set(st.deleted)
        self.wallet_dirty = st.wallet_dirty
        self.sfired = {(r.metric, r.start, r.end): set(r.thresholds) for r in st.spend_fired}
        self.changes = st.changes
        self.unrated = set(st.unrated)
        self.final = dict(st.final_usage)
        self._resolve()

    def closed_period(self, pk: PeriodKey, acc: Any) -> None:
        """The meter evicts the rows of ``pk``, which closed (no event can change it any more): if it is its
        metric's current period, its final usage (``acc``'s value) is kept until the current period advances."""
        if self.cur.get(pk[0]) == pk:
            self.final[pk[0]] = acc.value()

    def evict(self, wm: int, grace_ms: int) -> None:
        """Forget periods that no longer accept late events (their alerts are final)."""
        for d in (self.fired, self.next_level, self.sfired, self.spend_next):
            for pk in [pk for pk in d if pk[2] + grace_ms < wm]:
                del d[pk]
        self.blocked = {pk for pk in self.blocked if pk[2] + grace_ms >= wm or self.cur.get(pk[0]) == pk}
        self.overage = {pk for pk in self.overage if pk[2] + grace_ms >= wm}
        self.seq = {k: n for k, n in self.seq.items()
                    if k[1] == _WALLET_PK or k[1][2] + grace_ms >= wm or k[1] in self.blocked}

    # -- subscription -------------------------------------------------------------------
    def _resolve(self, track: bool = False) -> None:
        """Resolve the subscription in effect; with ``track``, mark the gateway state that changes with it
        (metrics whose entitlement went away are deleted, the others re-emitted)."""
        rules = self.rules
        before = set(self.infos)
        if self.cancelled is not None:
            kind, anchor = self.cancelled
            rule = SubscriptionRule(plan="", period=kind, anchor_ms=anchor, entitlements={})
        elif self.src is not None and self.src.subscription is not None:
            rule = rules.resolve(self.src.subscription, self.moved_plan)
        else:
            base = rules.subscription_configs.get(self.key)
            if base is None:
                rule = CALENDAR_MONTH
            else:
                rule = rules.resolve(base, self.moved_plan) if self.moved_plan else rules.subscriptions[self.key]
        self.rule = rule
        rated_before = set(self.prices)
        # (shared with the customers of the same plan, read-only: derived_of)
        self.infos, self.prices, self.spends = derived_of(rule, rules.derived_cache, rules.price_cache)
        w = rule.wallet
        self.credit: Dict[str, float] = dict(w.credit_rates) if w is not None else _NO_CREDIT
        self.rated: List[Tuple[str, float]] = sorted(self.credit.items()) if w is not None else _NO_RATED
        self.next_level: Dict[PeriodKey, float] = {}
        self.spend_next: Dict[PeriodKey, float] = {}
        if track:
            self.unrated = (self.unrated | rated_before) - set(self.prices)
            after = set(self.infos)
            self.deleted |= {code for code in before - after if code in self.cur}
            self.deleted -= after
            self.touched |= {self.cur[code] for code in after if code in self.cur}
            self.wallet_dirty = True

    @property
    def evaluated(self) -> bool:
        return bool(self.infos) or bool(self.credit) or bool(self.spends)

    def level(self, pk: PeriodKey, info: EntInfo) -> float:
        """The smallest usage at which :meth:`evaluate` has something to do for ``pk`` (cached)."""
        lvl = _level_of(info, self.fired.get(pk, ()),
                        info.enforcement == "hard" and pk not in self.blocked and self.cur.get(info.code) == pk or
                        info.enforcement == "auto_overage" and pk not in self.overage)
        self.next_level[pk] = lvl
        return lvl

    @staticmethod
    def fresh_level(info: EntInfo) -> float:
        """:meth:`level` of a current period of ``info``'s metric in which nothing fired, blocked or crossed into
        overage: a new customer's first period, whatever it is (operators/native.py starts the native fold there)."""
        return _level_of(info, (), info.enforcement in ("hard", "auto_overage"))

    # -- evaluation -----------------------------------------------------------------------
    def advance(self, code: str, pk: PeriodKey, me: Any, usage_of, alerts: List[Alert]) -> None:
        """``pk`` became the current period of ``code`` (an accepted event fell in a period later than the
        current one, or the metric had none): the earlier period is over, unblocked if it was blocked, and
        never blocks again (a late event for it still counts and fires its thresholds)."""
        old = self.cur.get(code)
        self.cur[code] = pk
        self.touched.add(pk)
        if old is None:
            return
        final = self.final.pop(code, None)
        self.next_level.pop(old, None)  # its level no longer includes the block (see level)
        if old in self.blocked:
            self.blocked.discard(old)
            info = self.infos.get(code)
            used = usage_of(old)
            evicted = used is None
            if evicted:  # it closed and the meter evicted its rows: its final usage (0 from a snapshot without it)
                used = 0.0 if final is None else final
            alerts.append(self._alert("unblocked", code, old, None, used, info, "unblock", me,
                                      detail="a new billing period started"))
            if evicted:
                # (evict kept its sequence numbers only because it was blocked while current: it can fire nothing
                # any more, so they go now, as the eviction of its rows would drop them after this alert)
                self.seq = {k: n for k, n in self.seq.items() if k[1] != old}

    def evaluate(self, code: str, pk: PeriodKey, usage: float, me: Any, usage_of, alerts: List[Alert],
                 _depth: int = 0) -> None:
        """Fire what ``usage`` crosses for ``code`` in ``pk`` and apply the enforcement."""
        info = self.infos.get(code)
        self.touched.add(pk)
        if info is None:
            if pk in self.blocked:
                self.blocked.discard(pk)
                alerts.append(self._alert("unblocked", code, pk, None, usage, None, "unblock", me,
                                          detail="the metric has no entitlement any more"))
            return
        inc = info.included
        fired = self.fired.get(pk)
        if fired is None:
            fired = self.fired[pk] = set()
        hundred = usage * 100.0
        for t in info.thresholds:
            if t not in fired and hundred >= t * inc:
                fired.add(t)
                alerts.append(self._alert("threshold_crossed", code, pk, t, usage, info,
                                          _threshold_action(info, t), me))
        over = hundred >= 100.0 * inc
        if pk in self.blocked and (info.enforcement != "hard" or not over):
            self.blocked.discard(pk)
            why = "usage is below the included amount" if info.enforcement == "hard" else \
                f"enforcement is now {info.enforcement}"
            alerts.append(self._alert("unblocked", code, pk, None, usage, info, "unblock", me, detail=why))
        if info.enforcement == "hard" and over and pk not in self.blocked and self.cur.get(code) == pk:
            self.blocked.add(pk)  # only the current period blocks: an earlier one is over
            alerts.append(self._alert("blocked", code, pk, 100.0, usage, info, "block", me))
        elif info.enforcement == "auto_overage" and over and pk not in self.overage:
            if info.next_plan and info.next_plan != self.rule.plan and _depth < 8:
                if self.before_move is not None:  # (the meter sends the rows closed under the plan moved from)
                    self.before_move(alerts)
                previous = self.rule.plan
                self.moved_plan = info.next_plan
                self.changes += 1  # (a subscription change: every re-rated row's version grows, as a changelog's)
                self._resolve(track=True)
                alerts.append(self._alert("plan_changed", code, pk, 100.0, usage, info, "upgrade", me,
                                          previous_plan=previous,
                                          detail=f"moved from plan {previous!r} to {self.rule.plan!r}"))
                self.reevaluate(me, usage_of, alerts, _depth + 1)
                return
            self.overage.add(pk)
            alerts.append(self._alert("plan_changed", code, pk, 100.0, usage, info, "overage", me,
                                      detail=f"overage accrues at {info.overage_rate} per unit"))
        self.level(pk, info)

    def spend_level(self, pk: PeriodKey, sp: SpendInfo, usage: float = 0.0) -> float:
        """The smallest usage at which :meth:`evaluate_spend` may fire something for ``pk`` (cached; a hair low:
        the exact decimal test decides). For a card that is not monotone, the smallest from ``usage`` on: valid
        while usage does not fall (the fold recomputes it when it may have)."""
        fired = self.sfired.get(pk, ())
        lvl = _INF
        for a in sp.amounts:
            if a not in fired:
                u = sp.price.units_for(a, usage)
                if u is not None:
                    lvl = float(u)
                    lvl = lvl - abs(lvl) * _SLACK - 1e-9
                break
        self.spend_next[pk] = lvl
        return lvl

    def evaluate_spend(self, code: str, pk: PeriodKey, usage: float, me: Any, alerts: List[Alert]) -> None:
        """Fire ``spend_crossed`` for every unfired amount ``charge(usage)`` reaches, in ascending order."""
        sp = self.spends.get(code)
        if sp is None:
            return
        fired = self.sfired.get(pk)
        if fired is None:
            fired = self.sfired[pk] = set()
        charge = sp.price.charge(usage)
        info = self.infos.get(code)
        for a in sp.amounts:
            if a not in fired and charge >= to_decimal(a):
                fired.add(a)
                alert = self._alert("spend_crossed", code, pk, a, usage, info, "notify", me,
                                    detail=f"the period charge reached {a} {self.rule.currency}")
                alerts.append(msgspec.structs.replace(alert, threshold_pct=None, threshold_amount=a,
                                                      amount=float(charge)))
        self.spend_level(pk, sp, usage)

    def reevaluate(self, me: Any, usage_of, alerts: List[Alert], _depth: int = 0) -> None:
        """Evaluate every metric's current period under the entitlement now in effect."""
        for code in sorted(self.cur):
            pk = self.cur[code]
            if code in self.infos or pk in self.blocked:
                used = usage_of(pk)
                if used is None:  # the period closed and its rows were evicted: its alerts are final
                    continue
                self.evaluate(code, pk, used, me, usage_of, alerts, _depth)
            if code in self.spends:
                used = usage_of(pk)
                if used is not None:
                    self.evaluate_spend(code, pk, used, me, alerts)
        self._check_wallet(me, None, alerts)

    def spend(self, code: str, units: Any, sign: int, me: Any, pk: PeriodKey, alerts: List[Alert]) -> None:
        """Draw ``units`` of ``code`` from the wallet (exact unit totals; see :attr:`spent`)."""
        acc = self.units.get(code)
        if acc is None:
            acc = self.units[code] = SumAcc()
        acc.add(units, 0, sign)
        self.wallet_dirty = True
        self._check_wallet(me, pk, alerts)

    @property
    def spent(self) -> float:
        """Credits spent: the sum over rated metrics (by code) of ``rate x units``, units summed exactly,
        so 10 calls at 0.1 spend exactly 1.0."""
        units = self.units
        total = 0.0
        for code, rate in self.rated:
            acc = units.get(code)
            if acc is not None and rate:
                total += rate * acc.value()
        return total

    def _check_wallet(self, me: Any, pk: Optional[PeriodKey], alerts: List[Alert]) -> None:
        w = self.rule.wallet
        if w is None:
            if self.wallet_blocked:
                self._lift_wallet_block(me, alerts, "the subscription has no wallet any more")
            return
        remaining = w.balance - self.spent
        low = w.balance * w.low_balance_pct / 100.0
        if remaining <= low and not self.wallet_low:
            self.wallet_low = True
            alerts.append(self._wallet_alert("wallet_low", "notify", me, pk, w.balance, remaining))
        elif remaining > low and self.wallet_low:
            self.wallet_low = False
        if remaining <= 0 and not self.wallet_exhausted:
            self.wallet_exhausted = True
            alerts.append(self._wallet_alert("wallet_exhausted", _EXHAUSTED_ACTION[w.on_exhausted], me, pk,
                                             w.balance, remaining))
            if w.on_exhausted == "block":
                self.wallet_blocked = True
                self._touch_credit()
        elif remaining > 0 and self.wallet_exhausted:
            self.wallet_exhausted = False
            if self.wallet_blocked:
                self._lift_wallet_block(me, alerts, "the wallet was topped up")
        elif self.wallet_blocked and w.on_exhausted != "block":
            self._lift_wallet_block(me, alerts, f"on_exhausted is now {w.on_exhausted}")

    def _lift_wallet_block(self, me: Any, alerts: List[Alert], why: str) -> None:
        self.wallet_blocked = False
        self._touch_credit()
        w = self.rule.wallet
        balance = w.balance if w is not None else 0.0
        alerts.append(self._wallet_alert("unblocked", "unblock", me, None, balance, balance - self.spent, why))

    def _touch_credit(self) -> None:
        self.wallet_dirty = True
        for code in self.credit:
            pk = self.cur.get(code)
            if pk is not None:
                self.touched.add(pk)

    # -- entitlement changes ----------------------------------------------------------------
    def apply_change(self, upd: EntitlementUpdate, usage_of, alerts: List[Alert]) -> bool:
        """Apply a changelog record if it is newer than the one in effect; re-evaluate at once."""
        if upd.version <= self.version:
            return False
        msg = upd.message
        self.version = upd.version
        self.changes += 1
        self.moved_plan = None
        if msg.cancelled or msg.subscription is None:
            self.cancelled = (self.rule.period, self.rule.anchor_ms)
            self.src = None
        else:
            self.cancelled = None
            self.src = msg
        self._resolve(track=True)
        self.reevaluate(None, usage_of, alerts)
        return True

    # -- outputs ----------------------------------------------------------------------------
    def gateway(self, usage_of, at_ms: int) -> Tuple[List[GatewayState], List[WalletState]]:
        """The live state of every metric whose current period changed (then nothing is pending)."""
        states: List[GatewayState] = []
        t, c = self.tenant_id, self.customer_id
        for pk in self.touched:
            code = pk[0]
            info = self.infos.get(code)
            if info is None or self.cur.get(code) != pk:
                continue
            used = usage_of(pk)
            if used is None:  # (a current period that closed: its final usage, whether a flush evicted it or not)
                used = self.final.get(code)
                if used is None:
                    continue
            inc = info.included
            pct = used * 100.0 / inc if inc else None
            blocked_by = "quota" if pk in self.blocked else ("wallet" if self.wallet_blocked and code in self.credit
                                                              else "")
            if blocked_by:
                st = "blocked"
            elif used > inc:
                st = "over"
            elif info.thresholds and used * 100.0 >= info.thresholds[0] * inc:
                st = "approaching"
            else:
                st = "ok"
            states.append(GatewayState(tenant_id=t, customer_id=c, metric=code, included=inc, used=used,
                                       remaining=max(0.0, inc - used), pct=pct, state=st, period_start=pk[1],
                                       period_end=pk[2], updated_at=at_ms, plan=self.rule.plan,
                                       blocked_by=blocked_by))
        for code in self.deleted:
            pk = self.cur.get(code, (code, 0, 0))
            states.append(GatewayState(tenant_id=t, customer_id=c, metric=code, included=0.0, used=0.0,
                                       remaining=0.0, pct=None, state="ok", period_start=pk[1], period_end=pk[2],
                                       updated_at=at_ms, deleted=True))
        self.touched = set()
        self.deleted = set()
        wallets: List[WalletState] = []
        if self.wallet_dirty:
            self.wallet_dirty = False
            w = self.rule.wallet
            if w is not None:
                remaining = w.balance - self.spent
                st = "exhausted" if remaining <= 0 else ("low" if self.wallet_low else "ok")
                wallets.append(WalletState(tenant_id=t, customer_id=c, balance=w.balance, spent=self.spent,
                                           remaining=remaining, state=st, on_exhausted=w.on_exhausted,
                                           updated_at=at_ms))
        return states, wallets

    def republish(self, usage_of, at_ms: int) -> Tuple[List[GatewayState], List[WalletState]]:
        """The live state of EVERY metric's current period and of the wallet, changed or not (and any
        pending removal). Gateway state is derived from this state, so a resumed flow or ``meter gateway
        sync`` rewrites it whole: states that never reached Redis before the last exit are not lost."""
        self.touched.update(self.cur.values())
        if self.rule.wallet is not None:
            self.wallet_dirty = True
        return self.gateway(usage_of, at_ms)

    def _next_seq(self, type_: str, pk: PeriodKey) -> int:
        k = (type_, pk)
        n = self.seq.get(k, 0) + 1
        self.seq[k] = n
        return n

    def _alert(self, type_: str, code: str, pk: PeriodKey, threshold: Optional[float], usage: float,
               info: Optional[EntInfo], action: str, me: Any, previous_plan: str = "", detail: str = "") -> Alert:
        seq = 0 if type_ in ("threshold_crossed", "spend_crossed") else self._next_seq(type_, pk)
        inc = info.included if info is not None else None
        pct = round(usage * 100.0 / inc, 6) if inc else None
        return self._build(type_, alert_id(type_, self.tenant_id, self.customer_id, code, pk[1], threshold, seq),
                           code, pk, threshold, inc, usage, pct, info.enforcement if info is not None else "", action,
                           me, previous_plan=previous_plan, detail=detail)

    def _wallet_alert(self, type_: str, action: str, me: Any, pk: Optional[PeriodKey], balance: float,
                      remaining: float, detail: str = "") -> Alert:
        seq = self._next_seq(type_, _WALLET_PK)
        spent = balance - remaining
        code = pk[0] if pk is not None else ""
        return self._build(type_, alert_id(type_, self.tenant_id, self.customer_id, "", 0, None, seq), code,
                           pk if pk is not None else _WALLET_PK, None, balance, spent,
                           round(spent * 100.0 / balance, 6) if balance else None, "wallet", action, me,
                           wallet_balance=balance, wallet_remaining=remaining, detail=detail)

    def _build(self, type_: str, aid: str, code: str, pk: PeriodKey, threshold: Optional[float],
               included: Optional[float], usage: float, pct: Optional[float], enforcement: str, action: str,
               me: Any, **extra: Any) -> Alert:
        now = now_ms()
        if me is not None:
            eid, ev_time, ingested = me.event.event_id, ms_to_iso(me.ts), ms_to_iso(me.ingested or now)
        else:
            eid, ev_time, ingested = "", ms_to_iso(now), ms_to_iso(now)
        return Alert(alert_id=aid, type=type_, tenant_id=self.tenant_id, customer_id=self.customer_id, metric=code,
                     period_start=ms_to_iso(pk[1]), period_end=ms_to_iso(pk[2]), threshold_pct=threshold,
                     included=included, usage=usage, usage_pct=pct, enforcement=enforcement, action=action,
                     event_id=eid, event_time=ev_time, ingested_at=ingested, detected_at=ms_to_iso(now),
                     plan=self.rule.plan, account_name=self.rule.account_name, **extra)


def _threshold_action(info: EntInfo, t: float) -> str:
    if t < 100 or info.enforcement == "soft":
        return "notify"
    if info.enforcement == "hard":
        return "block"
    return "upgrade" if info.next_plan else "overage"
