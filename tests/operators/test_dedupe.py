"""meterflow.operators.dedupe: fingerprint stability and IdTable against the dict[str, int] it replaces.

No timing here (see benchmarks/dedupe_table.py); only behaviour, the pinned fingerprint format and
the memory bound.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import meterflow.operators.dedupe as dedupe
from meterflow.operators.dedupe import NO_EXPIRY, IdTable, fingerprint

ROOT = Path(__file__).resolve().parents[2]

# ---- fingerprint ----------------------------------------------------------------------------------

# Computed once; they pin the snapshot format (XXH3-64, seed 0, of the UTF-8 bytes). Changing any of
# them means every stored IdTable snapshot would silently stop matching its ids.
PINNED = {
    "": 3244421341483603138,  # 0x2D06800538D394C2, XXH3-64's published empty-input value
    "a": 16629034431890738719,
    "evt_7_123456": 6138936429671516487,
    "é日本😀": 9999889393313570600,
    "x" * 256: 15118679849337335497,
    "\ud800": 15756832317056903632,  # a lone surrogate: its surrogatepass bytes
}


@pytest.mark.parametrize("event_id", list(PINNED))
def test_fingerprint_is_pinned(event_id):
    assert fingerprint(event_id) == PINNED[event_id]


def test_fingerprint_same_in_another_process_with_another_hash_seed():
    code = ("from operators.dedupe import fingerprint as f; "
            "print(f('evt_7_123456'), f('é日本😀'), hash('evt_7_123456'))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=ROOT).stdout.split()
            for seed in ("1", "2")]
    assert outs[0][:2] == outs[1][:2] == [str(PINNED["evt_7_123456"]), str(PINNED["é日本😀"])]
    assert outs[0][2] != outs[1][2]  # whereas hash() differs


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fingerprint_is_xxh3_of_utf8_and_in_range(s):
    fp = fingerprint(s)
    assert 0 < fp < 1 << 64
    assert fp == (xxhash.xxh3_64_intdigest(s.encode("utf-8", "surrogatepass")) or 1)


def test_fingerprint_maps_zero_to_one(monkeypatch):
    monkeypatch.setattr(dedupe, "_xxh3", lambda s: 0)
    assert fingerprint("whatever") == 1


# ---- IdTable unit tests ---------------------------------------------------------------------------

def test_duplicate_within_expiry():
    t = IdTable()
    fp = fingerprint("evt_1")
    assert t.check_add(fp, 1000, 0) is False
    assert t.check_add(fp, 5000, 999) is True  # still held: nothing changes
    assert t.get(fp) == 1000
    assert t.check_add(fp, 5000, 1000) is True  # expiry == wm still counts as held
    assert len(t) == 1 and fp in t


def test_reseen_after_expiry_is_new_and_takes_the_new_expiry():
    t = IdTable()
    fp = fingerprint("evt_1")
    assert not t.check_add(fp, 1000, 0)
    assert t.check_add(fp, 7000, 1001) is False  # expired (1000 < 1001), not yet evicted
    assert t.get(fp) == 7000 and len(t) == 1
    assert t.check_add(fp, 9000, 6999) is True
    assert t.min_expiry() == 7000


def test_evict_drops_exactly_the_expired_and_returns_the_min():
    t = IdTable()
    fps = {fingerprint(f"evt_{i}"): 100 + i for i in range(200)}
    for fp, e in fps.items():
        assert not t.check_add(fp, e, 0)
    assert t.min_expiry() == 100
    assert t.evict(100) == 100 and len(t) == 200  # nothing below 100: no change
    slots_before = t.slots
    assert t.evict(250) == 250
    assert len(t) == 50
    assert t.slots < slots_before  # rebuilt smaller
    for fp, e in fps.items():
        assert (fp in t) == (e >= 250)
        if e >= 250:
            assert t.check_add(fp, 0, 250) is True
    assert dict(t.items()) == {fp: e for fp, e in fps.items() if e >= 250}
    assert t.evict(10_000) == NO_EXPIRY
    assert len(t) == 0 and t.min_expiry() == NO_EXPIRY and t.slots == 8
    assert t.evict(10_001) == NO_EXPIRY


def test_check_add_id_is_check_add_of_the_fingerprint():
    a, b = IdTable(), IdTable()
    for eid in ["evt_1", "\ud800", "é", "evt_1", "\ud800"]:
        assert a.check_add_id(eid, 50, 10) is b.check_add(fingerprint(eid), 50, 10)
    assert list(a.items()) == list(b.items()) and len(a) == 3


def test_negative_expiry_is_refused_without_a_trace():
    t = IdTable()
    fp = fingerprint("evt_1")
    with pytest.raises(OverflowError):
        t.check_add(fp, -1, -5)
    assert len(t) == 0 and fp not in t
    assert not t.check_add(fp, 3, 0)
    with pytest.raises(OverflowError):
        t.check_add(fp, -1, 4)  # expired: the overwrite is refused too
    assert t.get(fp) == 3


def test_reserve_sizes_ahead_without_changing_answers():
    t = IdTable(reserve=1000)
    slots = t.slots
    assert slots == 2048 and len(t) == 0  # 1000 < 2048 * 5/8
    fps = [fingerprint(f"evt_{i}") for i in range(1000)]
    for i, fp in enumerate(fps):
        assert not t.check_add(fp, 10 if i < 990 else 20, 0)
    assert t.slots == slots  # no doubling on the way
    assert t.evict(15, reserve=len(t)) == 20
    assert len(t) == 10 and t.slots == slots  # kept for the next period's volume
    assert all(t.check_add(fp, 0, 20) for fp in fps[990:])
    assert t.evict(21) == NO_EXPIRY and t.slots == 8  # without reserve: shrunk to fit
    assert IdTable(reserve=4).slots == 8 and IdTable(reserve=5).slots == 16


def test_empty_table():
    t = IdTable()
    assert len(t) == 0 and t.min_expiry() == NO_EXPIRY == 1 << 62
    assert 5 not in t and "x" not in t and 0 not in t and -1 not in t and (1 << 64) not in t
    assert t.nbytes() == 16 * 8
    assert list(t.items()) == []


def test_growth_across_many_resizes_keeps_every_id():
    t = IdTable()
    fps = [fingerprint(f"evt_7_{i}") for i in range(50_000)]
    sizes = set()
    for n, fp in enumerate(fps, 1):
        assert t.check_add(fp, 10 + n % 1000, 5) is False
        sizes.add(t.slots)
        assert len(t) == n
        assert n < t.slots * 5 / 8  # load factor stays below 5/8
    assert len(sizes) >= 13  # 8 .. 131072 slots
    assert all(t.check_add(fp, 0, 5) for fp in fps)
    assert all(fp in t for fp in fps)
    assert t.min_expiry() == 10


def test_probe_chains_collisions_and_wraparound():
    # All four share home slot 7 (the slot is bits 1-3 of fp), the last of an 8-slot table: they chain
    # 7, 0, 1, 2.
    fps = [(j << 40) | 15 for j in range(1, 4)] + [2**64 - 1]
    t = IdTable()
    for j, fp in enumerate(fps):
        assert not t.check_add(fp, 100 + j, 0)
    assert t.slots == 8
    assert [t._a[2 * i] for i in (7, 0, 1, 2)] == fps
    for j, fp in enumerate(fps):
        assert fp in t and t.get(fp) == 100 + j
        assert t.check_add(fp, 0, 100)
    assert ((6 << 40) | 15) not in t and t.get((6 << 40) | 15) is None
    assert t.evict(102) == 102 and len(t) == 2
    assert [fp in t for fp in fps] == [False, False, True, True]


def test_pickle_round_trip_is_compact_and_behaves_the_same():
    t = IdTable()
    n = 10_000
    fps = [fingerprint(f"evt_7_{i}") for i in range(n)]
    for i, fp in enumerate(fps):
        t.check_add(fp, 1_000 + i, 0)
    blob = pickle.dumps(t, protocol=5)
    assert len(blob) <= 16 * n + 120  # ~16 B/id plus a fixed header
    u = pickle.loads(blob)
    assert type(u) is IdTable
    assert len(u) == n and u.slots == t.slots and u.min_expiry() == 1_000
    assert sorted(u.items()) == sorted(t.items())
    for i, fp in enumerate(fps[:2000]):
        assert u.check_add(fp, 0, 1_000 + i) is True
        assert u.check_add(fp, 0, 1_000 + i + 1) is False
    empty = pickle.loads(pickle.dumps(IdTable(), protocol=5))
    assert len(empty) == 0 and empty.slots == 8 and not empty.check_add(fps[0], 3, 0) and len(empty) == 1


def test_setstate_rejects_foreign_state():
    t = IdTable()
    with pytest.raises(ValueError):
        t.__setstate__((99, b"", b""))
    with pytest.raises(ValueError):
        t.__setstate__((1, bytes(8), bytes(16)))
    with pytest.raises(ValueError):
        t.__setstate__((1, bytes(8), bytes(8)))  # a zero fingerprint


def test_memory_100k_ids_about_42_bytes_per_id():
    # 100,000 ids sit in 262,144 slots x 16 B: 41.9 B/id (the doubling cycle ranges 25.6-51.2 B/id).
    t = IdTable()
    for i in range(100_000):
        t.check_add(fingerprint(f"evt_7_{i}"), 1_700_000_000_000 + i, 0)
    assert len(t) == 100_000
    assert t.nbytes() / len(t) <= 64
    assert t.nbytes() / len(t) == pytest.approx(41.94, abs=0.01)


# ---- property test against the dict model ---------------------------------------------------------

POOL = [f"evt_{i}" for i in range(40)]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, len(POOL) - 1), st.integers(-5, 30), st.integers(0, 4)),
        st.tuples(st.just("evict"), st.integers(0, 4), st.sampled_from([0, 0, 0, 20, 100])),
        st.tuples(st.just("pickle")),
    ),
    max_size=300,
)


@given(ops)
@settings(max_examples=400, deadline=None)
def test_matches_the_dict_model(program):
    seen: dict = {}
    t = IdTable()
    by_id = IdTable()  # the same operations through check_add_id
    wm = 1_000
    reserve = 0
    for op in program:
        if op[0] == "add":
            _, idx, delta, advance = op
            wm += advance
            eid = POOL[idx]
            expiry = wm + delta  # sometimes already below wm
            expiry_old = seen.get(eid)
            dup = expiry_old is not None and expiry_old >= wm
            if not dup:
                seen[eid] = expiry
            assert t.check_add(fingerprint(eid), expiry, wm) is dup
            assert by_id.check_add_id(eid, expiry, wm) is dup
        elif op[0] == "evict":
            wm += op[1]
            expired = [e for e, x in seen.items() if x < wm]
            for eid in expired:
                del seen[eid]
            if expired:
                reserve = op[2]
            assert t.evict(wm, op[2]) == by_id.evict(wm, op[2]) == min(seen.values(), default=NO_EXPIRY)
        else:
            t = pickle.loads(pickle.dumps(t, protocol=5))
            reserve = 0
        assert dict(t.items()) == dict(by_id.items())
        assert len(t) == len(seen)
        assert t.min_expiry() == min(seen.values(), default=NO_EXPIRY)
        assert dict(t.items()) == {fingerprint(e): x for e, x in seen.items()}
        assert all((fingerprint(e) in t) == (e in seen) for e in POOL)
        assert t.nbytes() <= max(16 * 8, 16 * 2 * 8 / 5 * max(len(t), reserve) + 16)


# Raw fingerprints chosen to collide on their low bits, so probe chains, wrap-around and rebuilds
# (growth, evict, restore) are exercised far more than random 64-bit values would.
FP_POOL = sorted({(j << 50) | low for j in range(1, 9) for low in (0, 1, 7, 15, 31, 63)} | {1, 2**64 - 1})


@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(FP_POOL), st.integers(-3, 20), st.integers(0, 3)),
    st.tuples(st.just("evict"), st.integers(0, 3)),
    st.tuples(st.just("pickle")),
), max_size=300))
@settings(max_examples=300, deadline=None)
def test_colliding_fingerprints_match_the_dict_model(program):
    seen: dict = {}
    t = IdTable()
    wm = 100
    for op in program:
        if op[0] == "add":
            _, fp, delta, advance = op
            wm += advance
            old = seen.get(fp)
            dup = old is not None and old >= wm
            if not dup:
                seen[fp] = wm + delta
            assert t.check_add(fp, wm + delta, wm) is dup
        elif op[0] == "evict":
            wm += op[1]
            seen = {fp: x for fp, x in seen.items() if x >= wm}
            assert t.evict(wm) == min(seen.values(), default=NO_EXPIRY)
        else:
            t = pickle.loads(pickle.dumps(t, protocol=5))
        assert dict(t.items()) == seen and len(t) == len(seen)
        assert all((fp in t) == (fp in seen) for fp in FP_POOL)
