"""The raw leg's SQL (meterflow/raw_leg.py) on chDB against an independent Python model of the contract's
semantics, on random archived events: duplicates (first arrival wins), corrections, exclusions, ``where``,
missing and non-numeric properties, every aggregation, monthly periods anchored on the 31st."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

from meterflow.base.periods import period_bounds
from meterflow.base.timeutil import dt_to_ms
from meterflow.raw_leg import raw_units
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import Emission, RawEvents
from meterflow.sinks.clickhouse import connect
from meterflow.sinks.clickhouse_schema import RAW_COLUMNS, raw_event_columns

AGGS = ["count", "sum", "max", "min", "unique_count", "latest", "p95", "p99"]


def config(chdb_path, db):
    metrics = [{"code": a, "event_type": "call", "aggregation": a, **({"property": "v"} if a != "count" else {})}
               for a in AGGS]
    metrics.append({"code": "big_calls", "event_type": "call", "aggregation": "count", "where": {"size": "big"}})
    metrics.append({"code": "seats", "event_type": "seat", "aggregation": "latest", "property": "v"})
    return parse_config({
        "tenants": [{"id": "t1", "exclude_when": {"test": True}, "excluded_customers": ["internal"]}, {"id": "t2"}],
        "metrics": metrics, "plans": [{"code": "p"}],
        "subscriptions": [{"tenant_id": "t1", "customer_id": "c1", "plan": "p", "period": "month",
                           "anchor": "2026-01-31T06:00:00Z"},
                          {"tenant_id": "t2", "customer_id": "c1", "plan": "p", "period": "week",
                           "anchor": "2026-01-01T00:00:00Z"}],
        "clickhouse": {"dsn": f"chdb://{chdb_path}", "database": db}}, environ={})


def random_events(rng: random.Random, n: int):
    base = dt_to_ms(__import__("datetime").datetime(2026, 1, 20, tzinfo=__import__("datetime").timezone.utc))
    values = [1, 2, 2.5, 7, "7", True, None, 1.0, 300, -4, "x"]
    rows = []
    for i in range(n):
        if rows and rng.random() < 0.15:  # a duplicate: same id, another source, later
            d = dict(rng.choice(rows))
            d["props"] = rng.choice([d["props"], {"v": 999}])  # a conflicting duplicate must not win
            d["source"], d["position"], d["ingested"] = f"f:{i}", i, 10_000 + i
            rows.append(d)
            continue
        props = {}
        if rng.random() < 0.9:
            props["v"] = rng.choice(values)
        if rng.random() < 0.3:
            props["size"] = rng.choice(["big", "small", True])
        if rng.random() < 0.05:
            props["test"] = rng.choice([True, 1])
        rows.append({"tenant": rng.choice(["t1", "t2"]), "customer": rng.choice(["c1", "c2", "internal"]),
                     "id": f"e{i}", "type": rng.choice(["call", "call", "call", "seat", "other"]),
                     "ts": base + rng.randrange(0, 60 * 86_400_000) // 1000 * 1000, "props": props,
                     "correction": rng.random() < 0.1, "ingested": 10_000 + i, "source": f"f:{i}", "position": i})
    return rows


def model(cfg, rows):
    subs = {(s.tenant_id, s.customer_id): (s.period, dt_to_ms(s.anchor)) for s in cfg.subscriptions}
    first = {}
    for r in sorted(rows, key=lambda r: (r["ingested"], r["position"])):
        first.setdefault((r["tenant"], r["id"]), r)
    groups = defaultdict(list)
    for r in first.values():
        t = next(t for t in cfg.tenants if t.id == r["tenant"])
        p = r["props"]
        if r["customer"] in t.excluded_customers or any(
                k in p and p[k] == v and (type(p[k]) is bool) == (type(v) is bool) for k, v in t.exclude_when.items()):
            continue
        kind, anchor = subs.get((r["tenant"], r["customer"]), ("month", 0))
        ps = period_bounds(r["ts"], kind, anchor)[0]
        for m in cfg.metrics:
            if m.event_type != r["type"]:
                continue
            if any(not (k in p and p[k] == v and (type(p[k]) is bool) == (type(v) is bool))
                   for k, v in m.where.items()):
                continue
            v = p.get(m.property) if m.property else None
            if m.property and m.aggregation != "count":
                if v is None:
                    continue
                if m.aggregation != "unique_count" and (type(v) is bool or not isinstance(v, (int, float))):
                    continue
                if r["correction"] and m.aggregation != "sum":
                    continue
            groups[(r["tenant"], r["customer"], m.code, ps)].append((m.aggregation, v, r))
    out = {}
    for k, items in groups.items():
        agg = items[0][0]
        sign = [-1 if r["correction"] else 1 for _, _, r in items]
        vs = [v for _, v, _ in items]
        if agg == "count":
            val = float(sum(sign))
        elif agg == "sum":
            val = math.fsum(s * v for s, v in zip(sign, vs))
        elif agg == "max":
            val = float(max(vs))
        elif agg == "min":
            val = float(min(vs))
        elif agg == "latest":
            val = float(max(items, key=lambda x: (x[2]["ts"], x[2]["ingested"], x[2]["position"]))[1])
        elif agg == "unique_count":
            val = float(len({v if type(v) is str else (type(v).__name__, v) for v in vs}))
        else:
            p = 0.95 if agg == "p95" else 0.99
            srt = sorted(vs)
            val = float(srt[max(1, math.ceil(round(p * len(srt), 9))) - 1])
        out[k] = val
    return out


def test_raw_leg_sql_equals_the_python_model(chdb_path, ch_database):
    cfg = config(chdb_path, ch_database)
    client, db = connect(cfg.clickhouse)
    for seed in range(3):
        client.command(f"TRUNCATE TABLE {db}.raw_event_rows")
        rng = random.Random(seed)
        rows = random_events(rng, 1500)
        batch = RawEvents(tenant_id=[r["tenant"] for r in rows], customer_id=[r["customer"] for r in rows],
                          event_id=[r["id"] for r in rows], event_type=[r["type"] for r in rows],
                          timestamp=[r["ts"] for r in rows], properties=[json.dumps(r["props"]) for r in rows],
                          correction=[r["correction"] for r in rows], ingested_at=[r["ingested"] for r in rows],
                          source=[r["source"] for r in rows], position=[r["position"] for r in rows])
        client.insert(f"{db}.raw_event_rows", raw_event_columns([Emission(raw_events=batch)]),
                      column_names=RAW_COLUMNS, column_oriented=True)
        got = {k: v.value for k, v in raw_units(client, db, cfg).items()}
        want = model(cfg, rows)
        assert set(got) == set(want), seed
        bad = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 1e-9 * max(1, abs(want[k]))}
        assert not bad, (seed, bad)
        assert {k[2] for k in want} >= {*AGGS, "big_calls", "seats"}
        # a replay of the same batch adds nothing (the view reads FINAL)
        client.insert(f"{db}.raw_event_rows", raw_event_columns([Emission(raw_events=batch)]),
                      column_names=RAW_COLUMNS, column_oriented=True)
        assert {k: v.value for k, v in raw_units(client, db, cfg).items()} == got


def test_cut_splits_units_ingested_before_and_after(chdb_path, ch_database):
    cfg = config(chdb_path, ch_database + "_cut")
    client, db = connect(cfg.clickhouse)
    ts = dt_to_ms(__import__("datetime").datetime(2026, 3, 5, tzinfo=__import__("datetime").timezone.utc))
    n = 10
    batch = RawEvents(tenant_id=["t2"] * n, customer_id=["c9"] * n, event_id=[f"e{i}" for i in range(n)],
                      event_type=["call"] * n, timestamp=[ts] * n, properties=['{"v": 1}'] * n,
                      correction=[False] * n, ingested_at=[100 * i for i in range(n)],
                      source=[f"f:{i}" for i in range(n)], position=list(range(n)))
    client.insert(f"{db}.raw_event_rows", raw_event_columns([Emission(raw_events=batch)]),
                  column_names=RAW_COLUMNS, column_oriented=True)
    ps = period_bounds(ts, "month", 0)[0]
    r = raw_units(client, db, cfg, "t2", {("t2", "c9", "count", ps): 650})[("t2", "c9", "count", ps)]
    assert (r.value, r.value_at_cut, r.late_events, sorted(r.late_ids)) == (10.0, 7.0, 3, ["e7", "e8", "e9"])
