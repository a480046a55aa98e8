"""Read the pickled meter snapshots of builds before issue 10 (state versions 3 and 4) as today's records.

Those builds pickled, per customer, the tuple
``(version, key, seen, wm, windows, periods, excluded, dirty_w, dirty_p, entitlement_state)`` with the live
objects inside, named by their class paths: ``operators.aggregate.SumAcc`` & co., ``operators.dedupe.IdTable``
(version 4; version 3 had a dict ``{event_id: expiry}``), ``schemas.alerts.EntitlementMessage`` and the
``schemas.config`` structs of its subscription; the build between the move of the modules (000849d) and
this reader wrote the same with ``meterflow.`` in front. ``entitlement_state`` is the 16-tuple
``(fired, blocked, overage, seq, cur, src, version, cancelled, moved_plan, units, wallet_low,
wallet_exhausted, wallet_blocked, touched, deleted, wallet_dirty)``.

:func:`decode_legacy_snapshot` unpickles with a restricted :class:`pickle.Unpickler` whose ``find_class``
maps exactly those names to inert stand-ins that only record their pickled state (never to the live
classes, whose layout may change, and never to whatever else a module path found on ``sys.path`` would
import: a stray checkout's top-level ``operators`` package is not consulted), allows ``datetime`` and
msgspec's struct rebuild helper, refuses every other global, and converts the result to a
:class:`meterflow.schemas.state.MeterState`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Dict, Tuple

import msgspec

from meterflow.operators.dedupe import IdTable
from meterflow.schemas import state as S
from meterflow.schemas.alerts import EntitlementMessage

LEGACY_VERSIONS = (3, 4)

# The accumulator classes of versions 3 and 4 and the order of their slot values in the pickled state
# (Acc.__getstate__ wrote the slots base class first: events, expires, then the class's own).
_ACC_SLOTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "CountAcc": ("count", ("events", "expires", "total")),
    "SumAcc": ("sum", ("events", "expires", "total", "fscaled")),
    "MaxAcc": ("max", ("events", "expires", "best")),
    "MinAcc": ("min", ("events", "expires", "best")),
    "LatestAcc": ("latest", ("events", "expires", "ts", "last")),
    "UniqueAcc": ("unique_count", ("events", "expires", "seen")),
    "P95Acc": ("p95", ("events", "expires", "counts", "n", "p")),
    "P99Acc": ("p99", ("events", "expires", "counts", "n", "p")),
}
# Field order of the msgspec structs of an entitlement record in versions 3 and 4: the positional arguments
# of their pickles (kw_only structs pickle as msgspec._utils.rebuild(cls, {field: value}) instead).
_STRUCT_FIELDS: Dict[str, Tuple[str, ...]] = {
    "EntitlementMessage": ("tenant_id", "customer_id", "subscription", "cancelled", "published_at"),
    "SubscriptionConfig": ("tenant_id", "customer_id", "plan", "period", "anchor", "account_name", "arr",
                           "overrides", "wallet"),
    "EntitlementOverride": ("included", "thresholds", "enforcement", "overage_rate", "next_plan", "price"),
    "WalletConfig": ("balance", "credit_rates", "on_exhausted", "low_balance_pct"),
    "PriceConfig": ("model", "unit_amount", "tiers", "package_size", "package_amount", "round_up", "minimum"),
    "Tier": ("up_to", "unit_amount", "flat_amount"),
}
_STRUCT_MODULES = {"EntitlementMessage": "schemas.alerts"}  # the others lived in schemas.config


class _Stand:
    """What a pickled object of a known class becomes: the class name and its pickled state, nothing more.
    One subclass per known class (``name``); NEWOBJ + BUILD set ``state`` from the pickled slot values, REDUCE
    (a positional msgspec struct) from its fields."""

    __slots__ = ("state",)
    name = ""

    def __init__(self, *args: Any) -> None:
        fields = _STRUCT_FIELDS.get(self.name)
        if fields is None or len(args) > len(fields):
            raise pickle.UnpicklingError(f"unexpected pickled arguments for {self.name}")
        self.state: Any = dict(zip(fields, args))

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.name}>"


def _stand(name: str) -> type:
    return type(f"Pickled{name}", (_Stand,), {"__slots__": (), "name": name})


def _rebuild(cls: Any, kwargs: Dict[str, Any]) -> _Stand:  # msgspec._utils.rebuild: a kw_only msgspec struct
    if not (isinstance(cls, type) and issubclass(cls, _Stand) and cls.name in _STRUCT_FIELDS):
        raise pickle.UnpicklingError(f"unexpected struct {cls!r} in a meter snapshot")
    obj = cls.__new__(cls)
    obj.state = dict(kwargs)
    return obj


def _globals() -> Dict[Tuple[str, str], Any]:
    import datetime

    stands = {name: _stand(name) for name in (*_ACC_SLOTS, *_STRUCT_FIELDS, "IdTable")}
    out: Dict[Tuple[str, str], Any] = {("datetime", n): getattr(datetime, n)
                                       for n in ("datetime", "timezone", "timedelta", "date")}
    out[("msgspec._utils", "rebuild")] = _rebuild
    for prefix in ("", "meterflow."):
        for name in _ACC_SLOTS:
            out[(f"{prefix}operators.aggregate", name)] = stands[name]
        out[(f"{prefix}operators.dedupe", "IdTable")] = stands["IdTable"]
        for name in _STRUCT_FIELDS:
            out[(prefix + _STRUCT_MODULES.get(name, "schemas.config"), name)] = stands[name]
    return out


_GLOBALS = _globals()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a meter snapshot of state version 3 "
                                         "or 4; refusing to load it") from None


def decode_legacy_snapshot(data: bytes) -> S.MeterState:
    """The :class:`~meterflow.schemas.state.MeterState` of a pickled version 3 or 4 meter snapshot.

    ValueError for another version or a pickle that is not a meter snapshot."""
    try:
        state = _Unpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ValueError(f"unreadable pickled meter snapshot (state version 3 or 4 expected): {exc}") from exc
    if not isinstance(state, tuple) or len(state) < 2:
        raise ValueError("unrecognised pickled meter snapshot (expected a tuple of state version 3 or 4)")
    version, key = state[0], state[1]
    if version not in LEGACY_VERSIONS or len(state) != 10:
        raise ValueError(f"snapshot of {key!r} has state version {version}, this build reads {S.STATE_VERSION} "
                         f"(and converts {' and '.join(map(str, LEGACY_VERSIONS))}): start with a new recovery "
                         "directory")
    try:
        return _convert(state)
    except (TypeError, ValueError, KeyError, AttributeError, msgspec.ValidationError) as exc:
        raise ValueError(f"pickled snapshot of {key!r} (state version {version}) is malformed: {exc}") from exc


def _convert(state: tuple) -> S.MeterState:
    version, key, seen, wm, windows, periods, excluded, dirty_w, dirty_p, ent = state
    if version == 3:  # ids in a dict of strings
        ids = IdTable(reserve=len(seen))
        for eid, expiry in seen.items():
            ids.check_add_id(eid, expiry, 0)
        dedupe = ids.to_state()
    else:
        if not isinstance(seen, _Stand) or seen.name != "IdTable":
            raise ValueError(f"expected an IdTable, got {seen!r}")
        table = IdTable.__new__(IdTable)
        table.__setstate__(seen.state)  # checks its own version and lengths
        dedupe = table.to_state()
    return S.MeterState(
        key=key, version=S.STATE_VERSION, watermark=wm, seen=dedupe,
        windows=[S.WindowRow(metric=m, start=start, acc=_acc(acc), dims=tuple(dims), dirty=(m, start, dims) in dirty_w)
                 for (m, start, dims), acc in windows.items()],
        periods=[S.PeriodRow(metric=pk[0], start=pk[1], end=pk[2], acc=_acc(acc), dirty=pk in dirty_p)
                 for pk, acc in periods.items()],
        excluded=[S.ExcludedRow(metric=pk[0], start=pk[1], end=pk[2], count=n, dirty=pk in dirty_p)
                  for pk, n in excluded.items()],
        entitlements=_entitlements(ent))


def _acc(obj: Any) -> Any:
    if not isinstance(obj, _Stand) or obj.name not in _ACC_SLOTS:
        raise ValueError(f"expected an accumulator, got {obj!r}")
    kind, slots = _ACC_SLOTS[obj.name]
    st = obj.state
    # Acc.__getstate__ pickled the tuple of slot values; without it, pickle writes (None, {slot: value})
    v = st[1] if len(st) == 2 and st[0] is None and isinstance(st[1], dict) else dict(zip(slots, st))
    base = {"events": v["events"], "expires": v["expires"]}
    if kind == "count":
        return S.CountState(**base, total=v["total"])
    if kind == "sum":
        return S.SumState(**base, total=S.int_bytes(v["total"]), fscaled=S.int_bytes(v["fscaled"]))
    if kind == "max":
        return S.MaxState(**base, best=v["best"])
    if kind == "min":
        return S.MinState(**base, best=v["best"])
    if kind == "latest":
        return S.LatestState(**base, ts=v["ts"], last=v["last"])
    if kind == "unique_count":
        return S.UniqueState(**base, values=list(v["seen"]))
    counts = v["counts"]
    return (S.P95State if kind == "p95" else S.P99State)(**base, n=v["n"], values=list(counts),
                                                         counts=list(counts.values()))


def _plain(obj: Any) -> Any:
    """Stand-ins of msgspec structs as dicts (recursively), for msgspec.convert into today's classes."""
    if isinstance(obj, _Stand):
        return {k: _plain(v) for k, v in obj.state.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _entitlements(ent: tuple) -> S.EntitlementState:
    (fired, blocked, overage, seq, cur, src, version, cancelled, moved_plan, units, wallet_low, wallet_exhausted,
     wallet_blocked, touched, deleted, wallet_dirty) = ent
    ref = S.PeriodRef
    if src is not None:
        if not isinstance(src, _Stand) or src.name != "EntitlementMessage":
            raise ValueError(f"expected an EntitlementMessage, got {src!r}")
        src = msgspec.convert(_plain(src), EntitlementMessage)
    return S.EntitlementState(
        fired=[S.FiredRow(metric=pk[0], start=pk[1], end=pk[2], thresholds=sorted(ts)) for pk, ts in fired.items()],
        blocked=[ref(metric=m, start=a, end=b) for m, a, b in blocked],
        overage=[ref(metric=m, start=a, end=b) for m, a, b in overage],
        seq=[S.SeqRow(type=t, metric=pk[0], start=pk[1], end=pk[2], n=n) for (t, pk), n in seq.items()],
        current=[ref(metric=m, start=a, end=b) for m, a, b in cur.values()],
        subscription=src, version=version,
        cancelled=S.Cancelled(period=cancelled[0], anchor=cancelled[1]) if cancelled is not None else None,
        moved_plan=moved_plan, units={code: _acc(acc) for code, acc in units.items()},
        wallet_low=wallet_low, wallet_exhausted=wallet_exhausted, wallet_blocked=wallet_blocked,
        touched=[ref(metric=m, start=a, end=b) for m, a, b in touched], deleted=sorted(deleted),
        wallet_dirty=wallet_dirty)
