"""Anomaly alerts for one customer: each metric's usage per UTC day against its trailing daily average.

Pure logic with no I/O, owned by the customer's :class:`meterflow.operators.meter.CustomerMeter`, which folds every
accepted event of an anomaly metric into it after dedupe, exclusions and the too_late check (so corrections,
exclusions and dedupe apply as everywhere) and saves it in the same snapshot (``MeterState.anomaly``).

Semantics (contract section 7; README "Anomaly alerts" says the same for users):

* The day of an event is its own UTC day, ``ts // 86_400_000`` (days since the epoch), whatever the rollup
  window or billing period. ``usage_d`` is the sum of the day's contributions: 1 per event for ``count``, the
  value for ``sum``, negated for a correction.
* ``first`` is the first UTC day with an accepted event of the metric; ``H = d - first``. A day with
  ``H < min_history_days`` is not judged. Else ``N = min(baseline_days, H)``, ``S`` the usage of days
  ``d - N .. d - 1`` (a day without usage counts 0) and ``baseline = S / N``. With ``baseline > 0`` the event
  that first brings ``usage_d`` above ``factor x baseline`` (``usage_d * N > factor * S``, exact in rationals,
  ``factor`` as written) fires ``anomaly``, once per customer, metric and day.
* A late event updates its own day (and so the baselines of the days after it) and can fire that day's
  anomaly, while the day is within the *judging horizon*: ``d >= latest - late_days``, where ``latest`` is the
  latest day of any accepted event of the metric and ``late_days = ceil(late_grace / 1 day)``. An event for
  an older day still counts in the days kept for baselines and in ``first``, but its day is not judged any
  more (an alert about a day long past helps nobody, and it bounds the memory).

Cost per event (the hot path inlined in ``CustomerMeter._fold``): the metric's current day is a cell
``[day, usage_d, level]`` where ``level`` is the unit level of the day, ``factor x baseline`` computed once when
the cell becomes current (a hair low; ``inf`` when the day is not judged or already fired); per event one
add and one comparison. The meter keeps the cell in its row cache beside the metric's window and period rows
(a window lies within one UTC day unless the rollup window does not divide a day, when the day is checked on
every event), so a cache hit needs no lookup. Only at or above the level is the exact test made. A cell
becomes current at the metric's first event of a day and again whenever an event of another day came in
between, so a late event for an earlier day is always reflected in a later day's baseline.

Memory bound, stated: per customer and anomaly metric, the usage of the days
``latest - late_days - baseline_days .. latest`` (``baseline_days + late_days + 1`` numbers, older days evicted as
``latest`` moves on: with the defaults 30 + 1 + 1 = 32 numbers), the days of that range whose anomaly fired,
``first``, and the current cell: about 2 KB of Python objects at most (measured with tracemalloc for 32 days of
usage above 256) and about 140 bytes in a snapshot.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple

from meterflow.base.timeutil import ms_to_iso, now_ms
from meterflow.schemas import state as S
from meterflow.schemas.alerts import Alert, alert_id
from meterflow.schemas.config import Config
from meterflow.schemas.gateway import AnomalyMarker

DAY_MS = 86_400_000
_INF = float("inf")
_SLACK = 1e-9  # the cheap level sits a hair low; the exact rational test decides


class AnomalySettings:
    """The ``[anomaly]`` section compiled for the hot path (None in :attr:`Rules.anomaly` when absent)."""

    __slots__ = ("factor", "factor_q", "baseline_days", "min_history_days", "late_days", "metrics", "keep")

    def __init__(self, factor: float, baseline_days: int, min_history_days: int, late_days: int,
                 metrics: frozenset) -> None:
        self.factor = factor
        self.factor_q = Fraction(repr(factor))  # the factor as written: 1.1 is 11/10
        self.baseline_days = baseline_days
        self.min_history_days = min_history_days
        self.late_days = late_days
        self.metrics = metrics
        self.keep = baseline_days + late_days  # days kept before the latest one


def anomaly_settings(cfg: Config) -> Optional[AnomalySettings]:
    a = cfg.anomaly
    if a is None:
        return None
    aggs = {m.code: m.aggregation for m in cfg.metrics}
    codes = a.metrics if a.metrics is not None else [c for c, agg in aggs.items() if agg in ("count", "sum")]
    late_days = -(-cfg.pipeline.late_grace_ms // DAY_MS)
    return AnomalySettings(float(a.factor), a.baseline_days, a.min_history_days, late_days, frozenset(codes))


class _History:
    """One metric's daily usage: ``vals[i]`` is the usage of day ``start + i``; ``start + len(vals) - 1`` is the
    latest day (the current cell's usage is written back into ``vals`` when another cell becomes current).
    ``fired``: the kept days whose anomaly fired (a tuple: almost always empty, and then shared)."""

    __slots__ = ("first", "start", "vals", "fired")

    def __init__(self, first: int, start: int, vals: List[Any], fired: Tuple[int, ...]) -> None:
        self.first = first
        self.start = start
        self.vals = vals
        self.fired = fired

    @property
    def latest(self) -> int:
        return self.start + len(self.vals) - 1


def _idle_cell() -> list:
    return [-1, 0, _INF]  # day -1 matches no event: the first one makes a real cell current


class Anomalies:
    """The anomaly state of one customer. ``cur`` maps each anomaly metric to its current cell
    ``[day, usage_d, level]``; ``CustomerMeter._fold`` reads it directly (see the module docstring)."""

    __slots__ = ("settings", "tenant_id", "customer_id", "hist", "cur")

    def __init__(self, settings: AnomalySettings, tenant_id: str, customer_id: str) -> None:
        self.settings = settings
        self.tenant_id = tenant_id
        self.customer_id = customer_id
        self.hist: Dict[str, _History] = {}
        self.cur: Dict[str, list] = {code: _idle_cell() for code in settings.metrics}

    def __bool__(self) -> bool:
        return bool(self.hist)

    # -- recovery ---------------------------------------------------------------------------------------
    def to_state(self) -> List[S.AnomalyRow]:
        self._write_back()
        return [S.AnomalyRow(metric=code, first=h.first, start=h.start, usage=list(h.vals), fired=sorted(h.fired))
                for code, h in sorted(self.hist.items())]

    def restore_state(self, rows: List[S.AnomalyRow]) -> None:
        """Load the rows of :meth:`to_state`; a metric no longer in ``[anomaly]`` is dropped."""
        metrics = self.settings.metrics
        self.hist = {r.metric: _History(r.first, r.start, list(r.usage), tuple(r.fired))
                     for r in rows if r.metric in metrics and r.usage}
        self.cur = {code: _idle_cell() for code in metrics}

    def markers(self) -> List[AnomalyMarker]:
        """The ``anomaly`` marker of each metric whose anomaly fired on a kept day: the latest such day, what the
        Redis hash's ``anomaly`` field holds (republished on resume and by ``meter gateway sync``)."""
        return [AnomalyMarker(tenant_id=self.tenant_id, customer_id=self.customer_id, metric=code,
                              day_start=max(h.fired) * DAY_MS) for code, h in sorted(self.hist.items()) if h.fired]

    def _write_back(self) -> None:
        for code, cell in self.cur.items():
            h = self.hist.get(code)
            if h is not None and cell[0] >= h.start:
                h.vals[cell[0] - h.start] = cell[1]

    # -- the day cells ----------------------------------------------------------------------------------
    def cell(self, code: str, day: int) -> list:
        """Make ``day`` the current cell of ``code`` (an event of another day than the current one): the day's
        usage so far and its level, the history extended and the days out of range evicted. A day older than
        the kept range gets a throwaway cell (it only moves ``first``)."""
        st = self.settings
        old = self.cur[code]
        h = self.hist.get(code)
        if h is None:
            h = self.hist[code] = _History(day, day, [0], ())
        else:
            if old[0] >= h.start:  # write the previous current day back
                h.vals[old[0] - h.start] = old[1]
            if day < h.first:
                h.first = day
            latest = h.latest
            if day > latest:
                h.vals.extend([0] * (day - latest))
                cut = day - st.keep - h.start
                if cut > 0:
                    del h.vals[:cut]
                    h.start += cut
                    if h.fired:
                        h.fired = tuple(d for d in h.fired if d >= h.start)
            elif day < h.start:
                if day < latest - st.keep:  # older than any kept day: it only moved `first`
                    self.cur[code] = _idle_cell()
                    return [day, 0, _INF]
                h.vals[:0] = [0] * (h.start - day)  # a late day before the first one kept: the range grows back
                h.start = day
        cell = self.cur[code] = [day, h.vals[day - h.start], self._level(h, day)]
        return cell

    def _level(self, h: _History, day: int) -> float:
        """``factor x baseline`` of ``day`` a hair low, or ``inf`` when the day is not judged (too little history,
        a zero baseline, beyond the judging horizon, already fired)."""
        st = self.settings
        hist_days = day - h.first
        if hist_days < st.min_history_days or day in h.fired or day < h.latest - st.late_days:
            return _INF
        n = st.baseline_days if st.baseline_days < hist_days else hist_days
        i = day - h.start
        # Days of the baseline before the kept range had no usage (a late event of an older day only moved
        # `first`; every day a judged day's baseline needs is kept: keep = baseline_days + late_days).
        total = sum(h.vals[i - n if i > n else 0:i])
        if not total > 0:
            return _INF
        lvl = st.factor * total / n
        return lvl - abs(lvl) * _SLACK - 1e-12

    def check(self, code: str, cell: list, me: Any, alerts: List[Alert], rule: Any) -> None:
        """The usage of the current day reached its level: fire ``anomaly`` if it is above ``factor x baseline``
        exactly (once: the level is then ``inf`` for the rest of the day)."""
        st = self.settings
        h = self.hist[code]
        day, usage = cell[0], cell[1]
        hist_days = day - h.first
        n = st.baseline_days if st.baseline_days < hist_days else hist_days
        i = day - h.start
        total = sum(Fraction(v) for v in h.vals[i - n if i > n else 0:i])
        if not Fraction(usage) * n > st.factor_q * total:
            return
        h.fired += (day,)
        cell[2] = _INF
        baseline = float(total / n)
        start = day * DAY_MS
        now = now_ms()
        alerts.append(Alert(
            alert_id=alert_id("anomaly", self.tenant_id, self.customer_id, code, start), type="anomaly",
            tenant_id=self.tenant_id, customer_id=self.customer_id, metric=code, period_start=ms_to_iso(start),
            period_end=ms_to_iso(start + DAY_MS), threshold_pct=st.factor * 100.0, included=None,
            usage=float(usage), usage_pct=round(float(usage) * 100.0 / baseline, 6), enforcement="",
            action="notify", event_id=me.event.event_id, event_time=ms_to_iso(me.ts),
            ingested_at=ms_to_iso(me.ingested or now), detected_at=ms_to_iso(now), plan=rule.plan,
            account_name=rule.account_name, baseline=baseline, factor=st.factor,
            detail=f"usage of the UTC day is {_fmt(float(usage) / baseline)}x its {n}-day baseline "
                   f"{_fmt(baseline)} (alert above {_fmt(st.factor)}x)"))


def _fmt(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:.4g}"
