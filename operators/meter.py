"""Per-customer metering state: deduplicate, aggregate windows and periods, handle late events.

One :class:`CustomerMeter` per ``tenant|customer`` key holds everything that key
needs, so one recoverable snapshot covers dedupe and aggregates together (a
replay can never see an id as "seen" without its effect, or the reverse).

Memory bound, stated: per customer,
- ``seen``: one 64-bit fingerprint and its expiry per event id (``meterflow.operators.dedupe.IdTable``, about
  36 bytes per id instead of ~124 for a dict of strings) until its billing period stops accepting late
  events (period end + ``late_grace`` < watermark) and at least ``dedupe_window``
  of watermark progress after it was seen. Keeping ids for the whole open period
  is what makes totals independent of the order partitions are read in;
- windows and periods: rows whose billing period still accepts late events
  (period end + ``late_grace`` >= watermark); older rows are evicted, their final
  values already emitted;
- unique_count and percentile rows additionally hold their distinct values.

The watermark is the greatest event time seen, taken from the event's own time
and the process watermark stamped on it at mediation, and it only grows.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from msgspec.structs import replace as _replace

from meterflow.base.keys import KEY_SEP, split_key
from meterflow.base.periods import period_bounds
from meterflow.base.stats import STATS, FlowStats
from meterflow.base.timeutil import now_ms
from meterflow.operators.aggregate import Acc, acc_from_state, new_acc
from meterflow.operators.anomaly import Anomalies
from meterflow.operators.dedupe import IdTable
from meterflow.operators.entitlements import Entitlements, EntitlementUpdate
from meterflow.operators.legacy_state import decode_legacy_snapshot
from meterflow.operators.mediate import dead_letter, internal_error, matches
from meterflow.operators.rating import Price
from meterflow.operators.review import ReviewTracker
from meterflow.operators.rules import Rules
from meterflow.schemas import state as S
from meterflow.schemas.records import Emission, PeriodAggregate, RatedRow, WindowAggregate

# The snapshot's state version, meterflow.schemas.state.STATE_VERSION: 2: ids map to their expiry; pending dirty rows
# joined the snapshot; 3: entitlement state; 4: ids kept as fingerprints in an IdTable; 5: named msgpack records
# instead of a pickled tuple (3 and 4 are converted on restore: meterflow.operators.legacy_state).
STATE_VERSION = S.STATE_VERSION
_MAX_NUMBER = 1e300  # larger magnitudes (or a JSON 1e400 read as inf) are rejected, so sums stay finite
_NO_DIMS: Tuple[str, ...] = ()
_NO_KEYS: FrozenSet[Any] = frozenset()
_ZERO = Decimal(0)
# Expired ids already count as unseen, so evicting them only frees memory: doing it once the watermark is an
# hour past the earliest expiry (not at every batch that passes one) keeps the rebuilds rare at period ends,
# where each id seen in the last dedupe_window has its own expiry.
_DEDUPE_EVICT_SLACK_MS = 3_600_000

WindowKey = Tuple[str, int, Tuple[str, ...]]  # metric, window_start, dimension values
PeriodKey = Tuple[str, int, int]  # metric, period_start, period_end


class CustomerMeter:
    """The metering state of one customer. Pure: no I/O, the clock comes in on the events."""

    __slots__ = ("rules", "key", "tenant_id", "customer_id", "seen", "wm", "windows", "periods",
                 "excluded", "next_evict", "next_dedupe_evict", "stats", "dirty_w", "dirty_p", "_period", "ent",
                 "_rows", "reviews", "anom", "_closed")

    def __init__(self, rules: Rules, key: str, snapshot: Optional[bytes] = None, stats: FlowStats = STATS) -> None:
        self.rules = rules
        self.key = key
        self.tenant_id, self.customer_id = split_key(key)
        self.stats = stats
        self.seen = IdTable()
        self.wm = 0
        self.windows: Dict[WindowKey, Acc] = {}
        self.periods: Dict[PeriodKey, Acc] = {}
        self.excluded: Dict[PeriodKey, int] = {}
        self.next_evict = 1 << 62
        self.next_dedupe_evict = 1 << 62
        # Rows changed since the last flush: part of the state, so a resume re-emits them.
        self.dirty_w: Set[WindowKey] = set()
        self.dirty_p: Set[PeriodKey] = set()
        self._period = (0, 0)  # cache of the last period looked up (not state)
        # The rows each metric's last event folded into (not state): consecutive events of a customer
        # mostly land in the same window and period, so a hit skips building keys, two dict lookups, two
        # set adds, the entitlement lookups and the period-advance check. Valid while the dirty sets, the
        # rows and the subscription stay the same objects: dropped on every flush, eviction and plan change.
        self._rows: Dict[str, list] = {}
        self.ent = Entitlements(rules, key)
        self.reviews = ReviewTracker(rules.review)  # open review items (README: Overage review queue)
        self.anom = self._new_anomalies()
        # Final rows sent at a subscription change, before it took effect (_close_before_change): added to the
        # emission of the process call that made the change (not state: never outlives that call).
        self._closed: Optional[Emission] = None
        if snapshot is not None:
            self._restore(snapshot)

    # -- recovery -----------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, rules: Rules, data: bytes, stats: FlowStats = STATS) -> "CustomerMeter":
        """Rebuild the state a :meth:`snapshot` captured (the key travels inside it)."""
        meter = cls(rules, KEY_SEP, stats=stats)
        meter._restore(data)
        return meter

    def snapshot(self) -> bytes:
        """An immutable, versioned copy of the state: a :class:`meterflow.schemas.state.MeterState` record as
        MessagePack bytes (named fields, no module paths; so later mutation cannot leak in either)."""
        dirty_w, dirty_p = self.dirty_w, self.dirty_p
        window, period = S.WindowRow, S.PeriodRow
        return S.encode_meter_state(S.MeterState(
            key=self.key, version=S.STATE_VERSION, watermark=self.wm, seen=self.seen.to_state(),
            windows=[window(metric=wk[0], start=wk[1], acc=acc.to_state(), dims=wk[2], dirty=wk in dirty_w)
                     for wk, acc in self.windows.items()],
            periods=[period(metric=pk[0], start=pk[1], end=pk[2], acc=acc.to_state(), dirty=pk in dirty_p)
                     for pk, acc in self.periods.items()],
            excluded=[S.ExcludedRow(metric=pk[0], start=pk[1], end=pk[2], count=n, dirty=pk in dirty_p)
                      for pk, n in self.excluded.items()],
            entitlements=self.ent.to_state(), reviews=self.reviews.to_state(),
            anomaly=self.anom.to_state() if self.anom is not None else []))

    def _restore(self, data: bytes) -> None:
        # A pickle (first byte 0x80) is a version 3 or 4 snapshot of a build before issue 10: converted.
        st = decode_legacy_snapshot(data) if data[:1] == b"\x80" else S.decode_meter_state(data)
        self.key = key = st.key
        self.tenant_id, self.customer_id = split_key(key)
        self.wm = st.watermark
        self.seen = IdTable.from_state(st.seen)
        self.windows, self.periods, self.excluded = {}, {}, {}
        self.dirty_w, self.dirty_p = set(), set()
        for w in st.windows:
            wk = (w.metric, w.start, w.dims)
            self.windows[wk] = acc_from_state(w.acc)
            if w.dirty:
                self.dirty_w.add(wk)
        for r in st.periods:
            pk = (r.metric, r.start, r.end)
            self.periods[pk] = acc_from_state(r.acc)
            if r.dirty:
                self.dirty_p.add(pk)
        for x in st.excluded:
            pk = (x.metric, x.start, x.end)
            self.excluded[pk] = x.count
            if x.dirty:
                self.dirty_p.add(pk)
        self.ent = Entitlements(self.rules, key)
        self.ent.restore_state(st.entitlements)
        self.reviews = ReviewTracker(self.rules.review)
        self.reviews.restore(st.reviews)
        self.anom = self._new_anomalies()
        if self.anom is not None:
            self.anom.restore_state(st.anomaly)
        self._recompute_next_evict()
        self.next_dedupe_evict = self.seen.min_expiry()

    def _new_anomalies(self) -> Optional[Anomalies]:
        settings = self.rules.anomaly
        return Anomalies(settings, self.tenant_id, self.customer_id) if settings is not None else None

    def is_empty(self) -> bool:
        return not (self.seen or self.windows or self.periods or self.excluded or self.anom)

    def has_dirty(self) -> bool:
        return bool(self.dirty_w or self.dirty_p)

    def usage(self, pk: PeriodKey) -> Optional[float]:
        """The current billing-period value of ``pk``; None when the period has no row (never counted, or
        closed and evicted)."""
        acc = self.periods.get(pk)
        return acc.value() if acc is not None else None

    def flush(self) -> Emission:
        """The current value of every row changed since the last flush (then nothing is dirty), and every period
        row that no event can change any more (period_end + late_grace before the watermark) with ``final``,
        changed or not; those rows are then evicted."""
        closing: Set[PeriodKey] = set()
        if self.wm > self.next_evict:
            limit = self.wm - self.rules.grace_ms
            closing = {pk for pk in self.periods if pk[2] < limit}
            closing.update([pk for pk in self.excluded if pk[2] < limit])
        out = self._emit(self.dirty_w, self.dirty_p | closing if closing else self.dirty_p, self.ent.rule, [],
                         closing)
        self.dirty_w = set()
        self.dirty_p = set()
        self._rows = {}
        if self.wm > self.next_evict:
            self._evict()
        return out

    def finalize_due(self, wm: int) -> bool:
        """Whether the flow's watermark ``wm`` closes a row of this customer (then :meth:`finalize`)."""
        return wm > self.next_evict

    def finalize(self, wm: int) -> Emission:
        """The flow's watermark reached ``wm`` while this customer sent nothing: its rows that no event can change
        any more leave ``final`` now, not at its next event. The watermark is the customer's from here on, so an
        event of a finalized period is ``too_late`` as the contract's single watermark says."""
        if wm > self.wm:
            self.wm = wm
        return self.flush()

    # -- the hot path -----------------------------------------------------------------
    # process() runs once per key and batch. The per-event loop is all in _fold: a Python call per event or
    # per metric would cost more than most of what the loop does. What the loop does rarely (a new window or
    # period row, an exclusion, a dead letter) and what runs once per batch (changelog records, p95/p99
    # checks, gateway state, the emission) are the helpers after it.
    def process(self, batches: List[Any], flush: bool = True) -> Emission:
        """Fold a batch of this customer's items: lists of events, and entitlement changes in between.

        Returns the batch's dead letters, alerts and changed gateway state at once, and, with ``flush``
        (the default), the current value of every row changed since the last flush. ``flush=False``
        keeps changed rows pending so that a busy key emits each row once per flush interval rather
        than once per batch (see :meth:`flush`). Alerts never wait for a flush.
        """
        dead: List[Any] = []
        alerts: List[Any] = []
        deferred: Dict[PeriodKey, list] = {}
        unevaluated = 0
        ent = self.ent
        rule = ent.rule
        # A changelog record in the batch can rate a p95/p99 metric after its period was deferred: then the
        # wallet needs the period's value before the batch even where the metric was not rated yet.
        exact = len(batches) > 1 and any(type(group) is EntitlementUpdate for group in batches)
        ent.before_move = self._close_before_change  # (set for the call only: no meter <-> entitlements cycle)
        try:
            for group in batches:
                if type(group) is EntitlementUpdate:
                    self._apply_change(group, alerts)
                else:
                    unevaluated += self._fold(group, dead, alerts, deferred, exact)
            if deferred:
                self._evaluate_deferred(deferred, dead, alerts)
        finally:
            ent.before_move = None
        if self.ent.rule is not rule:
            # The subscription in effect changed (an auto_overage move to next_plan or a changelog record): every
            # open period is re-rated at the next flush under it, as _apply_change does, so a row flushed before
            # the move is not left with the previous plan's included and price, whatever the batch boundaries.
            self.dirty_p.update(self.periods)
            self.dirty_p.update(self.excluded)
        if alerts or unevaluated:
            self.stats.add({"alerts": len(alerts), "unevaluated": unevaluated})
        return self._end_batch(dead, alerts, flush)

    def _apply_change(self, update: EntitlementUpdate, alerts: List[Any]) -> None:
        """A changelog record: the entitlement change takes effect at its place in the batch, on the usage
        folded so far. The cached period and rows may belong to the previous subscription: dropped."""
        if update.version > self.ent.version:
            self._close_before_change(alerts)
        if self.ent.apply_change(update, self.usage, alerts):
            # Rated rows follow the subscription in effect: every open period is re-rated at the next flush.
            self.dirty_p.update(self.periods)
            self.dirty_p.update(self.excluded)
        self._period = (0, 0)
        self._rows = {}

    def _fold(self, group: List[Any], dead: List[Any], alerts: List[Any], deferred: Dict[PeriodKey, list],
              exact: bool = False) -> int:
        """Fold one list of events in order; returns how many of them went unevaluated (the subscription
        evaluates no entitlement). ``exact``: the batch holds a changelog record, so a p95/p99 period deferred
        while unrated may be rated at the end of the batch: its value before the batch is kept for the wallet.

        Per event: admission (its billing period, dedupe, a metered type, a period still open, exclusion),
        then, per metric it matches, the fold into its window and period accumulators (through the row
        cache), then the entitlement check of the metrics the subscription evaluates (p95/p99 deferred to
        the end of the batch). One event never stops the flow: what it raises becomes its dead letter.
        Everything that can fail on the event's own values (period arithmetic) runs before it touches any
        state.
        """
        rules = self.rules
        by_type = rules.fold_by_event_type
        window_ms = rules.window_ms
        grace_ms = rules.grace_ms
        dedupe_ms = rules.dedupe_ms
        seen_check = self.seen.check_add_id
        windows, periods = self.windows, self.periods
        dirty_w, dirty_p = self.dirty_w, self.dirty_p
        ent = self.ent
        usage_of = self.usage
        sub = ent.rule
        kind, anchor = sub.period, sub.anchor_ms
        infos, credit, spends, evaluated = ent.infos, ent.credit, ent.spends, ent.evaluated
        unevaluated = 0 if evaluated else len(group)
        rowc = self._rows
        anom = self.anom
        acur = anom.cur if anom is not None else None  # anomaly metrics' current day cells
        aday = 86_400_000 % window_ms != 0  # a window can span two days: check the day on row cache hits too
        wm = self.wm
        pstart, pend = self._period
        dup = excl = unmetered = ignored = failed = missing = 0
        for me in group:
            try:
                # -- admission
                ts = me.ts
                if not pstart <= ts < pend:
                    bounds = self._bounds(ts, kind, anchor)
                    if type(bounds) is str:
                        dead.append(dead_letter("invalid_event", bounds, me.src, me.raw, self.tenant_id))
                        failed += 1
                        continue
                    pstart, pend = bounds
                ev = me.event
                if me.wm > wm:
                    wm = me.wm
                # Remember the id while its period accepts events (so a retry can never count twice,
                # whatever the read order) and for at least dedupe_window. An id whose expiry passed
                # counts as unseen, however late it is evicted.
                expiry = pend + grace_ms
                if expiry < wm + dedupe_ms:
                    expiry = wm + dedupe_ms
                if seen_check(ev.event_id, expiry, wm):
                    dup += 1
                    continue
                if expiry < self.next_dedupe_evict:
                    self.next_dedupe_evict = expiry
                metrics = by_type.get(ev.event_type)
                if metrics is None:
                    unmetered += 1
                    continue
                if pend + grace_ms < wm:
                    dead.append(self._too_late(me, pstart, pend, wm))
                    failed += 1
                    continue
                props = ev.properties
                if me.excluded:  # counted per metric it would have matched, never aggregated
                    self._exclude(metrics, props, pstart, pend)
                    excl += 1
                    continue
                # -- the fold: each metric the event matches, into its window and period accumulators
                sign = -1 if ev.correction else 1
                wstart = ts - ts % window_ms
                for _m, code, where, prop, needs_number, additive, gb, per_event, agg in metrics:
                    if where and not matches(props, where):
                        continue
                    v = None
                    if prop is not None:
                        v = props.get(prop)
                        if v is None or (needs_number and (type(v) is bool or not isinstance(v, (int, float))
                                                           or not -_MAX_NUMBER < v < _MAX_NUMBER)):
                            dead.append(self._missing_property(me, code, prop, v))
                            missing += 1
                            continue
                    if sign < 0 and not additive:
                        ignored += 1
                        continue
                    if not gb:
                        dims = _NO_DIMS
                    elif len(gb) == 1:
                        dims = (_dim(props.get(gb[0])),)
                    else:
                        dims = tuple([_dim(props.get(g)) for g in gb])
                    row = rowc.get(code)
                    if row is not None and row[0] == wstart and row[2] == pstart and row[1] == dims:
                        _, _, _, wacc, pk, acc, info, rate, sp, acell = row
                        wacc.add(v, ts, sign)
                    else:  # another window or period than this metric's last event: look its rows up
                        wk = (code, wstart, dims)
                        wacc = windows.get(wk)
                        if wacc is None:
                            wacc = self._new_window(wk, agg, kind, anchor, pstart, pend)
                        wacc.add(v, ts, sign)
                        dirty_w.add(wk)
                        pk = (code, pstart, pend)
                        acc = periods.get(pk)
                        if acc is None:
                            acc = self._new_period(pk, agg)
                        dirty_p.add(pk)
                        info = infos.get(code)
                        rate = credit.get(code)
                        sp = spends.get(code)
                        # anomaly metrics: the cell of the event's UTC day (a window lies within one day, so a
                        # row cache hit is the same day)
                        acell = acur.get(code) if acur is not None else None
                        if acell is not None and acell[0] != ts // 86_400_000:
                            acell = anom.cell(code, ts // 86_400_000)  # type: ignore[union-attr]
                        rowc[code] = [wstart, dims, pstart, wacc, pk, acc, info, rate, sp, acell]
                        cur = ent.cur.get(code)  # the current period: the latest one any accepted event of code fell in
                        if cur is None or cur[1] < pstart:
                            ent.advance(code, pk, me, usage_of, alerts)
                    if acell is not None:  # anomaly: one add and one comparison with the day's level
                        if aday and acell[0] != ts // 86_400_000:  # a window spanning two UTC days
                            acell = row[9] = anom.cell(code, ts // 86_400_000)  # type: ignore[union-attr,index]
                        acell[1] += sign if v is None else sign * v
                        if acell[1] >= acell[2]:
                            anom.check(code, acell, me, alerts, ent.rule)  # type: ignore[union-attr]
                    # -- entitlements: only for the metrics this customer's subscription evaluates
                    if not evaluated or (info is None and rate is None and sp is None):
                        acc.add(v, ts, sign)
                        continue
                    if not per_event:  # p95/p99: checked once per batch, on its last event (_evaluate_deferred)
                        d = deferred.get(pk)
                        if d is None:
                            # (the value before the batch only feeds the wallet: a percentile costs a sort; a
                            # changelog record later in the batch may rate the metric, see process)
                            deferred[pk] = [acc.value() if rate is not None or exact else 0.0, me]
                        else:
                            d[1] = me
                        acc.add(v, ts, sign)
                        continue
                    before = acc.value() if rate is not None and not additive else 0.0
                    acc.add(v, ts, sign)
                    if info is not None:
                        usage = acc.value()
                        lvl = ent.next_level.get(pk)
                        if lvl is None:
                            lvl = ent.level(pk, info)
                        if usage >= lvl or pk in ent.blocked:  # a threshold or the block to set, keep or lift
                            self.wm = wm  # (an auto_overage move first sends the rows this watermark closed)
                            ent.evaluate(code, pk, usage, me, usage_of, alerts)
                        else:
                            ent.touched.add(pk)
                    if sp is not None:  # spend thresholds: a unit level first, the exact decimal charge above it
                        usage = acc.value()
                        slvl = ent.spend_next.get(pk)
                        # (a card that can fall keeps a level from the current usage on: recomputed when
                        # usage may have fallen)
                        if slvl is None or not sp.monotone and (sign < 0 or not additive or
                                                                (v is not None and v < 0)):
                            slvl = ent.spend_level(pk, sp, usage)
                        if usage >= slvl:
                            ent.evaluate_spend(code, pk, usage, me, alerts)
                    if rate is not None:
                        if additive:  # exact units: 1 per event for count, the value for sum
                            ent.spend(code, 1 if v is None else v, sign, me, pk, alerts)
                        else:
                            ent.spend(code, acc.value() - before, 1, me, pk, alerts)
                    if ent.infos is not infos:  # the plan moved: other entitlements from the next metric on
                        infos, credit, spends, evaluated = ent.infos, ent.credit, ent.spends, ent.evaluated
                        rowc = self._rows = {}
            except Exception as exc:  # a bug, not bad input: the event is dead-lettered, the flow goes on
                failed += 1
                dead.append(internal_error("meter", exc, me.src, me.raw, self.tenant_id))
        self.wm = wm
        self._period = (pstart, pend)
        # Each event read ends as exactly one of accepted, duplicate, excluded or dead-lettered (too_late,
        # invalid_event, internal_error); missing_property dead letters are per metric, counted apart.
        self.stats.add_metered(len(group) - dup - excl - failed, dup, excl, unmetered, ignored, failed, missing)
        return unevaluated

    def _close_before_change(self, alerts: List[Any]) -> None:
        """A subscription change (a changelog record, an auto_overage move) is about to take effect: the period
        rows the watermark closed that no flush has sent yet leave final now, rated under the subscription they
        closed under, and are evicted, with the changed gateway state, as a batch end and flush just before the
        change would have done. So the change re-rates only the open periods, whatever the batch and flush
        boundaries (contract: a final row no event can change)."""
        if self.wm <= self.next_evict:
            return
        limit = self.wm - self.rules.grace_ms
        closing = {pk for pk in self.periods if pk[2] < limit}
        closing.update([pk for pk in self.excluded if pk[2] < limit])
        if not closing:
            return
        out = self._emit(set(), closing, self.ent.rule, [], closing, partial=True)
        alerts += out.alerts  # (review notifications, where the flush would have sent them: before the change)
        out.gateway, out.wallets = self._take_gateway()  # (before the rows it reads are evicted)
        prev = self._closed
        if prev is None:
            out.alerts = []
            self._closed = out
        else:
            prev.periods += out.periods
            prev.rated += out.rated
            prev.reviews += out.reviews
            prev.gateway += out.gateway
            prev.wallets += out.wallets
        self.dirty_p.difference_update(closing)
        closed_period = self.ent.closed_period
        for pk in closing:
            acc = self.periods.pop(pk, None)
            if acc is not None:
                closed_period(pk, acc)
            self.excluded.pop(pk, None)
        self.ent.evict(self.wm, self.rules.grace_ms)
        self.reviews.evict(limit)
        self._recompute_next_evict()
        self._rows = {}

    def _too_late(self, me: Any, pstart: int, pend: int, wm: int) -> Any:
        return dead_letter("too_late", f"billing period {pstart}..{pend} (epoch ms) closed more than late_grace "
                           f"before the watermark {wm}", me.src, me.raw, self.tenant_id)

    def _exclude(self, metrics: Tuple[Tuple[Any, ...], ...], props: Dict[str, Any], pstart: int, pend: int) -> None:
        """Count an excluded event in each metric it would have matched (the period rows' excluded_events)."""
        excluded, dirty_p = self.excluded, self.dirty_p
        for _m, code, where, *_ in metrics:
            if where and not matches(props, where):
                continue
            pk = (code, pstart, pend)
            n = excluded.get(pk)
            if n is None:
                n = 0
                expires = pend + self.rules.grace_ms  # the row closes (and leaves final) with its period
                if expires < self.next_evict:
                    self.next_evict = expires
            excluded[pk] = n + 1
            dirty_p.add(pk)

    def _missing_property(self, me: Any, code: str, prop: str, v: Any) -> Any:
        why = "is missing" if v is None else f"must be a number below 1e300 in size, got {v!r:.80}"
        return dead_letter("missing_property", f"metric {code!r} needs property {prop!r}, which {why}",
                           me.src, me.raw, self.tenant_id, metric=code)

    def _new_window(self, wk: WindowKey, agg: str, kind: str, anchor: int, pstart: int, pend: int) -> Acc:
        """Open a window row. It stays open for late events while the period holding its last millisecond
        does (checked by :meth:`_bounds` before the event touched any state)."""
        last_ms = wk[1] + self.rules.window_ms - 1
        if not pstart <= last_ms < pend:
            pstart, pend = period_bounds(last_ms, kind, anchor)
        expires = pend + self.rules.grace_ms
        acc = self.windows[wk] = new_acc(agg)
        acc.expires = expires
        if expires < self.next_evict:
            self.next_evict = expires
        return acc

    def _new_period(self, pk: PeriodKey, agg: str) -> Acc:
        """Open a billing-period row: it stays open for late events until late_grace after its end."""
        acc = self.periods[pk] = new_acc(agg)
        acc.expires = pk[2] + self.rules.grace_ms
        if acc.expires < self.next_evict:
            self.next_evict = acc.expires
        return acc

    def _evaluate_deferred(self, deferred: Dict[PeriodKey, list], dead: List[Any], alerts: List[Any]) -> None:
        """The p95/p99 entitlement checks, once per batch on the period's last event (a percentile has no
        cheap per-event increment). ``deferred`` maps each period to its value before the batch and that event."""
        ent = self.ent
        usage_of = self.usage
        errors = 0
        for pk, (before, me) in deferred.items():
            try:
                code = pk[0]
                usage = self.periods[pk].value()
                if code in ent.infos:
                    ent.evaluate(code, pk, usage, me, usage_of, alerts)
                sp = ent.spends.get(code)
                if sp is not None:
                    slvl = ent.spend_next.get(pk)
                    if slvl is None or not sp.monotone:  # a percentile can fall: from the current usage on
                        slvl = ent.spend_level(pk, sp, usage)
                    if usage >= slvl:
                        ent.evaluate_spend(code, pk, usage, me, alerts)
                if code in ent.credit:
                    ent.spend(code, usage - before, 1, me, pk, alerts)
            except Exception as exc:  # a bug: reported on the event that would have fired it (it is counted)
                dead.append(internal_error("meter (p95/p99 entitlement check)", exc, me.src, me.raw, self.tenant_id))
                errors += 1
        if errors:
            self.stats.add({"entitlement_errors": errors})

    def _end_batch(self, dead: List[Any], alerts: List[Any], flush: bool) -> Emission:
        """The batch's emission: its dead letters and alerts, the changed gateway state and, with ``flush``, the
        changed rows (then the evictions), and expired dedupe ids dropped once the watermark is an hour past the
        earliest expiry."""
        gateway, wallets = self._take_gateway()
        if flush:
            out = self.flush()
            out.dead_letters = dead
        else:
            out = Emission(dead_letters=dead)
        closed = self._closed
        if closed is not None:  # final rows a subscription change sent before it took effect: first
            self._closed = None
            out.periods = closed.periods + out.periods
            out.rated = closed.rated + out.rated
            out.reviews = closed.reviews + out.reviews
            gateway = closed.gateway + gateway
            wallets = closed.wallets + wallets
        out.alerts = alerts + out.alerts if out.alerts else alerts  # (review notifications of the flush last)
        out.gateway = gateway
        out.wallets = wallets
        if self.wm > self.next_dedupe_evict + _DEDUPE_EVICT_SLACK_MS:
            self._evict_seen()
        return out

    def _take_gateway(self) -> Tuple[List[Any], List[Any]]:
        """The changed gateway and wallet state (then nothing is pending)."""
        ent = self.ent
        if ent.touched or ent.deleted or ent.wallet_dirty:
            if self.rules.gateway_states:
                return ent.gateway(self.usage, now_ms())
            # nothing consumes live gateway state (no [redis]): do not build it
            ent.touched.clear()
            ent.deleted.clear()
            ent.wallet_dirty = False
        return [], []

    # -- helpers ---------------------------------------------------------------------
    def _bounds(self, ts: int, kind: str, anchor: int) -> Any:
        """The billing period ``(start, end)`` holding ``ts``, or why it has none (a str): period arithmetic
        ends with year 9999. The period of the last millisecond of its last window is checked too (a window
        row's expiry), so nothing later in the event's fold can fail on its time."""
        try:
            start, end = period_bounds(ts, kind, anchor)
            w = self.rules.window_ms
            last = end - 1 - (end - 1) % w + w - 1
            if last >= end:
                period_bounds(last, kind, anchor)
            return start, end
        except (OverflowError, ValueError) as exc:
            return (f"timestamp {ts} (epoch ms) is outside the range of billing periods ({kind} periods anchored "
                    f"at {anchor} epoch ms): {exc}")

    def _emit(self, dirty_w: Set[WindowKey], dirty_p: Set[PeriodKey], sub, dead,
              closing: Optional[Set[PeriodKey]] = None, partial: bool = False) -> Emission:
        """The rows ``dirty_w`` and ``dirty_p`` rated under ``sub`` (those in ``closing`` final); ``partial``: not
        every dirty row (a metric whose price a change took away keeps its pending removals)."""
        rules = self.rules
        t, c = self.tenant_id, self.customer_id
        wrows = []
        windows, window_ms = self.windows, rules.window_ms
        for wk in dirty_w:
            code, wstart, dims = wk
            acc = windows[wk]
            wrows.append(WindowAggregate(
                tenant_id=t, customer_id=c, metric=code, window_start=wstart, window_end=wstart + window_ms,
                dimensions=dict(zip(rules.metrics[code].group_by, dims)) if dims else {},
                value=acc.value(), events=acc.events, version=acc.events))
        prows = []
        rated = []
        ent = self.ent
        prices = ent.prices
        changes = ent.changes
        unrated = ent.unrated
        closed: Any = closing or _NO_KEYS
        periods, excluded = self.periods, self.excluded
        ents = sub.entitlements  # (sub.included without a call per row)
        templates = rules.row_templates
        for pk in dirty_p:
            code, pstart, pend = pk
            pacc = periods.get(pk)
            if pacc is not None:
                value = pacc.value()
                events = pacc.events
            else:
                value = 0.0
                events = 0
            excl = excluded.get(pk, 0)
            e = ents.get(code)
            included = None if e is None else e.included
            over = max(0.0, value - included) if included is not None else 0.0
            final = pk in closed
            # Grows with every event folded, every subscription change (it re-rates the row) and finality.
            version = events + excl + changes + final
            prows.append(PeriodAggregate(
                tenant_id=t, customer_id=c, metric=code, period_start=pstart, period_end=pend, value=value,
                included=included, overage_units=over, events=events, excluded_events=excl, version=version,
                final=final))
            price = prices.get(code)
            if price is not None:
                rated.append(rated_row(t, c, code, pstart, pend, sub, price, value, included, over, final, version,
                                       templates))
            elif code in unrated:  # a change took the metric's price away: its rated row goes
                rated.append(RatedRow(tenant_id=t, customer_id=c, metric=code, period_start=pstart, period_end=pend,
                                      plan=sub.plan, currency=sub.currency, price_model="", usage=value,
                                      included=included, overage_units=over, charge=_ZERO, overage_amount=_ZERO,
                                      minimum=_ZERO, amount=_ZERO, custom_rate=False, final=final, version=version,
                                      deleted=True))
        if unrated and not partial:  # every open row of those metrics was in this flush: the change dirtied them all
            self.ent.unrated = set()
        reviews, notes = self.reviews.observe(rated, now_ms()) if rated else ([], [])
        return Emission(windows=wrows, periods=prows, dead_letters=dead, rated=rated, reviews=reviews, alerts=notes)

    def _recompute_next_evict(self) -> None:
        exp = [a.expires for a in self.windows.values()] + [a.expires for a in self.periods.values()]
        exp += [pk[2] + self.rules.grace_ms for pk in self.excluded]
        self.next_evict = min(exp) if exp else 1 << 62

    def _evict(self) -> None:
        # Only called right after a flush, so no evicted row has an unsent change.
        wm = self.wm
        for wk in [k for k, a in self.windows.items() if a.expires < wm]:
            del self.windows[wk]
        closed_period = self.ent.closed_period  # (a current period's final usage stays with its entitlements)
        for pk in [k for k, a in self.periods.items() if a.expires < wm]:
            closed_period(pk, self.periods.pop(pk))
        grace = self.rules.grace_ms
        for k in [k for k in self.excluded if k[2] + grace < wm]:
            del self.excluded[k]
        self.ent.evict(wm, grace)
        self.reviews.evict(wm - grace)
        self._recompute_next_evict()

    def _evict_seen(self) -> None:
        # An id expires once its period closed for late events (a retry would be too_late anyway)
        # and dedupe_window passed: forgetting it can no longer change any total, whatever the
        # order partitions are read in. The table keeps its size (reserve), so a customer with steady
        # volume never regrows it.
        self.next_dedupe_evict = self.seen.evict(self.wm, reserve=len(self.seen))


def rated_row(t: str, c: str, code: str, pstart: int, pend: int, sub: Any, price: Price, value: float,
              included: Optional[float], over: float, final: bool, version: int,
              templates: Optional[Dict[Tuple[int, str], Tuple[Any, Price, RatedRow]]] = None) -> RatedRow:
    """A period row in money under the subscription ``sub`` and the metric's ``price`` (contract: Rating).

    ``templates`` (``Rules.row_templates``) keeps the first row of each subscription object and metric: the next
    ones are that row with the fields that vary replaced (``msgspec.structs.replace``, 12 keywords). The same
    record, built several times faster: a call with more than 15 keywords (RatedRow has 21 fields) goes through a
    dict in CPython."""
    charge, overage_amount = price.rate(value, included)
    if templates is not None:
        key = (id(sub), code)
        hit = templates.get(key)
        if hit is not None and hit[0] is sub and hit[1] is price:  # (the entry keeps sub alive: no id reuse)
            return _replace(hit[2], tenant_id=t, customer_id=c, period_start=pstart, period_end=pend, usage=value,
                            included=included, overage_units=over, charge=charge, overage_amount=overage_amount,
                            amount=max(price.minimum, charge), final=final, version=version)
        row = _rated_row(t, c, code, pstart, pend, sub, price, value, included, over, final, version, charge,
                         overage_amount)
        if len(templates) >= 100_000:  # changelog subscriptions are new objects: keep it bounded
            templates.clear()
        templates[key] = (sub, price, row)
        return row
    return _rated_row(t, c, code, pstart, pend, sub, price, value, included, over, final, version, charge,
                      overage_amount)


def _rated_row(t: str, c: str, code: str, pstart: int, pend: int, sub: Any, price: Price, value: float,
               included: Optional[float], over: float, final: bool, version: int, charge: Decimal,
               overage_amount: Decimal) -> RatedRow:
    return RatedRow(
        tenant_id=t, customer_id=c, metric=code, period_start=pstart, period_end=pend, plan=sub.plan,
        currency=sub.currency, price_model=price.model, usage=value, included=included, overage_units=over,
        charge=charge, overage_amount=overage_amount, minimum=price.minimum,
        amount=max(price.minimum, charge), custom_rate=sub.custom_rate(code), final=final, version=version,
        account_name=sub.account_name, arr=sub.arr)


def _dim(v: Any) -> str:
    if v is None:
        return ""
    if type(v) is str:
        return v
    if type(v) is bool:
        return "true" if v else "false"
    return str(v)
