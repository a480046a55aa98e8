"""Fuzz: hostile payloads through mediation and the meter step never raise, and every line is accounted for once.

Hypothesis builds streams of events that are valid, slightly wrong or outright hostile - nesting up to
10,000 deep (in unknown fields, properties or at the top level), extreme and malformed timestamps (years
0001 and 9999, offsets, epoch ms around 2^63 and 2^64, floats, text), malformed numbers (1e400, NaN,
4,301-digit integers), wrong types in every field, invalid UTF-8, binary, a byte-order mark, strings around
``pipeline.max_event_bytes`` - and feeds them in random batches to a :class:`Mediator` (fixed clock) and one
:class:`CustomerMeter` per key, as the dataflow wires them. Checked for every stream:

- no exception escapes either step, and no event needs the ``internal_error`` safety net;
- each line ends exactly once: mediation either dead-letters it or hands it to its customer's meter,
  which either counts it (accepted, duplicate, excluded) or dead-letters it (too_late, invalid_event);
- the counters add up: read = accepted + duplicates + excluded + dead_lettered, and the dead-letter records
  are those events plus one missing_property record per metric that lacked its property.
"""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.stats import FlowStats, identity
from meterflow.base.timeutil import ms_to_iso
from meterflow.operators.mediate import Mediator
from meterflow.operators.meter import CustomerMeter
from meterflow.operators.rules import Rules
from meterflow.schemas.config import parse_config

NOW = 1798761600000  # 2027-01-01T00:00:00Z, the injected wall clock
CFG = parse_config({
    "pipeline": {"rollup_window": "1h", "late_grace": "6h", "dedupe_window": "24h", "max_event_bytes": 65_536},
    "tenants": [{"id": "acme", "exclude_when": {"environment": "test"}, "excluded_customers": ["cust_internal"]},
                {"id": "beta"}],
    "metrics": [
        {"code": "api_calls", "event_type": "api_call"},
        {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens",
         "group_by": ["region"]},
        {"code": "users", "event_type": "api_call", "aggregation": "unique_count", "property": "user"},
        {"code": "lat95", "event_type": "api_call", "aggregation": "p95", "property": "latency"},
        {"code": "seats", "event_type": "seats", "aggregation": "latest", "property": "seats"},
    ],
    "plans": [{"code": "pro", "entitlements": {"api_calls": {"included": 5, "thresholds": [50, 100],
                                                             "enforcement": "hard"},
                                               "tokens": {"included": 1000, "overage_rate": 0.01}}}],
    "subscriptions": [{"tenant_id": "acme", "customer_id": "c1", "plan": "pro", "period": "month",
                       "anchor": "2026-03-15T12:00:00Z"},
                      {"tenant_id": "beta", "customer_id": "c2", "plan": "pro", "period": "year",
                       "anchor": "2024-02-29T00:00:00Z"}],
}, "fuzz.toml", environ={})
WHOLE_EVENT_REASONS = {"invalid_json", "invalid_event", "unknown_tenant", "too_late"}

# -- values --------------------------------------------------------------------------------------------

EXTREME_INTS = [0, 1, -1, 10 ** 15, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 5, 2 ** 64 - 1, 2 ** 64 + 5,
                -2 ** 63, -2 ** 63 - 1, 253402300799999, 253402300800000, -62135596800000, NOW, NOW + 3_600_000,
                NOW + 3_600_001, 221_845_392_000_000]
TIMESTAMP_TEXT = ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
                  "9999-12-31T23:59:59-23:59", "1969-12-31T23:59:59.999Z", "1970-01-01T00:00:00Z",
                  "2999-01-01T00:00:00Z", "2026-03-15T12:00:00Z", "2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z",
                  "2026-11-03T14:30:00", "2026-11-03T14:30:00.123456789Z", "2026-11-03T14:30:00+24:00",
                  "2026-11-03T14:30:00z", "2026-11-03 14:30:00Z", "", "Z", "0000-00-00T00:00:00Z",
                  "2026-11-03T14:30:00Z" + " " * 50, "+12026-11-03T14:30:00Z", "２０２６-11-03T14:30:00Z"]
RAW_NUMBERS = [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-0", b"01", b".5", b"1" * 4301, b"1" * 4300,
               b"-" + b"9" * 400, b"1e-400", b"0x10", b"1_000", b"2.5e+308", b"1.7976931348623157e308"]


def json_values(max_leaves=8):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from(EXTREME_INTS),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=max_leaves)


DAY = 86_400_000
plausible = st.integers(0, 120 * DAY).map(lambda d: NOW - d)  # the last four months: periods close, events are late
timestamps = st.one_of(
    plausible, plausible, plausible, plausible.map(ms_to_iso), plausible.map(ms_to_iso), plausible.map(ms_to_iso),
    st.integers(0, 2 ** 40).map(lambda d: NOW - d),  # up to 35 years back
    st.integers(-3_600_000 * 3, 3_600_000 * 3).map(lambda d: NOW + d),  # around the clock-skew limit
    st.sampled_from(EXTREME_INTS), st.integers(-2 ** 70, 2 ** 70), st.sampled_from(TIMESTAMP_TEXT),
    st.floats(), st.text(max_size=30), st.booleans(), st.none(), json_values(3))

properties = st.dictionaries(
    st.sampled_from(["tokens", "region", "user", "latency", "seats", "environment", "x"]),
    st.one_of(st.integers(-10 ** 6, 10 ** 6), st.integers(0, 100), st.sampled_from(["test", "us", "eu", "u1", "u2"]),
              st.sampled_from(EXTREME_INTS), st.floats(allow_nan=False, allow_infinity=False), st.floats(),
              st.text(max_size=8), st.booleans(), st.none()),
    max_size=6)


@st.composite
def events(draw):
    """A JSON-encodable event dict, right or wrong in any field."""
    ev = {"event_id": draw(st.one_of(st.sampled_from(["e1", "e2", "e3", "e4", "e5", "e6"]), st.text(max_size=6))),
          "tenant_id": draw(st.sampled_from(["acme", "acme", "acme", "beta", "beta", "ghost", ""])),
          "customer_id": draw(st.sampled_from(["c1", "c2", "c3", "cust_internal", "a|b"])),
          "event_type": draw(st.sampled_from(["api_call", "seats", "heartbeat"])),
          "timestamp": draw(timestamps),
          "properties": draw(properties)}
    if draw(st.integers(0, 3)) == 0:
        ev["correction"] = draw(st.one_of(st.booleans(), st.booleans(), json_values(2)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # a field of the wrong type, dropped, or an unknown one
        field = draw(st.sampled_from(list(ev) + ["extra", "corrects"]))
        how = draw(st.sampled_from(["wrong", "drop", "keep"]))
        if how == "wrong":
            ev[field] = draw(json_values())
        elif how == "drop":
            ev.pop(field, None)
    return ev


def nest(depth: int, kind: str) -> str:
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"k":' * depth + "0" + "}" * depth


@st.composite
def payloads(draw):
    """The bytes of one line: an event, then perhaps made hostile."""
    raw = json.dumps(draw(events()), ensure_ascii=draw(st.booleans())).encode()
    how = draw(st.sampled_from(["as is"] * 10 + ["deep", "deep", "number", "utf8", "huge", "bom", "binary",
                                                 "truncate", "top-level"]))
    if how == "deep":
        depth = draw(st.one_of(st.integers(1, 80), st.sampled_from([62, 63, 64, 65, 1000, 10_000])))
        inner = nest(depth, draw(st.sampled_from(["[", "{"])))
        where = draw(st.sampled_from(["unknown", "properties"]))
        if where == "unknown":
            raw = raw[:-1] + b', "deep": ' + inner.encode() + b"}"
        else:
            raw = raw.replace(b'"properties": {', b'"properties": {"deep": ' + inner.encode() + b", ", 1)
    elif how == "number":
        number = draw(st.sampled_from(RAW_NUMBERS))
        target = draw(st.sampled_from([b'"timestamp": ', b'"tokens": ', b'"latency": ', b'"seats": ']))
        i = raw.find(target)
        if i >= 0:
            j = i + len(target)
            end = j
            while end < len(raw) and raw[end:end + 1] not in (b",", b"}"):
                end += 1
            raw = raw[:j] + number + raw[end:]
    elif how == "utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80", b"\x00"]))
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + junk + raw[at:]
    elif how == "huge":
        n = draw(st.sampled_from([65_536, 65_535, 65_000, 70_000])) - len(raw)
        raw = raw[:-1] + b', "pad": "' + b"x" * max(0, n - 11) + b'"}'
    elif how == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif how == "binary":
        raw = draw(st.binary(max_size=64))
    elif how == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == "top-level":
        raw = draw(st.sampled_from([nest(10_000, "[").encode(), b"[" * 10_000, b"{" * 5000, b'"' + b"\\" * 999,
                                    b"[]", b"null", b"1e400", json.dumps(draw(json_values())).encode()]))
    return raw


@st.composite
def streams(draw):
    lines = draw(st.lists(payloads(), min_size=1, max_size=30))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(lines) - 1)), max_size=4)))
    batches, prev = [], 0
    for c in cuts + [len(lines)]:
        if c > prev:
            batches.append((prev, c))
            prev = c
    return lines, batches


# -- the harness and the check -------------------------------------------------------------------------

def run(lines, batches):
    stats = FlowStats()
    mediator = Mediator(CFG, stats=stats, clock=lambda: NOW)
    rules = Rules(CFG)
    meters = {}
    mediated_dead, metered, meter_dead, missing = [], [], [], []
    for lo, hi in batches:
        batch = [(("fuzz.jsonl", i + 1), lines[i]) for i in range(lo, hi)]
        groups, dead = mediator(batch)
        mediated_dead += dead
        for key, group in groups.items():
            metered += [me.src for me in group]
            meter = meters.get(key)
            if meter is None:
                meter = meters[key] = CustomerMeter(rules, key, stats=stats)
            out = meter.process([group], flush=True)
            for d in out.dead_letters:
                (missing if d.reason == "missing_property" else meter_dead).append(d)
    return stats.snapshot(), mediated_dead, metered, meter_dead, missing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(streams())
def test_hostile_streams_never_raise_and_every_line_is_accounted_for_exactly_once(stream):
    lines, batches = stream
    counters, mediated_dead, metered, meter_dead, missing = run(lines, batches)
    every = {("fuzz.jsonl", i + 1) for i in range(len(lines))}
    # mediation: each line is a dead letter or goes to its customer's meter, never both, never twice
    dead_lines = Counter(d.source for d in mediated_dead)
    assert all(n == 1 for n in dead_lines.values()), dead_lines
    assert len(metered) == len(set(metered))
    assert {f"fuzz.jsonl:{i}" for _, i in metered}.isdisjoint(dead_lines)
    assert {f"fuzz.jsonl:{i}" for _, i in metered} | set(dead_lines) == {f"fuzz.jsonl:{i}" for _, i in every}
    # the meter: at most one whole-event dead letter per line, only for lines it was given
    meter_lines = Counter(d.source for d in meter_dead)
    assert all(n == 1 for n in meter_lines.values()) and set(meter_lines) <= {f"fuzz.jsonl:{i}" for _, i in metered}
    # reasons: a contract code with a detail; the internal_error safety net never needed
    for d in mediated_dead + meter_dead + missing:
        assert d.detail, d
    assert {d.reason for d in mediated_dead} <= WHOLE_EVENT_REASONS - {"too_late"}, [d.detail for d in mediated_dead]
    assert {d.reason for d in meter_dead} <= {"too_late", "invalid_event"}, [d.detail for d in meter_dead]
    # the counters: the identity, and each term is what the outputs say
    assert counters["read"] == len(lines)
    ok, text = identity(counters)
    assert ok, text
    assert counters["dead_lettered"] == len(mediated_dead) + len(meter_dead)
    assert counters["missing_property"] == len(missing)
    assert counters["accepted"] + counters["duplicates"] + counters["excluded"] == len(metered) - len(meter_dead)
