"""The recovery state of one customer, as named and versioned records (state version 5).

What a recovery directory holds for the meter step is, per shard, ``(1, shards, {tenant|customer: bytes})``
(plain builtins, see ``meterflow.dataflows.metering``); the bytes are one :class:`MeterState` encoded with
msgspec MessagePack by :func:`encode_meter_state`. The encoding names every field and never a Python
module or class, so moving or renaming code cannot make a snapshot unreadable, and a later build reads
this one by the field names and the ``version`` (a new field gets a default; a change of meaning gets a
new version and a converter). ``meterflow.operators.legacy_state`` reads the pickled tuples of versions 3
and 4 that builds before issue 10 wrote.

The format, field by field (all times are epoch milliseconds, UTC):

* :class:`MeterState`: ``version``, ``key`` (``tenant|customer``), ``watermark`` (the greatest event time
  the customer has seen), ``seen`` (dedupe), ``windows`` / ``periods`` (the open rollup rows),
  ``excluded`` (excluded-event counts per period), ``entitlements``, ``anomaly`` (per anomaly metric the usage
  of the days its baselines need, :class:`AnomalyRow`; empty without ``[anomaly]``). A row's ``dirty`` says it changed
  since the last flush (a resume emits it).
* Accumulators, tagged by ``kind`` (the contract's aggregation names): every one has ``events`` (events
  folded, corrections included: the row version) and ``expires`` (the watermark after which the row can
  no longer change). Event values (``best``, ``last``, ``values``, ``values``) are JSON
  scalars as MessagePack has them (str, int, float, bool); an integer beyond 64 bits, which JSON allows,
  is the MessagePack extension type 1 holding its two's-complement little-endian bytes.
* ``sum``: ``total`` is the exact sum of the integer values, ``fscaled`` the exact sum of the float
  values as an integer multiple of 2**-1074, both two's-complement little-endian bytes (any length).
* ``unique_count``: ``values`` are the distinct values: a str as itself, any other value as
  ``[type, value]`` with type ``int``, ``float`` or ``bool`` (so that 1, 1.0, true and "1" stay apart).
* ``p95`` / ``p99``: ``values`` are the distinct values, ``counts[i]`` the multiplicity of ``values[i]``,
  ``n`` their sum.
* :class:`DedupeState`: the event-id fingerprints (XXH3-64 of the id's UTF-8 bytes, see
  ``meterflow.operators.dedupe``) and their expiries, two arrays of little-endian uint64 of equal length.
* :class:`EntitlementState`: thresholds fired and blocked/overage periods per period, alert sequence
  numbers, each metric's current period, the changelog record in effect (``subscription``, the
  contract's entitlement record, and ``version``, its log position), a cancellation, the plan moved to
  by auto_overage, wallet units per metric (``sum`` accumulators) and flags, the gateway state
  still to be written (``touched``, ``deleted``, ``wallet_dirty``), and per metric whose current period closed
  and was evicted, its final usage (``final_usage``; absent in snapshots of earlier builds, read as none).
* :class:`ReviewRow`: per open period with a review item, its route index and the routes notified (a bit mask).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple, Union

import msgspec

from meterflow.schemas.alerts import EntitlementMessage

STATE_VERSION = 5  # 5: named msgpack records; 4 (pickled tuple, ids in an IdTable) and 3 are converted on read
BIGINT_EXT = 1  # MessagePack extension code of an integer beyond 64 bits


class _Rec(msgspec.Struct, frozen=True, omit_defaults=True):
    pass


class _AccState(_Rec, tag_field="kind", frozen=True):
    events: int = 0
    expires: int = 0


class CountState(_AccState, tag="count", frozen=True):
    total: int = 0


class SumState(_AccState, tag="sum", frozen=True):
    total: bytes = b""
    fscaled: bytes = b""


class MaxState(_AccState, tag="max", frozen=True):
    best: Any = None


class MinState(_AccState, tag="min", frozen=True):
    best: Any = None


class LatestState(_AccState, tag="latest", frozen=True):
    ts: Optional[int] = None
    last: Any = None


class UniqueState(_AccState, tag="unique_count", frozen=True):
    values: List[Union[str, Tuple[str, Any]]] = []


class P95State(_AccState, tag="p95", frozen=True):
    n: int = 0
    values: List[Any] = []
    counts: List[int] = []


class P99State(_AccState, tag="p99", frozen=True):
    n: int = 0
    values: List[Any] = []
    counts: List[int] = []


AccState = Union[CountState, SumState, MaxState, MinState, LatestState, UniqueState, P95State, P99State]


class WindowRow(_Rec, frozen=True):
    metric: str
    start: int
    acc: AccState
    dims: Tuple[str, ...] = ()  # the values of the metric's group_by, in its order
    dirty: bool = False


class PeriodRow(_Rec, frozen=True):
    metric: str
    start: int
    end: int
    acc: AccState
    dirty: bool = False


class ExcludedRow(_Rec, frozen=True):
    metric: str
    start: int
    end: int
    count: int
    dirty: bool = False


class DedupeState(_Rec, frozen=True):
    fingerprints: bytes = b""
    expiries: bytes = b""


class PeriodRef(_Rec, frozen=True):
    metric: str
    start: int
    end: int


class FiredRow(_Rec, frozen=True):
    metric: str
    start: int
    end: int
    thresholds: List[float]


class SeqRow(_Rec, frozen=True):
    type: str
    metric: str
    start: int
    end: int
    n: int


class Cancelled(_Rec, frozen=True):
    period: str
    anchor: int


class EntitlementState(_Rec, frozen=True):
    fired: List[FiredRow] = []
    blocked: List[PeriodRef] = []
    overage: List[PeriodRef] = []
    seq: List[SeqRow] = []
    current: List[PeriodRef] = []
    subscription: Optional[EntitlementMessage] = None
    version: int = -1
    cancelled: Optional[Cancelled] = None
    moved_plan: Optional[str] = None
    units: Dict[str, SumState] = {}
    wallet_low: bool = False
    wallet_exhausted: bool = False
    wallet_blocked: bool = False
    touched: List[PeriodRef] = []
    deleted: List[str] = []
    wallet_dirty: bool = False
    spend_fired: List[FiredRow] = []  # spend_thresholds fired per period (amounts in the thresholds field)
    changes: int = 0  # subscription changes applied so far (part of every rated row's version)
    unrated: List[str] = []  # metrics whose price a change took away: their open rated rows leave deleted
    # per metric, the final usage of its current period once that closed and its rows were evicted (absent in
    # snapshots of earlier builds: then such a period's unblocked alert reports 0 and it has no gateway state)
    final_usage: Dict[str, float] = {}


class ReviewRow(_Rec, frozen=True):
    """The review item of one open period (README: Overage review queue): its route (an index into
    ``[review] routes``) and the routes already notified of it (bit i: route i)."""

    metric: str
    start: int
    end: int
    route: int = 0
    notified: int = 0


class AnomalyRow(_Rec, frozen=True):
    """One anomaly metric's daily usage (``meterflow.operators.anomaly``): days are UTC days since the epoch."""

    metric: str
    first: int  # the first day with an accepted event of the metric
    start: int  # the day of usage[0]
    # usage of days start, start + 1, ...(the last is the latest day): int or float; Any, because an int beyond 64
    # bits is a MessagePack extension (encode_meter_state), which msgspec hands to the ext hook only for Any
    usage: List[Any] = []
    fired: List[int] = []  # days of that range whose anomaly alert fired


class MeterState(_Rec, frozen=True):
    key: str
    version: int  # always written (STATE_VERSION), whatever omit_defaults leaves out
    watermark: int = 0
    seen: DedupeState = DedupeState()
    windows: List[WindowRow] = []
    periods: List[PeriodRow] = []
    excluded: List[ExcludedRow] = []
    entitlements: EntitlementState = EntitlementState()
    reviews: List[ReviewRow] = []  # review items of open periods (absent in snapshots of earlier builds)
    anomaly: List[AnomalyRow] = []  # [anomaly] metrics' daily usage (absent in snapshots of earlier builds)


class _Header(msgspec.Struct):
    version: int
    key: str = ""


# -- integers of any size ------------------------------------------------------------------------------------

def int_bytes(n: int) -> bytes:
    """Two's-complement little-endian bytes of ``n`` (empty for 0)."""
    return n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True) if n else b""


def bytes_int(b: bytes) -> int:
    return int.from_bytes(b, "little", signed=True)


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == BIGINT_EXT:
        return bytes_int(bytes(data))
    raise msgspec.ValidationError(f"unknown MessagePack extension type {code} in a meter snapshot")


def _big_ints_as_ext(obj: Any) -> Any:
    t = type(obj)
    if t is int:
        return msgspec.msgpack.Ext(BIGINT_EXT, int_bytes(obj)) if not -(1 << 63) <= obj < 1 << 64 else obj
    if t is dict:
        return {_big_ints_as_ext(k): _big_ints_as_ext(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [_big_ints_as_ext(v) for v in obj]
    return obj


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(MeterState, ext_hook=_ext_hook)
_HEADER = msgspec.msgpack.Decoder(_Header, ext_hook=_ext_hook)


def encode_meter_state(state: MeterState) -> bytes:
    """The snapshot bytes of ``state`` (a MessagePack map; never starts with 0x80, the first byte of a pickle)."""
    try:
        return _ENCODER.encode(state)
    except OverflowError:  # an event value is an integer beyond 64 bits (rare): the same map, with extensions
        return _ENCODER.encode(_big_ints_as_ext(msgspec.to_builtins(state, builtin_types=(bytes, datetime))))


def unknown_version(key: str, version: Any) -> str:
    """What to say of a meter snapshot of a state version this build does not read (newer: written by a later
    build; anything else: not a meterflow snapshot of any release)."""
    said = f"snapshot of {key!r} has state version {version!r}"
    if type(version) is int and version > STATE_VERSION:
        return (f"{said}, newer than this build reads ({STATE_VERSION}; it converts 3 and 4): the recovery "
                f"directory was written by a later meterflow; resume it with that build (or a later one), or start "
                f"with a new recovery directory")
    return (f"{said}, which this build does not read (it reads {STATE_VERSION} and converts 3 and 4): start with "
            f"a new recovery directory")


def decode_meter_state(data: bytes) -> MeterState:
    """The :class:`MeterState` of snapshot bytes of version 5; ValueError for another version."""
    try:
        head = _HEADER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a meter snapshot: {exc}") from exc
    if head.version != STATE_VERSION:
        raise ValueError(unknown_version(head.key, head.version))
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"snapshot of {head.key!r} (state version {STATE_VERSION}) is malformed: {exc}") from exc
