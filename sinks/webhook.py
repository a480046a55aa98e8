"""Alerts POSTed to a webhook through a durable outbox.

Delivery guarantee: at-least-once to the receiver, never lost. ``write_batch`` only appends the
batch's alerts to an outbox file in ``spool_dir`` (one per worker index, ``fsync``ed) and wakes a
background thread, so the flow never waits for the receiver. The thread POSTs the outbox's records
in order, retrying connection errors, timeouts, 5xx, 408 and 429 forever with exponential backoff
and jitter (capped at ``max_backoff``, ``Retry-After`` honoured), and records its progress in an
offset file after each acknowledgement: a restart resumes after the last acknowledged record and
redelivers at most the one that was in flight. Receivers deduplicate by the ``Idempotency-Key``
header (the deterministic ``alert_id``); alerts still in the outbox are not appended twice.
Other responses (4xx, 3xx) are permanent: the alert moves to ``undeliverable.jsonl`` in
``spool_dir`` with the status and the start of the response, logged at WARNING.

At the end of a run (``close()``: the input is exhausted, or a clean stop) the thread drains the
outbox for at most ``drain_timeout``: a backoff wait in progress is cut short and, while draining,
retries are at most 1 s apart (a ``Retry-After`` beyond that is not waited for), so a receiver that
recovers during the drain gets everything before the process exits. Whatever is still undelivered
then stays in the outbox and is reported in ONE warning per sink and process (the count, the outbox
files, the last failure): the next start with the same ``spool_dir`` delivers it first.

Each request: body = the contract's alert JSON, ``Content-Type: application/json``,
``Idempotency-Key``, ``X-Meter-Alert-Type``, ``X-Meter-Timestamp`` (Unix seconds) and, with a
secret, ``X-Meter-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

import msgspec
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from meterflow.base.errors import MeterError
from meterflow.base.timeutil import ms_to_iso, parse_duration_ms
from meterflow.schemas.alerts import ALERT_DECODER, Alert
from meterflow.schemas.config import WebhookConfig, mask_url
from meterflow.schemas.records import Emission
from meterflow.sinks.jsonl_log import AlertLog

log = logging.getLogger(__name__)

_OUTBOX_NAME = re.compile(r"^outbox-(\d+)\.jsonl$")
_SNIPPET = 500
_DRAIN_RETRY = 1.0  # seconds between retries while draining at exit


_OPEN: Set[Path] = set()  # outboxes open in this process: two live writers of one file would corrupt it
_OPEN_LOCK = threading.Lock()
_APPEND_LOCK = threading.Lock()


class Outbox:
    """An append-only file of alert JSON lines (:class:`~meterflow.sinks.jsonl_log.AlertLog`) and how far they
    are delivered.

    ``outbox-N.jsonl`` holds the records; ``outbox-N.offset`` holds ``{"offset": bytes, "records": n}``
    acknowledged so far, replaced atomically after each acknowledgement. When everything is delivered the
    file is truncated; the offset is reset first, so a crash in between redelivers and never loses.
    A torn last line (a crash during an append whose batch was never acknowledged) is dropped on open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_suffix(".offset")
        with _OPEN_LOCK:
            if path in _OPEN:
                raise MeterError(f"webhook outbox {path} is already open in this process; close the other sink "
                                 "first or give each sink its own alerts.webhook.spool_dir")
            _OPEN.add(path)
        self.lock = threading.Lock()
        self.closed = False
        self._log = AlertLog(path, "webhook outbox")  # drops a torn last line, loads the ids
        data = path.read_bytes()
        self.offset, self.records = self._load_offset(data)
        self.pending = data.count(b"\n", self.offset)
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def size(self) -> int:
        return self._log.size

    def _load_offset(self, data: bytes) -> Tuple[int, int]:
        try:
            saved = json.loads(self.offset_path.read_text())
            offset, records = int(saved["offset"]), int(saved["records"])
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("webhook outbox %s: unreadable offset file (%s); redelivering from the start", self.path,
                        exc)
            return 0, 0
        if 0 <= offset <= len(data) and (offset == 0 or data[offset - 1:offset] == b"\n"):
            return offset, records
        log.warning("webhook outbox %s: offset %d does not fit the file; redelivering from the start", self.path,
                    offset)
        return 0, 0

    def append(self, alerts: Sequence[Alert]) -> int:
        """Append the alerts not already in the outbox; durable on return. Returns how many were added."""
        with self.lock:
            added = self._log.append(alerts)
            self.pending += added
            return added

    def peek(self) -> Optional[bytes]:
        """The first undelivered record (with its newline), or None."""
        with self.lock:
            if self.closed or self.offset >= self.size:
                return None
            chunk = b""
            while True:
                more = os.pread(self._fd, 65536, self.offset + len(chunk))
                chunk += more
                nl = chunk.find(b"\n")
                if nl >= 0:
                    return chunk[:nl + 1]
                if not more:
                    return None

    def ack(self, nbytes: int, before: Optional[Callable[[], None]] = None) -> bool:
        """Mark the first undelivered record (``nbytes`` long) delivered, after running ``before``.
        False when the outbox was closed meanwhile (the next start redelivers the record)."""
        with self.lock:
            if self.closed:
                return False
            if before is not None:
                before()
            self.offset += nbytes
            self.records += 1
            self.pending -= 1
            if self.offset >= self.size:
                self._write_offset(0, 0)  # first: a crash before the truncation redelivers, never loses
                self._log.clear()
                self.offset = self.records = 0
            else:
                self._write_offset(self.offset, self.records)
            return True

    def _write_offset(self, offset: int, records: int) -> None:
        tmp = self.offset_path.with_suffix(".offset.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps({"offset": offset, "records": records}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.offset_path)

    def retire(self) -> bool:
        """Close and delete a fully delivered outbox (one left by a worker that no longer exists)."""
        with self.lock:
            if self.pending or self.closed:
                return False
        self.close()
        for p in (self.path, self.offset_path):
            p.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._log.close()
            os.close(self._fd)
        with _OPEN_LOCK:
            _OPEN.discard(self.path)


def append_record(path: Path, record: bytes) -> None:
    """Append one line to a file shared by every worker of this process (``undeliverable.jsonl``), durably."""
    with _APPEND_LOCK, open(path, "ab") as fh:
        fh.write(record)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass(frozen=True)
class WebhookCounters:
    """Delivery counters: alerts acknowledged, failed attempts retried, alerts moved to
    ``undeliverable.jsonl``, and alerts waiting in the outbox."""

    delivered: int = 0
    retried: int = 0
    undeliverable: int = 0
    pending: int = 0


@dataclass(frozen=True)
class _Response:
    status: int  # 0: no response (connection error or timeout)
    text: str
    retry_after: Optional[float] = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in (408, 429) or self.status >= 500


def http_post(url: str, body: bytes, headers: dict, timeout: float) -> _Response:
    """POST ``body``; a connection error or timeout is status 0. Redirects are not followed."""
    u = urlsplit(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname or "localhost", u.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(u.hostname or "localhost", u.port, timeout=timeout)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read(_SNIPPET).decode("utf-8", errors="replace")
        retry_after = resp.getheader("Retry-After")
        seconds = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
        return _Response(resp.status, text, seconds)
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, socket timeout, bad response
        return _Response(0, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


class _WebhookPartition(StatelessSinkPartition[Emission]):
    def __init__(self, sink: "WebhookSink", worker_index: int, worker_count: int) -> None:
        self._sink = sink
        spool = sink.spool_dir
        spool.mkdir(parents=True, exist_ok=True)
        self._own = Outbox(spool / f"outbox-{worker_index}.jsonl")
        # Outboxes left by workers that no longer exist (the flow restarted with fewer workers).
        self._boxes: List[Outbox] = []
        try:
            for p in sorted(spool.glob("outbox-*.jsonl")):
                m = _OUTBOX_NAME.match(p.name)
                if m and int(m.group(1)) >= worker_count and int(m.group(1)) % worker_count == worker_index:
                    self._boxes.append(Outbox(p))
        except BaseException:
            for box in (*self._boxes, self._own):
                box.close()
            raise
        self._boxes.append(self._own)
        self._undeliverable = spool / "undeliverable.jsonl"
        self.delivered = self.retried = self.undeliverable = 0
        self.last_failure = ""  # the latest failed attempt, for the report at exit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._kick = threading.Event()  # set when the drain starts: cuts a backoff wait short
        self._draining = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"webhook-outbox-{worker_index}", daemon=True)
        self._thread.start()

    # -- the flow's side: append and return ------------------------------------------------------
    def write_batch(self, items: List[Emission]) -> None:
        alerts = [a for e in items for a in e.alerts]
        if alerts and self._own.append(alerts):
            self._wake.set()

    def pending(self) -> int:
        return sum(b.pending for b in self._boxes)

    def outbox_files(self) -> List[Path]:
        """The outbox files that still hold undelivered alerts."""
        return [b.path for b in self._boxes if b.pending]

    def close(self) -> None:
        """Drain for at most the sink's ``close_timeout`` seconds (``alerts.webhook.drain_timeout``), then
        stop; what is left stays in the outbox and the sink reports it once (:meth:`WebhookSink.closed`)."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        self._kick.set()
        self._wake.set()
        self._thread.join(self._sink.close_timeout)
        self._stop.set()  # interrupts a retry wait; an in-flight request is never acknowledged after this
        for box in self._boxes:
            box.close()  # from here on ``pending`` cannot change: the report below is exact
        self._sink.closed(self)

    # -- the delivery thread ---------------------------------------------------------------------
    def _next(self) -> Tuple[Optional[Outbox], Optional[bytes]]:
        for box in self._boxes:
            line = box.peek()
            if line is not None:
                return box, line
        return None, None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                box, line = self._next()
                if box is None or line is None:
                    if self._draining:
                        return
                    self._wake.wait(1.0)
                    continue
                self._deliver(box, line)
                if box is not self._own and box.pending == 0 and box.retire():
                    self._boxes.remove(box)
            except Exception:  # a disk error must not end deliveries for good: log, wait, try again
                log.exception("webhook %s: outbox delivery failed; retrying", mask_url(self._sink.url))
                self._stop.wait(1.0)

    def _deliver(self, box: Outbox, line: bytes) -> None:
        body = line.rstrip(b"\n")
        try:
            alert = ALERT_DECODER.decode(body)
        except msgspec.DecodeError as exc:
            self._give_up(box, line, _Response(0, f"corrupt outbox record: {exc}"), 0)
            return
        sink = self._sink
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            resp = http_post(sink.url, body, sink.headers(alert.alert_id, alert.type, body), sink.timeout)
            if self._stop.is_set():
                return  # closed while in flight: the next start redelivers it
            if resp.ok:
                if box.ack(len(line)):
                    self.delivered += 1
                    if attempt > 1:
                        log.info("webhook %s: alert %s delivered after %d attempts", mask_url(sink.url),
                                 alert.alert_id, attempt)
                return
            if not resp.retryable:
                self._give_up(box, line, resp, attempt)
                return
            self.retried += 1
            self.last_failure = f"HTTP {resp.status}" if resp.status else resp.text[:200]
            delay = sink.backoff(attempt, resp.retry_after)
            draining = self._draining  # read once: close() sets it before _kick, so no wait can miss the drain
            if draining:  # the run is ending: keep trying while the drain lasts
                delay = min(delay, _DRAIN_RETRY)
            if attempt == 1 or attempt % 10 == 0:
                log.warning("webhook %s: alert %s attempt %d failed (%s); retrying in %.1f s", mask_url(sink.url),
                            alert.alert_id, attempt, resp.status or resp.text, delay)
            # Before the drain a wait ends early when it starts (close() sets _kick); during it, at _stop.
            sink.sleep_for(delay, self._stop if draining else self._kick)

    def _give_up(self, box: Outbox, line: bytes, resp: _Response, attempts: int) -> None:
        meta = {"failed_at": ms_to_iso(int(self._sink.clock() * 1000)), "url": mask_url(self._sink.url),
                "status": resp.status, "response": resp.text[:_SNIPPET], "attempts": attempts}
        alert_json = line.rstrip(b"\n").decode("utf-8", errors="replace")
        try:
            json.loads(alert_json)
        except ValueError:
            alert_json = json.dumps(alert_json)  # a corrupt record is kept as a string
        record = json.dumps(meta)[:-1].encode() + b', "alert": ' + alert_json.encode() + b"}\n"

        def move() -> None:
            append_record(self._undeliverable, record)

        if box.ack(len(line), before=move):
            self.undeliverable += 1
            log.warning("webhook %s: alert record moved to %s after HTTP %s: %s", mask_url(self._sink.url),
                        self._undeliverable, resp.status, resp.text[:200])


class WebhookSink(DynamicSink[Emission]):
    """POST each alert to ``config.url`` through a durable outbox: at-least-once and never lost; receivers
    deduplicate by ``Idempotency-Key`` (the alert id). See the module docstring.

    ``close_timeout`` (seconds; default ``config.drain_timeout``) bounds the drain at exit. ``clock``
    (seconds since the epoch), ``sleep(seconds)`` and ``rng`` are injectable for tests; the default
    sleep is interrupted by ``close()``.
    """

    def __init__(self, config: WebhookConfig, *, clock: Callable[[], float] = time.time,
                 sleep: Optional[Callable[[float], None]] = None, rng: Optional[random.Random] = None,
                 close_timeout: Optional[float] = None, initial_backoff: float = 0.5) -> None:
        try:
            self.timeout = parse_duration_ms(config.timeout) / 1000
            self.max_backoff = parse_duration_ms(config.max_backoff) / 1000
            drain = parse_duration_ms(config.drain_timeout) / 1000
        except ValueError as exc:
            raise MeterError(f"alerts.webhook: {exc}") from exc
        self.url = config.url
        self._secret = config.secret.encode()
        self.spool_dir = Path(config.spool_dir).expanduser().resolve()
        self.clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.close_timeout = drain if close_timeout is None else close_timeout
        self.initial_backoff = initial_backoff
        self._parts: List[_WebhookPartition] = []
        self._closing: List[_WebhookPartition] = []  # closed since the last report
        self._open = 0
        self._lock = threading.Lock()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WebhookPartition:
        part = _WebhookPartition(self, worker_index, worker_count)
        with self._lock:
            self._parts.append(part)
            self._open += 1
        return part

    def closed(self, part: _WebhookPartition) -> None:
        """A partition finished its drain. When the last open one has, say in ONE warning what the drain
        left in the outboxes (nothing is said when everything was delivered)."""
        with self._lock:
            self._closing.append(part)
            self._open -= 1
            if self._open > 0:
                return
            parts, self._closing = self._closing, []
        left = sum(p.pending() for p in parts)
        if not left:
            return
        files = sorted({f for p in parts for f in p.outbox_files()})
        names = ", ".join(f.name for f in files)
        last = next((p.last_failure for p in parts if p.pending() and p.last_failure), "")
        log.warning("webhook %s: %d alerts left in the outbox (%s in %s) after draining for up to %g s%s; they "
                    "are kept and delivered first, in order, by the next `meter run` with this "
                    "alerts.webhook.spool_dir (raise alerts.webhook.drain_timeout to wait longer at exit)",
                    mask_url(self.url), left, names, self.spool_dir, self.close_timeout,
                    f" (last attempt: {last})" if last else "")

    def stats(self) -> WebhookCounters:
        """Counters summed over this sink's partitions in this process."""
        return WebhookCounters(delivered=sum(p.delivered for p in self._parts),
                               retried=sum(p.retried for p in self._parts),
                               undeliverable=sum(p.undeliverable for p in self._parts),
                               pending=sum(p.pending() for p in self._parts))

    def headers(self, alert_id: str, alert_type: str, body: bytes) -> dict:
        h = {"Content-Type": "application/json", "User-Agent": "meterflow-webhook/1", "Idempotency-Key": alert_id,
             "X-Meter-Alert-Type": alert_type, "X-Meter-Timestamp": str(int(self.clock()))}
        if self._secret:
            h["X-Meter-Signature"] = "sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        return h

    def backoff(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds before retry number ``attempt``: exponential with jitter in [d/2, d], capped at max_backoff."""
        d = min(self.max_backoff, self.initial_backoff * 2 ** min(attempt - 1, 30))
        delay = d / 2 + self._rng.random() * d / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def sleep_for(self, seconds: float, stop: threading.Event) -> None:
        if self._sleep is None:
            stop.wait(seconds)
        else:
            self._sleep(seconds)
