"""Broker outage bookkeeping (sources/kafka_watch.py), the kafka.outage_timeout key and the producer settings
it drives. The end-to-end behaviour on a really stopped broker is in tests/e2e/test_broker_outage.py."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import KafkaError

from meterflow.base.errors import ConfigError, MeterError
from meterflow.schemas.config import parse_config
from meterflow.sinks.kafka import _AlertPartition, producer_config
from meterflow.sources.kafka import _TopicPartition
from meterflow.sources.kafka_watch import BrokerWatch, watch_for

NOWHERE = "127.0.0.1:9"  # the discard port: no broker answers there

ALL_DOWN = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _watch(timeout: float = 60.0, bootstrap: str = "127.0.0.1:9092"):
    clock = Clock()
    w = BrokerWatch(bootstrap, timeout, clock=clock)
    w.ANNOUNCE_AFTER = 0.05
    return w, clock


def test_an_outage_stops_the_flow_only_after_the_timeout_with_the_broker_and_the_fix_in_the_message():
    w, clock = _watch(60)
    w.check("reading")  # nothing happened yet
    w.on_error(ALL_DOWN)
    assert w.down
    clock.t += 59.9
    w.check("reading events[0] from offset 7")
    clock.t += 0.2
    with pytest.raises(MeterError) as info:
        w.check("reading events[0] from offset 7")
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("127.0.0.1:9092", "kafka.bootstrap_servers", "kafka.outage_timeout = 60s", "1/1 brokers are down",
                 "events[0] from offset 7", "start the broker", "rerun the same command", "--recovery"):
        assert part in msg, (part, msg)


def test_an_answer_ends_the_outage_and_a_later_one_starts_its_own_clock():
    w, clock = _watch(10)
    w.on_error(ALL_DOWN)
    clock.t += 9
    w.ok()
    assert not w.down and w.down_for() == 0.0
    clock.t += 100
    w.check("reading")
    w.on_error(ALL_DOWN)
    clock.t += 9
    w.check("reading")
    clock.t += 2
    with pytest.raises(MeterError):
        w.check("reading")


def test_an_answer_to_a_request_older_than_the_outage_ends_nothing():
    w, clock = _watch(10)
    asked = w.now()
    clock.t += 1
    w.on_error(ALL_DOWN)
    clock.t += 1
    w.ok(asked)  # (acknowledged before the broker went away, perhaps)
    assert w.down and w.down_for() == 1.0
    clock.t += 9.5
    with pytest.raises(MeterError):  # so the timeout still ends a real outage
        w.check("reading")
    w.ok(w.now())
    assert not w.down


def test_a_flush_with_nothing_pending_is_no_answer_of_a_broker_that_went_away():
    # The flake of test_broker_outage (no "unreachable" line): a batch's flush that found its messages already
    # acknowledged ended the outage just reported, before it was announced, and nothing reported it again.
    w, _clock = _watch(60, NOWHERE)
    part = _AlertPartition(producer_config(NOWHERE, None, 1), "t", w)
    try:
        w.on_error(ALL_DOWN)
        part._flush()  # nothing produced in this batch: no answer
        assert w.down
        asked = w.now()
        _clock.t += 1
        w.on_error(ALL_DOWN)  # (already down: its start stays)
        part._flush(asked)  # produced after the outage was known, and acknowledged: an answer
        assert not w.down
        w.on_error(ALL_DOWN)
        part._flush(asked)  # produced before this outage: perhaps acknowledged before it
        assert w.down
    finally:
        part._producer.flush(0)


def test_a_consumed_message_is_no_answer_only_a_probe_is():
    # A prefetched message consumed after the broker went away proves nothing; the probe (a metadata request
    # sent during the outage) does, and it is not answered here.
    w, _clock = _watch(60, NOWHERE)
    part = _TopicPartition({"bootstrap.servers": NOWHERE, "group.id": "g"}, "t", 0, None, 10, False, 0.01, w)
    try:
        w.on_error(ALL_DOWN)
        part._while_down(True)
        assert w.down
        assert w._probed == w.now(), "the outage is probed even while messages arrive"
    finally:
        part._consumer.close()


def test_other_errors_and_retired_bootstrap_connections_are_not_outages():
    w, clock = _watch(1)
    w.on_error(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
    w.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "0/1 brokers are down"))
    assert not w.down
    clock.t += 100
    w.check("reading")


def test_a_fatal_client_error_stops_at_once():
    w, _clock = _watch(60)
    w.on_error(KafkaError(KafkaError._FENCED, "producer fenced", fatal=True))
    with pytest.raises(MeterError, match="fatal client error .*producer fenced.*kafka.client_config"):
        w.check("delivering")


def test_one_warning_when_an_outage_lasts_and_one_when_it_ends_none_for_a_blip(caplog):
    caplog.set_level(logging.WARNING, logger="meterflow.kafka")
    w, clock = _watch(60, "10.9.9.9:9092")  # its own address: earlier tests' announcements may still arrive
    w.on_error(ALL_DOWN)
    w.ok()  # a blip: over before it is announced
    time.sleep(0.2)
    assert not [r for r in caplog.records if "10.9.9.9" in r.getMessage()]
    w.on_error(ALL_DOWN)
    w.on_error(ALL_DOWN)
    time.sleep(0.2)
    clock.t += 15
    w.ok()
    w.ok()
    msgs = [r.getMessage() for r in caplog.records if "10.9.9.9:9092" in r.getMessage()]
    assert len(msgs) == 2, msgs
    assert "10.9.9.9:9092 is unreachable (1/1 brokers are down)" in msgs[0] and "60s" in msgs[0]
    assert "answers again after 15.0 s" in msgs[1]


def test_every_client_of_one_bootstrap_list_shares_one_watch():
    assert watch_for("a:1", 60) is watch_for("a:1", 60)
    assert watch_for("a:1", 60) is not watch_for("b:1", 60)


def test_producer_messages_time_out_after_the_outage_timeout_unless_client_config_says_otherwise():
    assert producer_config("b:1")["message.timeout.ms"] == 60_000
    assert producer_config("b:1", None, 5)["message.timeout.ms"] == 5_000
    assert producer_config("b:1", {"message.timeout.ms": "9000"}, 5)["message.timeout.ms"] == "9000"


def _config(kafka):
    return parse_config({"tenants": [{"id": "acme"}], "metrics": [{"code": "calls", "event_type": "api_call",
                                                                  "aggregation": "count"}], "kafka": kafka},
                        "meter.toml", environ={})


def test_outage_timeout_key_default_and_validation():
    assert _config({}).kafka.outage_timeout_seconds == 60.0
    assert _config({"outage_timeout": "2m"}).kafka.outage_timeout_seconds == 120.0
    for bad in ("0s", "soon", "-5s"):
        with pytest.raises(ConfigError, match=r"meter\.toml.*kafka\.outage_timeout"):
            _config({"outage_timeout": bad})
