"""What per-customer dedupe state costs: ``dict[str, int]`` (the meter's ``seen`` today) against
``meterflow.operators.dedupe.IdTable`` (a 64-bit fingerprint + int64 expiry per id in flat arrays), in one process.

    python -m benchmarks.dedupe_table --ids 1000000
    python -m benchmarks.dedupe_table --ids 200000 --customers 2000 --repeat 5 --json

Ids look like the real ones (``evt_<customer>_<seq>``, 10-16 ASCII chars). Every check works on a
freshly made ``str`` whose hash is not cached yet, as a freshly decoded event's id would be, and
computes its expiry (``period_end + late_grace``, a new int per event as in the meter) whether or not
the id turns out to be a duplicate.

Time (ns per check; best of ``--repeat`` runs, tracemalloc off, the loop overhead included in every
row so rows compare directly):

* one structure holding all ``--ids`` ids: the ``new`` pass inserts every id (the table grows from
  8 slots, so its doublings are included), the ``dup`` pass checks them all again (all duplicates);
* ``--customers`` structures with a Zipf-like skew (``--zipf`` exponent) and the events of all
  customers interleaved at random, each check first picking its customer's structure;
* ``check_add(fingerprint(eid), ...)`` and ``check_add_id(eid, ...)`` (what the meter calls); the latter
  again with each table sized ahead for its ids (``IdTable(reserve=n)``, what ``evict(wm, reserve=)``
  gives a customer with a steady volume): the ``new`` figure without the doublings; and
  ``fingerprint`` alone for the breakdown.

Memory (tracemalloc; bytes freed when the structure is dropped, divided by the ids it held; the ids are
made while building so only the structure keeps them alive, as in the meter where the event is gone):

* the one big structure, the whole customer population, and the population split by customer size
  (small customers are dominated by the fixed per-structure cost);
* the fixed cost of an empty structure and of one holding 1 and 4 ids;
* the pickled snapshot size per id (what recovery writes).

Numbers depend on the machine and on what else runs on it; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import sys
import time
import tracemalloc
from collections import Counter
from typing import Callable, Dict, List, Sequence

from meterflow.operators.dedupe import IdTable, fingerprint

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z, the watermark
PERIOD_END = 1_796_083_200_000
GRACE_MS = 3_600_000


# ---- workloads ------------------------------------------------------------------------------------

def single_ids(n: int) -> List[str]:
    return [f"evt_7_{i}" for i in range(n)]


def fresh(ids: Sequence[str]) -> List[str]:
    """New str objects with the same text (hash not cached), as a newly decoded event carries."""
    return [s.encode().decode() for s in ids]


def zipf_population(n: int, customers: int, s: float, seed: int) -> List[int]:
    """Customer index of each of ``n`` events, weights 1/rank**s (customer 0 the biggest)."""
    rnd = random.Random(seed)
    weights = [1.0 / (r + 1) ** s for r in range(customers)]
    return rnd.choices(range(customers), weights=weights, k=n)


def customer_ids(cust: Sequence[int]) -> List[str]:
    seq: Dict[int, int] = {}
    out = []
    for c in cust:
        k = seq.get(c, 0)
        seq[c] = k + 1
        out.append(f"evt_{c}_{k}")
    return out


# ---- the hot loops (the same shape for both; only the structure differs) --------------------------

def dict_pass(eids: Sequence[str], seen: Dict[str, int], wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    get = seen.get
    for eid in eids:
        expiry = get(eid)
        if expiry is not None and expiry >= wm:
            dup += 1
            continue
        seen[eid] = pend + grace
    return dup


def table_pass(eids: Sequence[str], table: IdTable, wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    check_add = table.check_add
    fp = fingerprint
    for eid in eids:
        if check_add(fp(eid), pend + grace, wm):
            dup += 1
    return dup


def table_id_pass(eids: Sequence[str], table: IdTable, wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    check_add_id = table.check_add_id
    for eid in eids:
        if check_add_id(eid, pend + grace, wm):
            dup += 1
    return dup


def fingerprint_pass(eids: Sequence[str], _table: object, wm: int) -> int:
    fp = fingerprint
    x = 0
    for eid in eids:
        x = fp(eid)
    return x & 0


def dict_multi(cust: Sequence[int], eids: Sequence[str], seens: List[Dict[str, int]], wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    for c, eid in zip(cust, eids):
        seen = seens[c]
        expiry = seen.get(eid)
        if expiry is not None and expiry >= wm:
            dup += 1
            continue
        seen[eid] = pend + grace
    return dup


def table_id_multi(cust: Sequence[int], eids: Sequence[str], tables: List[IdTable], wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    for c, eid in zip(cust, eids):
        if tables[c].check_add_id(eid, pend + grace, wm):
            dup += 1
    return dup


def table_multi(cust: Sequence[int], eids: Sequence[str], tables: List[IdTable], wm: int) -> int:
    dup = 0
    pend, grace = PERIOD_END, GRACE_MS
    fp = fingerprint
    for c, eid in zip(cust, eids):
        if tables[c].check_add(fp(eid), pend + grace, wm):
            dup += 1
    return dup


# ---- measurement helpers --------------------------------------------------------------------------

def best_ns(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def time_single(kind: str, ids: List[str], repeat: int) -> Dict[str, float]:
    """(new, dup) ns per check for one structure holding all ids."""
    make, loop = {
        "dict": (dict, dict_pass),
        "table": (IdTable, table_pass),
        "table_id": (IdTable, table_id_pass),
        "table_id_reserved": (lambda: IdTable(reserve=len(ids)), table_id_pass),
        "fingerprint": (IdTable, fingerprint_pass),
    }[kind]
    n = len(ids)
    best_new = best_dup = float("inf")
    for _ in range(repeat):
        first, again = fresh(ids), fresh(ids)
        s = make()
        gc.collect()
        t0 = time.perf_counter_ns()
        d1 = loop(first, s, T0)
        t1 = time.perf_counter_ns()
        d2 = loop(again, s, T0)
        t2 = time.perf_counter_ns()
        if kind != "fingerprint":
            assert d1 == 0 and d2 == n, (kind, d1, d2)
        best_new = min(best_new, (t1 - t0) / n)
        best_dup = min(best_dup, (t2 - t1) / n)
        del s, first, again
    return {"new_ns": best_new, "dup_ns": best_dup}


def time_multi(kind: str, cust: List[int], ids: List[str], customers: int, repeat: int) -> Dict[str, float]:
    counts = Counter(cust)
    make, loop = {"dict": (lambda c: {}, dict_multi), "table": (lambda c: IdTable(), table_multi),
                  "table_id": (lambda c: IdTable(), table_id_multi),
                  "table_id_reserved": (lambda c: IdTable(reserve=counts[c]), table_id_multi)}[kind]
    n = len(ids)
    best_new = best_dup = float("inf")
    order = list(range(n))
    random.Random(3).shuffle(order)  # duplicates arrive in another order than the originals
    cust2 = [cust[i] for i in order]
    for _ in range(repeat):
        first = fresh(ids)
        again = fresh([ids[i] for i in order])
        structs = [make(c) for c in range(customers)]
        gc.collect()
        t0 = time.perf_counter_ns()
        d1 = loop(cust, first, structs, T0)
        t1 = time.perf_counter_ns()
        d2 = loop(cust2, again, structs, T0)
        t2 = time.perf_counter_ns()
        assert d1 == 0 and d2 == n, (kind, d1, d2)
        best_new = min(best_new, (t1 - t0) / n)
        best_dup = min(best_dup, (t2 - t1) / n)
        del structs, first, again
    return {"new_ns": best_new, "dup_ns": best_dup}


def freed_bytes(build: Callable[[], object]) -> int:
    """Bytes tracemalloc sees released when what ``build()`` returned is dropped."""
    gc.collect()
    tracemalloc.start()
    try:
        obj = build()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        del obj
        gc.collect()
        return held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def build_dicts(groups: Dict[int, List[str]]) -> List[Dict[str, int]]:
    out = []
    for ids in groups.values():
        seen: Dict[str, int] = {}
        for s in ids:
            seen[s.encode().decode()] = PERIOD_END + GRACE_MS  # own str, own int: as in the meter
        out.append(seen)
    return out


def build_tables(groups: Dict[int, List[str]]) -> List[IdTable]:
    out = []
    for ids in groups.values():
        t = IdTable()
        for s in ids:
            t.check_add(fingerprint(s.encode().decode()), PERIOD_END + GRACE_MS, T0)
        out.append(t)
    return out


BUCKETS = [(1, 10), (11, 100), (101, 1_000), (1_001, 10_000), (10_001, 1 << 62)]


def memory(ids: List[str], cust: List[int]) -> Dict[str, object]:
    n = len(ids)
    res: Dict[str, object] = {}
    one = {0: ids}
    res["single"] = {"dict": freed_bytes(lambda: build_dicts(one)) / n,
                     "table": freed_bytes(lambda: build_tables(one)) / n}
    groups: Dict[int, List[str]] = {}
    for c, s in zip(cust, customer_ids(cust)):
        groups.setdefault(c, []).append(s)
    total = sum(len(v) for v in groups.values())
    res["population"] = {"customers": len(groups), "ids": total,
                         "dict": freed_bytes(lambda: build_dicts(groups)) / total,
                         "table": freed_bytes(lambda: build_tables(groups)) / total}
    rows = []
    for lo, hi in BUCKETS:
        part = {c: v for c, v in groups.items() if lo <= len(v) <= hi}
        if not part:
            continue
        k = sum(len(v) for v in part.values())
        rows.append({"ids_per_customer": f"{lo}-{hi}" if hi < 1 << 62 else f">{lo - 1}", "customers": len(part),
                     "ids": k, "dict": freed_bytes(lambda part=part: build_dicts(part)) / k,
                     "table": freed_bytes(lambda part=part: build_tables(part)) / k})
    res["by_size"] = rows
    fixed = {}
    for k in (0, 1, 4):
        g = {0: [f"evt_7_{i}" for i in range(k)]}
        fixed[k] = {"dict": freed_bytes(lambda g=g: build_dicts(g)[0]),
                    "table": freed_bytes(lambda g=g: build_tables(g)[0])}
    res["fixed"] = fixed
    t = build_tables(one)[0]
    d = build_dicts(one)[0]
    res["snapshot"] = {"dict": len(pickle.dumps(d, protocol=5)) / n, "table": len(pickle.dumps(t, protocol=5)) / n}
    res["table_slots"] = t.slots
    res["table_nbytes_per_id"] = t.nbytes() / n
    return res


KINDS = ("dict", "table", "table_id", "table_id_reserved", "fingerprint")

# ---- output ---------------------------------------------------------------------------------------

def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=1_000_000, help="tracked ids (default 1,000,000)")
    ap.add_argument("--customers", type=int, default=6000, help="customers they are spread over (6000)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the customer skew (1.1)")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs, the best is kept (3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = ap.parse_args(argv)

    ids = single_ids(a.ids)
    random.Random(a.seed).shuffle(ids)
    cust = zipf_population(a.ids, a.customers, a.zipf, a.seed)
    mids = customer_ids(cust)

    timing = {
        "single": {k: time_single(k, ids, a.repeat) for k in KINDS},
        "customers": {k: time_multi(k, cust, mids, a.customers, a.repeat) for k in KINDS if k != "fingerprint"},
    }
    mem = memory(ids, cust)
    out = {"ids": a.ids, "customers": a.customers, "zipf": a.zipf, "python": sys.version.split()[0],
           "timing_ns": timing, "memory_bytes_per_id": mem}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    pop = mem["population"]
    t = Table(title=f"dedupe state: {a.ids:,} ids; {pop['customers']:,} customers (Zipf {a.zipf}); "
                    f"ns per check, best of {a.repeat}")
    t.add_column("structure")
    t.add_column("one table: new", justify="right")
    t.add_column("one table: dup", justify="right")
    t.add_column("per customer: new", justify="right")
    t.add_column("per customer: dup", justify="right")
    names = {"dict": "dict\\[str, int] (baseline)", "table": "IdTable: check_add(fingerprint(id))",
             "table_id": "IdTable: check_add_id(id)",
             "table_id_reserved": "  the same, table sized ahead (reserve=)", "fingerprint": "fingerprint() alone"}
    for k, name in names.items():
        s = timing["single"][k]
        m = timing["customers"].get(k)
        t.add_row(name, f"{s['new_ns']:.0f}", f"{s['dup_ns']:.0f}",
                  f"{m['new_ns']:.0f}" if m else "", f"{m['dup_ns']:.0f}" if m else "")
    console.print(t)

    t = Table(title="bytes per tracked id (tracemalloc: freed when the structure is dropped / ids)")
    t.add_column("what")
    t.add_column("ids", justify="right")
    t.add_column("dict\\[str, int]", justify="right")
    t.add_column("IdTable", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("one structure", f"{a.ids:,}", f"{mem['single']['dict']:.1f}", f"{mem['single']['table']:.1f}",
              f"{mem['single']['dict'] / mem['single']['table']:.1f}x")
    t.add_row(f"{pop['customers']:,} customers, all", f"{pop['ids']:,}", f"{pop['dict']:.1f}",
              f"{pop['table']:.1f}", f"{pop['dict'] / pop['table']:.1f}x")
    for r in mem["by_size"]:
        t.add_row(f"  customers with {r['ids_per_customer']} ids ({r['customers']:,})", f"{r['ids']:,}",
                  f"{r['dict']:.1f}", f"{r['table']:.1f}", f"{r['dict'] / r['table']:.1f}x")
    t.add_row("pickled snapshot (one structure)", f"{a.ids:,}", f"{mem['snapshot']['dict']:.1f}",
              f"{mem['snapshot']['table']:.1f}", f"{mem['snapshot']['dict'] / mem['snapshot']['table']:.1f}x")
    console.print(t)

    t = Table(title="fixed cost of one structure (bytes, tracemalloc)")
    t.add_column("ids held", justify="right")
    t.add_column("dict\\[str, int]", justify="right")
    t.add_column("IdTable", justify="right")
    for k, v in mem["fixed"].items():
        t.add_row(str(k), str(v["dict"]), str(v["table"]))
    console.print(t)
    console.print(f"IdTable with {a.ids:,} ids: {mem['table_slots']:,} slots, nbytes()/id = "
                  f"{mem['table_nbytes_per_id']:.1f} (16 B/slot; 25.6-51.2 B/id over a doubling cycle). "
                  f"python {out['python']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
