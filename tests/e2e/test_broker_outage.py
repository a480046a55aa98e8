"""Fault injection on the real broker: the Kafka broker stops under a running `meter run --recovery`.

The broker is a REAL Apache Kafka (KRaft) JVM of its own (module fixture, so the session's broker stays up
for the other tests), really stopped (SIGTERM: the JVM exits, connections are refused) and started again
on the same ports and data directory (``KafkaBroker.halt()`` / ``start()``): topics, messages and offsets
survive, as after a broker restart in production. `meter run` is a real subprocess on real chDB.

1. The broker is down ~15 s while the flow has output in flight (rollup rows wait for the next 3 s flush
   tick when the broker stops): the flow waits (it does not exit), catches up once the broker is back and
   the rest of the stream is produced; the ClickHouse views equal the independent reference
   (``tests/e2e/reference.py``), the alerts equal the reference model and the hand computation
   (``alert_support``), ``alerts_log`` has each alert id once, and a consumer of the alerts topic that keeps
   one record per key sees exactly the expected alerts.
2. The broker stays down longer than ``kafka.outage_timeout`` (5 s here): the flow exits non-zero within
   seconds with a ``meter: error:`` line naming the broker and what to do, both while output waits for
   delivery ("busy") and while the flow only waits for input ("idle"); the broker comes back, the rest of
   the stream is produced, and a rerun with the same ``--recovery`` ends exact: nothing lost, nothing doubled.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Dict, Tuple

import pytest

from meterflow.devservices import KafkaBroker
from tests.e2e import alert_support as al
from tests.e2e import reference as ref
from tests.e2e.support import LiveRun, aggregated_records, kafka_section, read_views, run_meter, run_summary, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(180)]

OUTAGE = 15.0  # seconds the broker stays down in test 1 (below the default kafka.outage_timeout of 60 s)
SHORT_TIMEOUT = 5  # kafka.outage_timeout of test 2, seconds
FLUSH_S = 3  # pipeline.flush_interval: rollup rows read just before the halt are written during the outage


@pytest.fixture(scope="module")
def broker():
    b = KafkaBroker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _setup(broker: KafkaBroker, tmp_path: Path, seed: int, **kafka_extra):
    tag = unique("o")[-6:]
    w = al.make_workload(seed=seed, tag=tag)
    p = unique("e2e-outage")
    k = kafka_section(broker.bootstrap, f"{p}-events", p)
    broker.create_topic(k["events_topic"], partitions=2)
    broker.create_topic(k["aggregated_topic"], partitions=2)
    broker.create_topic(k["dead_letter_topic"], partitions=1)
    broker.create_topic(k["alerts_topic"], partitions=1)
    k.update(batch_size=16, **kafka_extra)
    jsonl = tmp_path / "alerts.jsonl"
    text = al.config_toml(w.tenants, w.subs, chdb_dir=tmp_path / "ch", kafka=k, alerts_jsonl=jsonl,
                          pipeline_extra=f'flush_interval = "{FLUSH_S}s"\n')
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(text)
    cfg = al.parse(text)
    expected = al.model_alerts(cfg, w.items)
    assert expected == al.hand_alerts(w.subs, w.items), "the reference model and the hand computation disagree"
    spec = ref.Spec(tenants={t: ({}, ()) for t in w.tenants},
                    subscriptions={(s.tenant, s.customer): (datetime.fromisoformat(al.ANCHOR),
                                                            {al.METRIC: s.entitlement()[0]}) for s in w.subs},
                    metrics=(ref.Metric(al.METRIC, "api_call", "count"),))
    views = ref.compute([v for _k, v in w.messages], spec)
    assert views.duplicates == w.duplicates and len(views.dead_letters) == w.bad
    producer = al.KeyedProducer(broker.bootstrap, k["events_topic"])
    return w, k, jsonl, cfg_path, expected, views, producer


def _flat(per_customer: Dict[Tuple[str, str], list]) -> list:
    return [a for v in per_customer.values() for a in v]


def _assert_exact(broker: KafkaBroker, w, k, jsonl: Path, cfg_path: Path, expected, want) -> None:
    """Every output of the flow equals the references: ClickHouse views and dead letters, the aggregated
    topic's consumer view, alerts_log (each id once), the alerts topic (deduplicated by key), the JSONL file."""
    n_alerts = len(_flat(expected))
    views = read_views(cfg_path)
    got_p, got_w = ref.views_periods(views["periods"]), ref.views_windows(views["windows"])
    assert got_p == want.periods, "usage_by_period != reference:\n" + ref.diff(want.periods, got_p)
    assert got_w == want.windows, "usage_by_window != reference:\n" + ref.diff(want.windows, got_w)
    assert Counter(r[0] for r in views["dead_letters"]) == Counter(reason for _i, reason, _m in want.dead_letters)
    tp, tw = ref.topic_view(aggregated_records(broker.bootstrap, k["aggregated_topic"]))
    assert tp == want.periods, "aggregated topic (periods) != reference:\n" + ref.diff(want.periods, tp)
    assert tw == want.windows, "aggregated topic (windows) != reference:\n" + ref.diff(want.windows, tw)

    rows = al.read_alerts_log(cfg_path)
    ids = [r["alert_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n_alerts, f"alerts_log: {len(ids)} rows, {len(set(ids))} ids, " \
                                                  f"{n_alerts} expected"
    assert al.log_tuples(rows) == {c: set(v) for c, v in expected.items()}
    topic_alerts, n_msgs = al.alerts_topic_view(broker.bootstrap, k["alerts_topic"])
    assert al.by_customer(topic_alerts) == expected and n_msgs >= n_alerts
    records = al.read_jsonl(jsonl)
    assert len(records) == n_alerts and al.by_customer(records) == expected


def _wait_down(live: LiveRun, seconds: float) -> None:
    """Keep the broker down for ``seconds`` while checking that `meter run` keeps running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert live.proc.poll() is None, (f"meter run exited ({live.proc.returncode}) while the broker was down:\n"
                                          + "".join(live.stderr)[-3000:])
        time.sleep(0.2)


def _stderr_lines(text: str):
    return [line for line in text.splitlines() if not line.startswith("progress:")]


# -- 1 ---------------------------------------------------------------------------------------------------

def test_broker_down_15s_mid_run_the_flow_waits_and_ends_exact(broker, tmp_path):
    w, k, jsonl, cfg_path, expected, want, producer = _setup(broker, tmp_path, seed=15)
    first = len(w.messages) * 3 // 5
    producer.send(w.messages[:first])
    live = LiveRun(["run", "--config", str(cfg_path), "--recovery", str(tmp_path / "recovery"),
                    "--progress-every", "0.1"], tmp_path / "run.out")
    try:
        live.wait_until_read(first, timeout=60)
        t0 = time.monotonic()
        broker.halt()
        assert not broker.is_running()
        _wait_down(live, OUTAGE - (time.monotonic() - t0))
        broker.start()
        down = time.monotonic() - t0
        producer.send(w.messages[first:])
        live.wait_until_read(len(w.messages), timeout=60)
        al.wait_for("every alert in the JSONL file", lambda: al.by_customer(al.read_jsonl(jsonl)) == expected, 30,
                    live)
        want_topic = want.periods
        al.wait_for("the final totals on the aggregated topic",
                    lambda: ref.topic_view(aggregated_records(broker.bootstrap, k["aggregated_topic"]))[0]
                    == want_topic, 30, live, interval=0.5)
    finally:
        if not broker.is_running():
            broker.start()
        rc = al.stop_run(live)
    err = "".join(live.stderr)
    assert rc == 130, f"exit {rc}:\n{err[-3000:]}"
    # the flow said once that it waits, and once that the broker is back (no librdkafka log flood)
    lines = _stderr_lines(err)
    waits = [line for line in lines if "is unreachable" in line and broker.bootstrap in line]
    backs = [line for line in lines if "answers again after" in line]
    assert waits and backs, "\n".join(lines[-20:])
    # The outage is reported from when the flow noticed it: librdkafka's first failed request, which on a
    # loaded 2-core machine has come up to ~5 s after the halt; the report must still be of this outage.
    assert max(float(b.split("answers again after ")[1].split()[0]) for b in backs) >= OUTAGE / 2, backs
    assert not [line for line in lines if line.startswith("%")], "librdkafka log lines on stderr:\n" + \
        "\n".join(lines[:10])
    print(f"broker down {down:.1f} s; stderr besides progress: {lines}")
    _assert_exact(broker, w, k, jsonl, cfg_path, expected, want)


# -- 2 ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["busy", "idle"])
def test_broker_down_past_outage_timeout_exits_with_an_error_then_a_rerun_ends_exact(broker, tmp_path, phase):
    w, k, jsonl, cfg_path, expected, want, producer = _setup(broker, tmp_path, seed=16 if phase == "busy" else 17,
                                                             outage_timeout=f"{SHORT_TIMEOUT}s")
    first = len(w.messages) // 2
    producer.send(w.messages[:first])
    argv = ["run", "--config", str(cfg_path), "--recovery", str(tmp_path / "recovery")]
    live = LiveRun([*argv, "--progress-every", "0.1"], tmp_path / "run.out")
    try:
        live.wait_until_read(first, timeout=60)
        if phase == "idle":  # past the next flush tick everything read is delivered: only the source waits
            time.sleep(FLUSH_S + 1.5)
        t0 = time.monotonic()
        broker.halt()
        rc = live.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        if live.proc.poll() is None:
            live.kill()
        if not broker.is_running():
            broker.start()
    live._t.join(10)
    err = "".join(live.stderr)
    errors = [line for line in err.splitlines() if line.startswith("meter: error:")]
    assert rc not in (0, 130) and rc > 0, f"exit {rc} after the broker stopped:\n{err[-3000:]}"
    assert took < SHORT_TIMEOUT + 15, f"the flow took {took:.1f} s to give up"
    # besides progress lines, stderr holds the start-up note on the absent entitlements topic, the outage
    # warning and this one error line: no Rust panic report
    others = [line for line in _stderr_lines(err) if "is unreachable (" not in line and line not in errors
              and "does not exist; continuing without it" not in line]
    assert len(errors) == 1 and not others, err[-3000:]
    assert broker.bootstrap in errors[0] and "kafka.outage_timeout" in errors[0] and "rerun" in errors[0], errors
    print(f"{phase}: exit {rc} {took:.1f} s after the broker stopped: {errors[0]}")

    producer.send(w.messages[first:])
    proc = run_meter(*argv, "--stop-at-end", "--json", "--progress-every", "0", timeout=120)
    resumed = run_summary(proc)["counters"]
    assert 0 < resumed["read"] <= len(w.messages), resumed
    _assert_exact(broker, w, k, jsonl, cfg_path, expected, want)
