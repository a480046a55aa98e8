"""Alert outputs for people and scripts: an append-only JSONL file and a human-readable stdout line.

:class:`JsonlAlertSink` — exactly-once per ``alert_id`` in the file, across restarts and replays: at
``build()`` the ids already in the file are loaded, a batch appends only ids not yet written, and
``write_batch`` returns after ``fsync``. A crash can leave a torn last line (its batch was never
acknowledged, so Bytewax replays it): the torn tail is truncated when the file is next opened. The file
is :class:`meterflow.sinks.jsonl_log.AlertLog`, the same as the webhook's outbox.

:class:`StdoutAlertSink` — at-least-once: a resumed flow may print an alert again.

:func:`alert_sinks_from_config` lists the alert sinks a configuration asks for (ClickHouse's
``alerts_log`` is written by the main ClickHouse sink, not here).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, TextIO, Tuple

from bytewax.outputs import DynamicSink, Sink, StatelessSinkPartition

from meterflow.schemas.alerts import Alert, fmt_pct
from meterflow.schemas.config import Config
from meterflow.schemas.records import Emission
from meterflow.sinks.jsonl_log import AlertLog


class _JsonlFile:
    """One alert file (:class:`~meterflow.sinks.jsonl_log.AlertLog`), shared by every partition of this process
    that writes it (one lock per path), so workers never interleave partial lines and share one set of
    written ids."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.refs = 0
        self._log = AlertLog(path, "alert file")

    def append(self, alerts: List[Alert]) -> int:
        """Append the alerts whose ids are not in the file yet; durable on return. Returns how many."""
        with self.lock:
            return self._log.append(alerts)

    def close(self) -> None:
        self._log.close()


_FILES: Dict[Path, _JsonlFile] = {}
_FILES_LOCK = threading.Lock()


class _JsonlPartition(StatelessSinkPartition[Emission]):
    def __init__(self, path: Path) -> None:
        with _FILES_LOCK:
            shared = _FILES.get(path)
            if shared is None:
                shared = _FILES[path] = _JsonlFile(path)
            shared.refs += 1
        self._file = shared
        self._closed = False

    def write_batch(self, items: List[Emission]) -> None:
        alerts = [a for e in items for a in e.alerts]
        if alerts:
            self._file.append(alerts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _FILES_LOCK:
            self._file.refs -= 1
            if self._file.refs == 0:
                _FILES.pop(self._file.path, None)
                self._file.close()


class JsonlAlertSink(DynamicSink[Emission]):
    """Append each alert as one line of the contract's alert JSON to ``path``, exactly once per ``alert_id``.

    Idempotency: the ids already in the file are loaded when it is opened and a batch writes only new ids,
    so replays, duplicate emissions and re-runs over the same input add nothing. Each batch is written with
    one ``write`` and ``fsync``ed before ``write_batch`` returns. Workers of one process share one open file,
    one lock and one id set per path; separate processes must each be given their own path.
    """

    def __init__(self, path: str) -> None:
        self._path = Path(path).expanduser().resolve()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonlPartition:
        return _JsonlPartition(self._path)


def format_alert(a: Alert) -> str:
    """One compact human-readable line (no trailing newline).

    >>> a = Alert(alert_id="8e271bf85e52d80089fe8344a00af777", type="threshold_crossed", tenant_id="acme",
    ...           customer_id="c1", metric="api_calls", period_start="2026-11-01T00:00:00Z",
    ...           period_end="2026-12-01T00:00:00Z", threshold_pct=90.0, included=1000.0, usage=901.0,
    ...           usage_pct=90.1, enforcement="soft", action="notify", event_id="e9",
    ...           event_time="2026-11-03T14:30:00Z", ingested_at="", detected_at="2026-11-03T14:30:00.250Z")
    >>> line = format_alert(a)
    >>> print(line[:95])
    ALERT 2026-11-03T14:30:00.250Z threshold_crossed acme/c1 api_calls threshold=90% usage=901/1000
    >>> print(line[96:])
    (90.1%) enforcement=soft action=notify event=e9 id=8e271bf85e52
    """
    parts = ["ALERT", a.detected_at, a.type, f"{a.tenant_id}/{a.customer_id}"]
    if a.metric:
        parts.append(a.metric)
    if a.threshold_pct is not None:
        parts.append(f"threshold={fmt_pct(a.threshold_pct)}%")
    usage = f"usage={_num(a.usage)}" + ("" if a.included is None else f"/{_num(a.included)}")
    if a.usage_pct is not None:
        usage += f" ({a.usage_pct:.1f}%)"
    parts += [usage, f"enforcement={a.enforcement}", f"action={a.action}"]
    if a.plan:
        parts.append(f"plan={a.plan}" + (f" (was {a.previous_plan})" if a.previous_plan else ""))
    if a.wallet_remaining is not None:
        parts.append(f"wallet={_num(a.wallet_remaining)}/{_num(a.wallet_balance or 0.0)}")
    if a.event_id:
        parts.append(f"event={a.event_id}")
    if a.detail:
        parts.append(f"detail={a.detail!r}")
    parts.append(f"id={a.alert_id[:12]}")
    return " ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


class _StdoutPartition(StatelessSinkPartition[Emission]):
    _LOCK = threading.Lock()  # one batch's lines stay together when several workers print

    def __init__(self, stream: Optional[TextIO]) -> None:
        self._stream = stream

    def write_batch(self, items: List[Emission]) -> None:
        lines = [format_alert(a) + "\n" for e in items for a in e.alerts]
        if lines:
            stream = self._stream or sys.stdout
            with self._LOCK:
                stream.write("".join(lines))
                stream.flush()


class StdoutAlertSink(DynamicSink[Emission]):
    """Print one compact line per alert (:func:`format_alert`) to standard output (or ``stream``).

    At-least-once: a resumed flow may print an alert again (the ``id=`` prefix identifies it)."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self._stream = stream

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StdoutPartition:
        return _StdoutPartition(self._stream)


def alert_sinks_from_config(config: Config, recoverable: bool = False) -> List[Tuple[str, Sink]]:
    """``(step id, sink)`` for every alert destination the configuration asks for: the Kafka alerts topic
    when ``[kafka]`` is set, then ``alerts.jsonl``, ``alerts.stdout`` and ``alerts.webhook``. ``recoverable``:
    the flow keeps a recovery directory (then each batch's alerts are acknowledged before it ends; without one
    the next batch checks them, sinks/kafka.py)."""
    sinks: List[Tuple[str, Sink]] = []
    if config.kafka is not None:
        from meterflow.sinks.kafka import AlertTopicSink

        k = config.kafka
        sinks.append(("alerts_kafka", AlertTopicSink(k.bootstrap_servers, k.alerts_topic, k.client_config,
                                                     k.outage_timeout_seconds, defer_acks=not recoverable)))
    if config.alerts.jsonl:
        sinks.append(("alerts_jsonl", JsonlAlertSink(config.alerts.jsonl)))
    if config.alerts.stdout:
        sinks.append(("alerts_stdout", StdoutAlertSink()))
    if config.alerts.webhook is not None:
        from meterflow.sinks.webhook import WebhookSink

        sinks.append(("alerts_webhook", WebhookSink(config.alerts.webhook)))
    return sinks
