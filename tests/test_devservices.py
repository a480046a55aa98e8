"""The dev services are real: a Kafka broker that round-trips messages and a
redis-server that survives kill()/restart()."""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.mark.kafka
def test_kafka_produce_and_consume_100_messages(kafka):
    from confluent_kafka import Consumer, Producer

    topic = kafka.create_topic(f"devservices-{uuid.uuid4().hex[:8]}", partitions=3)
    payloads = [f'{{"seq": {i}, "tenant": "acme"}}'.encode() for i in range(100)]

    producer = Producer({"bootstrap.servers": kafka.bootstrap, "acks": "all", "linger.ms": 5})
    errors = []
    for i, value in enumerate(payloads):
        producer.produce(
            topic,
            key=str(i % 7).encode(),
            value=value,
            on_delivery=lambda err, msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0
    assert errors == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": f"devservices-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < len(payloads) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            assert msg.topic() == topic
            received.append(msg.value())
    finally:
        consumer.close()

    assert sorted(received) == sorted(payloads)
    assert len(received) == 100


@pytest.mark.kafka
def test_kafka_create_topic_partitions_and_config(kafka):
    from confluent_kafka.admin import AdminClient, ConfigResource

    name = kafka.create_topic(
        f"devservices-cfg-{uuid.uuid4().hex[:8]}", partitions=4, config={"retention.ms": 3_600_000}
    )
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    md = admin.list_topics(topic=name, timeout=10).topics[name]
    assert len(md.partitions) == 4
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    cfg = admin.describe_configs([res])[res].result(timeout=10)
    assert cfg["retention.ms"].value == "3600000"


@pytest.mark.redis
def test_redis_set_get_kill_restart(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    assert client.set("meterflow:test", "42")
    assert client.get("meterflow:test") == b"42"

    port = redis_server.port
    redis_server.kill()
    assert not redis_server.is_running()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_server.url, socket_timeout=1).ping()

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    assert client.ping()
    assert client.get("meterflow:test") is None  # no persistence: the outage lost the data
    assert client.set("meterflow:test", "43")
    assert client.get("meterflow:test") == b"43"


def test_ch_database_names_are_unique(ch_database, chdb_path):
    assert ch_database.startswith("meter_t_")
    assert ch_database.isidentifier()
    assert chdb_path


@pytest.mark.kafka
def test_kafka_halt_then_start_is_the_same_broker_with_its_data():
    """halt() is a real outage (the JVM exits, connections are refused); start() brings back the same broker on
    the same port with its topics, messages and committed offsets."""
    import socket

    from confluent_kafka import Consumer, Producer, TopicPartition

    from meterflow.devservices import KafkaBroker

    with KafkaBroker() as broker:
        topic = broker.create_topic("halted", partitions=2)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
        for i in range(10):
            producer.produce(topic, value=b"m%d" % i, partition=i % 2)
        assert producer.flush(30) == 0
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "halt-test"})
        consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        consumer.close()
        bootstrap, pid = broker.bootstrap, broker.pid

        broker.halt()
        assert not broker.is_running()
        with pytest.raises(OSError):
            socket.create_connection((broker.host, broker.port), timeout=1).close()

        broker.start()
        assert broker.bootstrap == bootstrap and broker.pid != pid and broker.is_running()
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "halt-test"})
        try:
            assert [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in (0, 1)] == \
                [(0, 5), (0, 5)]
            assert consumer.committed([TopicPartition(topic, 0)], timeout=30)[0].offset == 3
        finally:
            consumer.close()
