"""The metering dataflow: ingest -> mediate -> meter (dedupe + aggregate) -> sinks.

``build_flow(config, source, sinks)`` wires any source and sinks (tests pass
``TestingSource``/``TestingSink``); :func:`flow_from_config` picks them from the
configuration. ``python -m bytewax.run "meterflow.dataflows.metering:flow"`` builds the
module-level ``flow`` from ``METER_CONFIG`` (and ``METER_INPUT`` in embedded mode; a cluster's
``BYTEWAX_ADDRESSES``/``BYTEWAX_PROCESS_ID``).

The meter step is keyed by shard, not by customer: mediation bundles each batch's
customers into ``pipeline.shards`` shards (a stable hash of ``tenant|customer``) and
one :class:`_ShardLogic` per shard holds a :class:`CustomerMeter` per customer, so
Bytewax routes, schedules and snapshots a few dozen keys per batch whatever the
number of customers. Changelog records are re-keyed to their customer's shard.
Mediation (:mod:`meterflow.dataflows.mediation`) has two typed outputs: the shard bundles go
to the meter step, its dead letters straight to the sinks, merged with the meter step's outputs.

Delivery: every output is an idempotent upsert (rows carry a growing ``version``,
dead letters and alerts deterministic ids) and sinks write synchronously, so
Bytewax's at-least-once replay from the last snapshot leaves the outputs of one
clean run. Alerts, gateway state, wallets and dead letters leave with the batch
that produced them; changed rollup rows at the next flush tick (every
``pipeline.flush_interval``), pending ones being part of the snapshot.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, Sink

from meterflow.base.errors import MeterError
from meterflow.base.keys import customer_key
from meterflow.dataflows.mediation import mediate, mediate_changelog
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.entitlements import EntitlementUpdate
from meterflow.operators.mediate import Mediator, shard_of
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.native import BUNDLE, FOLD_TALLY, bundle_events, bundle_groups
from meterflow.operators.review_decisions import decision_emissions
from meterflow.operators.rules import Rules
from meterflow.schemas.config import Config, load_config
from meterflow.schemas.records import Emission

# The shards tick in this many slots of each flush interval (README: Outputs and delivery guarantees).
TICK_SLOTS = 8
SHARD_STATE_VERSION = 1  # layout of a shard's snapshot: (version, shard count, {tenant|customer: meter bytes})
# Bytewax pickles what snapshot() returns: that is only builtins (a tuple of ints and a dict of str -> bytes), so
# no class path is ever stored; the meter bytes are named records (meterflow.schemas.state, version 5), or the
# pickled tuples of versions 3/4 that builds before issue 10 wrote, which CustomerMeter converts on restore.


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _ShardLogic(StatefulBatchLogic):
    """Bytewax glue: one logic per shard (``pipeline.shards``), one :class:`CustomerMeter` per ``tenant|customer``
    key routed to the shard (:func:`meterflow.operators.mediate.shard_of`). Bytewax routes, schedules and snapshots a
    few dozen shards instead of every customer, and each shard answers a batch with at most one Emission.

    Values arrive in order: ``{tenant|customer: [MeteredEvent, ...]}`` bundles from mediation and
    :class:`EntitlementUpdate` changelog records; each customer's share goes to its meter in that order, in
    one :meth:`CustomerMeter.process` call per customer and batch. Mediation's dead letters never come here:
    they join the shards' outputs after this step (:func:`meterflow.dataflows.mediation.mediate`).

    Dead letters, alerts, gateway state and wallets leave with the batch that produced them. Changed rollup
    rows leave at flush ticks: a shard ticks once per ``pipeline.flush_interval`` of the wall clock, at its
    slot of the interval (shard number mod ``TICK_SLOTS``: the same instants in every process and run), and at
    a tick the rows of every customer of the shard changed since its last tick leave together (at once when
    the tick has passed when a batch arrives, otherwise at the notification), so each changed row is written
    once per interval, sinks get few, large batches, and no single pass of the flow does every shard's tick
    (events arriving during it would wait for all of it).
    Pending rows are part of each meter's state, so a resume re-emits them.

    Snapshots (only with recovery): ``(SHARD_STATE_VERSION, shards, {tenant|customer: bytes})``, builtins only;
    only the customers processed or flushed since the shard's last snapshot are encoded again
    (:meth:`CustomerMeter.snapshot`), the others keep their previous bytes. Resuming rebuilds every customer
    of the shard and feeds each one's watermark to the mediator; a snapshot taken with another shard count
    is refused (its customers would no longer meet their events).

    With ``pipeline.core = "native"`` (``native``: a :class:`meterflow.operators.native.NativeMeters`), the
    customers without a wallet, an auto_overage upgrade or a p95/p99 entitlement are folded by the shard's native core,
    in one call per batch, and their rows mirrored into their meters at each tick and before a snapshot
    (README: Native core).

    With live gateway state (``[redis]``), a resumed shard republishes the gateway and wallet state of
    every one of its customers once, ahead of its first batch or at once by notification (even with no
    new input): states the previous run could not write (Redis down at its end) are not lost, and a
    Redis restarted empty is refilled.
    """

    def __init__(self, rules: Rules, shards: int, resume: Any, recoverable: bool, mediator: Mediator,
                 clock: Callable[[], int] = _wall_ms, native: Any = None) -> None:
        self._rules = rules
        self._native = native  # pipeline.core = "native": a NativeMeters (operators/native.py), else None
        self._shards = shards
        self._recoverable = recoverable
        self._interval = rules.flush_ms
        self._clock = clock
        self._mediator = mediator
        self._bundle = BUNDLE if getattr(mediator, "split", None) is not None else None  # native mediation
        # Finality of silent customers: at each tick, rows closed by the flow's watermark as it was at the
        # previous tick (events mediated before then have reached their shard) leave final (on_eof: as it is).
        self._wm_lag = 0
        self._open_min = 1 << 62  # the earliest expiry of any customer's rows (a tick is needed before it)
        self._meters: Dict[str, CustomerMeter] = {}
        self._dirty: Set[str] = set()  # customers with changed rows waiting for the next tick
        self._native_pending = False  # customers folded natively since the last tick (_sync_native names them)
        # The native customers of the batch whose tick is due: flushed at that tick whatever they changed, as
        # process(flush=True) flushes a Python-fold customer of that batch (its watermark may have closed rows).
        # A customer folded only in earlier batches flushes only rows it changed, as the Python fold's dirty set.
        self._due_native: Set[str] = set()
        self._changed: Set[str] = set()  # customers whose state changed since the last snapshot
        self._snaps: Dict[str, bytes] = {}  # every customer's latest snapshot
        self._next_flush = 0  # epoch ms of the next tick; 0: the first batch flushes at once
        self._phase: Optional[int] = None  # this shard's tick offset in the interval (_tick_phase)
        self._notify: Optional[datetime] = None  # _next_flush as a datetime, for notify_at
        self._republish = False  # resumed with gateway state: every customer's state is still to go out
        if resume is not None:
            self._resume(resume, mediator)
            self._republish = rules.gateway_states and bool(self._meters)

    def _resume(self, state: Any, mediator: Mediator) -> None:
        snaps = shard_snapshots(state, self._shards)
        rules = self._rules
        for key, data in snaps.items():
            try:
                meter = CustomerMeter.from_snapshot(rules, data)
            except ValueError as exc:  # a state version this build does not read, or a damaged record
                raise MeterError(f"cannot resume from the recovery directory: {exc}") from exc
            if meter.key != key:
                raise MeterError(f"shard snapshot: the state stored for {key!r} belongs to {meter.key!r}")
            self._meters[key] = meter
            if self._native is not None:  # back to the native fold with its state, if admitted
                self._native.admit(meter)
            # The process watermark is not stored by itself: the greatest watermark any resumed
            # customer had seen is exactly the watermark at the snapshot.
            mediator.observe_watermark(meter.wm)
            self._open_min = min(self._open_min, meter.next_evict)
            if meter.has_dirty():
                self._dirty.add(key)
        self._snaps = dict(snaps)

    def _republish_all(self, out: "_Merged", now: int) -> None:
        """Once after a resume: the gateway and wallet state of every customer of the shard (ahead of
        anything this batch changes, so the batch's own states come later and win), and its anomaly markers."""
        self._republish = False
        for meter in self._meters.values():
            gateway, wallets = meter.ent.republish(meter.usage, now)
            markers = meter.anom.markers() if meter.anom is not None else []
            if gateway or wallets or markers:
                out.add(Emission(gateway=gateway, wallets=wallets, markers=markers))

    def on_batch(self, values: List[Any]) -> Tuple[List[Emission], bool]:
        out = _Merged()
        now = self._clock()
        if self._republish:
            self._republish_all(out, now)
        due = now >= self._next_flush
        bundle = self._bundle
        if bundle is not None:  # pipeline.core = "native": native mediation's shard bundles
            if len(values) == 1 and type(values[0]) is bundle or all(type(v) is bundle for v in values):
                self._native_bundles(values, out, due)
                if due:
                    self._flush_dirty(out, now)
                return out.emit(), StatefulBatchLogic.RETAIN
            values = [bundle_groups(v) if type(v) is bundle else v for v in values]  # with changelog records
        if len(values) == 1 and type(values[0]) is dict:  # the usual case: one bundle of event lists
            work: Any = [(key, [events]) for key, events in values[0].items()]
        else:
            work = self._gather(values)
        meters, dirty, rules, native = self._meters, self._dirty, self._rules, self._native
        native_work: List[Tuple[str, Any]] = []  # (key, events) of the customers the native core folds
        for key, items in work:
            meter = meters.get(key)
            if meter is None:
                meter = meters[key] = CustomerMeter(rules, key)
                if native is not None:
                    native.admit(meter)
            if native is not None and key in native.keys:
                self._native_items(key, meter, items, native_work, out, due)
            else:
                out.add(meter.process(items, flush=due))
                if native is not None and any(type(g) is EntitlementUpdate for g in items):
                    native.admit(meter)  # its new subscription may be one the native fold takes
            if meter.next_evict < self._open_min:
                self._open_min = meter.next_evict
            if not due and meter.has_dirty():
                dirty.add(key)
        if native_work:
            out.add(native.fold(meters, native_work))
            if not due:  # their rows are mirrored into their meters at the next tick (or snapshot)
                dirty.update([key for key, _ in native_work])
            else:
                self._due_native.update([key for key, _ in native_work])
            if native.gateway_due:  # live gateway state of evaluated customers: their rows mirrored now
                self._sync_native()
                out.add(native.gateway(meters))
        if self._recoverable:
            self._changed.update([key for key, _ in work])
        if due:
            self._flush_dirty(out, now)
        return out.emit(), StatefulBatchLogic.RETAIN

    def _native_bundles(self, bundles: List[Any], out: "_Merged", due: bool) -> None:
        """Native shard bundles (values of one batch, bundles only): the customers the native core folds in one
        native call per bundle; the others (new to the shard and not admitted, or on the Python fold) get their
        events as MeteredEvents, in one :meth:`CustomerMeter.process` call per customer, as on_batch does."""
        meters, native, rules = self._meters, self._native, self._rules
        python: Dict[str, List[Any]] = {}
        tally: Dict[str, int] = {}  # (the customers admitted or not, added to FOLD_TALLY once)
        for b in bundles:
            unknown = native.unknown(b)
            if not unknown:
                continue
            keys = b.keys()
            for k in unknown:
                key = keys[k]
                meter = meters.get(key)
                if meter is None:
                    meter = meters[key] = CustomerMeter(rules, key)
                    if native.admit_counted(meter, tally):
                        continue
                items = python.get(key)
                if items is None:
                    python[key] = [bundle_events(b, k)]
                else:
                    items.append(bundle_events(b, k))
        if tally:
            FOLD_TALLY.add(tally)
        dirty = self._dirty
        for key, items in python.items():
            meter = meters[key]
            out.add(meter.process(items, flush=due))
            if meter.next_evict < self._open_min:
                self._open_min = meter.next_evict
            if not due and meter.has_dirty():
                dirty.add(key)
        dead_letters, alerts = out.dead_letters, out.alerts
        for b in bundles:
            dead, raised = native.fold_bundle_parts(meters, b)
            if dead:
                dead_letters += dead
            if raised:
                alerts += raised
        if not due:  # the native rows are mirrored into their meters at the next tick (or snapshot), which
            # adds their customers to the dirty set (every customer folded since the last sync: NativeMeters.sync)
            self._native_pending = True
        else:
            for b in bundles:
                self._due_native.update(b.keys())
        if self._recoverable:
            for b in bundles:
                self._changed.update(b.keys())
        if native.gateway_due:  # live gateway state of evaluated customers: their rows mirrored now
            self._sync_native()
            out.add(native.gateway(meters))

    def _native_items(self, key: str, meter: CustomerMeter, items: List[Any], native_work: List[Tuple[str, Any]],
                      out: "_Merged", due: bool) -> None:
        """A customer the native core folds: its event lists join ``native_work``. At a changelog record it moves
        to the Python fold (its meter processes the record and what follows), then comes back with its state
        if :meth:`NativeMeters.admits` its new subscription."""
        for pos, group in enumerate(items):
            if type(group) is EntitlementUpdate:
                native = self._native
                before = [(key, g) for g in items[:pos]]
                if before:
                    # (folded here, before the record: not again with native_work, where they were appended)
                    del native_work[len(native_work) - pos:]
                    out.add(native.fold(self._meters, before))
                self._sync_native()
                if native.gateway_due:
                    out.add(native.gateway(self._meters))
                native.release(meter)
                out.add(meter.process(items[pos:], flush=due))
                if not due and meter.has_dirty():
                    self._dirty.add(key)
                native.admit(meter)  # back to the native fold, with its state, if its new subscription allows
                return
            native_work.append((key, group))

    def _sync_native(self) -> None:
        """The rows the native core changed into their customers' meters (then they flush and snapshot as
        the Python fold's do)."""
        native = self._native
        keys = native.sync(self._meters)
        if keys:
            self._dirty.update(keys)
            if native.synced_evict < self._open_min:
                self._open_min = native.synced_evict

    @staticmethod
    def _gather(values: List[Any]) -> List[Tuple[str, List[Any]]]:
        """Each customer's event lists and changelog records, in arrival order."""
        per: Dict[str, List[Any]] = {}
        for v in values:
            if type(v) is EntitlementUpdate:
                key = customer_key(v.message.tenant_id, v.message.customer_id)
                items = per.get(key)
                if items is None:
                    per[key] = [v]
                else:
                    items.append(v)
                continue
            for key, events in v.items():
                items = per.get(key)
                if items is None:
                    per[key] = [events]
                else:
                    items.append(events)
        return list(per.items())

    def _flush_dirty(self, out: "_Merged", now: int, wm: Optional[int] = None) -> None:
        """The tick: every pending row of the shard leaves, rows the watermark closed leave final (``wm``, by
        default the flow's watermark at the previous tick); the next tick is scheduled."""
        meters, native = self._meters, self._native
        if native is not None:
            self._sync_native()
        due_native = self._due_native
        for key in self._dirty:
            meter = meters[key]
            # (a customer of this batch was already flushed by process; one the native core folded is flushed
            # when it has rows to emit, or, if it was folded in this tick's batch, rows its watermark closed, as
            # process(flush=True) would flush it; one folded only earlier waits, as it is not in the Python
            # fold's dirty set, for its next batch or the flow's watermark to finalize it)
            evicts = meter.wm > meter.next_evict  # (the flush evicts the rows the watermark closed)
            if meter.has_dirty() or (evicts and key in due_native):
                out.add(meter.flush())
                if evicts and native is not None and key in native.keys:
                    native.evicted(meter)
        if self._recoverable:
            self._changed.update(self._dirty)
        self._dirty = set()
        self._native_pending = False
        if due_native:
            self._due_native = set()
        if wm is None:
            wm, self._wm_lag = self._wm_lag, self._mediator.watermark
        if wm > self._open_min:
            self._finalize(out, wm)
        interval = self._interval
        if interval > 0:
            phase = self._tick_phase()
            since = now - phase
            self._next_flush = since - since % interval + interval + phase
        else:
            self._next_flush = 0
        self._notify = None

    def _tick_phase(self) -> int:
        """This shard's tick offset in the interval: shard number mod TICK_SLOTS slots of interval / TICK_SLOTS,
        so the shards' ticks, and the rows they emit, are spread over the interval in TICK_SLOTS passes of the
        flow instead of one long pass in which every event waits (the shard number is its customers': any of
        them; 0 for a shard with none yet, or one shard)."""
        phase = self._phase
        if phase is None:
            if not self._meters or self._shards <= 1:
                return 0
            slots = min(self._shards, TICK_SLOTS)
            shard = int(shard_of(next(iter(self._meters)), self._shards))
            phase = self._phase = shard % slots * self._interval // slots
        return phase

    def _finalize(self, out: "_Merged", wm: int) -> None:
        """Customers whose rows the watermark ``wm`` closed emit them final, whether or not they sent anything."""
        lowest = 1 << 62
        for key, meter in self._meters.items():
            if meter.finalize_due(wm):
                out.add(meter.finalize(wm))
                if self._native is not None and key in self._native.keys:
                    self._native.raise_wm(meter)
                    self._native.evicted(meter)  # (finalize evicted the rows wm closed)
                if self._recoverable:
                    self._changed.add(key)
            if meter.next_evict < lowest:
                lowest = meter.next_evict
        self._open_min = lowest

    def notify_at(self) -> Optional[datetime]:
        if self._republish:
            return _EPOCH_DT  # now: a resumed shard need not wait for an event to republish
        if not self._dirty and not self._native_pending and self._open_min >= 1 << 62:
            return None
        if self._notify is None:
            self._notify = _EPOCH_DT + timedelta(milliseconds=self._next_flush)
        return self._notify

    def on_notify(self) -> Tuple[List[Emission], bool]:
        return self._drain()

    def on_eof(self) -> Tuple[List[Emission], bool]:
        # Every event has been mediated and delivered: the watermark as it is now closes what it closes.
        return self._drain(self._mediator.watermark)

    def _drain(self, wm: Optional[int] = None) -> Tuple[List[Emission], bool]:
        if not self._dirty and not self._native_pending and not self._republish and self._open_min >= 1 << 62:
            return [], StatefulBatchLogic.RETAIN
        out = _Merged()
        now = self._clock()
        if self._republish:
            self._republish_all(out, now)
        self._flush_dirty(out, now, wm)
        return out.emit(), StatefulBatchLogic.RETAIN

    def snapshot(self) -> Any:
        # Bytewax asks for snapshots every epoch even without recovery; only pay for them when they are kept.
        if not self._recoverable:
            return None
        snaps, meters, native = self._snaps, self._meters, self._native
        if native is not None:
            self._sync_native()
        for key in self._changed:
            if native is not None and key in native.keys:
                native.before_snapshot(meters[key])
            snaps[key] = meters[key].snapshot()
        self._changed = set()
        # A copy: Bytewax may serialise the snapshot after this logic has moved on.
        return (SHARD_STATE_VERSION, self._shards, dict(snaps))


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a shard snapshot holds only builtins, not {module}.{name}")


def load_shard_state(data: bytes) -> Any:
    """A shard's snapshot as Bytewax stored it (pickled), read without importing or calling anything:
    ``pickle.UnpicklingError`` if it names any class or function."""
    return _BuiltinsOnly(io.BytesIO(data)).load()


def shard_snapshots(state: Any, shards: Optional[int] = None) -> Dict[str, bytes]:
    """``{tenant|customer: CustomerMeter snapshot}`` of one shard's recovery snapshot, checked: the layout
    version, and (unless ``shards`` is None) that it was taken with ``shards`` shards."""
    if isinstance(state, bytes):
        raise MeterError("the recovery directory holds per-customer snapshots from a build without "
                         "pipeline.shards; resume it with that build, or start with a new recovery directory")
    version = state[0] if isinstance(state, tuple) and state else None
    if type(version) is int and version > SHARD_STATE_VERSION:
        raise MeterError(f"the recovery directory's meter snapshots have shard state version {version}, newer "
                         f"than this build reads ({SHARD_STATE_VERSION}): they were written by a later meterflow; "
                         "resume the directory with that build (or a later one), or start with a new recovery "
                         "directory")
    if not (isinstance(state, tuple) and len(state) == 3 and version == SHARD_STATE_VERSION):
        raise MeterError(f"unrecognised snapshot of the meter step (expected shard state version "
                         f"{SHARD_STATE_VERSION}); start with a new recovery directory")
    _version, taken_with, snaps = state
    if shards is not None and taken_with != shards:
        raise MeterError(f"the recovery snapshots were taken with pipeline.shards = {taken_with}, but this flow "
                         f"has pipeline.shards = {shards}: customers would be routed to shards that do "
                         f"not hold their state. Set pipeline.shards = {taken_with} (or METER_PIPELINE_SHARDS) to "
                         "resume, or start with a new recovery directory")
    return snaps


class _Merged:
    """The outputs of many customers' Emissions gathered into one (each customer's order kept): the Emission
    fields a shard produces, named once in ``FIELDS``."""

    FIELDS = ("windows", "periods", "dead_letters", "alerts", "gateway", "wallets", "rated", "reviews", "markers")
    __slots__ = FIELDS
    windows: List[Any]
    periods: List[Any]
    dead_letters: List[Any]
    alerts: List[Any]
    gateway: List[Any]
    wallets: List[Any]
    rated: List[Any]
    reviews: List[Any]
    markers: List[Any]

    def __init__(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, [])

    def add(self, em: Emission) -> None:
        for f in self.FIELDS:
            rows = getattr(em, f)
            if rows:
                getattr(self, f).extend(rows)

    def emit(self) -> List[Emission]:
        if not (self.windows or self.periods or self.dead_letters or self.alerts or self.gateway or self.wallets
                or self.rated or self.reviews or self.markers):
            return []
        return [Emission(windows=self.windows, periods=self.periods, dead_letters=self.dead_letters,
                         alerts=self.alerts, gateway=self.gateway, wallets=self.wallets, rated=self.rated,
                         reviews=self.reviews, markers=self.markers)]


_EPOCH_DT = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _drop_key(kv: Tuple[str, Emission]) -> Emission:
    return kv[1]


def build_flow(config: Config, source: Source, sinks: Sequence[Tuple[str, Sink]], flow_id: str = "meterflow",
               recoverable: bool = True, entitlements: Optional[Source] = None,
               gateway_states: Optional[bool] = None, decisions: Optional[Source] = None) -> Dataflow:
    """Wire the metering dataflow. ``source`` emits ``(src, raw_bytes)`` (or SourceChunks, schemas/chunk.py);
    every sink receives :class:`Emission`s.

    ``entitlements`` (optional) emits changelog records ``(src, raw_bytes)`` that are joined into the
    same keyed state as the events, so a subscription change applies to the customer's next event.
    ``recoverable=False`` (a run without a recovery directory) skips building state snapshots.
    ``gateway_states`` (default: whether ``[redis]`` is configured) builds the live gateway and wallet
    states (``Emission.gateway``/``wallets``), which only the Redis sink reads.
    ``decisions`` (optional) emits review decision records ``(src, raw_bytes)``: each valid one goes to the
    sinks as ``Emission.decisions`` (no keyed state), a bad one as an ``invalid_decision`` dead letter.
    """
    rules = Rules(config)
    rules.gateway_states = config.redis is not None if gateway_states is None else gateway_states
    shards = config.pipeline.shards
    native: Optional[Callable[[], Any]] = None
    mediator = Mediator(config)
    if config.pipeline.core == "native":
        from meterflow.operators.native import NativeMediator, NativeMeters, native_problem

        why = native_problem(config)
        if why is not None:
            raise MeterError(f'pipeline.core = "native": {why}; set pipeline.core = "python" (the default)')
        native = NativeMeters.factory(config)
        mediator = NativeMediator(config)  # native shard bundles (operators/native.py)
    flow = Dataflow(flow_id)
    events = mediate("mediate", op.input("ingest", flow, source), mediator, shards, config.pipeline.archive_raw)
    keyed, dead = events.events, events.dead_letters
    if entitlements is not None:
        changes = mediate_changelog("mediate_entitlements", op.input("entitlements_in", flow, entitlements),
                                    ChangelogMediator(config), shards)
        keyed = op.merge("events_and_changes", keyed, changes.events)
        dead = op.merge("all_dead_letters", dead, changes.dead_letters)
    if decisions is not None:
        decided = op.flat_map_batch("mediate_decisions", op.input("decisions_in", flow, decisions),
                                    decision_emissions)
        dead = op.merge("dead_letters_and_decisions", dead, decided)
    from meterflow.sinks.metrics import timed_logic

    logic = timed_logic(_ShardLogic)  # _ShardLogic itself unless meter run --metrics-port (then timed)
    metered = op.stateful_batch("meter", keyed,
                                lambda resume: logic(rules, shards, resume, recoverable, mediator,
                                                     native=native() if native else None))
    # Dead letters join after the meter step: they never wait for a shard, and leave in their batch's epoch.
    emissions = op.merge("emissions", op.map("drop_key", metered, _drop_key), dead)
    from meterflow.sinks.single_writer import SingleWriterSink, writer_item

    to_writer: Optional[Any] = None  # a cluster's single-writer sinks read (key, emission) pairs, routed to one process
    for name, sink in sinks:
        if isinstance(sink, SingleWriterSink):
            if to_writer is None:
                to_writer = op.map("to_single_writer", emissions, writer_item)
            op.output(name, to_writer, sink)
        else:
            op.output(name, emissions, sink)
    return flow


def sinks_from_config(config: Config, recoverable: bool = False, processes: int = 1,
                      process_id: int = 0) -> List[Tuple[str, Sink]]:
    """ClickHouse always (embedded chDB unless [clickhouse] names a server); Kafka topics in Kafka mode;
    live gateway state when [redis] is configured; the alert sinks of [alerts]. ``recoverable``: the
    flow keeps a recovery directory (the Redis sink's warning at exit says how unsent states arrive).

    ``processes`` > 1 (a Bytewax cluster; this is process ``process_id``): the outputs one process must
    own — embedded chDB and the JSONL alert file — are written by process 0 alone
    (:mod:`meterflow.sinks.single_writer`); a ClickHouse server, Kafka, Redis and webhooks by every worker."""
    from meterflow.sinks.clickhouse import ClickHouseSink

    # (without a recovery directory its inserts are batched across batches: sinks/clickhouse.py)
    sinks: List[Tuple[str, Sink]] = [("clickhouse", ClickHouseSink(config.clickhouse, coalesce=not recoverable))]
    if config.kafka is not None:
        from meterflow.sinks.kafka import AggregatedTopicSink, DeadLetterTopicSink, RatedTopicSink, ReviewTopicSink

        k = config.kafka
        # (without a recovery directory every topic's acks are checked at the next batch: sinks/kafka.py)
        sinks.append(("aggregated_topic", AggregatedTopicSink(k.bootstrap_servers, k.aggregated_topic, k.client_config,
                                                              k.outage_timeout_seconds, defer_acks=not recoverable)))
        sinks.append(("rated_topic", RatedTopicSink(k.bootstrap_servers, k.rated_topic, k.client_config,
                                                    k.outage_timeout_seconds, defer_acks=not recoverable)))
        sinks.append(("reviews_topic", ReviewTopicSink(k.bootstrap_servers, k.reviews_topic, k.client_config,
                                                       k.outage_timeout_seconds, defer_acks=not recoverable)))
        sinks.append(("dead_letter_topic", DeadLetterTopicSink(k.bootstrap_servers, k.dead_letter_topic,
                                                               k.client_config, k.outage_timeout_seconds,
                                                               defer_acks=not recoverable)))
    if config.redis is not None:
        from meterflow.sinks.redis import GatewayStateSink

        sinks.append(("redis_gateway", GatewayStateSink(config.redis, recoverable=recoverable)))
    from meterflow.sinks.alerts import alert_sinks_from_config

    # The gateway states and the alerts first: Bytewax runs the output steps of a batch in the order they were
    # added, and these are what someone is waiting for (a gateway's next call, an account manager), while a
    # ClickHouse insert of the same batch can take tens of milliseconds. The gateway state before the alerts,
    # so whoever reads a `blocked` alert finds the gateways already refusing (one pipelined round trip first,
    # about 17 us of the flow's thread per state: python -m benchmarks.redis_sink). No output promises an order.
    urgent = [s for s in sinks if s[0] == "redis_gateway"]
    sinks = urgent + alert_sinks_from_config(config, recoverable) + [s for s in sinks if s[0] != "redis_gateway"]
    from meterflow.sinks.metrics import instrument

    sinks = instrument(sinks)  # unchanged unless meter run --metrics-port
    if processes > 1:
        from meterflow.sinks.clickhouse import resolve
        from meterflow.sinks.single_writer import SingleWriterSink

        local = {"alerts_jsonl"} | ({"clickhouse"} if resolve(config.clickhouse)[2] else set())
        sinks = [(name, SingleWriterSink(sink, process_id) if name in local and isinstance(sink, DynamicSink)
                  else sink) for name, sink in sinks]
    return sinks


def source_from_config(config: Config, inputs: Sequence[str] = (), stop_at_end: bool = False) -> Source:
    """Kafka events topic when [kafka] is configured and no input is given; otherwise JSONL inputs."""
    if inputs:
        from meterflow.sources.jsonl import JsonlSource

        return JsonlSource(list(inputs))
    if config.kafka is not None:
        from meterflow.sources.kafka import KafkaEventSource

        k = config.kafka
        # (native mediation reads a consume call's messages as one chunk: schemas/chunk.py)
        return KafkaEventSource(k.bootstrap_servers, k.events_topic, k.client_config, batch_size=k.batch_size,
                                stop_at_end=stop_at_end, outage_timeout=k.outage_timeout_seconds,
                                chunks=config.pipeline.core == "native")
    raise MeterError("no input: without a [kafka] section, pass --input FILE (or - for standard input)")


def entitlements_source_from_config(config: Config, inputs: Sequence[str] = (), event_inputs: Sequence[str] = (),
                                   stop_at_end: bool = False) -> Optional[Source]:
    """The entitlements changelog: JSONL ``inputs`` if given; else the Kafka topic when Kafka feeds the events.

    A missing changelog topic is not an error (the config file's subscriptions apply); it is logged.
    """
    if inputs:
        from meterflow.sources.jsonl import JsonlSource

        return JsonlSource(list(inputs))
    if config.kafka is not None and not event_inputs:
        from meterflow.sources.kafka import KafkaEventSource

        k = config.kafka
        return KafkaEventSource(k.bootstrap_servers, k.entitlements_topic, k.client_config, batch_size=k.batch_size,
                                stop_at_end=stop_at_end, config_key="kafka.entitlements_topic", missing_ok=True,
                                outage_timeout=k.outage_timeout_seconds)
    return None


def decisions_source_from_config(config: Config, event_inputs: Sequence[str] = (),
                                 stop_at_end: bool = False) -> Optional[Source]:
    """The review decisions topic (``kafka.review_decisions_topic``) when Kafka feeds the events, else None.
    A tailing flow creates the topic when it is missing (its partitions are fixed at start, so a decision
    published later would otherwise wait for the next run); with ``stop_at_end`` a missing topic is logged."""
    if config.kafka is not None and not event_inputs:
        from meterflow.sources.kafka import KafkaEventSource, ensure_topic

        k = config.kafka
        if not stop_at_end:
            ensure_topic(k.bootstrap_servers, k.review_decisions_topic, k.client_config)
        return KafkaEventSource(k.bootstrap_servers, k.review_decisions_topic, k.client_config,
                                batch_size=k.batch_size, stop_at_end=stop_at_end,
                                config_key="kafka.review_decisions_topic", missing_ok=True,
                                outage_timeout=k.outage_timeout_seconds)
    return None


def flow_from_config(config: Config, inputs: Sequence[str] = (), stop_at_end: bool = False,
                     recoverable: bool = True, entitlements: Sequence[str] = (), processes: int = 1,
                     process_id: int = 0) -> Dataflow:
    """The flow of the configuration; ``processes``/``process_id``: this process's place in a Bytewax cluster
    (``meter run --addresses ... --process-id N``), which decides who writes the single-writer outputs."""
    return build_flow(config, source_from_config(config, inputs, stop_at_end),
                      sinks_from_config(config, recoverable, processes, process_id),
                      recoverable=recoverable,
                      entitlements=entitlements_source_from_config(config, entitlements, inputs, stop_at_end),
                      decisions=decisions_source_from_config(config, inputs, stop_at_end))


def __getattr__(name: str) -> Any:
    # `python -m bytewax.run "meterflow.dataflows.metering:flow"` reads the module attribute `flow`.
    if name != "flow":
        raise AttributeError(name)
    path = os.environ.get("METER_CONFIG")
    if not path:
        raise MeterError("set METER_CONFIG to the configuration file to run dataflows.metering:flow")
    inputs = [p for p in os.environ.get("METER_INPUT", "").split(",") if p]
    changes = [p for p in os.environ.get("METER_ENTITLEMENTS_INPUT", "").split(",") if p]
    from meterflow.base.gc_tuning import tune_gc

    # A cluster (`python -m bytewax.run ... -a "h:p;h:p" -i N`) must say so through Bytewax's own environment
    # variables, BYTEWAX_ADDRESSES and BYTEWAX_PROCESS_ID: the module cannot see bytewax.run's arguments.
    addresses = [a for a in os.environ.get("BYTEWAX_ADDRESSES", "").split(";") if a.strip()]
    built = flow_from_config(load_config(path), inputs, stop_at_end=os.environ.get("METER_STOP_AT_END") == "1",
                             entitlements=changes, processes=max(1, len(addresses)),
                             process_id=int(os.environ.get("BYTEWAX_PROCESS_ID") or 0))
    tune_gc()
    return built
