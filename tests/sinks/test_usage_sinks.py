"""The usage outputs: ClickHouse rollup, period and dead-letter tables (chDB) and the aggregated and
dead-letter topics (the real broker). The sinks build columns and messages straight from the records;
these tests pin what reaches the tables and topics, and that a failed delivery stops the flow."""

from __future__ import annotations

import os
import uuid
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterflow.base.errors import MeterError
from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import (
    AGGREGATE_DECODER,
    AGGREGATE_ENCODER,
    RATED_DECODER,
    RATED_ENCODER,
    DeadLetter,
    Emission,
    PeriodAggregate,
    RatedRow,
    WindowAggregate,
)
from meterflow.sinks.clickhouse import ClickHouseSink, connect
from meterflow.sinks.clickhouse_schema import DEAD_COLUMNS, PERIOD_COLUMNS, WINDOW_COLUMNS, dims_key, emission_columns
from meterflow.sinks.kafka import AggregatedTopicSink, DeadLetterTopicSink, RatedTopicSink, ReviewTopicSink

H = 3_600_000
T = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def window(cust, metric, start, value, version, dims=None, tenant="acme"):
    return WindowAggregate(tenant_id=tenant, customer_id=cust, metric=metric, window_start=start,
                           window_end=start + H, dimensions=dims or {}, value=value, events=version, version=version)


def period(cust, metric, value, version, included=None, excluded=0, tenant="acme"):
    return PeriodAggregate(tenant_id=tenant, customer_id=cust, metric=metric, period_start=T,
                           period_end=T + 30 * 24 * H, value=value, included=included,
                           overage_units=max(0.0, value - included) if included is not None else 0.0,
                           events=version - excluded, excluded_events=excluded, version=version)


def dead(i, payload=b'{"broken'):
    return DeadLetter(dl_id=f"dl{i}", reason="invalid_json", detail=f"detail {i}", source=f"usage.events/0/{i}",
                      tenant_id="", metric="", payload=payload, received_at=T + i)


EMISSIONS = [
    Emission(windows=[window("c1", "api_calls", T, 3.0, 3), window("c1", "tokens", T, 0.1 + 0.2, 2,
                                                                     {"region": "eu", "model": "m-large"})],
             periods=[period("c1", "api_calls", 3.0, 3, included=2.0)]),
    Emission(dead_letters=[dead(1), dead(2, b"\x00\xff binary")]),
    Emission(),
    Emission(windows=[window("c2", "api_calls", T + H, 1.0, 1, tenant="beta")],
             periods=[period("c2", "api_calls", 1.0, 2, excluded=1, tenant="beta")]),
]


def test_emission_columns_are_the_records_transposed():
    wcols, pcols, dcols = emission_columns(EMISSIONS, 42)
    windows = [w for e in EMISSIONS for w in e.windows]
    periods = [p for e in EMISSIONS for p in e.periods]
    deads = [d for e in EMISSIONS for d in e.dead_letters]
    assert len(wcols) == len(WINDOW_COLUMNS) and len(pcols) == len(PERIOD_COLUMNS) and len(dcols) == len(DEAD_COLUMNS)
    derived = {"dims_key": lambda w: dims_key(w.dimensions), "updated_at": lambda r: 42}
    for cols, names, records in ((wcols, WINDOW_COLUMNS, windows), (pcols, PERIOD_COLUMNS, periods),
                                 (dcols, DEAD_COLUMNS, deads)):
        for name, col in zip(names, cols):
            get = derived.get(name) or (lambda r, n=name: getattr(r, n))
            assert list(col) == [get(r) for r in records], name
    assert wcols[WINDOW_COLUMNS.index("dims_key")] == ["", "model=m-large\x1fregion=eu", ""]
    assert emission_columns([Emission(), Emission(dead_letters=[dead(3)])], 0)[:2] == (None, None)
    assert emission_columns([], 0) == (None, None, None)


def test_clickhouse_views_read_the_latest_version_of_each_row(chdb_path, ch_database):
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database)
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    part.write_batch(EMISSIONS)
    # a later flush of c1 (higher versions) and a replay of the dead letters (same ids)
    part.write_batch([Emission(windows=[window("c1", "api_calls", T, 5.0, 5)],
                               periods=[period("c1", "api_calls", 5.0, 5, included=2.0)],
                               dead_letters=[dead(1)])])
    part.write_batch([Emission(windows=[window("c1", "api_calls", T, 4.0, 4)])])  # an older replayed row
    part.close()
    client, db = connect(cfg)
    rows = client.query(f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(window_start), "
                        f"toUnixTimestamp64Milli(window_end), dimensions, value, events FROM {db}.usage_by_window "
                        "ORDER BY tenant_id, customer_id, metric").result_rows
    assert [tuple(r) for r in rows] == [
        ("acme", "c1", "api_calls", T, T + H, {}, 5.0, 5),
        ("acme", "c1", "tokens", T, T + H, {"region": "eu", "model": "m-large"}, 0.30000000000000004, 2),
        ("beta", "c2", "api_calls", T + H, T + 2 * H, {}, 1.0, 1)]
    rows = client.query(f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), "
                        f"toUnixTimestamp64Milli(period_end), value, included, overage_units, events, excluded_events "
                        f"FROM {db}.usage_by_period ORDER BY tenant_id").result_rows
    assert [tuple(r) for r in rows] == [("acme", "c1", "api_calls", T, T + 720 * H, 5.0, 2.0, 3.0, 5, 0),
                                        ("beta", "c2", "api_calls", T, T + 720 * H, 1.0, None, 0.0, 1, 1)]
    rows = client.query(f"SELECT dl_id, reason, detail, source, hex(payload), toUnixTimestamp64Milli(received_at) "
                        f"FROM {db}.dead_letters ORDER BY dl_id").result_rows
    assert [tuple(r) for r in rows] == [(d.dl_id, d.reason, d.detail, d.source, d.payload.hex().upper(), d.received_at)
                                        for d in (dead(1), dead(2, b"\x00\xff binary"))]


@pytest.mark.kafka
def test_aggregated_topic_records_and_keys(kafka):
    from tests.e2e.support import consume_all

    topic = kafka.create_topic(f"agg-{uuid.uuid4().hex[:8]}", partitions=2)
    part = AggregatedTopicSink(kafka.bootstrap, topic).build("aggregated_topic", 0, 1)
    part.write_batch(EMISSIONS)
    part.write_batch([Emission(dead_letters=[dead(9)]), Emission()])  # nothing to send: no message
    part.close()
    msgs = consume_all(kafka.bootstrap, topic, timeout=60)
    records = [r for e in EMISSIONS for r in (*e.windows, *e.periods)]
    assert len(msgs) == len(records)
    got = sorted(((k, AGGREGATE_DECODER.decode(v)) for k, v, _h in msgs), key=repr)
    assert got == sorted(((f"{r.tenant_id}|{r.customer_id}|{r.metric}".encode(), r) for r in records), key=repr)
    for _k, value, _h in msgs:  # the contract's shape: tagged by type, every field present
        assert value.startswith(b'{"type":"window"') or value.startswith(b'{"type":"period"')


@pytest.mark.kafka
def test_dead_letter_topic_keeps_the_payload_and_headers(kafka):
    from tests.e2e.support import consume_all

    topic = kafka.create_topic(f"dead-{uuid.uuid4().hex[:8]}")
    part = DeadLetterTopicSink(kafka.bootstrap, topic).build("dead_letter_topic", 0, 1)
    part.write_batch(EMISSIONS)
    part.close()
    msgs = consume_all(kafka.bootstrap, topic, timeout=60)
    assert [(k, v, dict(h)) for k, v, h in msgs] == [
        (d.dl_id.encode(), d.payload, {"reason": b"invalid_json", "detail": d.detail.encode(),
                                       "source": d.source.encode(), "tenant_id": b"", "metric": b"",
                                       "received_at": str(d.received_at).encode()})
        for d in (dead(1), dead(2, b"\x00\xff binary"))]


@pytest.mark.kafka
def test_without_recovery_dead_letters_and_reviews_are_queued_and_confirmed_by_close(kafka):
    """defer_acks (no recovery directory): the dead-letter and review topics' write_batch returns before the
    broker's answer (messages still unacknowledged in the producer), and close confirms every one of them; with
    acks awaited (recovery) nothing is left unacknowledged when write_batch returns. What reaches the topics is the
    same either way."""
    from tests.e2e.support import consume_all
    from tests.sinks.test_review_store import item

    reviews = [Emission(reviews=[item(f"{i:032x}", f"{i}.5", "approve", i)]) for i in range(1, 4)]
    for defer in (True, False):
        for name, sink, emissions, key in (
                ("dead_letter_topic", DeadLetterTopicSink, EMISSIONS, lambda e: [d.dl_id for d in e.dead_letters]),
                ("reviews_topic", ReviewTopicSink, reviews, lambda e: [r.review_id for r in e.reviews])):
            topic = kafka.create_topic(f"{name}-{int(defer)}-{uuid.uuid4().hex[:8]}")
            part = sink(kafka.bootstrap, topic, defer_acks=defer).build(name, 0, 1)
            part.write_batch(emissions)
            assert (len(part._producer) > 0) is defer, name  # (deferred: back before the broker's answer)
            part.write_batch([Emission()])  # (a batch with nothing for the topic checks earlier deliveries)
            part.close()
            assert len(part._producer) == 0
            msgs = consume_all(kafka.bootstrap, topic, timeout=60)
            assert [k.decode() for k, _v, _h in msgs] == [k for e in emissions for k in key(e)], name


@pytest.mark.kafka
def test_without_recovery_a_refused_dead_letter_fails_the_next_batch_or_close(kafka):
    """A dead letter the broker refuses (larger than the topic takes) fails the next write_batch with the
    synchronous path's error, or close when it was the last batch."""
    topic = kafka.create_topic(f"dead-small-{uuid.uuid4().hex[:8]}", config={"max.message.bytes": 1000})
    part = DeadLetterTopicSink(kafka.bootstrap, topic, defer_acks=True).build("dead_letter_topic", 0, 1)
    part.write_batch([Emission(dead_letters=[dead(1), dead(2, os.urandom(4000))])])  # returns: refused later
    part._producer.flush(30)
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed.*--recovery"):
        part.write_batch([Emission(dead_letters=[dead(3)])])
    part.write_batch([Emission(dead_letters=[dead(4)])])  # a batch after the failure is judged alone
    part.write_batch([Emission(dead_letters=[dead(5, os.urandom(4000))])])
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed"):
        part.close()


def test_every_kafka_topic_defers_its_acks_exactly_when_the_flow_has_no_recovery(tmp_path):
    """The wiring: without a recovery directory every Kafka output checks its acknowledgements at the next batch
    (and close); with one, every batch is confirmed before write_batch returns."""
    from meterflow.dataflows.metering import sinks_from_config
    from meterflow.schemas.config import parse_config

    cfg = parse_config({"kafka": {"bootstrap_servers": "127.0.0.1:9"},
                        "clickhouse": {"dsn": f"chdb://{tmp_path / 'ch'}"},
                        "metrics": [{"code": "api_calls", "event_type": "api_call", "aggregation": "count"}]},
                       "test", environ={})
    for recoverable in (True, False):
        topics = {name: sink for name, sink in sinks_from_config(cfg, recoverable)
                  if name.endswith("_topic") or name == "alerts_kafka"}
        assert set(topics) == {"aggregated_topic", "rated_topic", "reviews_topic", "dead_letter_topic", "alerts_kafka"}
        assert {name: sink._defer for name, sink in topics.items()} == {name: not recoverable for name in topics}


@pytest.mark.kafka
def test_a_delivery_the_broker_refuses_stops_the_flow(kafka):
    """Only failed deliveries are reported (no callback per message): one must still fail write_batch."""
    topic = kafka.create_topic(f"small-{uuid.uuid4().hex[:8]}", config={"max.message.bytes": 1000})
    part = AggregatedTopicSink(kafka.bootstrap, topic).build("aggregated_topic", 0, 1)
    big = window(os.urandom(2000).hex(), "api_calls", T, 1.0, 1)  # larger than the topic accepts, compressed
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed"):
        part.write_batch([Emission(windows=[window("c1", "api_calls", T, 1.0, 1), big])])
    part.write_batch([Emission(windows=[window("c1", "api_calls", T, 2.0, 2)])])  # the next batch is judged alone
    part.close()


def rated(cust, metric, version, tenant="acme"):
    return RatedRow(tenant_id=tenant, customer_id=cust, metric=metric, period_start=T, period_end=T + 720 * H,
                    plan="pro", currency="EUR", price_model="per_unit", usage=float(version), included=None,
                    overage_units=0.0, charge=Decimal("0.10") * version, overage_amount=Decimal(0),
                    minimum=Decimal(0), amount=Decimal("0.10") * version, custom_rate=False, final=False,
                    version=version)


def _keyed_emissions(make, keys: int, versions: int, per_emission: int):
    """``keys`` row keys x ``versions`` versions each, interleaved (version v of every key, then v + 1, with a
    tenant whose name contains a newline and non-ASCII text), cut into emissions of ``per_emission`` rows."""
    rows = [make(f"c{k:03d}", "tökens" if k % 3 else "api_calls", v, "acme" if k % 2 else "beta\nß")
            for v in range(1, versions + 1) for k in range(keys)]
    return [rows[i:i + per_emission] for i in range(0, len(rows), per_emission)]


@pytest.mark.kafka
@pytest.mark.parametrize("defer", [False, True], ids=["acked", "deferred"])
@pytest.mark.parametrize("queue", [{"queue.buffering.max.messages": "50"}, {"queue.buffering.max.kbytes": "2"}],
                         ids=["messages", "kbytes"])
@pytest.mark.parametrize("kind", ["aggregated", "rated"])
def test_row_topics_keep_every_row_once_in_emission_order_past_a_full_queue(kafka, queue, kind, defer):
    """More rows than the producer's local queue holds, across many keys: every row arrives exactly once, each
    key's rows in the order they were emitted. A queue of 50 messages makes a batch wait for room before each
    chunk; a queue of 2 KiB fills mid-chunk (by bytes), so produce refuses a message and the sink re-sends
    from it. Any message lost, doubled or moved behind a later one of its key fails the comparison. Deferred
    (a flow without recovery): the same, with the acknowledgements checked by the next batch and close."""
    from tests.e2e.support import consume_all

    topic = kafka.create_topic(f"order-{kind}-{uuid.uuid4().hex[:8]}", partitions=3)
    if kind == "aggregated":
        sink = AggregatedTopicSink(kafka.bootstrap, topic, client_config=queue, defer_acks=defer)
        make = lambda c, m, v, t: window(c, m, T, float(v), v, {"n": "a\nb"}, tenant=t)  # noqa: E731
        emit, encode, decode = (lambda rows: Emission(windows=rows)), AGGREGATE_ENCODER.encode, AGGREGATE_DECODER
    else:
        sink = RatedTopicSink(kafka.bootstrap, topic, client_config=queue, defer_acks=defer)
        make = lambda c, m, v, t: rated(c, m, v, tenant=t)  # noqa: E731
        emit, encode, decode = (lambda rows: Emission(rated=rows)), RATED_ENCODER.encode, RATED_DECODER
    part = sink.build(f"{kind}_topic", 0, 1)
    chunks = _keyed_emissions(make, keys=40, versions=30, per_emission=70)  # 1200 rows in emissions of 70
    part.write_batch([emit(rows) for rows in chunks[:12]])  # 840 rows in one batch
    part.write_batch([emit(rows) for rows in chunks[12:]])
    part.close()
    sent = [r for rows in chunks for r in rows]
    expected: dict = {}
    for r in sent:
        expected.setdefault(f"{r.tenant_id}|{r.customer_id}|{r.metric}".encode(), []).append(encode(r))
    got: dict = {}
    for k, v, _h in consume_all(kafka.bootstrap, topic, timeout=60):  # a key's messages in offset order
        got.setdefault(k, []).append(v)
    assert len(sent) == 1200 and len(expected) == 40
    assert got == expected
    assert [decode.decode(v) for v in got[b"acme|c001|t\xc3\xb6kens"]] == [r for r in sent if r.customer_id == "c001"]


def _rows_of(kind, n):
    if kind == "aggregated":
        return AggregatedTopicSink, Emission(windows=[window(f"c{i % 97}", "api_calls", T, float(i), i)
                                                      for i in range(1, n + 1)])
    return RatedTopicSink, Emission(rated=[rated(f"c{i % 97}", "api_calls", i) for i in range(1, n + 1)])


@pytest.mark.kafka
@pytest.mark.parametrize("kind", ["aggregated", "rated"])
def test_without_recovery_a_row_batch_returns_before_its_acks_and_close_confirms_them(kafka, kind):
    """defer_acks (no recovery directory): write_batch leaves its messages unacknowledged in the producer
    (the flow's thread goes on folding); close waits for them: every row on the topic once, per key in
    emission order. With acks awaited (recovery) nothing is left unacknowledged when write_batch returns."""
    from tests.e2e.support import consume_all

    for defer in (True, False):
        topic = kafka.create_topic(f"defer-{kind}-{uuid.uuid4().hex[:8]}", partitions=2)
        cls, batch = _rows_of(kind, 5000)
        part = cls(kafka.bootstrap, topic, defer_acks=defer).build(f"{kind}_topic", 0, 1)
        part.write_batch([batch])
        assert (len(part._producer) > 0) is defer
        part.write_batch([Emission()])  # no rows: serves reports, sends nothing
        part.close()
        assert len(part._producer) == 0
        msgs = consume_all(kafka.bootstrap, topic, timeout=60)
        rows = batch.windows or batch.rated
        encode = AGGREGATE_ENCODER.encode if kind == "aggregated" else RATED_ENCODER.encode
        expected: dict = {}
        for r in rows:
            expected.setdefault(f"{r.tenant_id}|{r.customer_id}|{r.metric}".encode(), []).append(encode(r))
        got: dict = {}
        for k, v, _h in msgs:
            got.setdefault(k, []).append(v)
        assert len(msgs) == 5000 and got == expected


@pytest.mark.kafka
@pytest.mark.parametrize("kind", ["aggregated", "rated"])
def test_without_recovery_a_refused_delivery_fails_the_next_batch_or_close(kafka, kind):
    """A delivery the broker refuses (message larger than the topic takes) does not fail the batch that sent it
    (it returned before the acks) but the next write_batch, with the synchronous path's error; after a
    failure-free batch, close raises the same error for a refusal of the last batch."""
    topic = kafka.create_topic(f"small-{uuid.uuid4().hex[:8]}", config={"max.message.bytes": 1000})
    cls, _ = _rows_of(kind, 1)
    big = os.urandom(2000).hex()  # a customer id larger than the topic accepts, compressed
    emit = ((lambda c, v: Emission(windows=[window(c, "api_calls", T, float(v), v)])) if kind == "aggregated"
            else (lambda c, v: Emission(rated=[rated(c, "api_calls", v)])))
    part = cls(kafka.bootstrap, topic, defer_acks=True).build(f"{kind}_topic", 0, 1)
    part.write_batch([emit("c1", 1), emit(big, 1)])  # returns: the refusal comes with the acks
    part._producer.flush(30)  # (the refusal has arrived; the sink has not looked yet)
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed.*--recovery"):
        part.write_batch([emit("c1", 2)])
    part.write_batch([emit("c1", 3)])  # a batch after the failure is judged alone
    part.write_batch([emit(big, 2)])
    with pytest.raises(MeterError, match=f"Kafka topic '{topic}': delivery failed"):
        part.close()


@pytest.mark.parametrize("kind", ["aggregated", "rated"])
def test_without_recovery_an_unreachable_broker_fails_a_later_batch_or_close_as_an_outage(kind):
    """No broker answers (a closed port): the batch returns at once; once its messages time out
    (kafka.outage_timeout, 1 s here) the next write_batch, or close, raises the outage error."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cls, batch = _rows_of(kind, 10)
    bootstrap = f"127.0.0.1:{port}"
    part = cls(bootstrap, "nowhere", outage_timeout=1.0, defer_acks=True).build(f"{kind}_topic", 0, 1)
    t0 = time.monotonic()
    part.write_batch([batch])
    assert time.monotonic() - t0 < 0.5 and len(part._producer) >= 10  # (len also counts librdkafka requests)
    time.sleep(2.5)
    with pytest.raises(MeterError, match=rf"Kafka at {bootstrap} .*unreachable for more than kafka.outage_timeout"
                                         rf" = 1s .*10 messages to topic 'nowhere' not delivered"):
        part.write_batch([batch])
    part = cls(bootstrap, "nowhere", outage_timeout=1.0, defer_acks=True).build(f"{kind}_topic", 0, 1)
    part.write_batch([batch])
    with pytest.raises(MeterError, match=r"unreachable for more than kafka.outage_timeout = 1s .*10 messages"):
        part.close()


@settings(max_examples=300, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5))
def test_dims_key_is_the_sorted_pairs_joined(dims):
    """The window row identity: every key=value in key order, joined by \\x1f (its first definition, kept)."""
    assert dims_key(dims) == ("\x1f".join(f"{k}={dims[k]}" for k in sorted(dims)) if dims else "")


_NO_PANDAS_SCRIPT = """
import sys
from tests.sinks.test_usage_sinks import EMISSIONS
from meterflow.schemas.config import ClickHouseConfig
from meterflow.sinks.clickhouse import ClickHouseSink, connect
cfg = ClickHouseConfig(dsn="chdb://" + sys.argv[1], database="nopandas")
part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
part.write_batch(EMISSIONS)
part.close()
client, db = connect(cfg)
rows = client.query("SELECT count() FROM " + db + ".usage_by_window").result_rows
print(rows[0][0], "pandas" in sys.modules)
"""


def test_the_clickhouse_sink_writes_without_loading_pandas(tmp_path):
    """A process of its own (chDB allows one path per process, and this one may have loaded pandas): the sink
    writes and the rows read back, and pandas was not imported on the way (sinks/clickhouse.py
    _without_dataframes: about half a second of each start-up; numpy comes with chDB's pyarrow)."""
    import subprocess
    import sys

    from tests.e2e.support import REPO

    out = subprocess.run([sys.executable, "-c", _NO_PANDAS_SCRIPT, str(tmp_path / "chdb")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "False"]
