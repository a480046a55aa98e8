"""The native batch core (meterflow_native, operators/native.py) against the Python path it replaces: the
Mediator and one CustomerMeter per key, on the same random and hostile lines. Totals, event counts and
excluded counts of every window and period row, the counters, and every dead letter (reason, detail, id)
must be identical."""

from __future__ import annotations

import json
import tomllib
from typing import Any, Dict, List, Tuple

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config

native = pytest.importorskip("meterflow.operators.native")
if not native.AVAILABLE:  # pragma: no cover - depends on the build
    pytest.skip("meterflow_native is not built (./dev setup with cargo)", allow_module_level=True)

NOW = 1_793_491_200_000 + 40 * 86_400_000  # 2026-12-11T00:00:00Z, injected
DAY = 86_400_000

CONFIG = """
[pipeline]
rollup_window = "1h"
late_grace = "2d"
dedupe_window = "1d"
max_clock_skew = "1h"
max_event_bytes = 600

[[tenants]]
id = "acme"
exclude_when = { environment = "test" }
excluded_customers = ["internal"]

[[tenants]]
id = "beta"
exclude_when = { synthetic = true, n = 1 }

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
code = "one_calls"
event_type = "api_call"
aggregation = "count"
where = { n = 1.0 }

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
included = 5
thresholds = [50, 100]
enforcement = "soft"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c1"
plan = "pro"
period = "month"
anchor = "2026-01-31T10:30:00Z"

[[subscriptions]]
tenant_id = "acme"
customer_id = "c2"
plan = "pro"
period = "day"
anchor = "2026-11-03T07:00:00Z"

[[subscriptions]]
tenant_id = "beta"
customer_id = "c1"
plan = "pro"
period = "quarter"
anchor = "2025-02-28T00:00:00Z"

[[subscriptions]]
tenant_id = "beta"
customer_id = "c2"
plan = "pro"
period = "week"
anchor = "2026-11-04T12:00:00Z"
"""

CFG = parse_config(tomllib.loads(CONFIG), "test", environ={})


def python_path(batches: List[List[Tuple[Any, bytes]]]) -> Dict[str, Any]:
    rules = Rules(CFG)
    rules.gateway_states = False
    stats = FlowStats()
    med = Mediator(CFG, stats, clock=lambda: NOW)
    meters: Dict[str, CustomerMeter] = {}
    dead = []
    for batch in batches:
        out = med(batch)
        dead += out.dead_letters
        for key, events in out.groups.items():
            m = meters.get(key)
            if m is None:
                m = meters[key] = CustomerMeter(rules, key, stats=stats)
            dead += m.process([events], flush=False).dead_letters
    windows, periods, excluded = {}, {}, {}
    for key, m in meters.items():
        for (code, ws, dims), acc in m.windows.items():
            assert dims == ()
            windows[(key, code, ws)] = (acc.events, acc.value())
        for (code, ps, pe), acc in m.periods.items():
            periods[(key, code, ps, pe)] = (acc.events, acc.value())
        for (code, ps, pe), n in m.excluded.items():
            excluded[(key, code, ps, pe)] = n
    c = stats.snapshot()
    counters = {k: c.get(k, 0) for k in ("duplicates", "excluded", "unmetered")}
    return {"windows": windows, "periods": periods, "excluded": excluded, "dead": _dead(dead), "counters": counters}


def native_path(batches: List[List[Tuple[Any, bytes]]]) -> Dict[str, Any]:
    core = native.NativeBatchCore(CFG, clock=lambda: NOW)
    windows, periods, excluded = {}, {}, {}
    dead = []
    for batch in batches:
        out = core.process(batch)
        dead += out.dead_letters
        for key, code, ws, events, total, fs in out.windows:
            windows[(key, code, ws)] = (events, native.sum_value(total, fs))
        for key, code, ps, pe, events, total, fs in out.periods:
            periods[(key, code, ps, pe)] = (events, native.sum_value(total, fs))
        for key, code, ps, pe, n in out.excluded:
            excluded[(key, code, ps, pe)] = n
    c = core.counters()
    counters = {k: c[k] for k in ("duplicates", "excluded", "unmetered")}
    return {"windows": windows, "periods": periods, "excluded": excluded, "dead": _dead(dead), "counters": counters}


def _dead(dls: List[Any]) -> List[Tuple[str, ...]]:
    return sorted((d.source, d.reason, d.detail, d.tenant_id, d.metric, d.dl_id) for d in dls)


# -- lines: plausible events, edge values, and hostile bytes ------------------------------------------------

BASE = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def _iso(ms: int, form: int) -> str:
    from meterflow.base.timeutil import ms_to_dt

    dt = ms_to_dt(ms)
    head = dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{ms % 1000:03d}"
    return [head + "Z", head + "." + frac + "Z", head.replace("T", " ") + "z", head + "." + frac + "123456+00:00",
            head + ".5-00:00", head.replace("T", "t") + "Z", head + "+05:30", head + "-11:59", head,
            head + ".Z", head + "+0530", head + ",5Z", head + "Z ", "2026-02-30T00:00:00Z", "2026-11-01T24:00:00Z",
            head + ".1234567890123Z"][form]


FORMS = [0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7] + list(range(8, 16))  # 0-7 valid RFC 3339, 8-15 not (or not strict)
stamps = st.one_of(
    st.integers(min_value=-5, max_value=60).map(lambda h: BASE + h * 3_600_000 * 24 // 2),
    st.integers(min_value=0, max_value=2 * DAY).map(lambda d: BASE + 30 * DAY + d),  # month and day edges
    st.sampled_from([BASE - 1, BASE, NOW, NOW + 3_600_000, NOW + 3_600_001, 0, 221_845_392_000_001]),
)
values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=64),
                   st.sampled_from([0.1, -0.0, 1e299, -1e299, 1e300, 2**63, -2**63 - 1, 10**30, 10**301, True, None,
                                    "7", 5e-324]),
                   st.text(max_size=3))


@st.composite
def events(draw) -> bytes:
    ev: Dict[str, Any] = {
        "event_id": draw(st.sampled_from(["e1", "e2", "e3", "e4", "e5", "é4", "e\u2603", "x" * 256, "x" * 257, ""])
                         | st.text(min_size=1, max_size=4)),
        "tenant_id": draw(st.sampled_from(["acme", "acme", "beta", "beta", "ghost", ""])),
        "customer_id": draw(st.sampled_from(["c1", "c2", "c3", "internal", "a|b"])),
        "event_type": draw(st.sampled_from(["api_call", "gpu", "other"])),
    }
    ts = draw(stamps)
    ev["timestamp"] = ts if draw(st.booleans()) else _iso(max(ts, 0), draw(st.sampled_from(FORMS)))
    props: Dict[str, Any] = {}
    for k, choices in (("tokens", values), ("seconds", values), ("kind", st.sampled_from(["a100", "h100", 1])),
                       ("environment", st.sampled_from(["test", "prod"])), ("synthetic", st.sampled_from([True, 1])),
                       ("n", st.sampled_from([1, 1.0, True, "1", 2]))):
        if draw(st.booleans()):
            props[k] = draw(choices)
    if props or draw(st.booleans()):
        ev["properties"] = props
    if draw(st.integers(0, 5)) == 0:
        ev["correction"] = True
        ev["corrects"] = "e1"
    if draw(st.integers(0, 8)) == 0:
        ev["extra"] = draw(st.sampled_from([{"a": [1, 2, {"b": None}]}, [[[]]], 1e400, "x", 12345678901234567890]))
    if draw(st.integers(0, 5)) == 0:  # a required field missing (or the optional properties)
        del ev[draw(st.sampled_from(sorted(ev)))]
    seps = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(ev, ensure_ascii=draw(st.booleans()), separators=seps)
    raw = text.encode("utf-8", "surrogatepass")
    how = draw(st.integers(0, 24))
    if how == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif how == 1:
        raw = raw.replace(b'"tenant_id"', b'"tenant_id": "acme", "tenant_id"', 1)
    elif how == 2:
        raw = b"[" * draw(st.integers(60, 70)) + raw
    elif how == 3:
        raw = raw.replace(b'"event_type"', b'"event\\u005ftype"', 1)
    elif how == 4:
        raw = draw(st.binary(max_size=20))
    elif how == 5:
        raw = b"  " + raw + b"\n"
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(events(), max_size=60), cuts=st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_native_core_matches_the_python_path(lines: List[bytes], cuts: List[int]) -> None:
    items = [(("t", i), raw) for i, raw in enumerate(lines)]
    batches, i, k = [], 0, 0
    while i < len(items):
        n = cuts[k % len(cuts)]
        batches.append(items[i:i + n])
        i, k = i + n, k + 1
    assert native_path(batches) == python_path(batches)


def test_known_stream_exact_totals_and_dead_letters() -> None:
    """A hand-made stream whose outcome is known: counted, duplicate, excluded, late, too_late, bad."""
    def line(eid: str, ts: Any, **props: Any) -> bytes:
        return json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": "c3", "event_type": "api_call",
                           "timestamp": ts, "properties": props}).encode()

    lines = [line("a", BASE + 10, tokens=5), line("a", BASE + 20, tokens=7),  # duplicate: not counted
             line("b", "2026-11-01T00:30:00.250+00:00", tokens=2.5),
             line("c", BASE + 40, tokens=1, environment="test"),  # excluded
             line("d", NOW, tokens="many"),  # counted in api_calls; missing_property for tokens
             line("e", BASE - 10 * DAY, tokens=1),  # its period (October) closed 2 days after its end: too_late
             b"{not json"]
    batches = [[(("t", i), raw) for i, raw in enumerate(lines)]]
    got = native_path(batches)
    assert got == python_path(batches)
    nov = (BASE, BASE + 30 * DAY)
    dec = (BASE + 30 * DAY, BASE + 61 * DAY)
    assert got["periods"][("acme|c3", "api_calls", *nov)] == (2, 2.0)
    assert got["periods"][("acme|c3", "tokens", *nov)] == (2, 7.5)
    assert got["periods"][("acme|c3", "api_calls", *dec)] == (1, 1.0)
    assert got["excluded"][("acme|c3", "tokens", *nov)] == 1
    assert [d[1] for d in got["dead"]] == ["missing_property", "too_late", "invalid_json"]
    assert got["counters"] == {"duplicates": 1, "excluded": 1, "unmetered": 0}


def test_unsupported_configurations_are_refused_with_the_reason() -> None:
    cfg = parse_config(tomllib.loads(CONFIG.replace('aggregation = "count"\nwhere', 'aggregation = "count"\n'
                                                    'group_by = ["n"]\nwhere')), "test", environ={})
    assert native.unsupported(CFG) is None
    assert native.unsupported(cfg) == "metric 'one_calls': group_by is not native yet"
    with pytest.raises(ValueError, match="cannot meter this configuration: metric 'one_calls'"):
        native.NativeBatchCore(cfg)
    # meter run --json reports the core: the dataflow still runs the Python one
    python_cfg = msgspec.structs.replace(CFG, pipeline=msgspec.structs.replace(CFG.pipeline, core="python"))
    assert native.core_in_use(python_cfg).startswith("python (native core built")  # (whatever pytest --core says)
