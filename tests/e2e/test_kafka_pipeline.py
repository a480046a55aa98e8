"""End to end, Kafka mode: a generated workload through `meter run --stop-at-end` and back out.

These tests run against the REAL Apache Kafka broker (4.1.1, KRaft) started by the ``kafka``
session fixture and REAL embedded ClickHouse (chDB); `meter run` is a real subprocess. Nothing is
mocked. Every test uses its own topics (uuid-suffixed) and its own temporary directories.

The expected values come from ``tests/e2e/reference.py``, an independent re-implementation of the
contract computed from the same event list, and are compared with:

* the ClickHouse views usage_by_period, usage_by_window and dead_letters (read by a helper
  subprocess, and `meter usage --json` for the CLI's view);
* a downstream consumer's view of the aggregated topic (highest version per identity);
* the dead-letter topic: one message per bad input, with the reason header and the original bytes.

The workload is spread round-robin over a 3-partition events topic, so a customer's events and
their retried duplicates arrive through different partitions in an order the test does not control.
It is built to be insensitive to that order (checked by the reference: no ``latest`` ties; no event
close enough to a period end + late_grace for the watermark's progress to decide it; the crafted
too-late events come last in their partitions).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from meterflow.sample import customer_ids, generate_events, sample_config_toml, tenant_ids
from tests.e2e import reference as ref
from tests.e2e.support import (
    aggregated_records,
    consume_all,
    kafka_section,
    produce,
    read_views,
    run_meter,
    run_summary,
    unique,
    usage_json,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

PARTITIONS = 3
ANCHOR = datetime(2026, 3, 15, tzinfo=timezone.utc)  # subscribed customers: periods start on the 15th
START = ref.to_ms(datetime(2026, 4, 14, 6, tzinfo=timezone.utc))
# 04-14 06:00 .. 04-15 05:00: crosses the subscribed customers' period end at 04-15 00:00, but the watermark
# never passes 04-15 06:00 (nothing generated is too late in any arrival order), and the span stays under
# dedupe_window = 24h (see also the lagging-partition dedupe test below).
SPAN = 23 * 3_600_000
TENANTS = tenant_ids(3)
SUBSCRIBED = {t: customer_ids(10) for t in TENANTS}
INCLUDED = 100  # small enough that the heaviest customers run into overage


def _ev(eid, tenant, cust, ts, etype="api_call", **props):
    return orjson.dumps({"event_id": eid, "tenant_id": tenant, "customer_id": cust, "event_type": etype,
                         "timestamp": ts, "properties": props})


def workload():
    """~3,000 generated events (duplicates, late, corrections, test traffic, bad events) plus crafted
    extras: internal-customer traffic, a non-numeric sum property, an unmetered type, too-late events."""
    events = list(generate_events(3000, tenants=3, customers=40, start_ms=START, span_ms=SPAN, seed=5,
                                  dup_rate=0.05, late_rate=0.05, bad_rate=0.01, correction_rate=0.02,
                                  test_rate=0.03))
    t0, t1 = TENANTS[0], TENANTS[1]
    base = dict(endpoint="/v2/search", model="m-small", region="eu-west-1", latency_ms=100, user_id="u1")
    extras = [
        # excluded customer: counted in excluded_events only
        _ev("x-int-1", t1, "cust_internal", "2026-04-14T10:00:00Z", tokens=10, **base),
        _ev("x-int-2", t1, "cust_internal", "2026-04-14T11:00:00+02:00", tokens=20, **base),
        _ev("x-int-3", t1, "cust_internal", "2026-04-14T12:00:00Z", "seat_count", seats=5),
        # tokens is not a number: missing_property for `tokens`, the other metrics still count it
        _ev("x-np-1", t0, "cust_00003", "2026-04-14T20:15:00Z", **{**base, "tokens": "lots"}),
        # no metric for this event type: accepted, not metered, not a dead letter
        _ev("x-hb-1", t0, "cust_00003", "2026-04-14T20:16:00Z", "heartbeat"),
        # too late: March (calendar month) and 2026-02-15..03-15 (subscribed) ended long before 04-14
        _ev("x-late-1", t0, "cust_00030", "2026-03-02T08:00:00Z", tokens=5, **base),
        _ev("x-late-2", t1, "cust_00001", "2026-03-10T08:00:00Z", tokens=5, **base),
        _ev("x-late-3", t0, "cust_00031", "2026-03-31T23:59:59.999Z", "seat_count", seats=7),
        # the retried duplicate of x-late-1 (same partition as x-late-1: 3 messages later)
        None,
        # a correction of an accepted event
        orjson.dumps({"event_id": "x-corr-1", "tenant_id": t0, "customer_id": "cust_00002",
                      "event_type": "api_call", "timestamp": "2026-04-15T01:00:00Z", "correction": True,
                      "corrects": "evt_5_100", "properties": {**base, "tokens": 333}}),
    ]
    extras[8] = extras[5]
    # x-late-1 and its duplicate must land in the same partition (round robin by index)
    assert (len(events) + 5) % PARTITIONS == (len(events) + 8) % PARTITIONS
    return events + extras


@pytest.fixture(scope="module")
def generated():
    events = workload()
    spec = ref.sample_spec(TENANTS, SUBSCRIBED, ANCHOR, included=INCLUDED)
    expected = ref.compute(events, spec)
    assert not expected.latest_ties, f"workload has ambiguous `latest` ties: {expected.latest_ties[:3]}"
    reasons = Counter(r for _, r, _ in expected.dead_letters)
    # the workload really exercises what the test claims
    assert reasons["invalid_json"] and reasons["invalid_event"] and reasons["unknown_tenant"]
    assert reasons["too_late"] == 3 and reasons["missing_property"] == 1
    assert expected.duplicates >= 100
    assert sum(p["excluded_events"] for p in expected.periods.values()) >= 50
    assert any(k[1] == "cust_internal" for k in expected.periods)
    assert len({k[3] for k in expected.periods}) >= 3  # several billing periods
    assert any(p["overage_units"] > 0 for p in expected.periods.values())
    assert any(p["value"] < 0 for p in expected.windows.values())  # a window holding only a correction
    return events, expected


def _config(tmp_path: Path, name: str, kafka_cfg) -> Path:
    base = sample_config_toml(TENANTS, SUBSCRIBED, "2026-03-15T00:00:00Z", included=INCLUDED)
    return write_config(tmp_path / f"{name}.toml", base, tmp_path / f"ch-{name}", kafka_cfg)


def _check_dead_letters(views: dict, expected: ref.Expected, events, where, topic: str) -> None:
    """dead_letters view: one row per bad input, right reason/metric, source topic/partition/offset,
    original payload bytes."""
    want = Counter()
    for i, reason, metric in expected.dead_letters:
        p, off = where[i]
        want[(reason, metric, f"{topic}/{p}/{off}", events[i].hex())] += 1
    got = Counter((reason, metric, source, hexp) for reason, _detail, source, _n, _sha, hexp, _t, metric, _ra
                  in views["dead_letters"])
    assert got == want, (f"dead_letters differ:\nmissing {list((want - got).items())[:5]}\n"
                         f"unexpected {list((got - want).items())[:5]}")


def _check_dead_letter_topic(bootstrap: str, topic: str, expected: ref.Expected, events, where,
                             events_topic: str) -> None:
    msgs = consume_all(bootstrap, topic)
    assert len(msgs) == len(expected.dead_letters), (
        f"dead-letter topic has {len(msgs)} messages for {len(expected.dead_letters)} bad inputs")
    want = Counter()
    for i, reason, metric in expected.dead_letters:
        p, off = where[i]
        want[(reason, metric, f"{events_topic}/{p}/{off}", events[i])] += 1
    got = Counter()
    keys = set()
    for key, value, headers in msgs:
        h = {k: v.decode() for k, v in headers}
        assert {"reason", "detail", "source", "tenant_id", "metric"} <= set(h), h
        assert key, "dead letters are keyed by dl_id"
        keys.add(key)
        got[(h["reason"], h["metric"], h["source"], value)] += 1
        if h["reason"] in ("unknown_tenant", "missing_property", "too_late"):
            assert h["tenant_id"] == json.loads(value)["tenant_id"], (h, value)
    assert len(keys) == len(msgs), "dead-letter keys (dl_id) must be distinct per bad input"
    assert got == want, (f"dead-letter topic differs:\nmissing {list((want - got).items())[:5]}\n"
                         f"unexpected {list((got - want).items())[:5]}")


def _run_and_check(kafka, tmp_path: Path, events, expected: ref.Expected, events_topic: str, where,
                   workers: int) -> dict:
    prefix = unique(f"e2e-pipe-w{workers}")
    kcfg = kafka_section(kafka.bootstrap, events_topic, prefix)
    for t in (kcfg["aggregated_topic"], kcfg["dead_letter_topic"]):
        kafka.create_topic(t, partitions=PARTITIONS)
    cfg = _config(tmp_path, f"w{workers}", kcfg)
    proc = run_meter("run", "--config", str(cfg), "--stop-at-end", "--workers", str(workers), "--json",
                     "--progress-every", "0", timeout=180)
    counters = run_summary(proc)["counters"]
    assert counters["read"] == len(events), counters
    assert counters["duplicates"] == expected.duplicates, counters

    views = read_views(cfg)
    got_p = ref.views_periods(views["periods"])
    got_w = ref.views_windows(views["windows"])
    assert got_p == expected.periods, "usage_by_period != reference:\n" + ref.diff(expected.periods, got_p)
    assert got_w == expected.windows, "usage_by_window != reference:\n" + ref.diff(expected.windows, got_w)
    _check_dead_letters(views, expected, events, where, events_topic)

    topic_p, topic_w = ref.topic_view(aggregated_records(kafka.bootstrap, kcfg["aggregated_topic"]))
    assert topic_p == expected.periods, "aggregated topic (periods) != reference:\n" + ref.diff(expected.periods,
                                                                                               topic_p)
    assert topic_w == expected.windows, "aggregated topic (windows) != reference:\n" + ref.diff(expected.windows,
                                                                                               topic_w)
    _check_dead_letter_topic(kafka.bootstrap, kcfg["dead_letter_topic"], expected, events, where, events_topic)
    return {"config": cfg, "views": views}


def test_generated_workload_through_kafka_matches_reference_with_1_and_2_workers(kafka, tmp_path, generated):
    events, expected = generated
    events_topic = kafka.create_topic(unique("e2e-pipe-events"), partitions=PARTITIONS)
    where = produce(kafka.bootstrap, events_topic, events, PARTITIONS)

    one = _run_and_check(kafka, tmp_path, events, expected, events_topic, where, workers=1)

    # The CLI's own view of the same tables (`meter usage --json`) agrees too.
    by_period = usage_json(one["config"], "period")
    cli_p = {(r["tenant_id"], r["customer_id"], r["metric"],
              ref.to_ms(datetime.fromisoformat(r["period_start"]))):
             {"period_end": ref.to_ms(datetime.fromisoformat(r["period_end"])), "value": r["value"],
              "included": r["included"], "overage_units": r["overage_units"], "events": r["events"],
              "excluded_events": r["excluded_events"]} for r in by_period}
    assert cli_p == expected.periods, "meter usage --by period != reference:\n" + ref.diff(expected.periods, cli_p)
    by_window = usage_json(one["config"], "window")
    cli_w = {(r["tenant_id"], r["customer_id"], r["metric"], ref.to_ms(datetime.fromisoformat(r["window_start"])),
              tuple(sorted(r["dimensions"].items()))):
             {"window_end": ref.to_ms(datetime.fromisoformat(r["window_end"])), "value": r["value"],
              "events": r["events"]} for r in by_window}
    assert cli_w == expected.windows, "meter usage --by window != reference:\n" + ref.diff(expected.windows, cli_w)

    # Same input, two workers, fresh ClickHouse path and fresh output topics: identical results.
    two = _run_and_check(kafka, tmp_path, events, expected, events_topic, where, workers=2)
    # dead letters: all but `detail` (free text; too_late's names the watermark of the moment) and received_at
    strip = lambda dl: sorted(json.dumps([r[0], *r[2:-1]]) for r in dl)  # noqa: E731
    assert sorted(map(json.dumps, one["views"]["periods"])) == sorted(map(json.dumps, two["views"]["periods"]))
    assert sorted(map(json.dumps, one["views"]["windows"])) == sorted(map(json.dumps, two["views"]["windows"]))
    assert strip(one["views"]["dead_letters"]) == strip(two["views"]["dead_letters"])


def test_duplicate_in_a_lagging_partition_is_not_billed_twice(kafka, tmp_path):
    """Partition 0 holds A (04-14 00:00) and the customer's next event C 30 h later; partition 1 is a
    backlog still at 04-14 00:00 that ends with the producer's retry of A (byte-identical). With
    kafka.batch_size = 1 the source reads the partitions one message each per round, so C raises the
    watermark to 04-15 06:00 long before partition 1 reaches the retry. A is one event: api_calls must
    be 2 (A and C) whatever the read interleaving; the same topic read with the default batch size
    (everything in one round) gives 2. Observed: 3 with batch_size = 1 (and 1-11 double-counted
    duplicates per run, varying run to run, for the 29 h generated workload of the main test)."""
    t = TENANTS[0]
    a = _ev("dup-A", t, "cust_00030", "2026-04-14T00:00:00Z", tokens=10, user_id="u1", latency_ms=5,
            region="eu-west-1")
    c = _ev("dup-C", t, "cust_00030", "2026-04-15T06:00:00Z", tokens=20, user_id="u2", latency_ms=6,
            region="eu-west-1")
    backlog = [_ev(f"lag-{i}", t, "cust_00031", "2026-04-14T00:00:00Z", tokens=1, user_id="u3", latency_ms=1,
                   region="eu-west-1") for i in range(1500)]
    topic = kafka.create_topic(unique("e2e-dup-lag"), partitions=2)
    from confluent_kafka import Producer

    prod = Producer({"bootstrap.servers": kafka.bootstrap, "acks": "all"})
    for v in (a, c):
        prod.produce(topic, value=v, partition=0)
    for v in backlog + [a]:
        prod.produce(topic, value=v, partition=1)
    assert prod.flush(30) == 0

    results = {}
    for batch in (5000, 1):
        kcfg = {**kafka_section(kafka.bootstrap, topic, unique("e2e-dup-lag")), "batch_size": batch}
        base = sample_config_toml(TENANTS, SUBSCRIBED, "2026-03-15T00:00:00Z")
        text = base + f'\n[clickhouse]\ndsn = "chdb://{(tmp_path / f"ch{batch}").resolve()}"\n[kafka]\n' + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in kcfg.items())
        cfg = tmp_path / f"b{batch}.toml"
        cfg.write_text(text)
        run_meter("run", "--config", str(cfg), "--stop-at-end", "--progress-every", "0", timeout=120)
        views = read_views(cfg)
        results[batch] = {(r[1], r[2]): r[5] for r in views["periods"] if r[1] == "cust_00030"}
    expected = {("cust_00030", "api_calls"): 2.0, ("cust_00030", "tokens"): 30.0,
                ("cust_00030", "active_users"): 2.0, ("cust_00030", "latency_p95"): 6.0}
    assert results[5000] == expected, results[5000]
    assert results[1] == expected, f"batch_size=1 gives {results[1]}, the default gives {results[5000]}"
