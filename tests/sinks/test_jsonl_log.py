"""AlertLog, the one durable deduplicating alert JSONL file behind the alert JSONL sink and the webhook
outbox: exactly one line per alert id across reopenings, a torn tail dropped, a failed append leaves
nothing behind, and the bytes are the contract's alert JSON."""

from __future__ import annotations

import logging
import os

import pytest

from meterflow.base.errors import MeterError
from meterflow.schemas.alerts import ALERT_DECODER, ALERT_ENCODER
from meterflow.sinks import jsonl_log
from meterflow.sinks.jsonl_log import AlertLog
from tests.sinks.test_alert_sinks import make_alerts


def test_one_line_per_alert_id_across_batches_and_reopenings(tmp_path):
    path = tmp_path / "sub" / "alerts.jsonl"
    alerts = make_alerts(6)
    log = AlertLog(path, "alert file")
    assert log.append([alerts[0], alerts[1], alerts[0]]) == 2  # a repeat inside a batch is written once
    assert log.append(alerts[:3]) == 1
    assert log.append([]) == 0 and log.append(alerts[1:2]) == 0
    log.close()
    reopened = AlertLog(path, "alert file")
    assert reopened.ids == {a.alert_id for a in alerts[:3]} and reopened.size == path.stat().st_size
    assert reopened.append(alerts) == 3
    reopened.close()
    assert path.read_bytes() == b"".join(ALERT_ENCODER.encode(a) + b"\n" for a in alerts)


def test_a_torn_tail_is_dropped_and_a_foreign_line_is_kept_but_not_an_id(tmp_path, caplog):
    path = tmp_path / "outbox-0.jsonl"
    a, b, c = make_alerts(3)
    whole = ALERT_ENCODER.encode(a) + b"\n" + b"not json\n\n"
    path.write_bytes(whole + ALERT_ENCODER.encode(b)[:40])
    with caplog.at_level(logging.WARNING, logger="meterflow.sinks.jsonl_log"):
        log = AlertLog(path, "webhook outbox")
    assert [r.getMessage() for r in caplog.records] == [
        f"webhook outbox {path}: dropping a torn last line of 40 bytes (its batch is replayed)",
        f"webhook outbox {path}: line 2 is not an alert record; ignored for deduplication"]
    assert path.read_bytes() == whole and log.size == len(whole) and log.ids == {a.alert_id}
    assert log.append([a, b, c]) == 2
    log.close()
    lines = path.read_bytes().splitlines()
    assert [ALERT_DECODER.decode(x) for x in (lines[0], *lines[3:])] == [a, b, c]


def test_a_failed_append_leaves_no_partial_line_and_a_retry_writes_it(tmp_path, monkeypatch):
    path = tmp_path / "alerts.jsonl"
    a, b = make_alerts(2)
    log = AlertLog(path, "alert file")
    log.append([a])
    before = path.read_bytes()
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonl_log.os, "fsync", full_disk)
    with pytest.raises(MeterError, match=r"^alert file .*alerts\.jsonl: cannot append 1 alerts: .*No space left"):
        log.append([b])
    monkeypatch.setattr(jsonl_log.os, "fsync", real_fsync)
    assert path.read_bytes() == before and log.ids == {a.alert_id} and log.size == len(before)
    assert log.append([b]) == 1
    log.close()
    assert path.read_bytes() == before + ALERT_ENCODER.encode(b) + b"\n"


def test_clear_empties_the_file_and_forgets_the_ids(tmp_path):
    path = tmp_path / "outbox-1.jsonl"
    a, = make_alerts(1)
    log = AlertLog(path, "webhook outbox")
    log.append([a])
    log.clear()
    assert path.read_bytes() == b"" and log.size == 0 and not log.ids
    assert log.append([a]) == 1  # delivered and forgotten: a later re-detection is queued again
    log.close()
    assert path.read_bytes() == ALERT_ENCODER.encode(a) + b"\n"
