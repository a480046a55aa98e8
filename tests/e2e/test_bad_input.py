"""End to end, embedded mode: bad input never stops the pipeline, good input is counted exactly.

These tests run `meter run --input FILE` as a real subprocess on REAL embedded ClickHouse (chDB);
the views are read back by a helper subprocess (chDB allows one data path per process). No Kafka
is needed here (the Kafka-mode tests run against the real Apache Kafka broker of the ``kafka``
session fixture). Each test uses its own temporary directory and ClickHouse path.

The input mixes good events with malformed JSON, wrong types, missing fields, an unknown tenant, a
2 MB payload, binary garbage, naive timestamps, a non-numeric property for a sum metric, a missing
property for a unique_count metric, events just inside and just outside late_grace and one far too
late. Every bad line must be in the dead_letters view with the right reason and ``source`` =
``path:line``; everything good must be counted exactly (compared with the independent reference in
tests/e2e/reference.py and with a few hand-computed numbers); a second run over the same input must
leave identical views. Bad configuration files must fail with one line naming the key and the file.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from meterflow.sample import sample_config_toml
from tests.e2e import reference as ref
from tests.e2e.support import read_views, run_meter, run_summary, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TENANTS = ["acme", "globex"]
SUBSCRIBED = {"acme": ["cust_1"]}
ANCHOR = "2026-03-15T00:00:00Z"
INCLUDED = 5
BIG = 2 * 1024 * 1024


def _ev(eid, tenant, cust, ts, etype="api_call", **props):
    return orjson.dumps({"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                         "timestamp": ts, "properties": props})


P = dict(region="us-east-1", tokens=100, user_id="u1", latency_ms=50)


def _lines():
    """(line bytes, expected dead letter (reason, metric) or None) in file order; line numbers are 1-based
    and count blank lines."""
    return [
        (_ev("e1", "acme", "cust_1", "2026-04-14T10:00:00Z", **P), None),
        (_ev("e2", "acme", "cust_1", "2026-04-14T10:30:00+02:00", **{**P, "tokens": 200, "user_id": "u2",
                                                                      "latency_ms": 70, "region": "eu-west-1"}), None),
        (_ev("e3", "acme", "cust_2", ref.to_ms(datetime(2026, 4, 14, 11, tzinfo=timezone.utc)),
             **{**P, "tokens": 300, "latency_ms": 10}), None),
        (b'{"event_id": "m1", "tenant_id": "acme"', ("invalid_json", "")),  # truncated JSON
        (_ev("s1", "globex", "cust_9", "2026-04-14T12:00:00.250Z", "seat_count", seats=3), None),
        (orjson.dumps({"event_id": 42, "tenant_id": "acme", "customer_id": "cust_1", "event_type": "api_call",
                       "timestamp": "2026-04-14T12:00:00Z"}), ("invalid_event", "")),  # id is a number
        (_ev("w2", "acme", "cust_1", True, **P), ("invalid_event", "")),  # timestamp is a bool
        (_ev("w3", "acme", "cust_1", "2026-04-14T12:00:00Z", nested={"a": 1}), ("invalid_event", "")),
        (orjson.dumps({"event_id": "w4", "tenant_id": "acme", "event_type": "api_call",
                       "timestamp": "2026-04-14T12:00:00Z"}), ("invalid_event", "")),  # no customer_id
        (orjson.dumps({"event_id": "w5", "tenant_id": "acme", "customer_id": "cust_1",
                       "event_type": "api_call"}), ("invalid_event", "")),  # no timestamp
        (b"", None),  # blank line: layout, not an event (but it is a line)
        (_ev("u1", "initech", "cust_1", "2026-04-14T12:00:00Z", **P), ("unknown_tenant", "")),
        (_ev("big", "acme", "cust_1", "2026-04-14T12:00:00Z", **{**P, "blob": "x" * BIG}), ("invalid_event", "")),
        (b"\x00\xff\xfe\x80garbage\x01\x02{{", ("invalid_json", "")),  # binary garbage
        (_ev("naive", "acme", "cust_1", "2026-04-14T13:00:00", **P), ("invalid_event", "")),
        (_ev("np", "acme", "cust_2", "2026-04-14T13:00:00Z", **{**P, "tokens": "lots"}),
         ("missing_property", "tokens")),  # counted by api_calls, active_users and latency_p95
        (_ev("nouser", "acme", "cust_2", "2026-04-14T13:10:00Z", region="us-east-1", tokens=7, latency_ms=900),
         ("missing_property", "active_users")),
        (_ev("e1", "acme", "cust_1", "2026-04-14T10:00:00Z", **P), None),  # retried duplicate of line 1
        (orjson.dumps({"event_id": "e19", "tenant_id": "acme", "customer_id": "cust_1", "event_type": "api_call",
                       "timestamp": "2026-04-14T14:00:00Z", "properties": {**P, "tokens": 1000},
                       "extra": {"ignored": [1, 2]}, "schema": 3}), None),  # unknown top-level fields
        (orjson.dumps({"event_id": "c1", "tenant_id": "acme", "customer_id": "cust_1", "event_type": "api_call",
                       "timestamp": "2026-04-14T15:00:00Z", "correction": True, "corrects": "e1",
                       "properties": {**P, "tokens": 50}}), None),
        (_ev("x1", "acme", "cust_1", "2026-04-14T15:30:00Z", **{**P, "environment": "test"}), None),  # excluded
        (_ev("x2", "acme", "cust_internal", "2026-04-14T16:00:00Z", **P), None),  # excluded customer
        (_ev("hb", "acme", "cust_1", "2026-04-14T16:10:00Z", "heartbeat"), None),  # no metric: not metered
        (_ev("rn", "acme", "cust_2", "2026-04-14T16:30:00Z", **{**P, "region": None}), None),
        (b"[1, 2, 3]", ("invalid_event", "")),
        (_ev("", "acme", "cust_1", "2026-04-14T12:00:00Z", **P), ("invalid_event", "")),
        (_ev("x" * 257, "acme", "cust_1", "2026-04-14T12:00:00Z", **P), ("invalid_event", "")),
        (_ev("neg", "acme", "cust_1", -5, **P), ("invalid_event", "")),
        (b"   \t ", None),  # whitespace only: layout
        (_ev("wm1", "acme", "cust_7", "2026-04-15T06:00:00Z", **P), None),  # watermark = period end + 6 h
        (_ev("edge-in", "acme", "cust_1", "2026-04-14T23:59:59.999Z", **{**P, "tokens": 10000}), None),
        (_ev("wm2", "acme", "cust_7", "2026-04-15T06:00:00.001Z", **P), None),  # now 1 ms past it
        (_ev("edge-out", "acme", "cust_1", "2026-04-14T23:00:00Z", **P), ("too_late", "")),
        (_ev("ancient", "globex", "cust_9", "2026-02-01T00:00:00Z", "seat_count", seats=99), ("too_late", "")),
        (_ev("edge-out", "acme", "cust_1", "2026-04-14T23:00:00Z", **P), None),  # its retry: a duplicate
        (_ev("fl", "acme", "cust_2", "2026-04-15T01:00:00Z", region="ap-south-1", tokens=1.5, user_id="u9",
             latency_ms=12.5), None),
        (b"{}", ("invalid_event", "")),
        (_ev("crlf", "acme", "cust_2", "2026-04-15T02:00:00Z", **P) + b"\r", None),  # CRLF line ending
        (orjson.dumps({"event_id": "cy", "tenant_id": "acme", "customer_id": "cust_1", "event_type": "api_call",
                       "timestamp": "2026-04-15T02:00:00Z", "correction": "yes", "properties": P}),
         ("invalid_event", "")),
        (_ev("s2", "globex", "cust_9", "2026-04-14T12:00:00.250Z", "seat_count", seats=8), None),  # tie: later wins
    ]


def _spec() -> ref.Spec:
    return ref.sample_spec(TENANTS, SUBSCRIBED, datetime.fromisoformat(ANCHOR), included=INCLUDED)


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "meterflow.toml", sample_config_toml(TENANTS, SUBSCRIBED, ANCHOR, INCLUDED),
                        tmp_path / "ch")


def _write(tmp_path: Path, lines) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for raw in lines))
    return path


def _events_for_reference(lines):
    """What a reader of the file sees as events: non-blank lines without the line terminator."""
    return [(n, raw.rstrip(b"\r")) for n, raw in enumerate(lines, 1) if raw.strip()]


def test_bad_lines_dead_lettered_good_lines_counted_exactly_and_rerun_is_idempotent(tmp_path):
    table = _lines()
    lines = [raw for raw, _ in table]
    path = _write(tmp_path, lines)
    cfg = _config(tmp_path)

    numbered = _events_for_reference(lines)
    expected = ref.compute([raw for _, raw in numbered], _spec())
    # the reference agrees with the hand-written reasons (a check of the reference itself)
    want_dead = {n: dl for n, (_, dl) in enumerate(table, 1) if dl is not None}
    assert {numbered[i][0]: (reason, metric) for i, reason, metric in expected.dead_letters} == want_dead
    # and with a few numbers computed by hand
    old = ("acme", "cust_1", "api_calls", ref.to_ms(datetime(2026, 3, 15, tzinfo=timezone.utc)))
    # e1, e2, e19, edge-in, minus the correction c1; x1 excluded; the duplicate and edge-out not counted
    assert expected.periods[old] == {"period_end": ref.to_ms(datetime(2026, 4, 15, tzinfo=timezone.utc)),
                                     "value": 3.0, "included": 5.0, "overage_units": 0.0, "events": 5,
                                     "excluded_events": 1}
    assert expected.periods[old[:2] + ("tokens", old[3])]["value"] == 100 + 200 + 1000 - 50 + 10000
    apr = ref.to_ms(datetime(2026, 4, 1, tzinfo=timezone.utc))
    assert expected.periods[("acme", "cust_2", "api_calls", apr)]["value"] == 6.0  # e3 np nouser rn fl crlf
    assert expected.periods[("acme", "cust_2", "tokens", apr)]["value"] == 300 + 7 + 100 + 1.5 + 100
    assert expected.periods[("globex", "cust_9", "seats", apr)]["value"] == 8.0
    assert expected.periods[("acme", "cust_internal", "api_calls", apr)]["excluded_events"] == 1

    t0 = time.time() * 1000
    first = run_summary(run_meter("run", "--config", str(cfg), "--input", str(path), "--json",
                                  "--progress-every", "0"))["counters"]
    t1 = time.time() * 1000
    assert first["read"] == len(numbered)
    assert {k: first[k] for k in expected.counters} == expected.counters
    assert first["dead_lettered"] + first["missing_property"] == len(want_dead)
    views = read_views(cfg)

    got_p, got_w = ref.views_periods(views["periods"]), ref.views_windows(views["windows"])
    assert got_p == expected.periods, "usage_by_period != reference:\n" + ref.diff(expected.periods, got_p)
    assert got_w == expected.windows, "usage_by_window != reference:\n" + ref.diff(expected.windows, got_w)

    got_dead = {}
    for reason, detail, source, n, sha, hexp, _tenant, metric, received_at in views["dead_letters"]:
        assert detail, f"no detail for the {reason} dead letter at {source}"
        assert t0 - 1000 <= received_at <= t1 + 1000, "received_at is not the wall-clock time of the run"
        assert source.startswith(f"{path}:"), source
        line = int(source.rsplit(":", 1)[1])
        assert line not in got_dead, f"two dead letters for line {line}"
        got_dead[line] = (reason, metric)
        raw = lines[line - 1].rstrip(b"\r")
        assert n == len(raw) and sha == hashlib.sha256(raw).hexdigest(), f"payload of line {line} altered"
        if n <= 65536:
            assert bytes.fromhex(hexp) == raw
    assert got_dead == want_dead

    # a second run over the same input into the same ClickHouse: identical views
    second = run_summary(run_meter("run", "--config", str(cfg), "--input", str(path), "--json",
                                   "--progress-every", "0"))["counters"]
    assert second == first
    again = read_views(cfg)
    for view in ("periods", "windows"):
        assert sorted(map(json.dumps, again[view])) == sorted(map(json.dumps, views[view])), view
    strip = lambda rows: sorted(json.dumps(r[:-1]) for r in rows)  # noqa: E731 - all but received_at
    assert strip(again["dead_letters"]) == strip(views["dead_letters"])


def test_invalid_utf8_inside_a_string_is_a_dead_letter_not_a_crash(tmp_path):
    good = _ev("g1", "acme", "cust_1", "2026-04-14T10:00:00Z", **P)
    bad = b'{"event_id":"bad\xff","tenant_id":"acme","customer_id":"cust_1","event_type":"api_call",' \
          b'"timestamp":"2026-04-14T10:00:00Z"}'
    path = _write(tmp_path, [good, bad, good.replace(b'"g1"', b'"g2"')])
    cfg = _config(tmp_path)
    proc = run_meter("run", "--config", str(cfg), "--input", str(path), "--json", "--progress-every", "0",
                     check=False)
    assert proc.returncode == 0, f"meter run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    views = read_views(cfg)
    assert [(r[0], r[2]) for r in views["dead_letters"]] == [("invalid_json", f"{path}:2")]
    assert {(r[2], r[5]) for r in views["periods"] if r[2] == "api_calls"} == {("api_calls", 2.0)}


def test_nanosecond_timestamp_stays_in_its_own_window_and_period(tmp_path):
    line = _ev("ns", "acme", "cust_2", "2026-04-30T23:59:59.9999999Z", **P)
    path = _write(tmp_path, [line])
    cfg = _config(tmp_path)
    run_meter("run", "--config", str(cfg), "--input", str(path), "--progress-every", "0")
    views = read_views(cfg)
    starts = {(r[2], r[3]) for r in views["periods"] if r[2] == "api_calls"}
    windows = {r[3] for r in views["windows"] if r[2] == "api_calls"}
    assert starts == {("api_calls", ref.to_ms(datetime(2026, 4, 1, tzinfo=timezone.utc)))}
    assert windows == {ref.to_ms(datetime(2026, 4, 30, 23, tzinfo=timezone.utc))}


# -- bad configuration ----------------------------------------------------------------------------

GOOD = sample_config_toml(TENANTS, SUBSCRIBED, ANCHOR, INCLUDED)


def _bad(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


BAD_CONFIGS = [
    pytest.param(_bad('rollup_window = "1h"', 'rollup_window = "fortnight"'), "pipeline.rollup_window", {},
                 id="bad-duration"),
    pytest.param(_bad('late_grace = "6h"', 'late_grase = "6h"'), "late_grase", {}, id="misspelt-key"),
    pytest.param(_bad('aggregation = "unique_count"', 'aggregation = "median"'), "metrics[2].aggregation", {},
                 id="unknown-aggregation"),
    pytest.param(_bad('plan = "pro"', 'plan = "enterprise"'), "subscriptions[0].plan", {}, id="unknown-plan"),
    pytest.param(_bad('property = "tokens"\n', ''), "metrics[1].property", {}, id="sum-without-property"),
    pytest.param(_bad('period = "month"', 'period = "fortnight"'), "subscriptions[0].period", {},
                 id="bad-period"),
    pytest.param(GOOD, "pipeline.late_grace", {"METER_PIPELINE_LATE_GRACE": "soon"}, id="bad-env-override"),
    pytest.param(_bad('included = 5\n', 'included = "lots"\n'), "plans[0].entitlements.api_calls.included", {},
                 id="wrong-type-in-entitlement"),
    pytest.param(GOOD + '\n[clickhouse]\ndsn = "ftp://127.0.0.1:1/meter"\n', "clickhouse.dsn", {},
                 id="unusable-clickhouse-dsn"),
]


@pytest.mark.parametrize("toml, key, extra_env", BAD_CONFIGS)
def test_bad_config_fails_with_one_line_naming_key_and_file(tmp_path, toml, key, extra_env):
    cfg = tmp_path / "bad-config.toml"
    if "[clickhouse]" not in toml:  # never fall back to ./var/clickhouse in the repository
        toml += '\n[clickhouse]\ndsn = "chdb://' + str(tmp_path / "ch") + '"\n'
    cfg.write_text(toml)
    events = _write(tmp_path, [_ev("g1", "acme", "cust_1", "2026-04-14T10:00:00Z", **P)])
    proc = run_meter("run", "--config", str(cfg), "--input", str(events), "--progress-every", "0", check=False,
                     extra_env=extra_env, timeout=120)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr, proc.stderr
    assert len(err) == 1, f"expected one line on stderr, got {len(err)}:\n{proc.stderr}"
    assert str(cfg) in err[0] and key in err[0], err[0]


def test_invalid_toml_and_missing_file_fail_with_one_line_naming_the_file(tmp_path):
    events = _write(tmp_path, [_ev("g1", "acme", "cust_1", "2026-04-14T10:00:00Z", **P)])
    broken = tmp_path / "broken.toml"
    broken.write_text(GOOD.replace("[pipeline]", "[pipeline", 1))
    for cfg in (broken, tmp_path / "does-not-exist.toml"):
        proc = run_meter("run", "--config", str(cfg), "--input", str(events), check=False)
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(err) == 1 and str(cfg) in err[0], proc.stderr
        assert "Traceback" not in proc.stderr


# -- poison lines (issue 9) -----------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def _deep_unknown(eid: str, depth: int) -> bytes:
    """A valid event with an unknown top-level field nested ``depth`` levels (the event object is one more)."""
    head = _ev(eid, "acme", "cust_1", "2026-04-14T11:00:00Z", **P)[:-1]
    return head + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


def _poison_table():
    """(line bytes, expected dead letter (reason, metric) or None): every poison class of issue 9 between good
    events of every kind (duplicates, exclusions, an unmetered type, missing properties, too_late), so the
    summary identity is checked on a mixed stream. cust_1's subscription is anchored mid-month (the 15th)."""
    bad = ("invalid_event", "")
    return [
        (BOM + _ev("g1", "acme", "cust_1", "2026-04-14T09:00:00Z", **P), None),  # a BOM before the first event
        (_ev("g2", "acme", "cust_2", "2026-04-14T09:10:00Z", **{**P, "tokens": 20}), None),
        (_deep_unknown("deep", 10_000), bad),  # RecursionError in the decoder, before
        (b"[" * 10_000 + b"]" * 10_000, bad),  # RecursionError in the untyped second decode, before
        (_deep_unknown("d65", 64), bad),  # 65 levels in all
        (_deep_unknown("d64", 63), None),  # 64 levels: the limit, accepted
        (_ev("t1", "acme", "cust_1", "9999-12-31T23:59:59Z", **P), bad),
        (_ev("t2", "acme", "cust_1", "0001-01-01T00:00:00Z", **P), bad),  # mid-month anchor: no period before it
        (_ev("t3", "acme", "cust_1", "0001-01-01T00:00:00+01:00", **P), bad),
        (_ev("t4", "acme", "cust_1", 10 ** 15, **P), bad),
        (_ev("t5", "acme", "cust_1", 2 ** 63 - 1, **P), bad),
        (_ev("t6", "acme", "cust_1", 2 ** 63 + 5, **P), bad),
        (_ev("t7", "acme", "cust_1", 0, **P).replace(b'"timestamp":0', b'"timestamp":%d' % (2 ** 64 + 5)), bad),
        (_ev("t8", "acme", "cust_2", "2999-01-01T00:00:00Z", **P), bad),  # well-formed, but its clock is wrong
        (_ev("t9", "acme", "cust_2", "1969-12-31T23:59:59Z", **P), bad),
        (_ev("g3", "acme", "cust_2", "2026-04-14T12:00:00Z", **{**P, "tokens": 30}), None),
        (_ev("g1", "acme", "cust_1", "2026-04-14T09:00:00Z", **P), None),  # the first line again: a duplicate
        (_ev("x1", "acme", "cust_1", "2026-04-14T13:00:00Z", **{**P, "environment": "test"}), None),  # excluded
        (_ev("x2", "globex", "cust_internal", "2026-04-14T13:00:00Z", **P), None),  # excluded customer
        (_ev("hb", "acme", "cust_2", "2026-04-14T13:30:00Z", "heartbeat"), None),  # accepted, no metric
        (_ev("np", "acme", "cust_2", "2026-04-14T14:00:00Z", region="us-east-1", tokens="lots", latency_ms=5),
         ("missing_property", "tokens")),  # and active_users (no user_id) below
        (BOM + _ev("mb", "acme", "cust_2", "2026-04-14T14:10:00Z", **P), ("invalid_json", "")),  # BOM mid-file
        (_ev("wm", "globex", "cust_9", "2026-04-15T06:00:00.001Z", **P), None),  # 6 h + 1 ms past cust_1's period
        (_ev("late", "acme", "cust_1", "2026-04-14T23:00:00Z", **P), ("too_late", "")),
        (_ev("g4", "acme", "cust_1", "2026-04-15T07:00:00Z", **{**P, "tokens": 7}), None),  # the next period
    ]


def test_poison_lines_are_dead_letters_and_every_view_equals_the_valid_lines_alone(tmp_path):
    table = _poison_table()
    lines = [raw for raw, _ in table]
    path = _write(tmp_path, lines)
    cfg = _config(tmp_path)
    # what a reader of the file sees: the BOM before the first line is not part of the first event
    events = [raw[len(BOM):] if n == 1 and raw.startswith(BOM) else raw for n, raw in _events_for_reference(lines)]
    t0 = int(time.time() * 1000)
    recovery = tmp_path / "recovery"
    proc = run_meter("run", "--config", str(cfg), "--input", str(path), "--recovery", str(recovery), "--json",
                     "--progress-every", "0", check=False)
    assert proc.returncode == 0, f"meter run exited {proc.returncode}: {proc.stderr[-3000:]}"
    summary = run_summary(proc)

    expected = ref.compute(events, _spec(), now_ms=t0)
    want_dead = {n: dl for n, (_, dl) in enumerate(table, 1) if dl is not None}
    want_dead[21] = ("missing_property", "tokens")
    got_ref = {}
    for i, reason, metric in expected.dead_letters:
        got_ref.setdefault(i + 1, []).append((reason, metric))
    assert got_ref.pop(21) == [("missing_property", "tokens"), ("missing_property", "active_users")]
    assert {n: v[0] for n, v in got_ref.items()} == {n: v for n, v in want_dead.items() if n != 21}

    # every view equals an independent computation over the valid lines alone: the poison left no trace
    valid = [raw for n, raw in enumerate(events, 1) if want_dead.get(n, ("",))[0] not in
             ("invalid_json", "invalid_event", "unknown_tenant")]
    alone = ref.compute(valid, _spec())
    assert alone.periods == expected.periods and alone.windows == expected.windows
    views = read_views(cfg)
    got_p, got_w = ref.views_periods(views["periods"]), ref.views_windows(views["windows"])
    assert got_p == expected.periods, "usage_by_period != reference:\n" + ref.diff(expected.periods, got_p)
    assert got_w == expected.windows, "usage_by_window != reference:\n" + ref.diff(expected.windows, got_w)
    apr = ref.to_ms(datetime(2026, 3, 15, tzinfo=timezone.utc))
    assert got_p[("acme", "cust_1", "api_calls", apr)]["value"] == 2.0  # g1 (after its BOM) and d64

    # one dead letter per poison line, with its reason, detail and file:line; payloads untouched
    got_dead = {}
    for reason, detail, source, _n, sha, _hex, _tenant, metric, _received in views["dead_letters"]:
        assert detail and source.startswith(f"{path}:"), (reason, detail, source)
        line = int(source.rsplit(":", 1)[1])
        got_dead.setdefault(line, []).append((reason, metric))
        assert sha == hashlib.sha256(lines[line - 1]).hexdigest(), f"payload of line {line} altered"
        if line in (7, 14):
            assert "max_clock_skew" in detail, detail
        if line in (3, 4, 5):
            assert "nested deeper than 64 levels" in detail, detail
    assert sorted(got_dead.pop(21)) == [("missing_property", "active_users"), ("missing_property", "tokens")]
    assert {n: v for n, v in got_dead.items()} == {n: [v] for n, v in want_dead.items() if n != 21}

    # the summary adds up, and each term is the reference's
    counters = summary["counters"]
    assert {k: counters[k] for k in expected.counters} == expected.counters == {
        "read": 25, "accepted": 8, "duplicates": 1, "excluded": 2, "dead_lettered": 14, "missing_property": 2}
    assert summary["balanced"] is True
    assert summary["identity"] == "read 25 = accepted 8 + duplicates 1 + excluded 2 + dead-lettered 14 " \
                                  "(+ 2 missing_property for single metrics)"
    # a resume from the recovery directory starts after the last line: nothing is read twice, nothing fails
    again = run_meter("run", "--config", str(cfg), "--input", str(path), "--recovery", str(recovery), "--json",
                      "--progress-every", "0")
    assert run_summary(again)["counters"]["read"] == 0
    assert ref.views_periods(read_views(cfg)["periods"]) == expected.periods


def test_a_future_dated_event_leaves_billing_and_alerts_untouched(tmp_path):
    """Issue 9.3: one well-formed event dated 2999-01-01 at line 101 used to move the watermark, and every
    later event was too_late. It is invalid_event now; usage and alerts are those of the other lines."""
    from tests.e2e import alert_support as al

    w = al.make_workload(11, "fut")
    lines = [value for _key, value in w.messages]
    t, c = w.subs[0].tenant, w.subs[0].customer
    future = json.dumps({"event_id": "from-the-future", "tenant_id": t, "customer_id": c, "event_type": "api_call",
                         "timestamp": "2999-01-01T00:00:00Z"}).encode()
    lines.insert(100, future)
    path = _write(tmp_path, lines)
    alerts_file = tmp_path / "alerts.jsonl"
    cfg_path = tmp_path / "meterflow.toml"
    cfg_path.write_text(al.config_toml(w.tenants, w.subs, chdb_dir=tmp_path / "ch", kafka=None,
                                       alerts_jsonl=alerts_file))
    cfg = al.parse(cfg_path.read_text())
    spec = ref.Spec(tenants={tn: ({}, ()) for tn in w.tenants},
                    subscriptions={(s.tenant, s.customer): (datetime.fromisoformat(al.ANCHOR),
                                                            {al.METRIC: s.entitlement()[0]}) for s in w.subs},
                    metrics=(ref.Metric(al.METRIC, "api_call", "count"),))
    t0 = int(time.time() * 1000)
    summary = run_summary(run_meter("run", "--config", str(cfg_path), "--input", str(path), "--json",
                                    "--progress-every", "0"))
    expected = ref.compute(lines, spec, now_ms=t0)
    without = ref.compute(lines[:100] + lines[101:], spec)
    assert expected.periods == without.periods and expected.windows == without.windows
    # the test is about something: counted as valid, the event would have starved everything after it
    starved = ref.compute(lines, spec)
    late = sum(1 for _, reason, _ in starved.dead_letters if reason == "too_late")
    assert late > 200, late

    views = read_views(cfg_path)
    assert ref.views_periods(views["periods"]) == expected.periods
    assert ref.views_windows(views["windows"]) == expected.windows
    future_dl = [r for r in views["dead_letters"] if r[2] == f"{path}:101"]
    assert [(r[0], "max_clock_skew" in r[1]) for r in future_dl] == [("invalid_event", True)]
    assert not [r for r in views["dead_letters"] if r[0] == "too_late"]
    # alerts: exactly the reference model's for the well-formed events, in the log and in the JSONL file
    want = al.model_alerts(cfg, w.items)
    n_alerts = sum(map(len, want.values()))
    assert n_alerts >= 20
    assert al.log_tuples(al.read_alerts_log(cfg_path)) == {k: set(v) for k, v in want.items()}
    assert al.by_customer(al.read_jsonl(alerts_file)) == want
    counters = summary["counters"]
    assert counters["alerts"] == n_alerts and summary["balanced"] is True
    assert counters["accepted"] == len({(e.tenant, e.event_id) for e in w.items})
