"""Mediation: decode, validate, normalise to UTC, check the tenant, mark exclusions, key.

Runs on whole batches (``flat_map_batch``). For one input batch it returns one :class:`Mediated`: the
accepted events grouped per ``tenant|customer`` key, and the batch's dead letters, so the rest of the flow
handles items per key and batch rather than per event.

:func:`bundle_shards` bundles the customers' groups per shard (what the dataflow routes,
``pipeline.shards``): one ``(shard key, {tenant|customer: [MeteredEvent, ...]})`` item per shard that has
events in the batch, the shard being :func:`shard_of` the customer key. Bytewax then routes a few dozen
items per batch rather than one per customer, and one keyed logic per shard holds that shard's customers.
The Bytewax operator with typed outputs (events to the shards, dead letters to the sinks) is
:func:`meterflow.dataflows.mediation.mediate`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from array import array
from itertools import accumulate
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import msgspec

from meterflow.base.keys import KEY_SEP
from meterflow.base.stats import STATS, FlowStats
from meterflow.base.timeutil import Rfc3339Parser, ms_to_iso, now_ms
from meterflow.schemas.config import Config
from meterflow.schemas.events import EVENT_DECODER, UsageEvent
from meterflow.schemas.records import DeadLetter, RawEvents

MAX_DEPTH = 64  # an event nested deeper than this anywhere (unknown fields included) is invalid
# The latest event time metered whatever the clock and pipeline.max_clock_skew say (9000-01-01T00:00:00Z): billing
# periods and windows of anything accepted then stay far inside the datetime range (year 9999).
LAST_EVENT_MS = 221_845_392_000_000


def shard_of(key: str, shards: int) -> str:
    """The shard (a Bytewax state key) of a ``tenant|customer`` key: CRC-32 of its UTF-8 bytes modulo
    ``shards``. Stable across processes, restarts and Python versions (unlike ``hash``), so a customer's
    events, its changelog records and its recovered state always meet in the same shard.

    >>> shard_of("acme|cust_456", 64), shard_of("acme|cust_456", 64) == shard_of("acme|cust_456", 64)
    ('8', True)
    """
    return str(zlib.crc32(key.encode()) % shards)


def format_source(src: Any) -> str:
    """Render a source location: ``(topic, partition, offset)`` -> ``topic/partition/offset``,
    ``(path, line)`` -> ``path:line``.

    >>> format_source(("usage.events", 0, 42))
    'usage.events/0/42'
    >>> format_source(("events.jsonl", 7))
    'events.jsonl:7'
    """
    if isinstance(src, tuple):
        if len(src) == 3:
            return f"{src[0]}/{src[1]}/{src[2]}"
        if len(src) == 2:
            return f"{src[0]}:{src[1]}"
    return str(src)


def dead_letter(reason: str, detail: str, src: Any, payload: Optional[bytes], tenant_id: str = "",
                metric: str = "", received_at: Optional[int] = None) -> DeadLetter:
    """A dead-letter record with a deterministic id (same input, same id: replays overwrite)."""
    source = format_source(src)
    body = payload or b""
    h = hashlib.blake2b(digest_size=16)
    for part in (source.encode(), reason.encode(), metric.encode(), body):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return DeadLetter(dl_id=h.hexdigest(), reason=reason, detail=detail[:1000], source=source,
                      tenant_id=tenant_id, metric=metric, payload=body,
                      received_at=now_ms() if received_at is None else received_at)


class MeteredEvent(msgspec.Struct, frozen=True, gc=False):
    """A validated event on its way to its customer's state.

    ``ts`` is event time in epoch ms (UTC); ``wm`` is the watermark (greatest event
    time this process had seen) when it arrived; ``src``/``raw`` locate and keep
    the original for dead letters raised later (too_late, missing_property).
    """

    event: UsageEvent
    ts: int
    wm: int
    src: Any
    raw: bytes
    excluded: bool
    ingested: int = 0  # when mediation read it (epoch ms), for breach-to-alert latency


class Mediated(NamedTuple):
    """One batch through mediation: the accepted events per ``tenant|customer`` key, in arrival order
    (keys in order of their first event), and the batch's dead letters, in arrival order."""

    groups: Dict[str, List[MeteredEvent]]
    dead_letters: List[DeadLetter]


Bundle = Dict[str, List[MeteredEvent]]  # one shard's share of a batch: {tenant|customer: [MeteredEvent, ...]}


def bundle_shards(groups: Dict[str, List[MeteredEvent]], shards: int) -> List[Tuple[str, Bundle]]:
    """``(shard, {tenant|customer: events})`` for every shard with events in ``groups``, each shard's
    customers in the order of ``groups`` (the shard of a key is :func:`shard_of`).

    >>> [(shard, list(bundle)) for shard, bundle in bundle_shards({"acme|a": [], "acme|b": [], "beta|a": []}, 2)]
    [('0', ['acme|a', 'acme|b']), ('1', ['beta|a'])]
    """
    by_shard: Dict[str, Bundle] = {}
    crc32 = zlib.crc32
    for key, group in groups.items():
        shard = str(crc32(key.encode()) % shards)  # shard_of, inlined: once per customer and batch
        bundle = by_shard.get(shard)
        if bundle is None:
            by_shard[shard] = {key: group}
        else:
            bundle[key] = group
    return list(by_shard.items())


_ENCODE_JSON = msgspec.json.Encoder().encode


def raw_columns(groups: Dict[str, List[MeteredEvent]]) -> Optional[RawEvents]:
    """The accepted events of one batch (:attr:`Mediated.groups`, duplicates and excluded events included) as
    the columns of the raw archive, None for a batch without any. One list comprehension per column: the
    per-event work is attribute reads and one msgspec encode of the properties, all in C but the loop.

    >>> from meterflow.schemas.events import EVENT_DECODER
    >>> ev = EVENT_DECODER.decode(b'{"event_id":"e1","tenant_id":"t","customer_id":"c","event_type":"x",'
    ...                           b'"timestamp":5,"properties":{"n":1.5}}')
    >>> cols = raw_columns({"t|c": [MeteredEvent(ev, 5, 5, ("in.jsonl", 3), b"", False, 9)]})
    >>> cols.source, cols.position, cols.properties, cols.ingested_at
    (['in.jsonl:3'], [3], ['{"n":1.5}'], [9])
    """
    mes = [me for group in groups.values() for me in group]
    if not mes:
        return None
    evs = [me.event for me in mes]
    srcs = [me.src for me in mes]
    enc = _ENCODE_JSON
    return RawEvents(
        tenant_id=[e.tenant_id for e in evs], customer_id=[e.customer_id for e in evs],
        event_id=[e.event_id for e in evs], event_type=[e.event_type for e in evs],
        timestamp=[me.ts for me in mes],
        properties=[enc(e.properties).decode() if e.properties else "{}" for e in evs],
        correction=[e.correction for e in evs], ingested_at=[me.ingested for me in mes],
        source=[format_source(s) for s in srcs],
        position=[s[-1] if type(s) is tuple and type(s[-1]) is int else 0 for s in srcs])


class _TenantRule(msgspec.Struct, frozen=True):
    exclude_when: Tuple[Tuple[str, Any], ...]
    excluded_customers: FrozenSet[str]


class Mediator:
    """Stateless per event except for the process watermark; call it with a batch of ``(src, raw)``."""

    def __init__(self, cfg: Config, stats: FlowStats = STATS, clock: Callable[[], int] = now_ms) -> None:
        self._tenants: Dict[str, _TenantRule] = {
            t.id: _TenantRule(tuple(t.exclude_when.items()), frozenset(t.excluded_customers)) for t in cfg.tenants
        }
        self._max_bytes = cfg.pipeline.max_event_bytes
        self._max_skew = cfg.pipeline.max_clock_skew_ms
        self._skew_text = cfg.pipeline.max_clock_skew
        self._clock = clock  # wall clock (epoch ms) for the clock-skew rule, read once per batch
        self._stats = stats
        self._parse_ts = Rfc3339Parser()
        self.watermark = 0

    def observe_watermark(self, ms: int) -> None:
        """Raise the process watermark (a resumed customer state reports the watermark it had seen)."""
        if ms > self.watermark:
            self.watermark = ms

    def __call__(self, batch: List[Tuple[Any, Optional[bytes]]]) -> Mediated:
        groups: Dict[str, List[MeteredEvent]] = {}
        dead: List[DeadLetter] = []
        tenants = self._tenants
        decode = EVENT_DECODER.decode
        find = bytes.find
        max_bytes = self._max_bytes
        wm = self.watermark
        ingested = now_ms()
        now = ingested if self._clock is now_ms else self._clock()
        horizon = min(now + self._max_skew, LAST_EVENT_MS)  # the latest event time accepted
        parse_ts = self._parse_ts
        for src, raw in batch:
            # One bad event must never stop the flow: anything unforeseen that one event's bytes raise here
            # becomes that event's dead letter (a try costs nothing until it raises).
            try:
                if not raw:
                    dead.append(dead_letter("invalid_json", "empty message (no bytes)", src, raw))
                    continue
                if len(raw) > max_bytes:
                    dead.append(dead_letter("invalid_event", f"payload of {len(raw)} bytes exceeds "
                                            f"pipeline.max_event_bytes={max_bytes}", src, raw))
                    continue
                # Nesting: a well-formed event has two '{' and no '['; anything more is measured exactly.
                if (find(raw, b"[") >= 0 or find(raw, b"{", find(raw, b"{", 1) + 1) >= 0) and too_deep(raw):
                    dead.append(dead_letter("invalid_event", f"nested deeper than {MAX_DEPTH} levels "
                                            f"(arrays and objects, unknown fields included)", src, raw))
                    continue
                try:
                    ev = decode(raw)
                except msgspec.ValidationError as exc:
                    # msgspec validates while it parses: tell a schema problem from broken JSON.
                    dead.append(dead_letter(_schema_or_syntax(raw), str(exc), src, raw))
                    continue
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    dead.append(dead_letter("invalid_json", str(exc), src, raw))
                    continue
                stamp = ev.timestamp
                if isinstance(stamp, str):
                    try:
                        ts = parse_ts(stamp)
                    except ValueError as exc:
                        dead.append(dead_letter("invalid_event", f"{exc} - at `$.timestamp`", src, raw))
                        continue
                else:  # epoch milliseconds (the schema allows str or int only)
                    ts = stamp
                if ts > horizon or ts < 0:
                    why = _bad_time(ts, now, self._skew_text, self._max_skew)
                    dead.append(dead_letter("invalid_event", why, src, raw))
                    continue
                rule = tenants.get(ev.tenant_id)
                if rule is None:
                    dead.append(dead_letter("unknown_tenant", f"tenant {ev.tenant_id!r} is not in the tenant "
                                            "registry ([[tenants]] in the config)", src, raw, tenant_id=ev.tenant_id))
                    continue
                is_excluded = ev.customer_id in rule.excluded_customers
                if not is_excluded and rule.exclude_when:
                    props = ev.properties
                    is_excluded = matches(props, rule.exclude_when)
                key = ev.tenant_id + KEY_SEP + ev.customer_id
                if ts > wm:
                    wm = ts
                item = MeteredEvent(ev, ts, wm, src, raw, is_excluded, ingested)
                group = groups.get(key)
                if group is None:
                    groups[key] = [item]
                else:
                    group.append(item)
            except Exception as exc:  # a bug, not bad input: say so, keep the event, keep going
                dead.append(internal_error("mediation", exc, src, raw))
        if wm > self.watermark:
            self.watermark = wm
        self._stats.add({"read": len(batch), "dead_lettered": len(dead)})
        return Mediated(groups, dead)


_MISSING = object()


def matches(props: Dict[str, Any], wanted: Tuple[Tuple[str, Any], ...]) -> bool:
    """Exact JSON equality of every wanted property: ``true`` does not match ``1``, ``"1"`` does not match ``1``.

    >>> matches({"environment": "test", "n": 1}, (("environment", "test"),))
    True
    >>> matches({"synthetic": 1}, (("synthetic", True),))
    False
    """
    for k, v in wanted:
        p = props.get(k, _MISSING)
        if p != v or (type(p) is bool) is not (type(v) is bool):
            return False
    return True


def _schema_or_syntax(raw: bytes) -> str:
    try:
        msgspec.json.decode(raw)  # nested at most MAX_DEPTH deep (checked before), so no RecursionError
    except msgspec.ValidationError:  # well-formed JSON whose values msgspec refuses (e.g. 1e400)
        return "invalid_event"
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "invalid_json"
    return "invalid_event"


def internal_error(step: str, exc: BaseException, src: Any, raw: Optional[bytes], tenant_id: str = "") -> DeadLetter:
    """The dead letter of an event that made ``step`` raise unexpectedly: a bug, reported with the exception
    instead of stopping the flow (reason ``internal_error``; the event is not counted anywhere else)."""
    try:
        why = str(exc)
    except Exception:  # even the message may fail (e.g. an int too long to print)
        why = "(message unavailable)"
    payload = raw if raw is None or type(raw) is bytes else repr(raw).encode()
    return dead_letter("internal_error", f"{step} raised {type(exc).__name__}: {why[:300]} (a meterflow bug: "
                       "please report it with this dead letter)", src, payload, tenant_id)


def _bad_time(ts: int, now: int, skew: str, skew_ms: int) -> str:
    if ts < 0:
        return f"timestamp {_iso(ts)} is before 1970-01-01T00:00:00Z - at `$.timestamp`"
    if ts <= now + skew_ms:
        return f"timestamp {_iso(ts)} is after 9000-01-01T00:00:00Z, the last time meterflow meters - at `$.timestamp`"
    return (f"timestamp {_iso(ts)} is more than pipeline.max_clock_skew = {skew!r} ahead of the wall clock "
            f"{_iso(now)} when the event was read (is the producer's clock wrong?) - at `$.timestamp`")


def _iso(ms: int) -> str:
    try:
        return ms_to_iso(ms)
    except (OverflowError, ValueError):  # beyond year 9999 (or before year 1): show the number
        return f"{ms} (epoch ms)"


# A JSON string: possessive, and ending at the closing quote or at the end of the input, so every match
# succeeds and the substitution stays linear whatever the bytes (no retries from inside a broken string).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.|\\\Z)*+(?:"|\Z)', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count).

    Exact for well-formed JSON; for broken JSON it is what the brackets outside strings say. Linear in the
    input, in C but for one step per bracket.

    >>> nesting_depth(b'{"a": [1, {"b": "]]"}], "c": {}}'), nesting_depth(b'7'), nesting_depth(b'[[[]]]')
    (3, 0, 3)
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET).translate(_BRACKET_STEP)
    return max(accumulate(array("b", brackets)), default=0)


def too_deep(raw: bytes) -> bool:
    """Whether ``raw`` nests deeper than :data:`MAX_DEPTH` (only measured when it has enough brackets)."""
    return raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nesting_depth(raw) > MAX_DEPTH
