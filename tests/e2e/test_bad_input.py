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
    assert first["dead_lettered"] == len(want_dead)
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
