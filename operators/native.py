"""The native batch core (issue 16, first step): an optional accelerator, ``meterflow_native`` (native/, Rust).

:class:`NativeBatchCore` runs mediation and the count/sum fold of :class:`meterflow.operators.meter.CustomerMeter`
over whole batches of raw lines in Rust: decode, validation, RFC 3339 timestamps, the tenant registry,
exclusions, dedupe (XXH3-64 fingerprints of event ids, per ``tenant|customer``) and the window and period
rows. What it does not handle exactly it hands back, line by line and in order: the line goes through the
Python :class:`~meterflow.operators.mediate.Mediator` (which gives the exact dead letter, or the event, then
folded natively), so the state sees every event in arrival order. Meter dead letters (too_late,
missing_property) are decided natively and worded here with the Python texts.

Not native yet (:func:`unsupported`): aggregations other than count and sum, ``group_by``, entitlements
(thresholds, alerts, rating), changelog records, snapshots and eviction. The dataflow does not use this
module yet: it runs the Python core; :func:`core_in_use` says so.

When ``meterflow_native`` is not built (no cargo at setup), :data:`AVAILABLE` is False and everything runs on
the Python path.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from meterflow.base.keys import KEY_SEP
from meterflow.base.stats import FlowStats
from meterflow.base.timeutil import dt_to_ms, now_ms
from meterflow.operators.dedupe import fingerprint
from meterflow.operators.mediate import Mediator, dead_letter
from meterflow.schemas.config import Config
from meterflow.schemas.events import EVENT_DECODER
from meterflow.schemas.records import DeadLetter

try:  # built by ./dev setup (maturin develop) when cargo is there
    import meterflow_native as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

AVAILABLE = _native is not None
_I64 = 1 << 63


def unsupported(cfg: Config) -> Optional[str]:
    """Why the native core cannot meter ``cfg`` exactly (None when it can)."""
    for m in cfg.metrics:
        if m.aggregation not in ("count", "sum"):
            return f"metric {m.code!r}: {m.aggregation} is not native yet (count and sum are)"
        if m.group_by:
            return f"metric {m.code!r}: group_by is not native yet"
        for k, v in m.where.items():
            if not _scalar(v):
                return f"metric {m.code!r}: where.{k} = {v!r} is not a JSON scalar"
    for t in cfg.tenants:
        for k, v in t.exclude_when.items():
            if not _scalar(v):
                return f"tenant {t.id!r}: exclude_when.{k} = {v!r} is not a JSON scalar"
    return None


def core_in_use(cfg: Optional[Config] = None) -> str:
    """What ``meter`` reports as its core: the dataflow runs the Python core; the native core is built or not."""
    if not AVAILABLE:
        return "python (native core not built: ./dev setup builds it when cargo is installed)"
    return "python (native core built, not yet wired into the dataflow: issue 16)"


def _scalar(v: Any) -> bool:
    return v is None or type(v) in (str, int, float, bool)


def _value(v: Any) -> Any:
    """A property value as the native fold takes it: ints beyond i64 as ('big', bytes, -1e300 < v < 1e300)."""
    if type(v) is int and not -_I64 <= v < _I64:
        return ("big", v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True), -1e300 < v < 1e300)
    return v


def _spec(cfg: Config) -> Dict[str, Any]:
    return {
        "max_event_bytes": cfg.pipeline.max_event_bytes,
        "max_clock_skew_ms": cfg.pipeline.max_clock_skew_ms,
        "window_ms": cfg.pipeline.rollup_window_ms,
        "grace_ms": cfg.pipeline.late_grace_ms,
        "dedupe_ms": cfg.pipeline.dedupe_window_ms,
        "tenants": [(t.id, list(t.excluded_customers), [(k, _value(v)) for k, v in t.exclude_when.items()])
                    for t in cfg.tenants],
        "metrics": [(m.code, m.event_type, m.aggregation, m.property, [(k, _value(v)) for k, v in m.where.items()])
                    for m in cfg.metrics],
        "subscriptions": [(s.tenant_id + KEY_SEP + s.customer_id, s.period, dt_to_ms(s.anchor))
                          for s in cfg.subscriptions],
    }


class NativeBatch(NamedTuple):
    """One batch through the native core: the rows it changed (current values) and the batch's dead letters.

    windows: ``(key, metric, window_start, events, total, fscaled)``; periods: ``(key, metric, period_start,
    period_end, events, total, fscaled)`` (``total`` the int part, ``fscaled`` the float part in units of
    2**-1074 or None, as :class:`meterflow.operators.aggregate.SumAcc` keeps them; a count's total is its
    value); excluded: ``(key, metric, period_start, period_end, excluded_events)``."""

    windows: List[Tuple[Any, ...]]
    periods: List[Tuple[Any, ...]]
    excluded: List[Tuple[Any, ...]]
    dead_letters: List[DeadLetter]


def sum_value(total: int, fscaled: Optional[bytes]) -> float:
    """The value of a row from its parts, exactly as SumAcc.value (a count: its total)."""
    from meterflow.operators.aggregate import SumAcc

    acc = SumAcc()
    acc.total = total
    acc.fscaled = int.from_bytes(fscaled, "little", signed=True) if fscaled else 0
    return acc.value()


class NativeBatchCore:
    """Mediation and the count/sum fold of one worker, natively. ``clock``: the wall clock (epoch ms) of
    the clock-skew rule, read once per batch, as the Mediator does."""

    def __init__(self, cfg: Config, clock: Callable[[], int] = now_ms, stats: Optional[FlowStats] = None) -> None:
        if _native is None:
            raise RuntimeError("meterflow_native is not built: run ./dev setup with cargo installed")
        why = unsupported(cfg)
        if why is not None:
            raise ValueError(f"the native core cannot meter this configuration: {why}")
        self._core = _native.BatchCore(_spec(cfg))
        self._clock = clock
        self._now = 0
        self._mediator = Mediator(cfg, stats or FlowStats(), clock=lambda: self._now)
        self._prop_of = {m.code: m.property or "" for m in cfg.metrics}  # missing_property: sum metrics only

    @property
    def watermark(self) -> int:
        return self._core.watermark

    def counters(self) -> Dict[str, int]:
        return dict(self._core.counters())

    def process(self, batch: Sequence[Tuple[Any, Optional[bytes]]]) -> NativeBatch:
        """Fold a batch of ``(src, raw)``; the changed rows and the dead letters (in line order)."""
        core = self._core
        now = self._now = self._clock()
        lines = [raw for _, raw in batch]
        dead: List[Tuple[int, DeadLetter]] = []
        n = len(lines)
        i = core.run(lines, 0, now)
        while i < n:
            self._python_line(i, batch[i], dead)
            i = core.run(lines, i + 1, now)
        windows, periods, excluded, notes = core.take_changes()
        for index, key, reason, a, b, c in notes:
            src, raw = batch[index]
            tenant = key.partition(KEY_SEP)[0]
            if reason == "too_late":
                dl = dead_letter("too_late", f"billing period {a}..{b} (epoch ms) closed more than late_grace "
                                 f"before the watermark {c}", src, raw, tenant)
            else:
                prop = self._prop_of[a]
                v = EVENT_DECODER.decode(raw).properties.get(prop)
                why = "is missing" if v is None else f"must be a number below 1e300 in size, got {v!r:.80}"
                dl = dead_letter("missing_property", f"metric {a!r} needs property {prop!r}, which {why}",
                                 src, raw, tenant, metric=a)
            dead.append((index, dl))
        dead.sort(key=lambda p: p[0])
        return NativeBatch(windows, periods, excluded, [d for _, d in dead])

    def _python_line(self, index: int, item: Tuple[Any, Optional[bytes]], dead: List[Tuple[int, DeadLetter]]) -> None:
        """A line the native core did not take: the Python Mediator's dead letter, or its event folded natively."""
        med = self._mediator
        med.watermark = self._core.watermark
        out = med([item])
        for dl in out.dead_letters:
            dead.append((index, dl))
        for events in out.groups.values():
            for me in events:
                ev = me.event
                self._core.fold(index, ev.tenant_id, ev.customer_id, fingerprint(ev.event_id), ev.event_type, me.ts,
                                me.wm, me.excluded, ev.correction, [(k, _value(v)) for k, v in ev.properties.items()])
