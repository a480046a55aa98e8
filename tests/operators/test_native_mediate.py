"""Native mediation (``pipeline.core = "native"``: operators/native.py ``NativeMediator``, native/src/mediate.rs)
against the Python Mediator on the same batches: the same dead letters in the same order (every field but the
wall-clock ``received_at``), the same shard bundles (shards, customers and events in the same order), the same
raw archive columns, watermark and counters; and bundles survive pickling (they cross workers)."""

from __future__ import annotations

import json
import pickle
import zlib
from typing import Any, Dict

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import Mediator, bundle_shards, raw_columns
from meterflow.schemas.chunk import SourceChunk, chunk_items
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import RawRows

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)

import meterflow_native  # noqa: E402

NOW = 1_793_577_600_000  # 2026-11-02T00:00:00Z: the wall clock of every batch here
BASE = NOW - 86_400_000

CFG = {
    "pipeline": {"max_event_bytes": 400, "max_clock_skew": "1h", "shards": 5},
    "tenants": [{"id": "acme", "exclude_when": {"environment": "test", "synthetic": True},
                 "excluded_customers": ["internal"]}, {"id": "beta"}],
    "metrics": [{"code": "calls", "event_type": "api_call", "aggregation": "count"}],
}

floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), floats,
                    st.text(max_size=6), st.sampled_from(["test", "prod", "\u2028", "\x00\x1f\"\\/é"]))


@st.composite
def line(draw) -> Any:
    ev: Dict[str, Any] = {
        "event_id": draw(st.sampled_from(["e1", "e2", "é3", "", "x" * 257])),
        "tenant_id": draw(st.sampled_from(["acme", "acme", "beta", "ghost", ""])),
        "customer_id": draw(st.sampled_from(["c1", "c2", "c3", "internal", "ü"])),
        "event_type": draw(st.sampled_from(["api_call", "other"])),
    }
    ts = BASE + draw(st.sampled_from([0, 1, 86_400_000 + 3_600_000, 86_400_000 + 3_600_001, -BASE - 1]))
    ev["timestamp"] = draw(st.sampled_from([ts, str(ts), _iso(ts) if ts >= 0 else "x",
                                            "2026-11-01T00:00:00+01:00", "2026-13-01T00:00:00Z", True]))
    ev["properties"] = draw(st.dictionaries(st.sampled_from(["environment", "synthetic", "n", "k\n", "é"]),
                                            scalars, max_size=4))
    if draw(st.integers(0, 5)) == 0:
        ev["correction"] = draw(st.sampled_from([True, False, 1]))
    # (compact: the properties text the raw archive may copy as it is, native/src/json.rs `props_raw`)
    raw = json.dumps(ev, ensure_ascii=draw(st.booleans()),
                     separators=(",", ":") if draw(st.booleans()) else None).encode()
    how = draw(st.integers(0, 12))
    if how == 0:
        return raw[: draw(st.integers(0, len(raw)))]
    if how == 1:
        return raw.replace(b'"event_type"', b'"event\\u005ftype"', 1)
    if how == 2:
        return b"[" * 70 + raw
    if how == 3:
        return raw.replace(b'"', b'"\xff', 1)
    if how == 4:
        return raw[:-1] + b', "pad": "' + b"p" * 400 + b'"}'
    if how == 5:
        return None
    if how == 6:
        return raw.replace(b"{", b'{"properties": {}, ', 1)  # a repeated key
    if how == 7:  # past a long ASCII run: invalid UTF-8 (a dead letter), or a valid two- or three-byte character
        bad = draw(st.sampled_from([b"\xc3", b"\xff", b"\xed\xa0\x80", b"\xe2\x82", b"\xc3\xa9", b"\xe2\x80\xa8"]))
        return raw.replace(b'"event_type": "', b'"event_type": "' + b"a" * draw(st.integers(0, 40)) + bad, 1)
    return raw


def _iso(ms: int) -> str:
    from meterflow.base.timeutil import ms_to_iso

    return ms_to_iso(ms)


sources = st.one_of(st.builds(lambda i: ("events.jsonl", i), st.integers(1, 99)),
                    st.builds(lambda p, o: ("usage.events", p, o), st.integers(0, 3), st.integers(0, 2**40)),
                    st.sampled_from(["odd-source", ("t", True), ("t",), ("t", 1, 2, 3), ("t", 2**70)]))


def _plain(me: Any) -> Any:
    return msgspec.structs.replace(me, ingested=0)


def _dl(d: Any) -> Any:
    return msgspec.structs.replace(d, received_at=0)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(st.tuples(sources, line()), max_size=12), min_size=1, max_size=4))
def test_native_mediation_equals_the_python_mediator(batches):
    cfg = parse_config(CFG, "t.toml", environ={})
    py_stats, nat_stats = FlowStats(), FlowStats()
    py = Mediator(cfg, stats=py_stats, clock=lambda: NOW)
    nat = native.NativeMediator(cfg, stats=nat_stats, clock=lambda: NOW)
    for batch in batches:
        groups, dead = py(batch)
        bundles, ndead, raw = nat.split(list(batch), True)
        assert [_dl(d) for d in ndead] == [_dl(d) for d in dead]
        want = [(s, {k: [_plain(me) for me in g] for k, g in b.items()}) for s, b in bundle_shards(groups, 5)]
        got = [(s, {k: [_plain(me) for me in g] for k, g in native.bundle_groups(b).items()}) for s, b in bundles]
        assert got == want
        again = [(s, native.bundle_groups(pickle.loads(pickle.dumps(b)))) for s, b in bundles]
        assert [(s, {k: [_plain(me) for me in g] for k, g in b.items()}) for s, b in again] == want
        cols = raw_columns(groups)
        if cols is None:
            assert raw is None
        else:
            if type(raw) is RawRows:  # the archive as RowBinary rows (native/src/mediate/archive.rs)
                raw = raw.columns()
            assert msgspec.structs.replace(raw, ingested_at=[]) == msgspec.structs.replace(cols, ingested_at=[])
            assert len(set(raw.ingested_at)) == 1 and len(raw.ingested_at) == len(cols.ingested_at)
        assert nat.watermark == py.watermark
        assert nat_stats.snapshot() == py_stats.snapshot()
    for _s, b in bundles:  # the ingested time of a batch is that of all its events
        assert {me.ingested for g in native.bundle_groups(b).values() for me in g} == {b.ingested}


# Properties texts around the raw archive's copy of the line's own text (native/src/json.rs `props_raw`): only
# msgspec's encoding is copied; whitespace, escapes, floats, "-0", big ints and repeated keys are encoded again
# (or left to Python) and come out as msgspec writes them.
PROPS_TEXTS = ['{}', '{ }', '{"a":1,"b":"x","c":true,"d":false,"e":null}', '{"a":-0}', '{"a":-0,"b":0}',
               '{"a":-12,"b":0}', '{"a":1.0}', '{"a":1.50}', '{"a":1e2}', '{"a":12345678901234567890}',
               '{"a":"x\\/y"}', '{"a":"\\u00e9"}', '{"a":"\\n"}', '{"\\u0061":1}', '{"a" :1}', '{"a": 1}',
               '{"a":1 }', '{ "a":1}', '{"a":1,\n"b":2}', '{"a":"\u2028\u00e9\x7f"}', '{"environment":"test"}',
               '{"a":1,"a":2}', '{"k\\n":"v"}', '{"a":"' + "y" * 200 + '"}']


@pytest.mark.parametrize("props", PROPS_TEXTS)
def test_the_raw_archive_of_a_properties_text_is_the_python_mediators(props):
    cfg = parse_config(CFG, "t.toml", environ={})
    py = Mediator(cfg, stats=FlowStats(), clock=lambda: NOW)
    nat = native.NativeMediator(cfg, stats=FlowStats(), clock=lambda: NOW)
    line = ('{"event_id":"e","tenant_id":"acme","customer_id":"c1","event_type":"api_call","timestamp":%d,'
            '"properties":%s}' % (BASE, props)).encode()
    batch = [(("usage.events", 1, 7), line), (("f", 2), line.replace(b'"e"', b'"e2"'))]
    groups, dead = py(batch)
    _bundles, ndead, raw = nat.split(list(batch), True)
    assert [_dl(d) for d in ndead] == [_dl(d) for d in dead]
    cols = raw_columns(groups)
    assert (raw is None) == (cols is None)
    if cols is not None:
        assert type(raw) is RawRows
        got = raw.columns()
        assert msgspec.structs.replace(got, ingested_at=[]) == msgspec.structs.replace(cols, ingested_at=[])


@st.composite
def chunk(draw) -> Any:
    """A consumed Kafka chunk (schemas/chunk.py): consecutive offsets with gaps; now and then an offset the
    native mediator does not store (beyond i64, a bool) or a topic that is not a str."""
    lines = draw(st.lists(line(), min_size=0, max_size=10))
    off = draw(st.integers(0, 2**40))
    offsets: list = []
    for _ in lines:
        offsets.append(off)
        off += draw(st.sampled_from([1, 1, 1, 2, 1000]))
    if offsets and draw(st.integers(0, 8)) == 0:
        offsets[draw(st.integers(0, len(offsets) - 1))] = draw(st.sampled_from([2**70, True, None]))
    part = draw(st.sampled_from([0, 3, 0, True]))
    return SourceChunk(draw(st.sampled_from(["usage.events", "usage.events", "other"])), part, offsets, lines)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(chunk(), max_size=3), min_size=1, max_size=4))
def test_native_mediation_of_source_chunks_equals_that_of_their_items(batches):
    """A batch of SourceChunks (the Kafka source with pipeline.core = "native") gives what its messages'
    ``((topic, part, offset), value)`` items give: the same dead letters (sources included), bundles, archive
    columns (source and position), watermark and counters (read: one per message)."""
    cfg = parse_config(CFG, "t.toml", environ={})
    py_stats, nat_stats = FlowStats(), FlowStats()
    py = native.NativeMediator(cfg, stats=py_stats, clock=lambda: NOW)
    nat = native.NativeMediator(cfg, stats=nat_stats, clock=lambda: NOW)
    for batch in batches:
        items = chunk_items(batch)
        assert len(items) == sum(len(c) for c in batch)
        bundles, dead, raw = py.split(items, True)
        nbundles, ndead, nraw = nat.split(list(batch), True)
        assert [_dl(d) for d in ndead] == [_dl(d) for d in dead]
        want = [(s, {k: [_plain(me) for me in g] for k, g in native.bundle_groups(b).items()}) for s, b in bundles]
        got = [(s, {k: [_plain(me) for me in g] for k, g in native.bundle_groups(b).items()}) for s, b in nbundles]
        assert got == want
        if raw is None:
            assert nraw is None
        else:
            cols, ncols = (r.columns() if type(r) is RawRows else r for r in (raw, nraw))
            assert msgspec.structs.replace(ncols, ingested_at=[]) == msgspec.structs.replace(cols, ingested_at=[])
        assert nat.watermark == py.watermark
        assert nat_stats.snapshot() == py_stats.snapshot()


def test_a_bad_line_inside_a_chunk_has_its_exact_source_and_the_events_around_it_stay():
    cfg = parse_config(CFG, "t.toml", environ={})
    stats = FlowStats()
    nat = native.NativeMediator(cfg, stats=stats, clock=lambda: NOW)

    def ev(i: int) -> bytes:
        return json.dumps({"event_id": f"e{i}", "tenant_id": "acme", "customer_id": "c1", "event_type": "api_call",
                           "timestamp": BASE + i}).encode()

    c = SourceChunk("usage.events", 2, [40, 41, 45, 46, 47],
                    [ev(0), ev(1), b"{not json", None, ev(4)])  # (a gap in the offsets: compacted or aborted)
    bundles, dead, raw = nat.split([c, SourceChunk("usage.events", 1, [7], [ev(5)])], True)
    assert [(d.reason, d.source) for d in dead] == [("invalid_json", "usage.events/2/45"),
                                                   ("invalid_json", "usage.events/2/46")]
    (_shard, b), = bundles
    assert [(me.event.event_id, me.src) for me in native.bundle_groups(b)["acme|c1"]] == [
        ("e0", ("usage.events", 2, 40)), ("e1", ("usage.events", 2, 41)), ("e4", ("usage.events", 2, 47)),
        ("e5", ("usage.events", 1, 7))]
    cols = raw.columns() if type(raw) is RawRows else raw
    assert (cols.source, cols.position) == (["usage.events/2/40", "usage.events/2/41", "usage.events/2/47",
                                             "usage.events/1/7"], [40, 41, 47, 7])
    assert (stats.snapshot()["read"], stats.snapshot()["dead_lettered"], nat.watermark) == (6, 2, BASE + 5)


def test_a_resumed_watermark_applies_to_native_mediation():
    cfg = parse_config(CFG, "t.toml", environ={})
    nat = native.NativeMediator(cfg, stats=FlowStats(), clock=lambda: NOW)
    nat.observe_watermark(BASE + 5)
    line = json.dumps({"event_id": "a", "tenant_id": "beta", "customer_id": "c", "event_type": "api_call",
                       "timestamp": BASE}).encode()
    bundles, dead, _raw = nat.split([(("f", 1), line)], False)
    ((_shard, b),) = bundles
    (me,) = native.bundle_events(b, 0)
    assert (me.ts, me.wm, dead, nat.watermark) == (BASE, BASE + 5, [], BASE + 5)


# Shortest digits with a tie between two of them (the float is exactly halfway): Python and msgspec take the even
# digit, Rust's own float formatting the upper one (the case hypothesis found).
TIES = [562949953421312.2, 562949953421312.6, 2.0 ** 52 + 0.5, 9007199254740993.0, 1e23, 5e-324, 1.7976931348623157e308,
        0.1 + 0.2, 1e16, 1e15, 1e-5, 1e-4, 123456789.0, -0.0, 0.0]


@settings(max_examples=400, deadline=None, database=None)
@given(f=floats)
@example(f=562949953421312.2)
def test_float_text_is_msgspecs(f):
    assert meterflow_native.float_json(f) == msgspec.json.encode(f).decode()


@settings(max_examples=400, deadline=None, database=None)
@given(f=st.floats(allow_nan=True, allow_infinity=True))
def test_float_dimension_text_is_pythons_repr(f):
    assert meterflow_native.float_repr(f) == repr(f)


def test_float_text_of_halfway_floats():
    for f in TIES + [-f for f in TIES] + [x / 8 + 2.0 ** 49 for x in range(64)]:
        assert meterflow_native.float_json(f) == msgspec.json.encode(f).decode(), f
        assert meterflow_native.float_repr(f) == repr(f), f


@settings(max_examples=200, deadline=None, database=None)
@given(key=st.text())
def test_the_shard_of_a_key_is_crc32(key):
    assert meterflow_native.crc32_of(key.encode()) == zlib.crc32(key.encode())


def test_a_bundle_state_is_checked_on_restore():
    with pytest.raises(ValueError, match="not a meterflow_native bundle state"):
        meterflow_native.Bundle(b"\x02garbage", [])


def test_a_pickled_bundle_folds_as_the_original_and_a_cut_state_is_refused():
    """The bundle carries each line's parse (native/src/mediate.rs `Parsed`): after a pickle the shard's
    native fold gives the very rows of the original, and every truncation of its state is refused."""
    cfg = parse_config(CFG, "t.toml", environ={})
    nat = native.NativeMediator(cfg, stats=FlowStats(), clock=lambda: NOW)
    lines = [json.dumps({"event_id": f"e{i % 7}", "tenant_id": "beta", "customer_id": f"c{i % 3}",
                         "event_type": "api_call", "timestamp": BASE + i, "correction": i % 5 == 4,
                         "properties": {"tokens": i, "model": "m\\u00e9" if i % 2 else "big", "x": None,
                                        "f": 1.5, "ok": True}}).encode() for i in range(40)]
    bundles, dead, _raw = nat.split([(("f", i), ln) for i, ln in enumerate(lines)], False)
    assert dead == [] and bundles

    def rows(b):
        core = meterflow_native.BatchCore(native._spec(cfg))
        for key in b.keys():
            core.hold(key)
        assert core.fold_bundle(b, 0, 0) == (len(b.keys()), 0, 0)
        w, p, x, notes = core.take_changes()
        return sorted(map(repr, w)), sorted(map(repr, p)), x, notes, core.counters()

    for _s, b in bundles:
        assert rows(pickle.loads(pickle.dumps(b))) == rows(b)
        state = b.__reduce__()[1][0]
        for cut in range(len(state)):
            with pytest.raises(ValueError, match="not a meterflow_native bundle state"):
                meterflow_native.Bundle(state[:cut], [])
        with pytest.raises(ValueError, match="not a meterflow_native bundle state"):
            meterflow_native.Bundle(b"\x01" + state[1:], [])  # a state of the version before


def _ord_at(state: bytes) -> int:
    """Where a bundle state (native/src/mediate.rs `Bundle::encode`, version 3) lists its events customer by
    customer (`ord`), after the header, the lines and the per-event records."""
    import struct
    at = 9  # version, ingested
    for _ in range(2):  # keys, source names
        (count,) = struct.unpack_from("<I", state, at)
        at += 4
        for _ in range(count):
            (ln,) = struct.unpack_from("<I", state, at)
            at += 4 + ln
    (keys,) = struct.unpack_from("<I", state, 9)
    at += 4 * (keys + 1)  # starts
    n, bl = struct.unpack_from("<II", state, at)
    return at + 8 + bl + 46 * n


def test_interleaved_customers_of_a_shard_keep_their_order_through_a_pickle_and_a_bad_order_is_refused():
    """A shard's events are kept in arrival order and listed customer by customer (`ord`): customers
    interleaved in one shard, with a line the Python Mediator decides between them, come out grouped, each in
    arrival order, before and after a pickle; a state that lists an event twice, or one that is not there,
    or is of the version before, is refused."""
    cfg = parse_config({**CFG, "pipeline": {**CFG["pipeline"], "shards": 1}}, "t.toml", environ={})
    nat = native.NativeMediator(cfg, stats=FlowStats(), clock=lambda: NOW)
    py = Mediator(cfg, stats=FlowStats(), clock=lambda: NOW)

    def ln(i: int, c: str, **props: Any) -> bytes:
        return json.dumps({"event_id": f"e{i}", "tenant_id": "beta", "customer_id": c, "event_type": "api_call",
                           "timestamp": BASE + i, "properties": props}).encode()

    batch = [(("f", i), ln(i, "abc"[i % 3])) for i in range(9)]
    batch.insert(4, (("f", 99), ln(99, "b", n=2**70)))  # an int beyond i64: the Python path decides
    batch.insert(6, ("not a source", ln(98, "c")))
    bundles, dead, _ = nat.split(list(batch), False)
    groups, pdead = py(list(batch))
    assert [_dl(d) for d in dead] == [_dl(d) for d in pdead]
    want = {k: [_plain(me) for me in g] for k, g in groups.items()}
    ((_s, b),) = bundles
    assert {k: [_plain(me) for me in g] for k, g in native.bundle_groups(b).items()} == want
    assert list(want) == ["beta|a", "beta|b", "beta|c"] and len(want["beta|b"]) == 4
    back = pickle.loads(pickle.dumps(b))
    assert {k: [_plain(me) for me in g] for k, g in native.bundle_groups(back).items()} == want
    cls, (state, events) = b.__reduce__()
    assert state[0] == 3
    at = _ord_at(state)
    assert at + 4 * len(b) <= len(state)
    first = state[at:at + 4]
    for bad in (state[:at + 4] + first + state[at + 8:],  # event listed twice
                state[:at] + (len(b)).to_bytes(4, "little") + state[at + 4:],  # no such event
                b"\x02" + state[1:]):  # the version before
        with pytest.raises(ValueError, match="not a meterflow_native bundle state"):
            cls(bad, events)
    assert native.bundle_groups(cls(state, events)).keys() == want.keys()
