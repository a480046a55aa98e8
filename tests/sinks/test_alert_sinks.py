"""The JSONL, stdout, ClickHouse and Kafka alert sinks, each against the real thing (files, chDB, the broker).

``make_alert``/``make_alerts`` (realistic alerts with deterministic ids) are shared by the other alert tests.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from pathlib import Path
from typing import List

import msgspec
import pytest

from meterflow.base.timeutil import ms_to_iso, parse_rfc3339_ms
from meterflow.schemas.alerts import ALERT_DECODER, Alert, alert_id
from meterflow.schemas.config import ClickHouseConfig, parse_config
from meterflow.schemas.records import Emission
from meterflow.sinks.alerts import JsonlAlertSink, StdoutAlertSink, alert_sinks_from_config, format_alert
from meterflow.sinks.clickhouse import ClickHouseSink, connect
from meterflow.sinks.kafka import AlertTopicSink
from meterflow.sinks.webhook import WebhookSink

PERIOD_START = "2026-11-01T00:00:00Z"
PERIOD_END = "2026-12-01T00:00:00Z"


def make_alert(customer: str, threshold: float, *, tenant: str = "acme", metric: str = "api_calls",
               included: float = 1000.0, event_ms: int = 1793800000000, latency_ms: int = 250,
               enforcement: str = "soft", type_: str = "threshold_crossed") -> Alert:
    usage = included * threshold / 100 + 1
    return Alert(alert_id=alert_id(type_, tenant, customer, metric, parse_rfc3339_ms(PERIOD_START), threshold),
                 type=type_, tenant_id=tenant, customer_id=customer, metric=metric, period_start=PERIOD_START,
                 period_end=PERIOD_END, threshold_pct=threshold, included=included, usage=usage,
                 usage_pct=round(100 * usage / included, 4), enforcement=enforcement, action="notify",
                 event_id=f"evt_{customer}_{threshold:g}", event_time=ms_to_iso(event_ms),
                 ingested_at=ms_to_iso(event_ms + 10), detected_at=ms_to_iso(event_ms + latency_ms),
                 account_name=f"{customer} Inc", plan="pro")


def make_alerts(n: int, prefix: str = "cust", tenant: str = "acme") -> List[Alert]:
    """``n`` distinct alerts: thresholds 75/90/100 for customers ``prefix0``, ``prefix1``, ... in event order."""
    return [make_alert(f"{prefix}{i // 3}", (75.0, 90.0, 100.0)[i % 3], tenant=tenant,
                       event_ms=1793800000000 + 1000 * i, latency_ms=100 + i) for i in range(n)]


def batch(alerts: List[Alert], per_emission: int = 2) -> List[Emission]:
    return [Emission(alerts=alerts[i:i + per_emission]) for i in range(0, len(alerts), per_emission)]


def read_jsonl(path: Path) -> List[Alert]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the file must end with a complete line"
    return [ALERT_DECODER.decode(line) for line in data.splitlines()]


# -- JSONL ----------------------------------------------------------------------------------------

def test_jsonl_exactly_once_across_instances_replays_and_a_torn_line(tmp_path):
    path = tmp_path / "out" / "alerts.jsonl"
    alerts = make_alerts(6)
    part = JsonlAlertSink(str(path)).build("alerts_jsonl", 0, 1)
    part.write_batch(batch(alerts[:4]) + [Emission(alerts=[alerts[1]])])  # a duplicate inside the batch
    part.write_batch([Emission()])  # nothing to write
    part.close()
    assert read_jsonl(path) == alerts[:4]

    # A crash in the middle of the next append leaves a torn line (its batch was never acknowledged).
    torn = msgspec.json.encode(alerts[4])[:57]
    with open(path, "ab") as fh:
        fh.write(torn)

    part = JsonlAlertSink(str(path)).build("alerts_jsonl", 0, 1)  # a restart: new sink, same file
    assert read_jsonl(path) == alerts[:4], "the torn tail is truncated when the file is opened"
    part.write_batch(batch(alerts))  # the replay re-sends everything
    part.write_batch(batch(alerts[::-1]))
    part.close()
    assert read_jsonl(path) == alerts
    assert [a.alert_id for a in read_jsonl(path)] == [a.alert_id for a in alerts]

    part = JsonlAlertSink(str(path)).build("alerts_jsonl", 0, 1)  # and once more, with nothing new
    part.write_batch(batch(alerts))
    part.close()
    assert read_jsonl(path) == alerts


def run_workers(work, parts):
    """Run ``work(w)`` for every partition in its own thread (as Bytewax workers are), then close them all."""
    threads = [threading.Thread(target=work, args=(w,)) for w in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in parts:
        p.close()


def test_jsonl_workers_of_one_process_share_the_file_without_interleaving(tmp_path):
    path = tmp_path / "alerts.jsonl"
    sink = JsonlAlertSink(str(path))
    parts = [sink.build("alerts_jsonl", w, 4) for w in range(4)]
    alerts = make_alerts(400)
    chunks = [alerts[w::4] for w in range(4)]

    def work(w: int) -> None:
        for i in range(0, len(chunks[w]), 3):
            parts[w].write_batch(batch(chunks[w][i:i + 3] * 2, per_emission=1))  # duplicates too
            parts[(w + 1) % 4].write_batch([Emission(alerts=chunks[w][i:i + 1])])  # another worker replays one

    run_workers(work, parts)
    got = read_jsonl(path)  # every line decodes: no interleaved partial lines
    assert len(got) == len(alerts)
    assert {a.alert_id for a in got} == {a.alert_id for a in alerts}
    assert {a.alert_id: a for a in got} == {a.alert_id: a for a in alerts}


def test_jsonl_workers_writing_the_same_alerts_at_once_write_each_once(tmp_path):
    path = tmp_path / "alerts.jsonl"
    sink = JsonlAlertSink(str(path))
    parts = [sink.build("alerts_jsonl", w, 4) for w in range(4)]
    rounds = [make_alerts(20, prefix=f"r{r}_") for r in range(5)]
    barrier = threading.Barrier(4)

    def work(w: int) -> None:
        for alerts in rounds:
            barrier.wait(10)
            parts[w].write_batch(batch(alerts[w:] + alerts[:w]))

    run_workers(work, parts)
    got = read_jsonl(path)
    assert sorted(a.alert_id for a in got) == sorted(a.alert_id for r in rounds for a in r)


# -- stdout ---------------------------------------------------------------------------------------

def test_stdout_prints_one_readable_line_per_alert(capsys):
    alerts = make_alerts(3) + [make_alert("c9", 100.0, type_="blocked", enforcement="hard")]
    part = StdoutAlertSink().build("alerts_stdout", 0, 1)
    part.write_batch(batch(alerts))
    part.write_batch([Emission()])
    part.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [format_alert(a) for a in alerts]
    assert lines[1].startswith("ALERT 2026-11-04T")
    assert "threshold_crossed acme/cust0 api_calls threshold=90% usage=901/1000 (90.1%)" in lines[1]
    assert "event=evt_cust0_90" in lines[1] and f"id={alerts[1].alert_id[:12]}" in lines[1]
    assert " blocked acme/c9 " in lines[3] and "enforcement=hard" in lines[3]

    out = io.StringIO()
    StdoutAlertSink(out).build("alerts_stdout", 0, 1).write_batch(batch(alerts[:1]))
    assert out.getvalue() == format_alert(alerts[0]) + "\n"


# -- ClickHouse -----------------------------------------------------------------------------------

def test_clickhouse_alerts_log_round_trip_keeps_the_first_detection(chdb_path, ch_database):
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database)
    alerts = make_alerts(5)
    wallet = Alert(alert_id=alert_id("wallet_low", "acme", "cw", "", 0, None, 0), type="wallet_low",
                   tenant_id="acme", customer_id="cw", metric="", period_start="", period_end="",
                   threshold_pct=None, included=None, usage=80.0, usage_pct=None, enforcement="", action="notify",
                   event_id="", event_time="", ingested_at="", detected_at="2026-11-05T10:00:00.5Z",
                   wallet_balance=100.0, wallet_remaining=20.0, detail="20 % left")
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    part.write_batch(batch(alerts + [wallet]))
    # A replay re-detects the same alerts later: the first detection stays, nothing is added.
    later = [msgspec.structs.replace(a, detected_at=ms_to_iso(parse_rfc3339_ms(a.detected_at) + 60_000))
             for a in alerts]
    part.write_batch(batch(later))
    part.close()

    client, db = connect(cfg)
    cols = ("alert_id, type, tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), "
            "toUnixTimestamp64Milli(period_end), threshold_pct, included, usage, usage_pct, enforcement, action, "
            "event_id, toUnixTimestamp64Milli(event_time), toUnixTimestamp64Milli(ingested_at), "
            "toUnixTimestamp64Milli(detected_at), plan, previous_plan, account_name, wallet_balance, "
            "wallet_remaining, detail")
    rows = client.query(f"SELECT {cols} FROM {db}.alerts_log ORDER BY detected_at").result_rows

    def ms(text: str):
        return parse_rfc3339_ms(text) if text else None

    expected = [(a.alert_id, a.type, a.tenant_id, a.customer_id, a.metric, ms(a.period_start) or 0,
                 ms(a.period_end) or 0, a.threshold_pct, a.included, a.usage, a.usage_pct, a.enforcement, a.action,
                 a.event_id, ms(a.event_time), ms(a.ingested_at), ms(a.detected_at), a.plan, a.previous_plan,
                 a.account_name, a.wallet_balance, a.wallet_remaining, a.detail) for a in alerts + [wallet]]
    assert [tuple(r) for r in rows] == expected
    n = client.query(f"SELECT count() FROM {db}.alerts_log").result_rows[0][0]
    assert n == 6
    names = [r[0] for r in client.query(f"DESCRIBE TABLE {db}.alerts_log").result_rows]
    for c in ("alert_id", "type", "tenant_id", "customer_id", "metric", "period_start", "threshold_pct", "usage",
              "included", "usage_pct", "enforcement", "action", "event_id", "event_time", "detected_at"):
        assert c in names


# -- Kafka ----------------------------------------------------------------------------------------

@pytest.mark.kafka
def test_alert_topic_sink_keys_values_and_headers(kafka):
    from tests.e2e.support import consume_all

    topic = kafka.create_topic(f"alerts-{uuid.uuid4().hex[:8]}", partitions=2)
    alerts = make_alerts(7)
    part = AlertTopicSink(kafka.bootstrap, topic).build("alerts_kafka", 0, 1)
    part.write_batch(batch(alerts[:4]))
    part.write_batch([Emission()])
    part.write_batch(batch(alerts[4:]))
    part.close()
    msgs = consume_all(kafka.bootstrap, topic, timeout=60)
    assert len(msgs) == len(alerts)
    by_key = {}
    for key, value, headers in msgs:
        a = ALERT_DECODER.decode(value)
        assert key == a.alert_id.encode()
        assert dict(headers) == {"type": a.type.encode(), "tenant_id": a.tenant_id.encode()}
        by_key[key.decode()] = a
    assert by_key == {a.alert_id: a for a in alerts}


@pytest.mark.kafka
def test_without_recovery_alerts_go_at_once_and_the_next_batch_or_close_confirms_them(kafka):
    """defer_acks (no recovery directory): write_batch sends each alert (no linger) and returns without waiting
    for the broker; the alert is on the topic before the next batch; close confirms the rest. With acks awaited
    (recovery) nothing is left unacknowledged when write_batch returns."""
    import time

    from confluent_kafka import Consumer

    from tests.e2e.support import consume_all

    for defer in (True, False):
        topic = kafka.create_topic(f"alerts-defer-{uuid.uuid4().hex[:8]}")
        alerts = make_alerts(5, prefix=f"d{int(defer)}")
        part = AlertTopicSink(kafka.bootstrap, topic, defer_acks=defer).build("alerts_kafka", 0, 1)
        part.write_batch(batch(alerts[:1]))
        assert (len(part._producer) > 0) is defer  # (deferred: back before the broker's answer)
        if defer:  # (sent, not yet known to be acknowledged: a consumer still reads it without another batch)
            c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": uuid.uuid4().hex,
                          "auto.offset.reset": "earliest", "log_level": 2})
            c.subscribe([topic])
            deadline, got = time.monotonic() + 30, None
            while got is None and time.monotonic() < deadline:
                m = c.poll(0.2)
                got = m if m is not None and m.error() is None else None
            c.close()
            assert got is not None and got.key() == alerts[0].alert_id.encode()
        else:
            assert len(part._producer) == 0
        part.write_batch([Emission()])
        part.write_batch(batch(alerts[1:]))
        part.close()
        assert len(part._producer) == 0
        msgs = consume_all(kafka.bootstrap, topic, timeout=60)
        assert [ALERT_DECODER.decode(v) for _k, v, _h in msgs] == alerts


@pytest.mark.kafka
def test_without_recovery_a_refused_alert_fails_the_next_batch_or_close(kafka):
    """An alert the broker refuses (larger than the topic takes) fails the next write_batch with the synchronous
    path's error, or close when it was the last batch."""
    from meterflow.base.errors import MeterError

    topic = kafka.create_topic(f"alerts-small-{uuid.uuid4().hex[:8]}", config={"max.message.bytes": 1000})
    big = make_alert(os.urandom(2000).hex(), 75.0)  # a customer id larger than the topic accepts, compressed
    part = AlertTopicSink(kafka.bootstrap, topic, defer_acks=True).build("alerts_kafka", 0, 1)
    part.write_batch(batch([make_alert("c1", 75.0), big]))  # returns: the refusal comes with the acks
    part._producer.flush(30)
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed.*--recovery"):
        part.write_batch(batch([make_alert("c1", 90.0)]))
    part.write_batch(batch([make_alert("c1", 100.0)]))  # a batch after the failure is judged alone
    part.write_batch(batch([make_alert(os.urandom(2000).hex(), 90.0)]))
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed"):
        part.close()


# -- wiring ---------------------------------------------------------------------------------------

def test_alert_sinks_from_config(tmp_path):
    cfg = parse_config({"kafka": {"bootstrap_servers": "127.0.0.1:1", "alerts_topic": "my.alerts"},
                        "alerts": {"jsonl": str(tmp_path / "a.jsonl"), "stdout": True,
                                   "webhook": {"url": "http://127.0.0.1:1/hook",
                                               "spool_dir": str(tmp_path / "spool")}}}, environ={})
    sinks = alert_sinks_from_config(cfg)
    assert [name for name, _ in sinks] == ["alerts_kafka", "alerts_jsonl", "alerts_stdout", "alerts_webhook"]
    assert [type(s) for _, s in sinks] == [AlertTopicSink, JsonlAlertSink, StdoutAlertSink, WebhookSink]
    assert alert_sinks_from_config(parse_config({}, environ={})) == []


def test_gateway_states_then_alerts_are_the_first_outputs_of_the_flow(tmp_path):
    """Bytewax runs a batch's output steps in the order they were added: the live gateway state, then the alerts,
    come before the ClickHouse and Kafka row outputs (a chDB insert of the same batch would delay them); the
    gateway state first, so a `blocked` alert's reader finds the gateways already refusing."""
    from meterflow.dataflows.metering import sinks_from_config

    cfg = parse_config({"kafka": {"bootstrap_servers": "127.0.0.1:1", "alerts_topic": "my.alerts"},
                        "redis": {"url": "redis://127.0.0.1:1/0"},
                        "clickhouse": {"dsn": f"chdb://{tmp_path / 'ch'}"},
                        "alerts": {"jsonl": str(tmp_path / "a.jsonl")}}, environ={})
    names = [name for name, _ in sinks_from_config(cfg)]
    assert names[:3] == ["redis_gateway", "alerts_kafka", "alerts_jsonl"]
    assert set(names[3:]) == {"clickhouse", "aggregated_topic", "rated_topic", "reviews_topic", "dead_letter_topic"}


def test_the_alert_producer_has_no_linger_unless_kafka_client_config_sets_one():
    """An alert is sent the moment it is produced (deferred acks no longer flush it out); client_config still
    overrides, as for every producer."""
    assert AlertTopicSink("127.0.0.1:1", "a")._config["linger.ms"] == "0"
    assert AlertTopicSink("127.0.0.1:1", "a", {"linger.ms": "7"})._config["linger.ms"] == "7"
