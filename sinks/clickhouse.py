"""ClickHouse: rollups, billing-period totals, dead letters and alerts, with exact views on top.

Delivery guarantee: at-least-once from Bytewax (a resumed flow re-emits the rows
of the epoch it was in); exactly-once in effect, because every row is an upsert:
tables are ``ReplacingMergeTree(version)`` keyed by the row's identity, a row's
``version`` is the number of events folded into it (it only grows), and the
contract's views read ``FINAL``, so readers see each row's latest value with no
FINAL or GROUP BY of their own. Dead letters are keyed by a deterministic id.
Alerts are keyed by their deterministic ``alert_id``; when a replay re-detects an
alert the FIRST detection is kept (``rank`` = 2^62 - detected_at ms grows for
earlier detections), so ``alerts_log`` agrees with the JSONL file and webhooks.

The same code talks to a ClickHouse server (``http://host:8123/db``) and to
embedded chDB (``chdb:///path``); chDB allows one data path per process, so the
embedded client is shared and its calls serialised, and a path that another process
holds is refused with that process named (``embedded_holder``).

Per row the sink does as little Python as it can: one insert context per table is
made when the partition is built (column types read once, not per insert), and a
batch is handed over column-oriented, one list per column read straight off the
records, rather than as rows that the driver would transpose again.
"""

from __future__ import annotations

import threading
from itertools import chain
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from meterflow.base.errors import MeterError
from meterflow.base.timeutil import now_ms, parse_rfc3339_ms
from meterflow.schemas.alerts import Alert
from meterflow.schemas.config import ClickHouseConfig, mask_url
from meterflow.schemas.records import Emission

DEFAULT_DATABASE = "meter"

_DDL = [
    """CREATE TABLE IF NOT EXISTS {db}.usage_window_rows (
        tenant_id String, customer_id String, metric LowCardinality(String),
        window_start DateTime64(3, 'UTC'), window_end DateTime64(3, 'UTC'),
        dims_key String, dimensions Map(String, String),
        value Float64, events UInt64, version UInt64, updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version)
    PARTITION BY toYYYYMM(window_start)
    ORDER BY (tenant_id, customer_id, metric, window_start, dims_key)""",
    """CREATE TABLE IF NOT EXISTS {db}.usage_period_rows (
        tenant_id String, customer_id String, metric LowCardinality(String),
        period_start DateTime64(3, 'UTC'), period_end DateTime64(3, 'UTC'),
        value Float64, included Nullable(Float64), overage_units Float64,
        events UInt64, excluded_events UInt64, version UInt64, updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY (tenant_id, customer_id, metric, period_start)""",
    """CREATE TABLE IF NOT EXISTS {db}.dead_letter_rows (
        dl_id String, received_at DateTime64(3, 'UTC'), reason LowCardinality(String), detail String,
        source String, tenant_id String, metric String, payload String
    ) ENGINE = ReplacingMergeTree
    ORDER BY dl_id""",
    """CREATE TABLE IF NOT EXISTS {db}.alert_rows (
        alert_id String, type LowCardinality(String), tenant_id String, customer_id String,
        metric LowCardinality(String), period_start DateTime64(3, 'UTC'), period_end DateTime64(3, 'UTC'),
        threshold_pct Nullable(Float64), included Nullable(Float64), usage Float64, usage_pct Nullable(Float64),
        enforcement LowCardinality(String), action LowCardinality(String), event_id String,
        event_time Nullable(DateTime64(3, 'UTC')), ingested_at Nullable(DateTime64(3, 'UTC')),
        detected_at DateTime64(3, 'UTC'), plan String, previous_plan String, account_name String,
        wallet_balance Nullable(Float64), wallet_remaining Nullable(Float64), detail String, rank UInt64
    ) ENGINE = ReplacingMergeTree(rank)
    ORDER BY alert_id""",
    """CREATE OR REPLACE VIEW {db}.usage_by_window AS
       SELECT tenant_id, customer_id, metric, window_start, window_end, dimensions, value, events
       FROM {db}.usage_window_rows FINAL""",
    """CREATE OR REPLACE VIEW {db}.usage_by_period AS
       SELECT tenant_id, customer_id, metric, period_start, period_end, value, included, overage_units,
              events, excluded_events
       FROM {db}.usage_period_rows FINAL""",
    """CREATE OR REPLACE VIEW {db}.dead_letters AS
       SELECT received_at, reason, detail, source, payload, tenant_id, metric, dl_id
       FROM {db}.dead_letter_rows FINAL""",
    """CREATE OR REPLACE VIEW {db}.alerts_log AS
       SELECT alert_id, type, tenant_id, customer_id, metric, period_start, period_end, threshold_pct, usage,
              included, usage_pct, enforcement, action, event_id, event_time, ingested_at, detected_at, plan,
              previous_plan, account_name, wallet_balance, wallet_remaining, detail
       FROM {db}.alert_rows FINAL""",
]

# Insert column orders: the record's fields in declaration order (meterflow.schemas.records), then the derived ones,
# so that a batch's columns are its records transposed.
WINDOW_COLUMNS = ["tenant_id", "customer_id", "metric", "window_start", "window_end", "dimensions", "value", "events",
                  "version", "dims_key", "updated_at"]
PERIOD_COLUMNS = ["tenant_id", "customer_id", "metric", "period_start", "period_end", "value", "included",
                  "overage_units", "events", "excluded_events", "version", "updated_at"]
DEAD_COLUMNS = ["dl_id", "reason", "detail", "source", "tenant_id", "metric", "payload", "received_at"]
ALERT_COLUMNS = ["alert_id", "type", "tenant_id", "customer_id", "metric", "period_start", "period_end",
                 "threshold_pct", "included", "usage", "usage_pct", "enforcement", "action", "event_id", "event_time",
                 "ingested_at", "detected_at", "plan", "previous_plan", "account_name", "wallet_balance",
                 "wallet_remaining", "detail", "rank"]
_RANK_BASE = 1 << 62  # rank = _RANK_BASE - detected_at ms: the earliest detection of an alert_id wins

_EMBEDDED_LOCK = threading.RLock()
_EMBEDDED: Dict[str, Any] = {}


class LockedClient:
    """Serialises calls to a client shared by threads (chDB is one engine per process)."""

    def __init__(self, client: Any, lock: Optional[threading.RLock]) -> None:
        self._client = client
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if self._lock is None or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


def resolve(cfg: ClickHouseConfig) -> Tuple[str, str, bool]:
    """(dsn to connect with, database, embedded?) — chDB paths made absolute."""
    u = urlparse(cfg.dsn)
    if u.scheme == "chdb":
        path = (u.netloc + u.path) if u.netloc not in ("", "localhost") else u.path
        abs_path = Path(path).expanduser().resolve()
        return f"chdb://{abs_path}", cfg.database or DEFAULT_DATABASE, True
    db = cfg.database or (u.path.strip("/") or DEFAULT_DATABASE)
    return cfg.dsn, db, False


def connect(cfg: ClickHouseConfig) -> Tuple[LockedClient, str]:
    """Open (or reuse, for chDB) a client; create the database, tables and views. Returns (client, database)."""
    try:
        import clickhouse_connect
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise MeterError("clickhouse-connect is not installed: pip install clickhouse-connect chdb") from exc
    dsn, db, embedded = resolve(cfg)
    try:
        if embedded:
            with _EMBEDDED_LOCK:
                client = _EMBEDDED.get(dsn)
                if client is None:
                    path = Path(dsn[len("chdb://"):])
                    _refuse_if_held(path)  # before chDB prints its own "Cannot lock file" line to stderr
                    path.mkdir(parents=True, exist_ok=True)
                    try:
                        client = LockedClient(clickhouse_connect.get_client(dsn=dsn), _EMBEDDED_LOCK)
                    except Exception:
                        _refuse_if_held(path)  # another process opened it since the check above
                        raise
                    _EMBEDDED[dsn] = client
        else:
            client = LockedClient(clickhouse_connect.get_client(dsn=dsn, database="default"), None)
        client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        for stmt in _DDL:
            client.command(stmt.format(db=db))
    except MeterError:
        raise
    except Exception as exc:
        hint = "a writable directory" if embedded else "a reachable ClickHouse server"
        raise MeterError(f"cannot open ClickHouse at {mask_url(cfg.dsn)} (database {db}): {exc}; check that "
                         f"clickhouse.dsn names {hint}") from exc
    return client, db


def embedded_holder(path: Path) -> Optional[str]:
    """The process holding the chDB data path ``path``, described for an operator, or None when it is free.

    chDB (like a ClickHouse server) holds an exclusive ``flock`` on ``PATH/status`` while the path is open
    and writes its pid and start time there. The holder is found by reading ``/proc/locks`` (Linux), never
    by trying the lock: a probe lock, however short, could make the legitimate owner's start fail. Where
    /proc/locks does not exist, a status file whose pid is alive counts as held."""
    import os

    status = path / "status"
    try:
        st = os.stat(status)
        info = dict(line.split(": ", 1) for line in status.read_text(errors="replace").splitlines() if ": " in line)
    except (OSError, ValueError):
        return None
    pid = None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[3] == "WRITE" and parts[5] == ident:
                    pid = int(parts[4])
                    break
            else:
                return None
    except FileNotFoundError:
        try:
            pid = int(info.get("PID", ""))
            os.kill(pid, 0)
        except (ValueError, OSError):
            return None
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        argv = []
    if len(argv) > 1 and Path(argv[0]).name.startswith("python"):
        argv = argv[1:]  # a console script run by its interpreter: name the script
    what = f"pid {pid}"
    if argv:
        cmd = " ".join([Path(argv[0]).name, *argv[1:]])
        what += f": {cmd[:157] + '...' if len(cmd) > 160 else cmd}"
    if info.get("Started at"):
        what += f", started {info['Started at']}"
    return what


def _refuse_if_held(path: Path) -> None:
    holder = embedded_holder(path)
    if holder is not None:
        raise MeterError(f"embedded ClickHouse at {path} is in use by another process ({holder}): chDB opens a "
                         "data path in one process at a time, so this command is refused; run it after that "
                         "process exits, or set clickhouse.dsn to a ClickHouse server (e.g. "
                         "http://localhost:8123/meter) for readers that run while meter run writes")


def dims_key(dims: Dict[str, str]) -> str:
    r"""The dimensions as one sortable string (part of a window row's identity).

    >>> dims_key({}), dims_key({"region": "eu", "model": "m"})
    ('', 'model=m\x1fregion=eu')
    """
    return "\x1f".join(f"{k}={dims[k]}" for k in sorted(dims)) if dims else ""


def emission_columns(items: List[Emission], at_ms: int) -> Tuple[Optional[list], Optional[list], Optional[list]]:
    """A batch of emissions as the columns of (window rows, period rows, dead-letter rows) — each None when the
    batch has no such row — in the orders ``WINDOW_COLUMNS``, ``PERIOD_COLUMNS``, ``DEAD_COLUMNS``.

    One list per column, filled by a comprehension over the records: no per-row list or tuple is made."""
    wcols = pcols = dcols = None
    ws = list(chain.from_iterable([e.windows for e in items if e.windows]))
    if ws:
        dims = [w.dimensions for w in ws]
        wcols = [[w.tenant_id for w in ws], [w.customer_id for w in ws], [w.metric for w in ws],
                 [w.window_start for w in ws], [w.window_end for w in ws], dims, [w.value for w in ws],
                 [w.events for w in ws], [w.version for w in ws], [dims_key(d) if d else "" for d in dims],
                 [at_ms] * len(ws)]
    ps = list(chain.from_iterable([e.periods for e in items if e.periods]))
    if ps:
        pcols = [[p.tenant_id for p in ps], [p.customer_id for p in ps], [p.metric for p in ps],
                 [p.period_start for p in ps], [p.period_end for p in ps], [p.value for p in ps],
                 [p.included for p in ps], [p.overage_units for p in ps], [p.events for p in ps],
                 [p.excluded_events for p in ps], [p.version for p in ps], [at_ms] * len(ps)]
    ds = list(chain.from_iterable([e.dead_letters for e in items if e.dead_letters]))
    if ds:
        dcols = [[d.dl_id for d in ds], [d.reason for d in ds], [d.detail for d in ds], [d.source for d in ds],
                 [d.tenant_id for d in ds], [d.metric for d in ds], [d.payload for d in ds],
                 [d.received_at for d in ds]]
    return wcols, pcols, dcols


def alert_time_ms(alert: Alert, field: str, optional: bool = False) -> Optional[int]:
    """Epoch ms of one of an alert's RFC 3339 time fields; an empty string is None when ``optional``
    (``event_time`` of an alert no event caused), else the epoch (wallet alerts have no period)."""
    text = getattr(alert, field)
    if not text:
        return None if optional else 0
    try:
        return parse_rfc3339_ms(text)
    except ValueError as exc:
        raise MeterError(f"ClickHouse sink: alert {alert.alert_id} has an invalid {field}: {exc}") from exc


def alert_rows(items: List[Emission]) -> List[list]:
    """The ``alert_rows`` insert rows of a batch of emissions (columns ``ALERT_COLUMNS``)."""
    rows = []
    for e in items:
        for a in e.alerts:
            detected = alert_time_ms(a, "detected_at")
            rows.append([a.alert_id, a.type, a.tenant_id, a.customer_id, a.metric,
                         alert_time_ms(a, "period_start"), alert_time_ms(a, "period_end"), a.threshold_pct,
                         a.included, a.usage, a.usage_pct, a.enforcement, a.action, a.event_id,
                         alert_time_ms(a, "event_time", True), alert_time_ms(a, "ingested_at", True), detected,
                         a.plan, a.previous_plan, a.account_name, a.wallet_balance, a.wallet_remaining, a.detail,
                         max(0, _RANK_BASE - detected)])
    return rows


class _ClickHousePartition(StatelessSinkPartition[Emission]):
    def __init__(self, cfg: ClickHouseConfig) -> None:
        self._client, db = connect(cfg)
        try:
            # One reusable insert context per table: the column types are read once here, not per insert.
            self._windows, self._periods, self._dead, self._alerts = (
                self._client.create_insert_context(f"{db}.{table}", columns, column_oriented=True)
                for table, columns in (("usage_window_rows", WINDOW_COLUMNS), ("usage_period_rows", PERIOD_COLUMNS),
                                       ("dead_letter_rows", DEAD_COLUMNS), ("alert_rows", ALERT_COLUMNS)))
        except Exception as exc:
            raise MeterError(f"cannot prepare inserts into ClickHouse at {mask_url(cfg.dsn)} (database {db}): {exc}; "
                             "check that its tables have this version's columns") from exc
        # clickhouse-connect imports pandas/numpy lazily on the first insert (~0.3 s): pay it at start-up.
        from clickhouse_connect.driver import options
        options.pd, options.np  # noqa: B018 - attribute access triggers the import

    def _insert(self, context: Any, columns: list) -> None:
        context.data = columns
        self._client.insert(context=context)

    def write_batch(self, items: List[Emission]) -> None:
        wcols, pcols, dcols = emission_columns(items, now_ms())
        if wcols:
            self._insert(self._windows, wcols)
        if pcols:
            self._insert(self._periods, pcols)
        if dcols:
            self._insert(self._dead, dcols)
        arows = alert_rows(items)
        if arows:
            self._insert(self._alerts, list(zip(*arows)))


class ClickHouseSink(DynamicSink[Emission]):
    """Write emissions to ClickHouse (see the module docstring for the delivery guarantee)."""

    def __init__(self, cfg: ClickHouseConfig) -> None:
        self._cfg = cfg

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ClickHousePartition:
        return _ClickHousePartition(self._cfg)
