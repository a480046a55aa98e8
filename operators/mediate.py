"""Mediation: decode, validate, normalise to UTC, check the tenant, mark exclusions, key.

Runs on whole batches (``flat_map_batch``). For one input batch it returns one
``(key, [MeteredEvent, ...])`` item per ``tenant|customer`` key, plus one
:class:`Emission` holding the batch's dead letters, so the rest of the flow
handles items per key and batch rather than per event.

With ``shards`` (what the dataflow uses, ``pipeline.shards``) the customers' groups
are bundled per shard instead: one ``(shard key, {tenant|customer: [MeteredEvent, ...]})``
item per shard that has events in the batch, the shard being :func:`shard_of` the
customer key, and the dead letters as ``(shard key, Emission)`` to one of those
shards, which passes them on with its outputs. Bytewax then routes a few dozen
items per batch rather than one per customer, and one keyed logic per shard holds
that shard's customers.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import msgspec

from operators.stats import STATS, FlowStats
from operators.timeutil import Rfc3339Parser, now_ms
from schemas.config import Config
from schemas.events import EVENT_DECODER, UsageEvent
from schemas.records import DeadLetter, Emission

KEY_SEP = "|"


def customer_key(tenant_id: str, customer_id: str) -> str:
    """The state key of one customer; tenant ids never contain the separator (checked in config).

    >>> customer_key("acme", "cust_456")
    'acme|cust_456'
    """
    return tenant_id + KEY_SEP + customer_id


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


class _TenantRule(msgspec.Struct, frozen=True):
    exclude_when: Tuple[Tuple[str, Any], ...]
    excluded_customers: FrozenSet[str]


class Mediator:
    """Stateless per event except for the process watermark; call it with a batch of ``(src, raw)``."""

    def __init__(self, cfg: Config, stats: FlowStats = STATS, shards: Optional[int] = None) -> None:
        self._shards = shards  # None: one item per customer; n: one item per shard (see the module docstring)
        self._tenants: Dict[str, _TenantRule] = {
            t.id: _TenantRule(tuple(t.exclude_when.items()), frozenset(t.excluded_customers)) for t in cfg.tenants
        }
        self._max_bytes = cfg.pipeline.max_event_bytes
        self._stats = stats
        self._parse_ts = Rfc3339Parser()
        self.watermark = 0

    def observe_watermark(self, ms: int) -> None:
        """Raise the process watermark (a resumed customer state reports the watermark it had seen)."""
        if ms > self.watermark:
            self.watermark = ms

    def __call__(self, batch: List[Tuple[Any, Optional[bytes]]]) -> List[Any]:
        groups: Dict[str, List[MeteredEvent]] = {}
        dead: List[DeadLetter] = []
        tenants = self._tenants
        decode = EVENT_DECODER.decode
        max_bytes = self._max_bytes
        wm = self.watermark
        ingested = now_ms()
        parse_ts = self._parse_ts
        for src, raw in batch:
            if not raw:
                dead.append(dead_letter("invalid_json", "empty message (no bytes)", src, raw))
                continue
            if len(raw) > max_bytes:
                dead.append(dead_letter("invalid_event", f"payload of {len(raw)} bytes exceeds "
                                        f"pipeline.max_event_bytes={max_bytes}", src, raw))
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
            ts = ev.timestamp
            if type(ts) is not int:
                try:
                    ts = parse_ts(ts)
                except ValueError as exc:
                    dead.append(dead_letter("invalid_event", f"{exc} - at `$.timestamp`", src, raw))
                    continue
            rule = tenants.get(ev.tenant_id)
            if rule is None:
                dead.append(dead_letter("unknown_tenant", f"tenant {ev.tenant_id!r} is not in the tenant registry "
                                        "([[tenants]] in the config)", src, raw, tenant_id=ev.tenant_id))
                continue
            if ts > wm:
                wm = ts
            is_excluded = ev.customer_id in rule.excluded_customers
            if not is_excluded and rule.exclude_when:
                props = ev.properties
                is_excluded = matches(props, rule.exclude_when)
            key = ev.tenant_id + KEY_SEP + ev.customer_id
            item = MeteredEvent(ev, ts, wm, src, raw, is_excluded, ingested)
            group = groups.get(key)
            if group is None:
                groups[key] = [item]
            else:
                group.append(item)
        if wm > self.watermark:
            self.watermark = wm
        self._stats.add({"read": len(batch), "dead_lettered": len(dead)})
        shards = self._shards
        if shards is None:
            out: List[Any] = list(groups.items())
        else:
            by_shard: Dict[str, Dict[str, List[MeteredEvent]]] = {}
            for key, group in groups.items():
                shard = str(zlib.crc32(key.encode()) % shards)  # shard_of, inlined: once per customer and batch
                bundle = by_shard.get(shard)
                if bundle is None:
                    by_shard[shard] = {key: group}
                else:
                    bundle[key] = group
            out = list(by_shard.items())
            if dead:
                # Keyed too, to the shard of the first customer (or shard 0): the batch's dead letters then
                # leave in the same sink batch as its metered outputs instead of a separate write per batch.
                out.append((out[0][0] if out else "0", Emission(dead_letters=dead)))
            return out
        if dead:
            out.append(Emission(dead_letters=dead))
        return out


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
        msgspec.json.decode(raw)
    except msgspec.ValidationError:  # well-formed JSON whose values msgspec refuses (e.g. 1e400)
        return "invalid_event"
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "invalid_json"
    return "invalid_event"
