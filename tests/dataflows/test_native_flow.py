"""``pipeline.core = "native"`` against ``"python"`` through the whole dataflow (``build_flow`` with
``TestingSource``; 1 and 2 workers; aborts with resume from the recovery store): the final window, period
and rated rows per key (value, events, version, ``final``), dead letters by id (reason, detail), alerts by
id, the last gateway state per customer and metric, and the counters must be identical. The configuration
mixes, in shared shards, customers that evaluate nothing (no subscription, or a priced plan without
entitlements) with customers whose soft and hard entitlements the native core checks at the events that
reach a level (several thresholds crossed by one sum event, corrections, late events of earlier periods,
blocks set and lifted), spend thresholds on a card of every model with auto_overage (beta|c3, native too), and
customers on the Python fold (beta|c4: a wallet; beta|c5: an auto_overage upgrade to another plan).
Native mediation is in every native run: hostile and invalid lines, unknown tenants, excluded customers,
sources of every shape, and the raw archive (``archive_raw``, on by default) is compared column by column.
"""

from __future__ import annotations

import json
import tempfile
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import msgspec
import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import STATS, FlowStats
from meterflow.dataflows.metering import _ShardLogic, build_flow
from meterflow.operators.changelog import ChangelogMediator
from meterflow.operators.mediate import Mediator, bundle_shards
from meterflow.operators.rules import Rules
from meterflow.schemas.chunk import SourceChunk
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import RawRows
from meterflow.schemas.state import decode_meter_state

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)

DAY = 86_400_000
BASE = 1_793_491_200_000  # 2026-11-01T00:00:00Z: every event is before the flow's wall clock (skew rule)

CONFIG = """
[pipeline]
rollup_window = "1h"
late_grace = "2d"
dedupe_window = "1d"
max_event_bytes = 600
shards = 3

[[tenants]]
id = "acme"
exclude_when = { environment = "test" }
excluded_customers = ["internal"]

[[tenants]]
id = "beta"

[[metrics]]
code = "api_calls"
event_type = "api_call"
aggregation = "count"

[[metrics]]
code = "tokens"
event_type = "api_call"
aggregation = "sum"
property = "tokens"

[[metrics]]
code = "gpu_seconds"
event_type = "gpu"
aggregation = "sum"
property = "seconds"
where = { kind = "a100" }

[[metrics]]
code = "peak_tokens"
event_type = "api_call"
aggregation = "max"
property = "tokens"

[[metrics]]
code = "low_seconds"
event_type = "gpu"
aggregation = "min"
property = "seconds"

[[metrics]]
code = "last_tokens"
event_type = "api_call"
aggregation = "latest"
property = "tokens"

[[metrics]]
code = "distinct_tokens"
event_type = "api_call"
aggregation = "unique_count"
property = "tokens"

[[metrics]]
code = "p95_tokens"
event_type = "api_call"
aggregation = "p95"
property = "tokens"

[[metrics]]
code = "p99_seconds"
event_type = "gpu"
aggregation = "p99"
property = "seconds"
where = { kind = "h100" }

[[metrics]]
code = "calls_by"
event_type = "api_call"
aggregation = "count"
group_by = ["kind", "tokens", "absent", "environment"]

[[metrics]]
code = "a100_by"
event_type = "gpu"
aggregation = "unique_count"
property = "seconds"
where = { kind = "a100" }
group_by = ["environment", "seconds"]

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
included = 4
thresholds = [50, 100]
enforcement = "hard"

[[plans]]
code = "metered"
[plans.entitlements.tokens]
price = { model = "per_unit", unit_amount = 0.25 }
[plans.entitlements.api_calls]
price = { model = "tiered", tiers = [{ up_to = 2, unit_amount = 1 }, { unit_amount = 0.5 }] }

[[plans]]
code = "soft"
[plans.entitlements.tokens]
included = 20
thresholds = [10, 25, 50, 75, 100, 150, 400]
[plans.entitlements.distinct_tokens]
included = 4
thresholds = [50, 100]
[plans.entitlements.last_tokens]
included = 6
thresholds = [100]

[[plans]]
code = "percentiles"
[plans.entitlements.p95_tokens]
included = 8
thresholds = [100]
[plans.entitlements.tokens]
price = { model = "per_unit", unit_amount = 0.5 }

[[plans]]
code = "mixed"
[plans.entitlements.tokens]
included = 30
thresholds = [20, 40, 60, 80, 100, 200]
[plans.entitlements.gpu_seconds]
included = 5
thresholds = [50, 100]
enforcement = "hard"
[plans.entitlements.peak_tokens]
included = 10
thresholds = [50, 100]
enforcement = "hard"
[plans.entitlements.low_seconds]
included = 2
thresholds = [100]

[[plans]]
code = "spendy"
[plans.entitlements.tokens]
price = { model = "per_unit", unit_amount = 0.5 }
spend_thresholds = [2, 5, 5.5, 40]
included = 16
thresholds = [50, 100]
enforcement = "auto_overage"
overage_rate = 0.1
[plans.entitlements.api_calls]
price = { model = "volume", tiers = [{ up_to = 3, unit_amount = 1 }, { unit_amount = 0.25 }] }
spend_thresholds = [2, 2.5, 3]
[plans.entitlements.gpu_seconds]
price = { model = "staircase", tiers = [{ up_to = 2, flat_amount = 0 }, { up_to = 4, flat_amount = 6 },
                                        { up_to = 7, flat_amount = 1 }, { flat_amount = 9 }] }
spend_thresholds = [1, 4, 8]
included = 6
thresholds = [100]
enforcement = "hard"
[plans.entitlements.peak_tokens]
price = { model = "tiered", tiers = [{ up_to = 2, unit_amount = 1 }, { unit_amount = 0.5 }] }
spend_thresholds = [1, 3]
[plans.entitlements.last_tokens]
price = { model = "volume", tiers = [{ up_to = 4, unit_amount = 1 }, { unit_amount = 0.1 }] }
spend_thresholds = [1, 2.5]
[plans.entitlements.distinct_tokens]
price = { model = "package", package_size = 2, package_amount = 1 }
spend_thresholds = [1, 2]
[plans.entitlements.low_seconds]
price = { model = "staircase", tiers = [{ up_to = 1, flat_amount = 0 }, { flat_amount = 2 }] }
spend_thresholds = [1]

[[plans]]
code = "spendy2"
[plans.entitlements.tokens]
price = { model = "volume", tiers = [{ up_to = 5, unit_amount = 1 }, { unit_amount = 0.5 }] }
spend_thresholds = [3, 4, 6]
included = 10
thresholds = [100]
enforcement = "auto_overage"
[plans.entitlements.api_calls]
price = { model = "package", package_size = 3, package_amount = 2, round_up = false }
spend_thresholds = [2, 4]

[[plans]]
code = "climb"
[plans.entitlements.api_calls]
included = 3
thresholds = [100]
enforcement = "auto_overage"
next_plan = "spendy"
[plans.entitlements.tokens]
price = { model = "per_unit", unit_amount = 1 }
spend_thresholds = [3]

[[subscriptions]]
tenant_id = "beta"
customer_id = "c5"
plan = "climb"
period = "day"

[[subscriptions]]
tenant_id = "beta"
customer_id = "c3"
plan = "spendy"
period = "day"
anchor = "2026-11-01T00:00:00Z"

[[subscriptions]]
tenant_id = "beta"
customer_id = "c4"
plan = "metered"
period = "month"
[subscriptions.wallet]
balance = 6
credit_rates = { api_calls = 1 }

[[subscriptions]]
tenant_id = "beta"
customer_id = "c2"
plan = "soft"
period = "day"
anchor = "2026-11-02T05:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c4"
plan = "mixed"
period = "day"
anchor = "2026-11-01T13:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c1"
plan = "pro"
period = "week"
anchor = "2026-11-04T12:00:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c2"
plan = "metered"
period = "day"
anchor = "2026-11-03T07:00:00Z"

[[subscriptions]]
tenant_id = "beta"
customer_id = "c1"
plan = "percentiles"
period = "month"
"""


def config(core: str, shards: int = 3):
    raw = tomllib.loads(CONFIG)
    raw["pipeline"]["core"] = core
    raw["pipeline"]["shards"] = shards
    return parse_config(raw, "native_flow.toml", environ={})


values = st.one_of(st.integers(-50, 50), st.sampled_from([0.1, 0.25, -0.0, 1e299, 2**63, 10**30, True, None, "7"]))


@st.composite
def lines(draw, thresholded: bool = False) -> bytes:
    """A random line; ``thresholded``: mostly events of the customers with entitlements (acme|c1, acme|c4,
    beta|c2), distinct ids, metered types and numeric values, so their thresholds and blocks are reached."""
    ev: Dict[str, Any] = {
        "event_id": draw(st.one_of(st.sampled_from(["e1", "e2", "e3", "e4", "e5", "e6", "e7", "é8"]),
                                   st.integers(0, 99).map(lambda n: f"n{n}"))),
        "tenant_id": draw(st.sampled_from(["acme", "acme", "beta", "ghost"])),
        "customer_id": draw(st.sampled_from(["c1", "c2", "c3", "c4", "internal"])),
        "event_type": draw(st.sampled_from(["api_call", "api_call", "gpu", "other"])),
    }
    if thresholded and draw(st.integers(0, 4)):
        ev["tenant_id"], ev["customer_id"] = draw(st.sampled_from([("acme", "c1"), ("acme", "c4"), ("beta", "c2"),
                                                                   ("beta", "c3"), ("beta", "c3"), ("beta", "c4"),
                                                                   ("beta", "c5")]))
        ev["event_id"] = f"t{draw(st.integers(0, 10_000))}"
        ev["event_type"] = draw(st.sampled_from(["api_call", "gpu"]))
    ts = BASE + draw(st.integers(0, 12)) * DAY // 2 + draw(st.sampled_from([0, 1, 3_599_999, 3_600_000]))
    ev["timestamp"] = ts if draw(st.booleans()) else f"{_iso(ts)}"
    props: Dict[str, Any] = {}
    numbers = st.one_of(st.integers(-3, 12), values) if thresholded else values
    for k, choices in (("tokens", numbers), ("seconds", numbers), ("kind", st.sampled_from(["a100", "h100"])),
                       ("environment", st.sampled_from(["test", "prod"]))):
        if draw(st.booleans()) or thresholded and k in ("tokens", "seconds"):
            props[k] = draw(choices)
    ev["properties"] = props
    if draw(st.integers(0, 6)) == 0:
        ev["correction"] = True
        ev["corrects"] = "e1"
    raw = json.dumps(ev, ensure_ascii=draw(st.booleans())).encode()
    how = draw(st.integers(0, 20))
    if how == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif how == 1:
        raw = raw.replace(b'"event_type"', b'"event\\u005ftype"', 1)  # decoded by Python, folded natively
    elif how == 2:
        raw = b"[" * 70 + raw
    elif how == 3:
        raw = raw.replace(b'"', b'"\xff', 1)  # not UTF-8
    elif how == 4:
        raw = raw[:-1] + b', "pad": "' + b"p" * 600 + b'"}'  # beyond max_event_bytes
    elif how == 5:
        raw = raw.replace(b"{", b'{"timestamp": "2026-13-01T00:00:00Z", ', 1)  # a repeated key
    elif how == 6:
        raw = json.dumps({**ev, "timestamp": draw(st.sampled_from([-1, "1969-12-31T23:59:59Z", True]))}).encode()
    return raw


def sourced(stream: List[Any]) -> List[Any]:
    """``(src, raw)`` items with sources of every shape: file lines, Kafka offsets, and a few the native
    mediator leaves to Python (not a tuple of a name and ints)."""
    def src(i: int) -> Any:
        if i % 5 == 3:
            return ("usage.events", i % 2, 10_000 + i)
        if i % 11 == 7:
            return f"odd-source-{i}"
        return ("events.jsonl", i + 1)

    return [(src(i), raw) for i, raw in enumerate(stream)]


def _iso(ms: int) -> str:
    from meterflow.base.timeutil import ms_to_iso

    return ms_to_iso(ms)


def outcome(out: List[Any]) -> Dict[str, Any]:
    """Final rows per key (highest version), dead letters and alerts by id, without wall-clock fields."""
    rows: Dict[Tuple[Any, ...], Any] = {}

    def keep(k: Tuple[Any, ...], r: Any, version: int) -> None:
        prev = rows.get(k)
        if prev is None or version >= prev[0]:
            rows[k] = (version, r)

    dead, alerts, gateway = {}, {}, {}
    raw: List[Tuple[Any, ...]] = []  # the raw archive, every column but the wall-clock ingested_at
    for em in out:
        if em.raw_events is not None:
            got = em.raw_events.columns() if type(em.raw_events) is RawRows else em.raw_events
            cols = msgspec.structs.asdict(msgspec.structs.replace(got, ingested_at=[]))
            raw += zip(*[v for k, v in cols.items() if k != "ingested_at"])
        for r in em.windows:
            keep(("w", r.tenant_id, r.customer_id, r.metric, r.window_start, tuple(r.dimensions.items())),
                 msgspec.structs.asdict(r), r.version)
        for r in em.periods:
            keep(("p", r.tenant_id, r.customer_id, r.metric, r.period_start), msgspec.structs.asdict(r), r.version)
        for r in em.rated or ():
            keep(("r", r.tenant_id, r.customer_id, r.metric, r.period_start), msgspec.structs.asdict(r), r.version)
        for g in em.gateway or ():  # the last state written per customer and metric (as Redis keeps it)
            # (a deleted state only deletes the key, sinks/redis.py; its period is the metric's current one at the end
            # of the batch that wrote it, so it follows where Bytewax cut the batches, which varies with 2 workers)
            gateway[(g.tenant_id, g.customer_id, g.metric)] = {
                k: v for k, v in msgspec.structs.asdict(g).items()
                if k != "updated_at" and not (g.deleted and k in ("period_start", "period_end"))}
        for d in em.dead_letters:
            dead[d.dl_id] = (d.reason, d.detail, d.source, d.tenant_id, d.metric)
        for a in em.alerts:
            alerts[a.alert_id] = {k: v for k, v in msgspec.structs.asdict(a).items()
                                  if k not in ("detected_at", "ingested_at", "event_time")}
    return {"rows": rows, "dead": dead, "alerts": alerts, "gateway": gateway, "raw": sorted(raw, key=repr)}


def run_flow(core: str, items: List[Any], batch_size: int, workers: int = 1, aborts: int = 0) -> Dict[str, Any]:
    """The flow's outcome and its counters (``meter run --json``; replays after aborts counted again)."""
    before = STATS.snapshot()
    got = _run_flow(core, items, batch_size, workers, aborts)
    after = STATS.snapshot()
    got["counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return got


def _run_flow(core: str, items: List[Any], batch_size: int, workers: int, aborts: int) -> Dict[str, Any]:
    out: List[Any] = []
    cfg = config(core)
    if not aborts:
        flow = build_flow(cfg, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))],
                          recoverable=False, gateway_states=True)
        if workers == 1:
            run_main(flow)
        else:
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
        return outcome(out)
    with tempfile.TemporaryDirectory() as tmp:
        init_db_dir(Path(tmp), 1)
        for _ in range(aborts + 1):
            flow = build_flow(cfg, TestingSource(items, batch_size=batch_size), [("out", TestingSink(out))])
            run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(Path(tmp)))
    return outcome(out)


SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=25, **SETTINGS)
@given(stream=st.lists(lines(), min_size=1, max_size=40), batch_size=st.integers(1, 10),
       workers=st.sampled_from([1, 2]))
def test_native_and_python_cores_emit_the_same_through_the_flow(stream, batch_size, workers):
    items = sourced(stream)
    want = run_flow("python", items, batch_size, workers)
    got = run_flow("native", items, batch_size, workers)
    assert got == want


@settings(max_examples=15, **SETTINGS)
@given(stream=st.lists(lines(), min_size=1, max_size=40), chunk=st.integers(1, 12), batch_size=st.integers(1, 3),
       workers=st.sampled_from([1, 2]))
def test_kafka_chunks_emit_what_their_messages_emit_on_both_cores(stream, chunk, batch_size, workers):
    """The Kafka source's SourceChunks (schemas/chunk.py: one per consume call, what it emits with the
    native core) give what the per-message ``((topic, part, offset), value)`` items give: the same
    outputs, dead letters (their sources) and counters (read: per message), on either core."""
    items = [(("usage.events", 1, 500 + 2 * i), raw) for i, raw in enumerate(stream)]  # (offsets with gaps)
    chunks = [SourceChunk("usage.events", 1, [src[2] for src, _ in items[i:i + chunk]],
                          [raw for _, raw in items[i:i + chunk]]) for i in range(0, len(items), chunk)]
    want = run_flow("python", items, chunk, workers)
    assert run_flow("native", chunks, batch_size, workers) == want
    assert run_flow("python", chunks, batch_size, workers) == want


@settings(max_examples=25, **SETTINGS)
@given(stream=st.lists(lines(thresholded=True), min_size=1, max_size=60), batch_size=st.integers(1, 10),
       workers=st.sampled_from([1, 2]))
def test_native_and_python_cores_alert_the_same(stream, batch_size, workers):
    """Thresholds (several crossed by one sum event), blocks set and lifted by corrections, late events of
    earlier periods: the same alerts (id, event_id, usage, ...), gateway states, rows and counters."""
    items = sourced(stream)
    want = run_flow("python", items, batch_size, workers)
    got = run_flow("native", items, batch_size, workers)
    assert got == want


@settings(max_examples=12, **SETTINGS)
@given(stream=st.lists(st.one_of(lines(), lines(thresholded=True)), min_size=1, max_size=30),
       batch_size=st.integers(1, 4),
       cuts=st.lists(st.integers(0, 200), min_size=1, max_size=2))
def test_native_and_python_cores_agree_through_abort_and_resume(stream, batch_size, cuts):
    def items() -> List[Any]:  # new ABORT markers for each flow: a marker aborts once
        out: List[Any] = sourced(stream)
        for c in sorted(set(cuts), reverse=True):
            out.insert(c % (len(out) + 1), TestingSource.ABORT())
        return out

    n = len(set(cuts))
    assert run_flow("native", items(), batch_size, aborts=n) == run_flow("python", items(), batch_size, aborts=n)


def test_a_retried_id_after_a_resume_stays_a_duplicate():
    """The native dedupe table goes into the snapshot: e1 retried after the abort is not counted again."""
    def ev(eid):
        return json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c3", "event_type": "api_call",
                           "timestamp": BASE, "properties": {"tokens": 2}}).encode()

    def items() -> List[Any]:
        return [(("in", 1), ev("e1")), (("in", 2), ev("e2")), TestingSource.ABORT(), (("in", 3), ev("e1"))]

    got = run_flow("native", items(), 1, aborts=1)
    assert got == run_flow("python", items(), 1, aborts=1)
    assert got["rows"][("p", "acme", "c3", "api_calls", BASE)][1]["value"] == 2.0


def test_the_native_core_folds_the_customers_that_evaluate_nothing():
    """Who is folded natively: c3 (no subscription), acme|c2 (prices, no entitlement) and acme|c1 (hard
    thresholds, checked at the events that reach a level). A customer moves to the Python fold with its dedupe
    table when a changelog record reaches it (a retried id stays a duplicate), and its alerts and state are
    those of the Python core."""
    change = json.dumps({"tenant_id": "acme", "customer_id": "c3", "subscription": {
        "tenant_id": "acme", "customer_id": "c3", "plan": "pro", "period": "month",
        "anchor": "2026-11-01T00:00:00Z"}}).encode()

    def ev(eid, cust, ts):
        return (("in", eid), json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": cust,
                                         "event_type": "api_call", "timestamp": ts, "properties": {"tokens": 2}})
                .encode())

    def run(core, native_mediation=False):
        cfg = config(core, shards=1)
        med = native.NativeMediator(cfg, stats=FlowStats()) if native_mediation else Mediator(cfg, stats=FlowStats())
        logic = _ShardLogic(Rules(cfg), 1, None, True, med, clock=lambda: BASE + 40 * DAY,
                            native=native.NativeMeters(cfg) if core == "native" else None)

        def bundles(batch):
            if native_mediation:  # native bundles: the first batch alone, the second with the changelog record
                return [b for _, b in med.split(batch, False)[0]]
            return [b for _, b in bundle_shards(med(batch).groups, 1)]

        first, _ = logic.on_batch(bundles([ev("a", "c3", BASE), ev("b", "c2", BASE), ev("c", "c1", BASE)]))
        keys = set(logic._native.keys) if logic._native else set()
        ((_key, update),), dead = ChangelogMediator(cfg, stats=FlowStats())([(("changes", 1), change)])
        assert dead == []
        out, _ = logic.on_batch(bundles([ev("d", "c3", BASE + 1)]) + [update] +
                                bundles([ev("a", "c3", BASE + 2), ev("e", "c3", BASE + 3), ev("f", "c3", BASE + 4)]))
        # (the native dedupe table copied into the meter first; compared as `_state` does: the table's ids in a
        # fixed order, since colliding ids sit in insertion order in IdTable, which the native table does not keep)
        snap = _state({"acme|c3": logic.snapshot()[2]["acme|c3"]})
        alerts = [(a.type, a.threshold_pct, a.event_id, a.usage) for em in first + out for a in em.alerts]
        rows = sorted((r.metric, r.period_start, r.value, r.version) for em in first + out for r in em.periods)
        return keys, set(logic._native.keys) if logic._native else set(), snap, alerts, rows

    keys, after, snap, alerts, rows = run("native")
    # c3 comes back to the native fold after the record (plan pro: hard thresholds), with its state
    assert keys == {"acme|c3", "acme|c2", "acme|c1"} and after == keys
    # the change crosses 50 % at once (2 of 4 calls), the retried a is a duplicate, f reaches 100 % and blocks
    assert alerts == [("threshold_crossed", 50.0, "", 2.0), ("threshold_crossed", 100.0, "f", 4.0),
                      ("blocked", 100.0, "f", 4.0)]
    assert (keys, after, snap, alerts, rows) == (keys, after) + run("python")[2:]
    assert run("native", native_mediation=True) == (keys, after, snap, alerts, rows)


def test_group_by_runs_on_the_native_fold():
    """A group_by metric runs on the native fold: its customers are folded natively, each window row carries
    the dims of the Python fold (a missing value "", a number its repr, in group_by order), and the outputs are
    the Python core's."""
    raw = tomllib.loads(CONFIG)
    raw["metrics"].append({"code": "gpu_by_kind", "event_type": "gpu", "aggregation": "sum", "property": "seconds",
                           "group_by": ["kind", "zone"]})
    kinds = [{"kind": "a100"}, {"kind": "h100", "zone": 2}, {"kind": "a100"}, {"zone": 1.5}, {"kind": "h100",
                                                                                              "zone": 2}]
    stream = [json.dumps({"event_id": f"g{i}", "tenant_id": "acme", "customer_id": "c3", "event_type": "gpu",
                          "timestamp": BASE + i, "properties": {"seconds": i, **k}}).encode()
              for i, k in enumerate(kinds)]
    items = [(("events.jsonl", i + 1), line) for i, line in enumerate(stream)]
    got = {}
    for core in ("python", "native"):
        raw["pipeline"]["core"] = core
        cfg = parse_config(raw, "native_flow.toml", environ={})
        out: List[Any] = []
        before = native.FOLD_TALLY.snapshot().get("native", 0)
        run_main(build_flow(cfg, TestingSource(items), [("out", TestingSink(out))], recoverable=False))
        dims: Dict[Tuple[str, ...], float] = {}
        for em in out:
            for r in em.windows:
                if r.metric == "gpu_by_kind":
                    dims[(r.dimensions["kind"], r.dimensions["zone"])] = r.value
        got[core] = outcome(out), dims, native.FOLD_TALLY.snapshot().get("native", 0) - before
    assert got["native"][:2] == got["python"][:2]
    assert got["native"][1] == {("a100", ""): 2.0, ("h100", "2"): 5.0, ("", "1.5"): 3.0}
    assert (got["python"][2], got["native"][2]) == (0, 1)  # acme|c3 on the native fold
    assert native.python_fold_reason(cfg) is None and native.NativeMeters(cfg).python_only is None
    assert native.core_in_use(cfg).startswith("native (customers without wallet")
    assert native.core_in_use(config("python")).startswith("python")


def test_blocks_set_and_lifted_and_thresholds_crossed_at_once_alert_the_same():
    """Pinned: one sum event crossing five thresholds, a hard block set, lifted by a correction, set again and
    lifted by the next period's first event, a late event of the earlier period: identical alerts."""
    def ev(eid, cust, etype, ts, tenant="acme", correction=False, **props):
        body = {"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                "timestamp": ts, "properties": props}
        if correction:
            body.update(correction=True, corrects="x")
        return json.dumps(body).encode()

    day0 = BASE + 13 * 3_600_000  # acme|c4's day periods start at 13:00
    stream = [ev("a", "c2", "api_call", BASE + 6 * 3_600_000, tenant="beta", tokens=16),  # 10..75 % of 20
              ev("b", "c4", "gpu", day0, seconds=5, kind="a100"),  # blocked at 5 of 5
              ev("c", "c4", "gpu", day0 + 1, seconds=2, kind="a100", correction=True),  # unblocked: 3 of 5
              ev("d", "c4", "gpu", day0 + 2, seconds=2.5, kind="a100"),  # blocked again: 5.5
              ev("e", "c4", "gpu", day0 + DAY, seconds=1, kind="a100"),  # next period: unblocked
              ev("f", "c4", "gpu", day0 + 3, seconds=1, kind="a100"),  # late, earlier period: counts, no block
              ev("g", "c4", "api_call", day0 + DAY + 5, tokens=40.5)]  # 20..100 % of 30 at once
    items = [(("in", i + 1), raw) for i, raw in enumerate(stream)]
    want = run_flow("python", items, 3)
    types = sorted((a["customer_id"], a["type"], a["event_id"], a["threshold_pct"]) for a in want["alerts"].values()
                   if a["metric"] in ("tokens", "gpu_seconds"))  # (the pinned ones; all are compared below)
    assert types == sorted(
        [("c2", "threshold_crossed", "a", t) for t in (10.0, 25.0, 50.0, 75.0)]
        + [("c4", "threshold_crossed", "b", 50.0), ("c4", "threshold_crossed", "b", 100.0),
           ("c4", "blocked", "b", 100.0), ("c4", "unblocked", "c", None), ("c4", "blocked", "d", 100.0),
           ("c4", "unblocked", "e", None)]
        + [("c4", "threshold_crossed", "g", t) for t in (20.0, 40.0, 60.0, 80.0, 100.0)])
    for batch in (1, 3, 7):
        assert run_flow("native", items, batch) == run_flow("python", items, batch)


def test_a_new_customer_s_first_events_do_not_stop_the_native_fold_and_alert_the_same(monkeypatch):
    """A new customer's first period of each evaluated metric starts at the level NativeMeters.admit_counted gave
    the native fold (Entitlements.fresh_level), so its first events stop nowhere; the period still becomes the
    current one (NativeMeters._fresh), so what follows — a first event that reaches a level at once, a hard block,
    the next period, a late event of the first — alerts and writes gateway state exactly as the Python core."""
    from meterflow.operators import native

    def ev(eid, cust, etype, ts, tenant="acme", **props):
        return json.dumps({"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                           "timestamp": ts, "properties": props}).encode()

    day0 = BASE + 13 * 3_600_000  # acme|c4's day periods start at 13:00
    quiet = [ev("q1", "c2", "api_call", BASE + 6 * 3_600_000, tenant="beta", tokens=1),  # soft: 5 % of 20
             ev("q2", "c4", "gpu", day0, seconds=1, kind="a100"),  # hard: 20 % of 5
             ev("q3", "c4", "api_call", day0 + 1, tokens=1),  # tokens 3 % of 30, peak 10 % of 10
             ev("q4", "c1", "api_call", BASE + 8 * 3_600_000)]  # pro (hard): 1 of 4
    checks = []
    original = native.NativeMeters._check
    monkeypatch.setattr(native.NativeMeters, "_check", lambda self, *a: checks.append(a[1].event.event_id) or
                        original(self, *a))
    items = [(("in", i + 1), raw) for i, raw in enumerate(quiet)]
    for batch in (1, 4):
        checks.clear()
        assert run_flow("native", items, batch) == run_flow("python", items, batch)
        assert checks == []  # (before: a stop at every first event of an evaluated metric)
    later = [ev("n1", "c2", "api_call", BASE + 6 * 3_600_000 + 5, tenant="beta", tokens=15),  # 80 %: four thresholds
             ev("n2", "c4", "gpu", day0 + 2, seconds=4, kind="a100"),  # 5 of 5: blocked
             ev("n3", "c4", "gpu", day0 + DAY, seconds=1, kind="a100"),  # next period: unblocked
             ev("n4", "c4", "gpu", day0 + 3, seconds=1, kind="a100"),  # late, in the first period
             ev("f1", "c3", "api_call", day0 + DAY + 1, tenant="acme", tokens=1),  # no subscription
             ev("f2", "c5", "api_call", BASE, tenant="beta", tokens=500)]  # its first event reaches every level
    items = [(("in", i + 1), raw) for i, raw in enumerate(quiet + later)]
    for batch in (1, 3, 10):
        checks.clear()
        want = run_flow("python", items, batch)
        assert run_flow("native", items, batch) == want
        assert {"n1", "n2", "n3"} <= set(checks) and not {"q1", "q2", "q3", "q4"} & set(checks)
    assert sorted((a["customer_id"], a["type"], a["event_id"]) for a in want["alerts"].values()
                  if a["customer_id"] == "c4" and a["type"] != "threshold_crossed") == [
        ("c4", "blocked", "n2"), ("c4", "unblocked", "n3")]


tricky = st.sampled_from([1, 1.0, True, -0.0, 0.0, 0, 2**53, float(2**53), 2**53 + 1, 2**63, -(2**63) - 1,
                          float(2**63), 10**30, 1e30, 1e299, -1e299, 0.5, -3, "1", "x", None])


@settings(max_examples=40, **SETTINGS)
@given(events=st.lists(st.tuples(st.sampled_from(["c3", "c4", "c2"]), st.integers(0, 30), st.integers(0, 3),
                                 tricky, st.booleans(), st.integers(0, 5)), min_size=1, max_size=40),
       batch=st.integers(1, 8))
def test_native_rows_keep_the_very_values_the_python_fold_keeps(events, batch):
    """max/min/latest/unique_count/p95/p99 rows of both cores snapshot the same records, value types
    included (1 and 1.0 and True stay apart where Python keeps them apart; the first of equal values stays;
    a tie in latest goes to the later arrival; ints beyond 64 bits against floats compared exactly)."""
    stream = []
    for n, (cust, eid, t, v, correction, late) in enumerate(events):
        body = {"event_id": f"e{eid}", "tenant_id": "acme", "customer_id": cust,
                "event_type": "api_call" if t % 2 == 0 else "gpu",
                "timestamp": BASE + (t * DAY) // 2 - late * 3 * DAY, "properties": {"tokens": v, "seconds": v,
                                                                                    "kind": "h100"}}
        if correction:
            body.update(correction=True, corrects="e0")
        stream.append((("in", n), json.dumps(body).encode()))

    def run(core):
        cfg = config(core, shards=1)
        med = Mediator(cfg, stats=FlowStats())
        logic = _ShardLogic(Rules(cfg), 1, None, True, med, clock=lambda: BASE + 40 * DAY,
                            native=native.NativeMeters(cfg) if core == "native" else None)
        for i in range(0, len(stream), batch):
            logic.on_batch([b for _, b in bundle_shards(med(stream[i:i + batch]).groups, 1)])
        _, _, snaps = logic.snapshot()
        out = {}
        for key, data in snaps.items():
            st_ = decode_meter_state(data)
            rows = [("w", r.metric, r.start, r.dims, r.dirty, r.acc) for r in st_.windows]
            rows += [("p", r.metric, r.start, r.end, r.dirty, r.acc) for r in st_.periods]
            # (sum rows: an int beyond 64 bits lands in total on the Python fold, in fscaled on the native
            # one: the same value, not yet the same record; the flow tests compare their rows)
            out[key] = sorted(repr(msgspec.to_builtins(_normal(r))) for r in rows  # (repr: 1, 1.0, True apart)
                              if type(r[-1]).__name__ != "SumState")
        return out

    assert run("native") == run("python")


def _normal(row):
    """A row record with a unique_count's values in a fixed order (a set's order is not state)."""
    acc = row[-1]
    if type(acc).__name__ == "UniqueState":
        acc = msgspec.structs.replace(acc, values=sorted(acc.values, key=repr))
    return row[:-1] + (acc,)


def _fixed_events(prefix: str, ts: int, distinct: Tuple[str, ...] = ("7",)) -> List[Any]:
    """One event of each admitted customer (so each has state at the snapshot and events after it), and one
    of beta|c2 per ``distinct`` value (its distinct_tokens entitlement: 4 included, alerts at 2 and 4)."""
    out = []
    for tenant, cust, etype, props in (("acme", "c3", "api_call", {"tokens": 3, "environment": "prod"}),
                                       ("acme", "c1", "api_call", {"tokens": 1.5}),
                                       ("acme", "c4", "gpu", {"seconds": 2, "kind": "a100"}),
                                       *[("beta", "c2", "api_call", {"tokens": v}) for v in distinct],
                                       ("acme", "c3", "api_call", {"tokens": 1, "environment": "test"})):
        body = {"event_id": f"{prefix}{len(out)}", "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                "timestamp": ts, "properties": props}
        out.append(((prefix, len(out)), json.dumps(body).encode()))
    return out


def _state(snaps: Dict[str, bytes]) -> Dict[str, Any]:
    """Shard snapshots compared across cores: every record, the live ids of the dedupe table, a unique_count's values
    in a fixed order, a sum by its value (total and fscaled split an int beyond 64 bits differently)."""
    out = {}
    for key, data in snaps.items():
        st_ = decode_meter_state(data)
        # the live ids (an expired id counts as unseen; the Python table evicts them on its own schedule)
        seen = sorted((fp, e) for fp, e in _words(st_.seen.fingerprints, st_.seen.expiries) if e >= st_.watermark)
        rows = [("w", r.metric, r.start, r.dims, r.dirty, r.acc) for r in st_.windows]
        rows += [("p", r.metric, r.start, r.end, r.dirty, r.acc) for r in st_.periods]
        norm = []
        for r in rows:
            acc = r[-1]
            if type(acc).__name__ == "SumState":
                from meterflow.operators.aggregate import acc_from_state

                a = acc_from_state(acc)
                acc = ("sum", a.events, a.expires, a.value())
            norm.append(repr(msgspec.to_builtins(_normal(r[:-1] + (acc,)))))
        ent = st_.entitlements  # (the current periods by metric: a dict, its order is not state)
        ent = msgspec.structs.replace(ent, current=sorted(ent.current, key=lambda r: r.metric))
        rest = msgspec.structs.replace(st_, windows=[], periods=[], seen=None, entitlements=ent)
        out[key] = (sorted(norm), repr(msgspec.to_builtins(rest)), seen)
    return out


def _words(fps: bytes, exps: bytes) -> List[Tuple[int, int]]:
    import struct

    n = len(fps) // 8
    return list(zip(struct.unpack(f"<{n}Q", fps), struct.unpack(f"<{n}Q", exps)))


@settings(max_examples=30, **SETTINGS)
@given(before=st.lists(st.one_of(lines(), lines(thresholded=True)), max_size=30),
       after=st.lists(st.one_of(lines(), lines(thresholded=True)), max_size=30),
       batch=st.integers(1, 6), native_mediation=st.booleans())
def test_resumed_customers_fold_natively_and_agree(before, after, batch, native_mediation):
    """A shard resumed from a snapshot (taken by the Python core) brings every customer the native fold admits
    back into it with its state (rows of every aggregation, excluded counts, dedupe table, watermark,
    levels): those customers fold natively after the resume, and the outputs and the state are the Python
    core's resumed from the same snapshot (a wrong import shows as a different row, alert or duplicate)."""
    first = sourced(before) + _fixed_events("a", BASE + DAY) + _fixed_events("c", BASE + 4 * DAY, ("7", "x"))
    then = (sourced(after) + _fixed_events("a", BASE + DAY) + _fixed_events("b", BASE + 3 * DAY)
            + _fixed_events("d", BASE + 4 * DAY, ("8", "y", "7")))  # (4 distinct across the resume: an alert)
    clock = lambda: BASE + 40 * DAY  # noqa: E731

    cfg = config("python", shards=1)
    med = Mediator(cfg, stats=FlowStats())
    logic = _ShardLogic(Rules(cfg), 1, None, True, med, clock=clock)
    for i in range(0, len(first), batch):
        logic.on_batch([b for _, b in bundle_shards(med(first[i:i + batch]).groups, 1)])
    state = logic.snapshot()

    def run(core):
        cfg = config(core, shards=1)
        nm = native.NativeMeters(cfg) if core == "native" else None
        med = native.NativeMediator(cfg, stats=FlowStats()) if nm and native_mediation else Mediator(cfg, FlowStats())
        logic = _ShardLogic(Rules(cfg), 1, state, True, med, clock=clock, native=nm)
        resumed = set(nm.keys) if nm else set()
        if nm:  # every resumed customer the native fold admits is held by it, none left behind on Python
            assert resumed == {k for k, m in logic._meters.items() if nm.admits(m)} and nm.loaded == len(resumed)
            assert {"acme|c1", "acme|c3", "acme|c4", "beta|c2"} <= resumed
        out = []
        for i in range(0, len(then), batch):
            part = then[i:i + batch]
            if core == "native" and native_mediation:
                got, _ = logic.on_batch([b for _, b in med.split(part, False)[0]])
            else:
                got, _ = logic.on_batch([b for _, b in bundle_shards(med(part).groups, 1)])
            out += got
        out += logic.on_eof()[0]
        if nm:  # the resumed customers' events after the resume were folded by the native core
            assert nm._core.counters()["read"] >= 10 and resumed <= nm.keys
        return outcome(out), _state(logic.snapshot()[2])

    assert run("native") == run("python")


def _spend_ev(eid: str, etype: str, ts: int, cust: str = "c3", correction: bool = False, **props: Any) -> bytes:
    body: Dict[str, Any] = {"event_id": eid, "tenant_id": "beta", "customer_id": cust, "event_type": etype,
                            "timestamp": ts, "properties": props}
    if correction:
        body.update(correction=True, corrects="x")
    return json.dumps(body).encode()


def _plan_change(cust: str, plan: Optional[str]) -> bytes:
    if plan is None:
        return json.dumps({"tenant_id": "beta", "customer_id": cust, "cancelled": True}).encode()
    return json.dumps({"tenant_id": "beta", "customer_id": cust, "subscription": {
        "tenant_id": "beta", "customer_id": cust, "plan": plan, "period": "day",
        "anchor": "2026-11-01T00:00:00Z"}}).encode()


def _run_shard(core: str, items: List[Any], batch: int, native_mediation: bool = False):
    """``items`` (event lines, or ("change", raw) changelog records) through one shard's _ShardLogic in batches
    of ``batch`` (a changelog record between the bundles at its place); the outcome, the shard's snapshot
    compared as :func:`_state` does, and the customers held by the native fold at the end."""
    cfg = config(core, shards=1)
    nm = native.NativeMeters(cfg) if core == "native" else None
    med = native.NativeMediator(cfg, stats=FlowStats()) if nm and native_mediation else Mediator(cfg, FlowStats())
    logic = _ShardLogic(Rules(cfg), 1, None, True, med, clock=lambda: BASE + 40 * DAY, native=nm)
    changes = ChangelogMediator(cfg, stats=FlowStats())

    def bundles(lines_: List[Any]) -> List[Any]:
        if not lines_:
            return []
        if nm and native_mediation:
            return [b for _, b in med.split(lines_, False)[0]]
        return [b for _, b in bundle_shards(med(lines_).groups, 1)]

    out: List[Any] = []
    n = 0
    for i in range(0, len(items), batch):
        parts: List[Any] = []
        run: List[Any] = []
        for src, raw in items[i:i + batch]:
            if src[0] == "change":
                n += 1
                ((_key, update),), dead = changes([(("changes", n), raw)])
                assert dead == []
                parts += bundles(run) + [update]
                run = []
            else:
                run.append((src, raw))
        got, _ = logic.on_batch(parts + bundles(run))
        out += got
    out += logic.on_eof()[0]
    return outcome(out), _state(logic.snapshot()[2]), set(nm.keys) if nm else set()


def test_spend_thresholds_and_auto_overage_fold_natively_and_alert_the_same():
    """Pinned: beta|c3 (spend thresholds on a card of every model, auto_overage on tokens, a hard block on
    gpu_seconds) is folded natively, beta|c5 (auto_overage with a next plan: an upgrade) and beta|c4 (a wallet)
    stay on Python; several amounts crossed by one event, volume and staircase cards whose charge falls, a
    correction that lowers a staircase charge and lifts a block, a late event: the Python core's alerts (ids,
    event ids, amounts, usage), rows and state, for every batch size."""
    day = BASE + 2 * DAY
    stream = [_spend_ev("a", "api_call", day, tokens=12),  # 6.0: 2, 5, 5.5 at once; 50 % of 16; 1 call: 1
              _spend_ev("b", "api_call", day + 1, tokens=1),  # 2 calls: 2
              _spend_ev("c", "api_call", day + 2, tokens=5),  # 3 calls: 3 (2.5 and 3 at once); tokens 18: overage
              _spend_ev("d", "api_call", day + 3, tokens=5),  # 4 calls: 1.0 (the volume card falls)
              _spend_ev("e", "gpu", day + 4, seconds=3, kind="a100"),  # staircase 6: 1 and 4
              _spend_ev("f", "gpu", day + 5, seconds=3, kind="a100"),  # 6 s: 1, blocked at 6 of 6
              _spend_ev("g", "gpu", day + 6, seconds=3, kind="a100"),  # 9 s: 9, fires 8
              _spend_ev("h", "gpu", day + 7, seconds=4, kind="a100", correction=True),  # 5 s: 1, unblocked
              _spend_ev("i", "api_call", day + 8, tokens=0.5),  # last_tokens 0.5: not 1 yet
              _spend_ev("j", "api_call", day - DAY, tokens=3),  # late (the day before): its own period
              _spend_ev("k", "api_call", day + 9, tokens=1),
              _spend_ev("l", "api_call", day + 9, cust="c5", tokens=1),
              _spend_ev("m", "api_call", day + 10, cust="c5", tokens=2.5),
              _spend_ev("n", "api_call", day + 11, cust="c5", tokens=1),  # 3 calls: upgrade to spendy
              _spend_ev("o", "api_call", day + 12, cust="c4", tokens=1),
              # the next day: charges that fall, then rise again below the level derived before the fall
              _spend_ev("p", "api_call", day + DAY, tokens=5),  # last_tokens 5: 0.5 (1 needs 10 from here on)
              _spend_ev("q", "api_call", day + DAY + 1, tokens=2),  # latest 2: 2, fires 1 and not 2.5
              _spend_ev("r", "gpu", day + DAY + 2, seconds=5, kind="a100"),  # staircase 1: fires 1 (4 needs 7)
              _spend_ev("s", "gpu", day + DAY + 3, seconds=2, kind="a100", correction=True),  # 3 s: 6, fires 4
              _spend_ev("t", "gpu", day + 2 * DAY, seconds=5, kind="a100"),  # as r
              _spend_ev("u", "gpu", day + 2 * DAY + 1, seconds=-2, kind="a100")]  # a negative value: as s
    items = [(("in", i + 1), raw) for i, raw in enumerate(stream)]
    want = _run_shard("python", items, 3)[0]
    spent = sorted((a["customer_id"], a["metric"], a["event_id"], a["threshold_amount"], a["amount"])
                   for a in want["alerts"].values() if a["type"] == "spend_crossed" and a["customer_id"] == "c3"
                   and a["period_start"] == _iso(day))
    assert spent == sorted([
        ("c3", "tokens", "a", 2.0, 6.0), ("c3", "tokens", "a", 5.0, 6.0), ("c3", "tokens", "a", 5.5, 6.0),
        ("c3", "api_calls", "b", 2.0, 2.0), ("c3", "api_calls", "c", 2.5, 3.0), ("c3", "api_calls", "c", 3.0, 3.0),
        ("c3", "gpu_seconds", "e", 1.0, 6.0), ("c3", "gpu_seconds", "e", 4.0, 6.0),
        ("c3", "gpu_seconds", "g", 8.0, 9.0), ("c3", "low_seconds", "e", 1.0, 2.0),
        ("c3", "peak_tokens", "a", 1.0, 7.0), ("c3", "peak_tokens", "a", 3.0, 7.0),
        ("c3", "last_tokens", "a", 1.0, 1.2),  # (then latest 5, 0.5, 1: 0.5 .. 1, never 2.5)
        ("c3", "distinct_tokens", "a", 1.0, 1.0), ("c3", "distinct_tokens", "c", 2.0, 2.0)])
    fell = sorted((a["metric"], a["event_id"], a["threshold_amount"], a["amount"]) for a in want["alerts"].values()
                  if a["type"] == "spend_crossed" and a["metric"] in ("last_tokens", "gpu_seconds")
                  and a["customer_id"] == "c3" and a["period_start"] == _iso(day + DAY))
    assert fell == [("gpu_seconds", "r", 1.0, 1.0), ("gpu_seconds", "s", 4.0, 6.0), ("last_tokens", "q", 1.0, 2.0)]
    assert sorted((a["event_id"], a["threshold_amount"]) for a in want["alerts"].values()
                  if a["type"] == "spend_crossed" and a["period_start"] == _iso(day + 2 * DAY)
                  and a["metric"] == "gpu_seconds") == [("t", 1.0), ("u", 4.0)]
    others = sorted((a["customer_id"], a["type"], a["metric"], a["event_id"], a["action"])
                    for a in want["alerts"].values() if a["type"] in ("plan_changed", "blocked", "unblocked"))
    assert others == sorted([("c3", "plan_changed", "tokens", "c", "overage"),
                             ("c3", "blocked", "gpu_seconds", "f", "block"),
                             ("c3", "unblocked", "gpu_seconds", "h", "unblock"),
                             ("c5", "plan_changed", "api_calls", "n", "upgrade")])
    for batch in (1, 3, 7, 20):
        want = _run_shard("python", items, batch)[:2]
        for nmed in (False, True):
            got, got_state, keys = _run_shard("native", items, batch, nmed)
            assert (got, got_state) == want
            assert "beta|c3" in keys and not {"beta|c4", "beta|c5"} & keys


@settings(max_examples=40, **SETTINGS)
@given(steps=st.lists(st.one_of(
    st.tuples(st.sampled_from(["c3", "c3", "c3", "c5"]), st.sampled_from(["api_call", "gpu"]), st.integers(0, 7),
              st.one_of(st.integers(-3, 12), st.sampled_from([0.5, 2.5, -1.5, 1e6])), st.integers(0, 6),
              st.sampled_from(["a100", "h100"])),
    st.tuples(st.just("change"), st.sampled_from(["c3", "c5"]),
              st.sampled_from(["spendy", "spendy2", "climb", "soft", "pro", "metered", None]))),
    min_size=1, max_size=50), batch=st.integers(1, 8), native_mediation=st.booleans())
def test_spend_thresholds_and_plan_changes_agree_with_the_python_core(steps, batch, native_mediation):
    """Random events of the spend-threshold customers (every card model, corrections, negative values, late
    events of earlier periods, retried ids) with changelog records moving them between plans (spend
    thresholds on other cards, an auto_overage upgrade, thresholds only, cancelled): the Python core's alerts,
    rows and state; a customer whose plan the native fold takes is held by it at the end."""
    items: List[Any] = []
    plan = {"c3": "spendy", "c5": "climb"}
    for n, s in enumerate(steps):
        if s[0] == "change":
            items.append((("change", n), _plan_change(s[1], s[2])))
            plan[s[1]] = s[2]
            continue
        cust, etype, t, v, when, kind = s
        props = {"tokens": v, "seconds": v, "kind": kind}
        ts = BASE + 5 * DAY + when * 3_600_000 - (DAY if t == 7 else 0)
        items.append((("in", n), _spend_ev(f"e{n % 23}" if t == 6 else f"u{n}", etype, ts, cust,
                                           correction=t == 5, **props)))
    want = _run_shard("python", items, batch)
    got = _run_shard("native", items, batch, native_mediation)
    assert got[:2] == want[:2]
    if plan["c3"] in ("spendy", "spendy2") and any(s[0] == "c3" for s in steps):
        assert "beta|c3" in got[2]


def test_a_changelog_record_after_native_events_in_one_batch_folds_them_once():
    """A natively folded customer's events, then a changelog record moving it to a plan the native fold does
    not take (an auto_overage upgrade), then more events, all in one batch: the events before the record are
    folded once (not again into a fresh native customer whose rows would overwrite the meter's at the next
    mirror), so the state and rows are the Python core's."""
    ts = BASE + 5 * DAY
    items = [(("in", 0), _spend_ev("u0", "api_call", ts, tokens=2)),
             (("change", 1), _plan_change("c3", "climb")),
             (("in", 2), _spend_ev("u2", "api_call", ts + 1, tokens=3))]
    want = _run_shard("python", items, 3)
    got = _run_shard("native", items, 3)
    assert got[:2] == want[:2] and "beta|c3" not in got[2]
    assert want[0]["rows"][("p", "beta", "c3", "api_calls", ts)][1]["events"] == 2


def test_the_native_core_drops_the_rows_the_python_meter_evicts():
    """A flow that runs for months: when a customer's meter evicts the rows of a closed period (its flush, or
    finalize, past period end + late_grace), the native core drops the same rows. Without that, every closed
    period's windows stayed in native memory for the life of the flow. The outputs stay those of the Python core
    (late events into the open grace window included), and each customer's native rows are exactly its meter's."""
    def ev(eid, cust, ts, tenant="acme", **props):
        return (("in", eid), json.dumps({"event_id": eid, "tenant_id": tenant, "customer_id": cust,
                                         "event_type": "api_call", "timestamp": ts,
                                         "properties": {"tokens": 3, **props}}).encode())

    customers = [("acme", "c1"), ("acme", "c2"), ("acme", "c3"), ("acme", "c9")]
    batches = []
    for day in range(0, 150, 2):  # five months, every other day; each batch also has a late event of 1 day before
        ts = BASE + day * DAY
        batch = [ev(f"{t}{c}-{day}-{h}", c, ts + h * 3_600_000, tenant=t, kind=f"k{h % 2}")
                 for t, c in customers for h in range(3)]
        batch.append(ev(f"late-{day}", "c2", ts - DAY + 5))
        batches.append(batch)

    def run(core):
        cfg = config(core, shards=1)
        tick = [0]
        med = native.NativeMediator(cfg, stats=FlowStats()) if core == "native" else Mediator(cfg, stats=FlowStats())
        logic = _ShardLogic(Rules(cfg), 1, None, False, med, clock=lambda: tick[0],
                            native=native.NativeMeters(cfg) if core == "native" else None)
        out: List[Any] = []
        for n, batch in enumerate(batches):
            tick[0] = BASE + n * 1000  # a flush tick with every batch
            values = [b for _, b in med.split(batch, False)[0]] if core == "native" else \
                [b for _, b in bundle_shards(med(batch).groups, 1)]
            out += logic.on_batch(values)[0]
        out += logic.on_eof()[0]
        rows: Dict[Any, Any] = {}
        for em in out:
            for r in em.windows:
                rows[("w", r.tenant_id, r.customer_id, r.metric, r.window_start, tuple(sorted(r.dimensions.items())))] \
                    = (r.value, r.events, r.version)
            for r in em.periods:
                rows[("p", r.tenant_id, r.customer_id, r.metric, r.period_start)] = (r.value, r.events, r.version,
                                                                                      r.final)
        return logic, rows

    nat, rows = run("native")
    assert rows == run("python")[1]
    assert sum(1 for k in rows if k[0] == "p" and rows[k][3]) >= 4 * 3  # closed periods left final
    core = nat._native._core
    for key, meter in nat._meters.items():
        assert key in nat._native.keys
        assert core.rows(key) == (len(meter.windows), len(meter.periods), len(meter.excluded)), key
        # only the open period (and the one inside late_grace) is held: not five months of hourly windows
        assert len(meter.windows) < 2 * 31 * 3 * 12, key


def test_a_customer_moving_between_the_folds_reuses_its_native_slot():
    """Each changelog record moves its customer to the Python fold and back with its state; the native core
    reuses the slot the customer left instead of keeping an empty one per move, and the outputs stay the Python
    core's."""
    def change(n):
        return json.dumps({"tenant_id": "acme", "customer_id": "c3", "subscription": {
            "tenant_id": "acme", "customer_id": "c3", "plan": "pro", "period": "month",
            "anchor": "2026-11-01T00:00:00Z", "account_name": f"v{n}"}}).encode()

    def ev(eid, cust):
        return (("in", eid), json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": cust,
                                         "event_type": "api_call", "timestamp": BASE, "properties": {"tokens": 1}})
                .encode())

    def run(core):
        cfg = config(core, shards=1)
        med = Mediator(cfg, stats=FlowStats())
        logic = _ShardLogic(Rules(cfg), 1, None, False, med, clock=lambda: BASE + 40 * DAY,
                            native=native.NativeMeters(cfg) if core == "native" else None)
        changes = ChangelogMediator(cfg, stats=FlowStats())
        out = logic.on_batch([b for _, b in bundle_shards(med([ev("a", "c3"), ev("b", "c2")]).groups, 1)])[0]
        for n in range(6):
            ((_key, update),), _dead = changes([(("changes", n), change(n))])
            out += logic.on_batch([update] + [b for _, b in bundle_shards(med([ev(f"e{n}", "c3")]).groups, 1)])[0]
        out += logic.on_eof()[0]
        return logic, sorted((r.customer_id, r.metric, r.value, r.version) for em in out for r in em.periods)

    nat, rows = run("native")
    assert rows == run("python")[1]
    assert nat._native.keys == {"acme|c3", "acme|c2"} and nat._native.loaded == 6
    assert nat._native._core.customers() == 2  # (one slot each; it was 2 + one per move)


def test_the_unblocked_alert_after_a_flush_evicted_the_blocked_period_agrees():
    """Pinned: acme|c4's gpu_seconds (hard, 5 included) blocks at 5 in its day from Nov 1 13:00; an api_call four
    days later closes that day (its end + late_grace 2d before the watermark) and the first batch's flush evicts its
    rows. The gpu event of the next batch starts a new period: the unblocked alert reports the closed day's final
    usage (5, 100 %), on both cores, with the same gateway state (the new period's)."""
    day0 = BASE + 13 * 3_600_000
    stream = [json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c4", "event_type": etype,
                          "timestamp": ts, "properties": props}).encode()
              for eid, etype, ts, props in (("b", "gpu", day0, {"seconds": 5, "kind": "a100"}),
                                            ("x", "api_call", day0 + 4 * DAY, {"tokens": 1}),
                                            ("e", "gpu", day0 + 4 * DAY + 1, {"seconds": 1, "kind": "a100"}))]
    items = [(("in", i + 1), raw) for i, raw in enumerate(stream)]
    want = _run_shard("python", items, 2)[:2]
    unblocked = [(a["metric"], a["event_id"], a["usage"], a["usage_pct"], a["period_start"])
                 for a in want[0]["alerts"].values() if a["type"] == "unblocked"]
    assert unblocked == [("gpu_seconds", "e", 5.0, 100.0, _iso(day0))]
    assert want[0]["gateway"][("acme", "c4", "gpu_seconds")]["period_start"] == day0 + 4 * DAY
    for nmed in (False, True):
        got, got_state, keys = _run_shard("native", items, 2, nmed)
        assert (got, got_state) == want
        assert "acme|c4" in keys
