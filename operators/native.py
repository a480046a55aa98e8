"""The native batch core (issue 16, first step): an optional accelerator, ``meterflow_native`` (native/, Rust).

:class:`NativeBatchCore` runs mediation and the fold of :class:`meterflow.operators.meter.CustomerMeter`
over whole batches of raw lines in Rust: decode, validation, RFC 3339 timestamps, the tenant registry,
exclusions, dedupe (XXH3-64 fingerprints of event ids, per ``tenant|customer``) and the window and period
rows. What it does not handle exactly it hands back, line by line and in order: the line goes through the
Python :class:`~meterflow.operators.mediate.Mediator` (which gives the exact dead letter, or the event, then
folded natively), so the state sees every event in arrival order. Meter dead letters (too_late,
missing_property) are decided natively and worded here with the Python texts.

:class:`NativeMeters` is what the dataflow runs with ``pipeline.core = "native"``: one native core per shard
folds the events of the customers with no wallet whose entitlements are soft, hard or auto_overage without an
upgrade to another plan, with or without spend thresholds and anomaly detection; their thresholds, spend
amounts, blocks and overage are checked at the events whose fold reaches the next level Python gave for the
period (:meth:`NativeMeters._check`: the least of the next threshold, block or overage level and the spend
level, ``Price.units_for`` of the next amount), their anomaly cells at the events that reach the day's level
or start another day (:meth:`NativeMeters._anomaly`, native/src/anomaly.rs), and it mirrors
the rows each batch changed into those customers' :class:`~meterflow.operators.meter.CustomerMeter`, so
flushes, versions, finality, rated rows, reviews and snapshots are the Python ones. The other customers run the
Python fold. A customer resumed from a snapshot, or back from the Python fold after a changelog record, is loaded
into the native core with its state (:meth:`NativeMeters.load`) when :meth:`NativeMeters.admits` it.

Every aggregation is native (count, sum, max, min, latest, unique_count, p95, p99; the value kept is the very
object the Python accumulator keeps, mirrored into it), and ``group_by`` (window rows keyed by the same dims
tuple as the Python fold's, native/src/dims.rs). Not native yet: wallets, auto_overage upgrades (next_plan),
and entitlements or spend thresholds on p95/p99 metrics (those customers run the Python fold).

When ``meterflow_native`` is not built (no cargo at setup), :data:`AVAILABLE` is False and everything runs on
the Python path.
"""

from __future__ import annotations

import atexit
import json
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import msgspec

from meterflow.base.keys import KEY_SEP
from meterflow.base.periods import period_bounds
from meterflow.base.stats import STATS, FlowStats
from meterflow.base.timeutil import dt_to_ms, now_ms
from meterflow.operators.anomaly import DAY_MS
from meterflow.operators.dedupe import IdTable, fingerprint
from meterflow.operators.mediate import Mediator, MeteredEvent, dead_letter, format_source
from meterflow.schemas.chunk import SourceChunk, chunk_items
from meterflow.schemas.config import Config
from meterflow.schemas.events import EVENT_DECODER
from meterflow.schemas.records import DeadLetter, Emission, RawEvents, RawRows
from meterflow.schemas.state import DedupeState

try:  # built by ./dev setup (maturin develop) when cargo is there
    import meterflow_native as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

AVAILABLE = _native is not None
BUNDLE: Any = _native.Bundle if _native is not None else None  # a native mediator's shard bundle (NativeMediator)
NATIVE_AGGREGATIONS = ("count", "sum", "max", "min", "latest", "unique_count", "p95", "p99")
_I64 = 1 << 63
_INF = float("inf")
# Diagnostics: the customers NativeMeters admitted to the native fold ("native"), left to the Python fold
# ("python") and moved there at a changelog record ("released"), process-wide. With METERFLOW_NATIVE_TALLY
# naming a file, the process appends them to it at exit as one JSON line with its pid (pytest --core native
# reports the sums of the meter subprocesses of tests/e2e with it).
FOLD_TALLY = FlowStats()


def _write_tally(path: str) -> None:
    counts = {k: v for k, v in FOLD_TALLY.snapshot().items() if k in ("native", "python", "released") and v}
    if counts:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), **counts}) + "\n")


if os.environ.get("METERFLOW_NATIVE_TALLY"):
    atexit.register(_write_tally, os.environ["METERFLOW_NATIVE_TALLY"])


def unsupported(cfg: Config) -> Optional[str]:
    """Why the native core cannot meter ``cfg`` exactly (None when it can)."""
    for m in cfg.metrics:
        if m.aggregation not in NATIVE_AGGREGATIONS:
            return f"metric {m.code!r}: {m.aggregation} is not native yet"
        for k, v in m.where.items():
            if not _scalar(v):
                return f"metric {m.code!r}: where.{k} = {v!r} is not a JSON scalar"
    for t in cfg.tenants:
        for k, v in t.exclude_when.items():
            if not _scalar(v):
                return f"tenant {t.id!r}: exclude_when.{k} = {v!r} is not a JSON scalar"
    return None


def python_fold_reason(cfg: Config) -> Optional[str]:
    """Why, with ``pipeline.core = "native"``, every customer of ``cfg`` runs on the Python fold (None: the
    native fold takes the customers :meth:`NativeMeters.admits`). The flow runs either way: what the native
    fold cannot do exactly runs on the Python one."""
    return unsupported(cfg)


def core_in_use(cfg: Optional[Config] = None) -> str:
    """What ``meter`` reports as its core (``pipeline.core``; whether the native core is built), and what runs
    where."""
    if cfg is not None and cfg.pipeline.core == "native":
        why = python_fold_reason(cfg) if AVAILABLE else None
        if why is not None:
            return f"native requested; every customer on the Python fold ({why})"
        return "native (customers without wallet or auto_overage upgrade; the others on Python)"
    if not AVAILABLE:
        return "python (native core not built: ./dev setup builds it when cargo is installed)"
    return "python (native core built: pipeline.core = \"native\" turns it on)"


def native_problem(cfg: Config) -> Optional[str]:
    """Why ``pipeline.core = "native"`` cannot run ``cfg`` (None: it can; what the native fold cannot do
    exactly runs on the Python fold, :func:`python_fold_reason`)."""
    if not AVAILABLE:
        return "the native core is not built (./dev setup builds it when cargo is installed)"
    return None


def _evaluated_codes(ent: Any) -> List[str]:
    """The metrics the native fold stops at for ``ent``: those with an entitlement or spend thresholds."""
    return sorted(set(ent.infos) | set(ent.spends))


def _level(ent: Any, pk: Tuple[str, int, int], info: Any, sp: Any) -> Tuple[float, bool]:
    """The level the native fold stops at for ``pk`` and whether an event that may lower the usage stops too:
    the least of the next threshold or block level (``Entitlements.level``) and the next spend level
    (``Entitlements.spend_level``); -inf (every event checked) while the period is blocked. A card that is not
    monotone (volume, staircase) has a spend level valid only while usage does not fall (the Python fold
    re-derives it from the usage it fell to): while it has an amount left to fire, the events that may lower
    usage (a correction, a negative value, an aggregation that is not additive) stop too."""
    if pk in ent.blocked:
        return -_INF, False
    lvl = _INF
    fall = False
    if info is not None:
        lvl = ent.next_level.get(pk)
        if lvl is None:
            lvl = ent.level(pk, info)
    if sp is not None:
        s = ent.spend_next.get(pk)
        lvl = min(lvl, -_INF if s is None else s)  # (None: the next event derives it)
        if not sp.monotone:
            fired = ent.sfired.get(pk, ())
            fall = any(a not in fired for a in sp.amounts)
    return lvl, fall


def _first(x: Tuple[int, Any]) -> int:
    return x[0]


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
        "metrics": [(m.code, m.event_type, m.aggregation, m.property, [(k, _value(v)) for k, v in m.where.items()],
                     list(m.group_by)) for m in cfg.metrics],
        "subscriptions": [(s.tenant_id + KEY_SEP + s.customer_id, s.period, dt_to_ms(s.anchor))
                          for s in cfg.subscriptions],
    }


class NativeBatch(NamedTuple):
    """One batch through the native core: the rows it changed (current values) and the batch's dead letters.

    windows: ``(key, metric, window_start, events, total, fscaled, dims)``; periods: ``(key, metric, period_start,
    period_end, events, total, fscaled)`` (``total`` the int part, ``fscaled`` the float part in units of
    2**-1074 or None, as :class:`meterflow.operators.aggregate.SumAcc` keeps them; a count's total is its
    value); excluded: ``(key, metric, period_start, period_end, excluded_events)``."""

    windows: List[Tuple[Any, ...]]
    periods: List[Tuple[Any, ...]]
    excluded: List[Tuple[Any, ...]]
    dead_letters: List[DeadLetter]


def _mirror(acc: Any, agg: str, events: int, total: int, x: Any) -> None:
    """A native row into its Python accumulator (meterflow.operators.aggregate), as the Python fold leaves it;
    ``x``: the float part of a sum, or what the native row reports of the other aggregations."""
    acc.events = events
    if agg == "count":
        acc.total = total
    elif agg == "sum":
        acc.total = total
        acc.fscaled = int.from_bytes(x, "little", signed=True) if x else 0
    elif agg == "max" or agg == "min":
        acc.best = x
    elif agg == "latest":
        acc.ts, acc.last = x
    elif agg == "unique_count":  # the distinct values new since the last report, in the order first seen
        acc.seen.update(x)
    else:  # p95 / p99: n, and the entries changed since the last report (new ones in the order first seen)
        acc.n, changed = x
        counts = acc.counts
        for v, c in changed:
            counts[v] = c


_FIXED_BYTES = 36 * 8  # native/src/acc.rs LIMBS: the float part of a native sum
_I128 = 1 << 127


def _row_parts(acc: Any, agg: str) -> Tuple[Any, ...]:
    """``(total, fixed, ext)`` of a Python accumulator for the native core's ``load_customer``, the inverse
    of :func:`_mirror`: a count's total; a sum's int part and its float part (``fscaled``, as little-endian
    two's complement bytes; an int part beyond i128 goes into it, the value is the same); the value of the
    other aggregations (max/min ``best``; latest ``(ts, last)``; unique_count the values of ``seen``;
    p95/p99 ``(n, [(value, count)])`` in the order of ``counts``), None while it has none."""
    if agg == "count":
        return acc.total, None, None
    if agg == "sum":
        total, fs = acc.total, acc.fscaled
        if not -_I128 <= total < _I128:
            total, fs = 0, (total << 1074) + fs
        return total, fs.to_bytes(_FIXED_BYTES, "little", signed=True) if fs else None, None
    if agg == "max" or agg == "min":
        return 0, None, None if acc.best is None else _value(acc.best)
    if agg == "latest":
        return 0, None, None if acc.ts is None else (acc.ts, _value(acc.last))
    if agg == "unique_count":
        return 0, None, [v if type(v) is str else _value(v[1]) for v in acc.seen] if acc.seen else None
    return 0, None, (acc.n, [(_value(v), c) for v, c in acc.counts.items()]) if acc.n else None


def sum_value(total: int, fscaled: Optional[bytes]) -> float:
    """The value of a row from its parts, exactly as SumAcc.value (a count: its total)."""
    from meterflow.operators.aggregate import SumAcc

    acc = SumAcc()
    acc.total = total
    acc.fscaled = int.from_bytes(fscaled, "little", signed=True) if fscaled else 0
    return acc.value()


class NativeBatchCore:
    """Mediation and the fold of one worker, natively. ``clock``: the wall clock (epoch ms) of
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


_ENCODE_JSON = msgspec.json.Encoder().encode


def _archive_row(me: MeteredEvent) -> Tuple[Any, ...]:
    """The raw archive columns of one event the Python Mediator made (as operators/mediate.py raw_columns)."""
    e, s = me.event, me.src
    return (e.tenant_id, e.customer_id, e.event_id, e.event_type, me.ts,
            _ENCODE_JSON(e.properties).decode() if e.properties else "{}", e.correction, me.ingested,
            format_source(s), s[-1] if type(s) is tuple and type(s[-1]) is int else 0)


def bundle_event(bundle: Any, k: int, i: int) -> MeteredEvent:
    """Customer ``k``'s ``i``-th event of a native bundle as the Python Mediator would have made it."""
    x = bundle.event(k, i)
    if type(x) is tuple:
        raw, ts, wm, src, excluded = x
        return MeteredEvent(EVENT_DECODER.decode(raw), ts, wm, src, raw, excluded, bundle.ingested)
    return x


def bundle_events(bundle: Any, k: int) -> List[MeteredEvent]:
    """Customer ``k``'s events of a native bundle as MeteredEvents (a customer on the Python fold)."""
    decode, ingested = EVENT_DECODER.decode, bundle.ingested
    return [MeteredEvent(decode(x[0]), x[1], x[2], x[3], x[0], x[4], ingested) if type(x) is tuple else x
            for x in bundle.events(k)]


def bundle_groups(bundle: Any) -> Dict[str, List[MeteredEvent]]:
    """A native bundle as the Python Mediator's bundle (``{tenant|customer: [MeteredEvent, ...]}``)."""
    return {key: bundle_events(bundle, k) for k, key in enumerate(bundle.keys())}


class NativeMediator(Mediator):
    """Mediation of one worker for ``pipeline.core = "native"``: :meth:`split` takes a batch of ``(src, raw)``
    to the shard bundles of the native mediator (``meterflow_native.Mediator``, native/src/mediate.rs: the
    events stay in Rust, one pickleable ``Bundle`` per shard), the dead letters and the raw archive columns,
    equal to what the Python Mediator, :func:`~meterflow.operators.mediate.bundle_shards` and
    :func:`~meterflow.operators.mediate.raw_columns` give. A line the native mediator does not take exactly
    (bad input, an unusual encoding or source) goes through the Python Mediator at its place in the batch,
    which gives its dead letter, or its event, carried in the bundle. Called as a Mediator it is one."""

    def __init__(self, cfg: Config, stats: FlowStats = STATS, clock: Callable[[], int] = now_ms,
                 spec: Optional[Dict[str, Any]] = None) -> None:
        if _native is None:
            raise RuntimeError("meterflow_native is not built: run ./dev setup with cargo installed")
        super().__init__(cfg, stats, clock)
        self._med = _native.Mediator(spec if spec is not None else _spec(cfg), cfg.pipeline.shards)
        self._now = 0
        self._lines = Mediator(cfg, FlowStats(), clock=lambda: self._now)  # the lines left to Python

    def split(self, batch: List[Any], archive_raw: bool
              ) -> Tuple[List[Tuple[str, Any]], List[DeadLetter], Optional[Union[RawEvents, RawRows]]]:
        """``(shard bundles, dead letters, raw archive columns or None)`` of one batch: ``(src, raw)`` items, or
        :class:`~meterflow.schemas.chunk.SourceChunk` items (each consumed Kafka chunk read natively, with no
        tuple per message)."""
        med = self._med
        if type(batch) is not list:
            batch = list(batch)
        ingested = now_ms()
        now = self._now = ingested if self._clock is now_ms else self._clock()
        dead: List[DeadLetter] = []
        med.archiving = archive_raw  # run writes the archive rows as it parses the lines
        wm = self.watermark
        if batch and type(batch[0]) is SourceChunk and all(type(c) is SourceChunk for c in batch):
            n = 0
            for c in batch:  # (one per consume call)
                wm = self._run_chunk(c, now, wm, ingested, dead)
                n += len(c.values)
        else:
            if batch and type(batch[0]) is SourceChunk:  # (chunks and items: not from one source)
                batch = chunk_items(batch)
            n = len(batch)
            i, wm = med.run(batch, 0, now, wm)
            while i < n:
                wm = self._python_line(batch[i], wm, ingested, dead)
                i, wm = med.run(batch, i + 1, now, wm)
        if wm > self.watermark:
            self.watermark = wm
        self._stats.add({"read": n, "dead_lettered": len(dead)})
        raw: Optional[Union[RawEvents, RawRows]] = None
        block = med.archive(ingested, _archive_row) if archive_raw else None
        if block is not None:  # the archive as RowBinary rows (native/src/mediate/archive.rs)
            raw = RawRows(rows=block[0], data=block[1])
        elif archive_raw:
            cols = med.columns(ingested, _archive_row)
            if cols is not None:
                raw = RawEvents(tenant_id=cols[0], customer_id=cols[1], event_id=cols[2], event_type=cols[3],
                                timestamp=cols[4], properties=cols[5], correction=cols[6], ingested_at=cols[7],
                                source=cols[8], position=cols[9])
        return med.take(ingested), dead, raw

    def _run_chunk(self, c: SourceChunk, now: int, wm: int, ingested: int, dead: List[DeadLetter]) -> int:
        """Stage chunk ``c``; the watermark after it. A message the native mediator does not take gets its
        ``(src, raw)`` item here, for the Python Mediator."""
        med, topic, part, offsets, values = self._med, c.topic, c.part, c.offsets, c.values
        n = len(values)
        i, wm = med.run_chunk(topic, part, offsets, values, 0, now, wm)
        while i < n:
            wm = self._python_line(c.item(i), wm, ingested, dead)
            i, wm = med.run_chunk(topic, part, offsets, values, i + 1, now, wm)
        return wm

    def _python_line(self, item: Tuple[Any, Optional[bytes]], wm: int, ingested: int,
                     dead: List[DeadLetter]) -> int:
        """A line the native mediator left to the Python Mediator, at its place: its dead letter, or its
        event pushed into the staged bundles; the watermark after it."""
        lines = self._lines
        lines.watermark = wm
        got = lines([item])
        dead += got.dead_letters
        for key, events in got.groups.items():
            for me in events:
                self._med.push(key, msgspec.structs.replace(me, ingested=ingested))
        return lines.watermark


class NativeMeters:
    """The native fold of one shard (``pipeline.core = "native"``), beside its :class:`CustomerMeter` objects.

    A customer is folded here when it is first seen and :meth:`admits` its subscription (soft, hard and
    auto_overage entitlements, spend thresholds, anomaly detection; no wallet or upgrade); its ``CustomerMeter``
    then holds everything but the dedupe table (and the usage of its anomaly cells between mirrors: at each
    :meth:`sync`, before a snapshot and on release): after each list of
    events, the rows the native fold changed are written into its accumulators (dirty, with their expiries)
    and its watermark and current periods follow, so :meth:`CustomerMeter.flush` and ``finalize`` emit
    exactly what the Python fold would. The dedupe table is copied into the meter for a snapshot
    (:meth:`before_snapshot`), so snapshots are the Python ones and a recovery directory resumes with
    either core; a resumed customer comes back here with its state (:meth:`load`). A changelog record moves its
    customer to the Python fold, its dedupe table with it (:meth:`release`); it comes back if :meth:`admits`
    its new subscription."""

    def __init__(self, cfg: Config, stats: FlowStats = STATS, spec: Optional[Dict[str, Any]] = None) -> None:
        why = native_problem(cfg)
        if why is not None or _native is None:
            raise ValueError(why)
        self._spec = spec if spec is not None else _spec(cfg)  # one per flow: shared by its shards (factory)
        self.python_only = python_fold_reason(cfg)  # not None: every customer runs on the Python fold
        self._core_obj: Any = None  # made when the shard admits its first customer
        self._stats = stats
        self._agg = {m.code: m.aggregation for m in cfg.metrics}
        self._prop = {m.code: m.property or "" for m in cfg.metrics}
        self._grace = cfg.pipeline.late_grace_ms
        self._window_ms = cfg.pipeline.rollup_window_ms
        self._invalid = 0
        self.keys: set = set()  # the customers folded here
        self.evaluated: set = set()  # those of them whose subscription evaluates thresholds (admit)
        self.loaded = 0  # customers brought in with their state (load: resumed, or back after a changelog record)
        self.gateway_due: set = set()  # evaluated customers folded since the last gateway call (with [redis])
        self._gateway = False  # the shard's rules.gateway_states (admit): gateway_due is kept only then
        self.synced_evict = 1 << 62  # the least next_evict of the meters the last sync mirrored

    @classmethod
    def factory(cls, cfg: Config) -> Callable[[], "NativeMeters"]:
        """One shard's NativeMeters per call, the compiled rules built once."""
        spec = _spec(cfg)
        # One subscription table for every shard's core (native/src/spec.rs), not a copy parsed per shard.
        spec["subscriptions"] = _native.Subscriptions(spec["subscriptions"])
        return lambda: cls(cfg, spec=spec)

    @property
    def _core(self) -> Any:
        if self._core_obj is None:
            self._core_obj = _native.BatchCore(self._spec)
        return self._core_obj

    def admits(self, meter: Any) -> bool:
        """Whether the customer is folded here: no wallet; soft, hard and auto_overage entitlements (an
        auto_overage one that would move the plan stays on Python) and spend thresholds, on metrics evaluated per
        event (thresholds, spend amounts, blocking and overage are evaluated at the events that reach a level,
        :meth:`_check`); anomaly detection on count and sum metrics (the day cells, :meth:`_anomaly`)."""
        ent = meter.ent
        if self.python_only is not None or ent.credit:
            return False
        agg = self._agg
        if meter.anom is not None and any(agg[code] not in ("count", "sum") for code in meter.anom.cur):
            return False
        # (an entitlement or spend threshold on a p95/p99 metric is checked once per batch by the Python fold)
        for code, info in ent.infos.items():
            if agg[code] in ("p95", "p99") or info.enforcement not in ("soft", "hard", "auto_overage"):
                return False
            # an upgrade re-evaluates every metric mid-event (Entitlements.evaluate): the Python fold's
            if info.enforcement == "auto_overage" and info.next_plan and info.next_plan != ent.rule.plan:
                return False
        for code in ent.spends:
            if agg[code] in ("p95", "p99"):
                return False
        return True

    def admit(self, meter: Any) -> bool:
        """Fold the customer here if :meth:`admits`: a new customer of the shard, or one with state (resumed
        from a snapshot, or on the Python fold until a changelog record), which :meth:`load` brings in."""
        tally: Dict[str, int] = {}
        ok = self.admit_counted(meter, tally)
        FOLD_TALLY.add(tally)
        return ok

    def admit_counted(self, meter: Any, tally: Dict[str, int]) -> bool:
        """:meth:`admit`, counted into ``tally`` (``native``/``python``) for the caller to add to ``FOLD_TALLY``
        once for many customers."""
        if not self.admits(meter):
            tally["python"] = tally.get("python", 0) + 1
            return False
        key = meter.key
        ent = meter.ent
        self._gateway = meter.rules.gateway_states
        if meter.wm or meter.windows or meter.periods or meter.excluded or len(meter.seen) or \
                ent.src is not None or ent.cancelled is not None or ent.moved_plan is not None:
            if not self.load(meter):
                # (its state does not fit the native rows: it stays on Python)
                tally["python"] = tally.get("python", 0) + 1
                return False
        elif ent.infos or ent.spends:
            core = self._core
            core.evaluate(key, _evaluated_codes(ent))
            for code, info in ent.infos.items():  # (a new customer: its first periods need no stop, :meth:`_fresh`)
                if code not in ent.spends:
                    core.set_fresh(key, code, ent.fresh_level(info))
        else:
            self._core.hold(key)  # (fold_bundle folds the customers the native core holds)
        if meter.anom is not None:  # its day cells: none yet, the first event of each metric stops (_anomaly)
            self._core.anomaly(key, sorted(meter.anom.cur))
        tally["native"] = tally.get("native", 0) + 1
        self.keys.add(key)
        if ent.infos or ent.spends:
            self.evaluated.add(key)
        return True

    def load(self, meter: Any) -> bool:
        """The customer's state into the native core, the inverse of :meth:`sync` and :meth:`release`: its
        window and period rows (as :func:`_mirror` would leave its accumulators), excluded counts, dedupe
        table, watermark and period rule; for an evaluated customer the level of each current period (as
        :meth:`_check` leaves it; other periods stop their first event for Python). False (nothing held,
        the customer stays on the Python fold) when some of it does not fit the native rows."""
        agg = self._agg
        try:
            windows = [(wk[0], wk[1], wk[2], acc.events, *_row_parts(acc, agg[wk[0]]))
                       for wk, acc in meter.windows.items()]
            periods = [(pk[0], pk[1], pk[2], acc.events, *_row_parts(acc, agg[pk[0]]))
                       for pk, acc in meter.periods.items()]
            excluded = [(pk[0], pk[1], pk[2], n) for pk, n in meter.excluded.items()]
            st = meter.seen.to_state()
            sub = meter.ent.rule
            self._core.load_customer(meter.key, sub.period, sub.anchor_ms, meter.wm, st.fingerprints, st.expiries,
                                     windows, periods, excluded)
        except (ValueError, OverflowError, TypeError, KeyError):
            return False
        key, ent, core = meter.key, meter.ent, self._core
        if ent.infos or ent.spends:
            core.evaluate(key, _evaluated_codes(ent))
            for code in ent.infos:
                pk = ent.cur.get(code)
                if pk is not None and code not in ent.spends:  # (a spend level: from the usage at the next event)
                    core.set_level(key, code, pk[1], pk[2], *_level(ent, pk, ent.infos[code], None))
        meter.seen = IdTable()  # (the native table is the customer's now: before_snapshot, release copy it back)
        self.loaded += 1
        return True

    def fold(self, meters: Dict[str, Any], pairs: List[Tuple[str, List[Any]]]) -> Emission:
        """Fold ``(key, events)`` lists of customers folded here, in order, in one native call; the dead letters
        (each customer's in event order) and alerts. The changed rows wait in the native state for :meth:`sync`.
        An event that reaches a level of an evaluated metric (or folds into a period without one) stops the
        native fold: its entitlement check runs here, exactly as the Python fold's (:meth:`_check`), and the
        fold resumes with the new level."""
        core = self._core
        failed: List[Tuple[int, DeadLetter]] = []
        alerts: List[Any] = []
        np_ = len(pairs)
        p, i, why = core.fold_many(pairs, 0, 0)
        while p < np_:
            key, group = pairs[p]
            self._fresh(meters, alerts)
            self._stopped(meters[key], group[i], why, p << 32 | i, failed, alerts)
            p, i, why = core.fold_many(pairs, p, i + 1)
        self._fresh(meters, alerts)
        n = sum(len(g) for _, g in pairs)
        evaluated = self.evaluated
        unevaluated = sum(len(g) for k, g in pairs if k not in evaluated) if evaluated else n
        if evaluated:
            self.gateway_due.update([k for k, _ in pairs if k in evaluated and meters[k].rules.gateway_states])
        dead = self._finish(meters, lambda index: pairs[index >> 32][1][index & 0xFFFFFFFF], n, unevaluated, failed,
                            alerts, core.take_end())
        return Emission(dead_letters=dead, alerts=alerts)

    def unknown(self, bundle: Any) -> List[int]:
        """The indexes of a native bundle's customers not folded here (new to the shard, or on the Python fold)."""
        return self._core.unknown(bundle)

    def fold_bundle(self, meters: Dict[str, Any], bundle: Any) -> Emission:
        """:meth:`fold` over a native mediator's bundle (``meterflow_native.Bundle``): the events of its
        customers folded here, in one native call, with no Python object per event (the customers not folded
        here are skipped: the caller gives them to their meters). An event is made in Python only where
        Python looks at it: a level reached, a dead letter, a line the native decoder leaves to Python."""
        dead, alerts = self.fold_bundle_parts(meters, bundle)
        return Emission(dead_letters=dead, alerts=alerts)

    def fold_bundle_parts(self, meters: Dict[str, Any], bundle: Any) -> Tuple[List[DeadLetter], List[Any]]:
        """:meth:`fold_bundle` as ``(dead letters, alerts)``, the only fields its Emission has (the shard adds
        them to its outputs without an Emission per bundle)."""
        core = self._core
        failed: List[Tuple[int, DeadLetter]] = []
        alerts: List[Any] = []
        k, i, why = core.fold_bundle(bundle, 0, 0)
        if why:  # (0: every event folded; else it stopped at customer k's event i, as fold_many says)
            keys = bundle.keys()
            nk = len(keys)
            while k < nk:
                self._fresh(meters, alerts)
                self._stopped(meters[keys[k]], bundle_event(bundle, k, i), why, k << 32 | i, failed, alerts)
                k, i, why = core.fold_bundle(bundle, k, i + 1)
        self._fresh(meters, alerts)
        n, unevaluated, evaluated, *end = core.bundle_end(bundle, self._gateway)
        if evaluated:
            self.gateway_due.update(evaluated)
        return self._finish(meters, lambda index: bundle_event(bundle, index >> 32, index & 0xFFFFFFFF), n,
                            unevaluated, failed, alerts, end), alerts

    def _finish(self, meters: Dict[str, Any], event_at: Callable[[int], Any], n: int, unevaluated: int,
                failed: List[Tuple[int, DeadLetter]], alerts: List[Any], end: Sequence[Any]) -> List[DeadLetter]:
        """The end of :meth:`fold` and :meth:`fold_bundle` over ``n`` events (``unevaluated`` of them of customers
        that evaluate nothing; ``end``: what the native ``take_end`` gives): the meter dead letters the native fold
        noted (``event_at(index)`` the event), the counters, and every dead letter in event order."""
        notes, dup, excl, unmetered, too_late, missing, ignored = end
        for index, key, reason, a, b, c in notes:
            failed.append((index, self._note(meters[key], event_at(index), reason, a, b, c)))
        bad = too_late + self._invalid
        self._invalid = 0
        stats = self._stats
        stats.add_metered(n - dup - excl - bad, dup, excl, unmetered, ignored, bad, missing)
        if alerts or unevaluated:  # (as CustomerMeter.process)
            stats.add({"alerts": len(alerts), "unevaluated": unevaluated})
        if not failed:
            return []
        failed.sort(key=_first)
        return [d for _, d in failed]

    def _fresh(self, meters: Dict[str, Any], alerts: List[Any]) -> None:
        """New customers' first periods that took their fresh level since the last call (:meth:`admit_counted`; the
        native fold did not stop there): each becomes its metric's current period, in event order, as
        :meth:`_check` would have made it at the stop. Called before Python looks at a stop (so its customer's
        current periods are the Python fold's there) and at the end of each fold call (the metric has no earlier
        period, so no alert comes of it; any would go to ``alerts``)."""
        for key, code, ps, pe in self._core.take_fresh():
            meter = meters[key]
            ent = meter.ent
            cur = ent.cur.get(code)
            if cur is None or cur[1] < ps:
                ent.advance(code, (code, ps, pe), None, meter.usage, alerts)
            if not meter.rules.gateway_states:
                ent.touched.clear()

    def _stopped(self, meter: Any, me: Any, why: int, index: int, failed: List[Tuple[int, DeadLetter]],
                 alerts: List[Any]) -> None:
        """Where the native fold stopped at event ``me`` (``why``): 3, it reached a level (the Python check); 1, a
        line the native decoder leaves to Python (the Mediator's event, folded natively); 2, no billing period
        (the Python fold's dead letter)."""
        core = self._core
        if why == 3:
            self._check(meter, me, core.take_stops(meter.key), alerts)
        elif why == 1:
            ev = me.event
            try:
                core.fold(index, ev.tenant_id, ev.customer_id, fingerprint(ev.event_id), ev.event_type, me.ts, me.wm,
                          me.excluded, ev.correction, [(k, _value(v)) for k, v in ev.properties.items()])
            except ValueError:
                why = 2
            else:
                stops = core.take_stops(meter.key)
                if stops:
                    self._check(meter, me, stops, alerts)
        if why == 2:
            sub = meter.ent.rule
            text = meter._bounds(me.ts, sub.period, sub.anchor_ms)
            failed.append((index, dead_letter("invalid_event", str(text), me.src, me.raw, meter.tenant_id)))
            self._invalid += 1

    def _note(self, meter: Any, me: Any, reason: str, a: Any, b: Any, c: Any) -> DeadLetter:
        """A meter dead letter the native fold decided (too_late, missing_property), worded by the Python fold."""
        if reason == "too_late":
            return meter._too_late(me, a, b, c)
        prop = self._prop[a]
        return meter._missing_property(me, a, prop, me.event.properties.get(prop))

    def _usage_of(self, meter: Any) -> Callable[[Tuple[str, int, int]], Optional[float]]:
        """``meter.usage`` as the Python fold sees it mid-batch: the native row's value (a row the meter
        evicted, unchanged since, is gone)."""
        core, key, periods, agg = self._core, meter.key, meter.periods, self._agg

        def usage(pk: Tuple[str, int, int]) -> Optional[float]:
            r = core.period_value(key, pk[0], pk[1], pk[2])
            if r is None or not r[3] and pk not in periods:
                return None
            if agg[pk[0]] in ("count", "sum"):
                # (no float part: SumAcc.value's float of the int part, which an i128 never overflows)
                return sum_value(r[1], r[2]) if r[2] else float(r[1])
            return float(r[2])  # max/min/latest: the value kept; unique_count: the number of distinct values

        return usage

    def _check(self, meter: Any, me: Any, stops: List[Tuple[str, Any, Any]], alerts: List[Any]) -> None:
        """The entitlement check of the Python fold (CustomerMeter._fold) for the evaluated metrics ``me`` folded
        into periods ``stops``: the current period advanced, thresholds and the block evaluated when usage reaches
        the period's level; then the new level to the native fold (-inf while blocked: every event is checked).
        A stop ``(code, None, value)`` is the metric's anomaly cell (:meth:`_anomaly`), run where the Python fold
        adds to it: after the period advanced, before the thresholds."""
        core, ent, key = self._core, meter.ent, meter.key
        usage_of = self._usage_of(meter)
        n = len(stops)
        j = 0
        while j < n:
            code, ps, pe = stops[j]
            j += 1
            if ps is None:
                self._anomaly(meter, me, code, pe, alerts)
                continue
            pk = (code, ps, pe)
            info = ent.infos.get(code)
            sp = ent.spends.get(code)
            cur = ent.cur.get(code)
            if cur is None or cur[1] < ps:
                ent.advance(code, pk, me, usage_of, alerts)
                if cur is not None:
                    core.set_level(key, code, cur[1], cur[2], None)  # its level no longer includes the block
            if j < n and stops[j][1] is None and stops[j][0] == code:  # (the metric's anomaly cell)
                self._anomaly(meter, me, code, stops[j][2], alerts)
                j += 1
            usage = usage_of(pk)
            if info is not None:
                lvl = ent.next_level.get(pk)
                if lvl is None:
                    lvl = ent.level(pk, info)
                if usage >= lvl or pk in ent.blocked:
                    ent.evaluate(code, pk, usage, me, usage_of, alerts)
                else:
                    ent.touched.add(pk)
            if sp is not None:  # spend thresholds, as the Python fold: a unit level, the exact charge above it
                slvl = ent.spend_next.get(pk)
                if slvl is None or not sp.monotone and self._may_fall(code, me):
                    slvl = ent.spend_level(pk, sp, usage)
                if usage >= slvl:
                    ent.evaluate_spend(code, pk, usage, me, alerts)
            core.set_level(key, code, ps, pe, *_level(ent, pk, info, sp))
        if not meter.rules.gateway_states:
            ent.touched.clear()

    def _anomaly(self, meter: Any, me: Any, code: str, value: Any, alerts: List[Any]) -> None:
        """The anomaly cell of metric ``code`` at event ``me``, where the native fold stopped (its add would reach
        the day's level, another UTC day, no cell yet, or an add it does not make exactly; the event is not in
        the native cell): exactly what CustomerMeter._fold does, from the native cell's ``value`` (None: the Python
        cell holds it), then the cell back to the native fold."""
        anom = meter.anom
        cur = anom.cur
        cell = cur[code]
        if value is not None:
            cell[1] = value
        day = me.ts // DAY_MS
        if cell[0] != day:
            cell = anom.cell(code, day)
        ev = me.event
        sign = -1 if ev.correction else 1
        v = ev.properties.get(self._prop[code]) if self._agg[code] != "count" else None
        cell[1] += sign if v is None else sign * v
        if cell[1] >= cell[2]:
            anom.check(code, cell, me, alerts, meter.ent.rule)
        val = cell[1]
        self._core.set_cell(meter.key, code, cell[0], val if type(val) is float or -_I128 <= val < _I128 else None,
                            cell[2], cell is cur[code])

    def _mirror_cells(self, meter: Any) -> None:
        """The usage of the customer's native anomaly cells into its ``Anomalies.cur`` (snapshot, release)."""
        if meter.anom is not None:
            cur = meter.anom.cur
            for code, day, val in self._core.cells(meter.key):
                cell = cur[code]
                if cell[0] == day:
                    cell[1] = val

    def _may_fall(self, code: str, me: Any) -> bool:
        """Whether ``me`` may have lowered ``code``'s usage (the Python fold then re-derives the spend level of a
        card that is not monotone): a correction, an aggregation that is not additive, a negative value."""
        if me.event.correction or self._agg[code] not in ("count", "sum"):
            return True
        v = me.event.properties.get(self._prop[code]) if self._agg[code] == "sum" else None
        return v is not None and v < 0

    def gateway(self, meters: Dict[str, Any]) -> Emission:
        """The live gateway state of the evaluated customers folded since the last call (call :meth:`sync`
        first), as CustomerMeter.process leaves it at the end of its batch."""
        gw: List[Any] = []
        wallets: List[Any] = []
        now = now_ms()
        for key in self.gateway_due:
            meter = meters[key]
            g, w = meter.ent.gateway(meter.usage, now)
            gw += g
            wallets += w
        self.gateway_due = set()
        return Emission(gateway=gw, wallets=wallets)

    def sync(self, meters: Dict[str, Any]) -> List[str]:
        """Mirror every row changed since the last sync into its customer's meter, as the Python fold leaves it
        (accumulators, dirty sets, expiries, the watermark, the current periods); the customers mirrored (every
        customer folded since the last sync), the least ``next_evict`` of their meters in :attr:`synced_evict`."""
        core = self._core_obj
        if core is None:
            return []
        windows, periods, excluded, _notes = core.take_changes()
        agg = self._agg
        grace = self._grace
        window_ms = self._window_ms
        bounds: Dict[Tuple[str, int], Tuple[int, int]] = {}  # the last period found per (kind, anchor)
        # (a customer's rows come one after another, mostly: its meter is looked up once per run of them; a count
        # or sum row is mirrored here, as _mirror does, the other aggregations by _mirror)
        last: Any = None
        meter: Any = None
        rows: Dict[Any, Any] = {}
        dirty: set = set()
        for key, code, ws, events, total, fs, dims in windows:
            if key is not last:
                last = key
                meter = meters[key]
                rows, dirty = meter.windows, meter.dirty_w
            wk = (code, ws, dims)
            acc = rows.get(wk)
            a = agg[code]
            if acc is None:
                sub = meter.ent.rule
                rule = (sub.period, sub.anchor_ms)
                ps, pe = bounds.get(rule, (0, 0))
                if not ps <= ws + window_ms - 1 < pe:  # (new windows mostly share their customers' periods)
                    ps, pe = bounds[rule] = period_bounds(ws + window_ms - 1, sub.period, sub.anchor_ms)
                acc = meter._new_window(wk, a, sub.period, sub.anchor_ms, ps, pe)
            _mirror(acc, a, events, total, fs)
            dirty.add(wk)
        alerts: List[Any] = []
        last = None
        evaluated = self.evaluated
        ent: Any = None
        is_evaluated = gateway = False
        for key, code, ps, pe, events, total, fs in periods:
            if key is not last:
                last = key
                meter = meters[key]
                rows, dirty, ent = meter.periods, meter.dirty_p, meter.ent
                is_evaluated = key in evaluated
                gateway = meter.rules.gateway_states
            pk = (code, ps, pe)
            acc = rows.get(pk)
            a = agg[code]
            if acc is None:
                acc = meter._new_period(pk, a)
            _mirror(acc, a, events, total, fs)
            dirty.add(pk)
            if is_evaluated:  # an evaluated metric's current period advanced at its event (_check)
                if code not in ent.infos and code not in ent.spends:
                    cur = ent.cur.get(code)
                    if cur is None or cur[1] < ps:
                        ent.advance(code, pk, None, meter.usage, alerts)
                if gateway:
                    ent.touched.add(pk)  # (gateway: each changed period, as the fold touches it)
                else:
                    ent.touched.clear()
                continue
            cur = ent.cur.get(code)  # the current period, as the fold advances it (first arrivals, in order)
            if cur is None or cur[1] < ps:
                ent.advance(code, pk, None, meter.usage, alerts)
                # (nothing of an unevaluated customer is live gateway state: the batch's end would clear it)
                ent.touched.clear()
        for key, code, ps, pe, count in excluded:
            meter = meters[key]
            pk = (code, ps, pe)
            if pk not in meter.excluded and pe + grace < meter.next_evict:
                meter.next_evict = pe + grace
            meter.excluded[pk] = count
            meter.dirty_p.add(pk)
        for key, code, day, val in core.take_cells():  # anomaly cells folded natively, into Anomalies.cur
            cell = meters[key].anom.cur[code]
            if cell[0] == day:
                cell[1] = val
        keys = []
        held = self.keys
        lowest = 1 << 62
        for key, wm in core.take_wms():
            meter = meters.get(key)
            if meter is not None and key in held:
                if wm > meter.wm:
                    meter.wm = wm
                if meter.next_evict < lowest:
                    lowest = meter.next_evict
                keys.append(key)
        self.synced_evict = lowest
        return keys

    def _seen(self, key: str) -> IdTable:
        fps, exps = self._core.export_seen(key)
        return IdTable.from_state(DedupeState(fingerprints=fps, expiries=exps))

    def before_snapshot(self, meter: Any) -> None:
        """Copy the customer's dedupe table and anomaly cells into its meter, which :meth:`CustomerMeter.snapshot`
        encodes."""
        meter.seen = self._seen(meter.key)
        self._mirror_cells(meter)

    def release(self, meter: Any) -> None:
        """The customer goes to the Python fold: its dedupe table into its meter, forgotten here (call
        :meth:`sync` first)."""
        key = meter.key
        FOLD_TALLY.add({"released": 1})
        meter.seen = self._seen(key)
        self._mirror_cells(meter)
        meter.next_dedupe_evict = meter.seen.min_expiry()
        meter._period = (0, 0)
        meter._rows = {}
        self._core.drop_customer(key)
        self.keys.discard(key)
        self.evaluated.discard(key)
        self.gateway_due.discard(key)

    def evicted(self, meter: Any) -> None:
        """The meter's flush evicted the rows its watermark closed (CustomerMeter._evict): the native core drops
        the same rows, so a long-running flow holds only open periods natively too (call :meth:`sync` first)."""
        self._core.evict_rows(meter.key, meter.wm, list({(wk[0], wk[1]) for wk in meter.windows}))

    def raise_wm(self, meter: Any) -> None:
        """The flow's watermark finalized the customer's rows: its native watermark follows."""
        self._core.raise_wm(meter.key, meter.wm)
