"""WebhookSink against a real local HTTP receiver that fails (500), hangs past the timeout, rejects (400)
and recovers: every alert arrives, in order, signed, and a restart redelivers only what was not acknowledged."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from meterflow.schemas.alerts import ALERT_DECODER
from meterflow.schemas.config import WebhookConfig
from meterflow.sinks.webhook import WebhookCounters, WebhookSink
from tests.sinks.test_alert_sinks import batch, make_alerts

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cret"


class Receiver:
    """A webhook endpoint. ``script`` is consumed one entry per request ("500", "503", "timeout", "ok");
    when it is empty ``default`` applies; ids in ``reject`` always get 400. ``accepted`` lists the
    Idempotency-Key of every request answered 2xx, in arrival order."""

    def __init__(self, script: Optional[List[str]] = None, default: str = "ok", hang: float = 1.0) -> None:
        self.script = list(script or [])
        self.default = default
        self.reject: set = set()
        self.hang = hang
        self.lock = threading.Lock()
        self.accepted: List[str] = []
        self.attempts: List[str] = []
        self.requests: List[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.handle(self, body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/alerts?src=meter"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        key = h.headers["Idempotency-Key"]
        with self.lock:
            action = self.script.pop(0) if self.script else self.default
            if key in self.reject:
                action = "400"
            self.attempts.append(key)
            self.requests.append({"path": h.path, "headers": dict(h.headers), "body": body, "action": action})
        if action == "timeout":
            time.sleep(self.hang)  # the client gave up long ago; never counted as accepted
            action = "500"
        if action == "503-retry-after":  # down, and asks not to come back for 30 s
            self._reply(h, 503, b"maintenance", {"Retry-After": "30"})
        elif action == "ok":
            with self.lock:
                self.accepted.append(key)
            self._reply(h, 200, b'{"ok": true}')
        elif action == "400":
            self._reply(h, 400, b'{"error": "payload rejected by schema v7"}')
        else:
            self._reply(h, int(action), b"server error")

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Optional[dict] = None) -> None:
        try:
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass  # the client timed out and closed the connection

    def set_default(self, action: str) -> None:
        with self.lock:
            self.default = action

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: List[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def make_sink(url: str, spool: Path, sleeps: Optional[List[float]] = None, **kwargs) -> WebhookSink:
    cfg = WebhookConfig(url=url, secret=SECRET, timeout="300ms", max_backoff="2s", spool_dir=str(spool))

    def sleep(seconds: float) -> None:  # record the backoff, wait a token amount
        if sleeps is not None:
            sleeps.append(seconds)
        time.sleep(0.002)

    return WebhookSink(cfg, sleep=sleep, rng=random.Random(7), clock=lambda: 1793800000.5, **kwargs)


def first_seen(keys: List[str]) -> List[str]:
    return list(dict.fromkeys(keys))


def test_failures_timeouts_then_recovery_deliver_everything_in_order(receiver, tmp_path):
    rx = receiver(script=["500", "500", "timeout", "503", "ok", "ok", "timeout", "500", "429"], hang=1.0)
    alerts = make_alerts(8)
    sleeps: List[float] = []
    sink = make_sink(rx.url, tmp_path / "spool", sleeps)
    part = sink.build("alerts_webhook", 0, 1)
    t0 = time.monotonic()
    part.write_batch(batch(alerts[:5]))
    part.write_batch(batch(alerts[5:] + alerts[:2]))  # a replay of two alerts still pending adds nothing
    assert time.monotonic() - t0 < 0.5, "write_batch never waits for the receiver"
    expected = [a.alert_id for a in alerts]
    wait_for(lambda: set(rx.accepted) == set(expected), what="every alert to be accepted")
    wait_for(lambda: sink.stats().pending == 0, what="the outbox to drain")
    part.close()

    assert first_seen(rx.accepted) == expected, "first deliveries keep the outbox order"
    assert Counter(rx.accepted) == Counter(expected), "each alert acknowledged exactly once"
    assert sink.stats() == WebhookCounters(delivered=8, retried=7, undeliverable=0, pending=0)
    assert len(sleeps) == 7 and all(0 < s <= 2.0 for s in sleeps)
    assert sleeps[:3] == sorted(sleeps[:3]), "exponential backoff grows while the receiver keeps failing"
    by_id = {a.alert_id: a for a in alerts}
    for req in rx.requests:
        h, body = req["headers"], req["body"]
        assert req["path"] == "/hooks/alerts?src=meter"
        assert h["Content-Type"] == "application/json"
        expected_sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(h["X-Meter-Signature"], expected_sig)
        assert h["X-Meter-Timestamp"] == "1793800000"
        alert = ALERT_DECODER.decode(body)
        assert alert == by_id[h["Idempotency-Key"]]
        assert h["X-Meter-Alert-Type"] == alert.type
    outbox = tmp_path / "spool" / "outbox-0.jsonl"
    assert outbox.stat().st_size == 0, "a fully delivered outbox is truncated"
    assert json.loads((tmp_path / "spool" / "outbox-0.offset").read_text()) == {"offset": 0, "records": 0}


def test_restart_after_partial_delivery_redelivers_only_the_unacknowledged(receiver, tmp_path):
    rx = receiver(script=["ok", "ok"], default="503")
    alerts = make_alerts(6)
    spool = tmp_path / "spool"
    sink = make_sink(rx.url, spool, close_timeout=0.3)
    part = sink.build("alerts_webhook", 0, 1)
    part.write_batch(batch(alerts[:5]))
    wait_for(lambda: len(rx.attempts) >= 4, what="two deliveries and failing retries")
    t0 = time.monotonic()
    part.close()
    assert time.monotonic() - t0 < 3, "close() gives the thread a bounded time"
    assert rx.accepted == [a.alert_id for a in alerts[:2]]
    offset = json.loads((spool / "outbox-0.offset").read_text())
    assert offset["records"] == 2
    n_attempts = len(rx.attempts)
    time.sleep(0.3)
    assert len(rx.attempts) <= n_attempts + 1, "no deliveries after close (at most the one in flight)"

    # A torn line from a crash mid-append (never acknowledged) is dropped when the outbox is reopened.
    with open(spool / "outbox-0.jsonl", "ab") as fh:
        fh.write(b'{"alert_id": "torn')
    rx.set_default("ok")
    sink2 = make_sink(rx.url, spool)
    part2 = sink2.build("alerts_webhook", 0, 1)
    assert sink2.stats().pending == 3
    part2.write_batch(batch(alerts[2:]))  # the flow's replay of the unacknowledged batch, and one new alert
    wait_for(lambda: len(rx.accepted) == 6, what="the rest to be delivered")
    wait_for(lambda: sink2.stats().pending == 0, what="the outbox to drain")
    part2.close()
    assert rx.accepted == [a.alert_id for a in alerts], "nothing acknowledged is sent again"
    assert sink2.stats() == WebhookCounters(delivered=4, retried=0, undeliverable=0, pending=0)
    assert not (spool / "undeliverable.jsonl").exists()


def test_a_rejected_alert_goes_to_undeliverable_and_the_rest_flow_on(receiver, tmp_path, caplog):
    rx = receiver()
    alerts = make_alerts(4)
    rx.reject.add(alerts[1].alert_id)
    spool = tmp_path / "spool"
    sink = make_sink(rx.url, spool)
    part = sink.build("alerts_webhook", 0, 1)
    with caplog.at_level(logging.WARNING, logger="meterflow.sinks.webhook"):
        part.write_batch(batch(alerts))
        wait_for(lambda: sink.stats().pending == 0, what="the outbox to drain")
    part.close()
    assert rx.accepted == [alerts[i].alert_id for i in (0, 2, 3)]
    assert rx.attempts.count(alerts[1].alert_id) == 1, "a 400 is permanent: not retried"
    lines = (spool / "undeliverable.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["status"] == 400 and "schema v7" in rec["response"] and rec["attempts"] == 1
    assert rec["alert"]["alert_id"] == alerts[1].alert_id and rec["alert"]["usage"] == alerts[1].usage
    assert sink.stats() == WebhookCounters(delivered=3, retried=0, undeliverable=1, pending=0)
    assert any(r.levelno == logging.WARNING and "undeliverable" in r.getMessage() for r in caplog.records)


def test_write_batch_never_blocks_and_the_outbox_survives_a_down_receiver(receiver, tmp_path):
    rx = receiver(default="timeout", hang=2.0)
    spool = tmp_path / "spool"
    sink = make_sink(rx.url, spool, close_timeout=0.2)
    part = sink.build("alerts_webhook", 0, 1)
    alerts = make_alerts(30)
    t0 = time.monotonic()
    for i in range(0, 30, 3):
        part.write_batch(batch(alerts[i:i + 3]))
    assert time.monotonic() - t0 < 1.0
    wait_for(lambda: sink.stats().retried >= 2, what="retries")
    t0 = time.monotonic()
    part.close()
    assert time.monotonic() - t0 < 2.0
    assert rx.accepted == []
    lines = (spool / "outbox-0.jsonl").read_bytes().splitlines()
    assert [ALERT_DECODER.decode(x) for x in lines] == alerts
    # A restart with fewer workers: worker 0 of 1 adopts worker 1's outbox left by a 2-worker run.
    (spool / "outbox-0.jsonl").rename(spool / "outbox-1.jsonl")
    (spool / "outbox-0.offset").unlink(missing_ok=True)
    rx.set_default("ok")
    sink2 = make_sink(rx.url, spool)
    part2 = sink2.build("alerts_webhook", 0, 1)
    wait_for(lambda: len(rx.accepted) == 30, what="adopted outbox delivered")
    wait_for(lambda: not (spool / "outbox-1.jsonl").exists(), what="the adopted outbox to be retired")
    part2.close()
    assert rx.accepted == [a.alert_id for a in alerts]


def test_backoff_is_exponential_jittered_and_capped():
    cfg = WebhookConfig(url="http://127.0.0.1:1/", max_backoff="10s")
    sink = WebhookSink(cfg, rng=random.Random(1), initial_backoff=0.5)
    for attempt, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (60, 10.0)]:
        delays = [sink.backoff(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 100, "jittered"
    assert 5.0 <= sink.backoff(1, retry_after=5.0) <= 10.0, "Retry-After is honoured"
    assert sink.backoff(1, retry_after=3600.0) <= 10.0, "... up to max_backoff"


def test_headers_without_a_secret_are_unsigned():
    sink = WebhookSink(WebhookConfig(url="http://127.0.0.1:1/"), clock=lambda: 12.9)
    h = sink.headers("abc", "blocked", b"{}")
    assert h["Idempotency-Key"] == "abc" and h["X-Meter-Alert-Type"] == "blocked"
    assert h["X-Meter-Timestamp"] == "12" and "X-Meter-Signature" not in h


# -- at exit: a bounded drain, and one line about what is left -------------------------------------------

def left_lines(caplog) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meterflow.sinks.webhook" and "left in the outbox" in
            r.getMessage()]


def test_close_drains_a_receiver_that_recovers_while_the_next_retry_is_far_away(receiver, tmp_path, caplog):
    # The receiver is down and asks for 30 s (Retry-After) before the run ends, then recovers: the
    # scheduled retry is far beyond the end of the run, but close() retries at once and delivers all.
    rx = receiver(script=["503-retry-after", "503-retry-after"], default="ok")
    alerts = make_alerts(5)
    cfg = WebhookConfig(url=rx.url, secret=SECRET, timeout="1s", max_backoff="60s", drain_timeout="10s",
                        spool_dir=str(tmp_path / "spool"))
    sink = WebhookSink(cfg, rng=random.Random(3))  # the real sleep: the backoff really waits
    part = sink.build("alerts_webhook", 0, 1)
    part.write_batch(batch(alerts))
    wait_for(lambda: len(rx.attempts) >= 1, what="the first failed attempt")
    time.sleep(0.2)  # the thread now waits for the retry 30 s away
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="meterflow.sinks.webhook"):
        part.close()
    took = time.monotonic() - t0
    assert rx.accepted == [a.alert_id for a in alerts], "every alert delivered before close() returned"
    assert took < 5.0, f"the drain retries soon after the receiver recovers, not after Retry-After ({took:.1f} s)"
    assert sink.stats() == WebhookCounters(delivered=5, retried=2, undeliverable=0, pending=0)
    assert left_lines(caplog) == []
    assert (tmp_path / "spool" / "outbox-0.jsonl").stat().st_size == 0


def test_a_zero_drain_timeout_leaves_the_outbox_for_the_next_start_at_once(receiver, tmp_path, caplog):
    rx = receiver(default="503-retry-after")
    cfg = WebhookConfig(url=rx.url, timeout="1s", drain_timeout="0s", spool_dir=str(tmp_path / "spool"))
    sink = WebhookSink(cfg)
    part = sink.build("alerts_webhook", 0, 1)
    part.write_batch(batch(make_alerts(2)))
    wait_for(lambda: len(rx.attempts) >= 1, what="the first failed attempt")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="meterflow.sinks.webhook"):
        part.close()
    assert time.monotonic() - t0 < 1.0
    assert len(left_lines(caplog)) == 1 and "2 alerts left in the outbox" in left_lines(caplog)[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_what_is_left_at_exit_is_said_exactly_once_with_the_outbox_and_how_it_is_delivered(receiver, tmp_path,
                                                                                         caplog, workers):
    # Every worker closes its partition in its own thread, as Bytewax does. Before the fix each partition
    # warned only if its thread happened to be alive after close() stopped it: zero, one or two lines.
    rx = receiver(default="503")
    alerts = make_alerts(7)
    for run in range(4):
        spool = tmp_path / f"spool{run}"
        sink = make_sink(rx.url, spool, close_timeout=0.3)
        parts = [sink.build("alerts_webhook", w, workers) for w in range(workers)]
        parts[0].write_batch(batch(alerts[:4]))
        parts[-1].write_batch(batch(alerts[4:] if workers == 2 else []))
        if workers == 1:
            parts[0].write_batch(batch(alerts[4:]))
        wait_for(lambda sink=sink: sink.stats().retried >= 2, what="failing retries")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meterflow.sinks.webhook"):
            closers = [threading.Thread(target=p.close) for p in parts]
            for t in closers:
                t.start()
            for t in closers:
                t.join(10)
        lines = left_lines(caplog)
        assert len(lines) == 1, f"run {run}: {lines}"
        line = lines[0]
        assert "7 alerts left in the outbox" in line, line
        assert str(spool) in line and "outbox-0.jsonl" in line, line
        assert ("outbox-1.jsonl" in line) == (workers == 2), line
        assert "next `meter run`" in line and "HTTP 503" in line and "drain_timeout" in line, line
        assert sink.stats().pending == 7
        assert sum(len((spool / f"outbox-{w}.jsonl").read_bytes().splitlines()) for w in range(workers)) == 7
