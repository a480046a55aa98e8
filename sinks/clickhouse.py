"""ClickHouse: rollups, billing-period totals, dead letters, alerts and the raw archive, with exact views on top.

Delivery guarantee: at-least-once from Bytewax (a resumed flow re-emits the rows
of the epoch it was in); exactly-once in effect, because every row is an upsert:
tables are ``ReplacingMergeTree(version)`` keyed by the row's identity, a row's
``version`` is the number of events folded into it (it only grows), and the
contract's views read ``FINAL``, so readers see each row's latest value with no
FINAL or GROUP BY of their own. Dead letters are keyed by a deterministic id.
Raw archive rows are keyed by (tenant, customer, event id, source location), so a
replay rewrites the rows it had written.

Insert batching: an insert costs a ClickHouse part whatever its size (about 6 ms on embedded chDB for one row or
ten thousand, and the merges of those parts after it), so a flow WITHOUT a recovery directory gathers its batches
for ``COALESCE_S`` (or ``COALESCE_ITEMS`` emissions) and inserts them together; after a slow insert the next
emissions wait longer, up to ``COALESCE_MAX_S``, so that inserts take about ``INSERT_SHARE`` of the time
(:func:`paced_wait`). An idle flow's last rows go out within that time (a timer),
and at the end of the flow (``close``). Those inserts run on a thread of the partition, so the flow's thread goes on
folding events while ClickHouse works (a batch that finds ``COALESCE_ITEMS`` waiting inserts them itself, so what
waits stays bounded). Nothing is lost that a rerun would not rewrite: without recovery a rerun reads the topics from
the start. With a recovery directory every batch is inserted before ``write_batch``
returns, so Bytewax commits an epoch only after its rows are in ClickHouse. Alerts are keyed by their deterministic
``alert_id``; when a replay re-detects an alert the FIRST detection is kept (``rank`` = 2^62 - detected_at ms grows for
earlier detections), so ``alerts_log`` agrees with the JSONL file and webhooks.

The same code talks to a ClickHouse server (``http://host:8123/db``) and to
embedded chDB (``chdb:///path``); chDB allows one data path per process, so the
embedded client is shared and its calls serialised, and a path that another process
holds is refused with that process named (``embedded_holder``).

The tables, views and insert columns are :mod:`meterflow.sinks.clickhouse_schema`. Per row
the sink does as little Python as it can: one insert context per table is made when
the partition is built (column types read once, not per insert), and a batch is
handed over column-oriented, one list per column read straight off the records,
rather than as rows that the driver would transpose again. A table with money columns (``usage_rated_rows``) is
encoded by :func:`native_block`: the driver's own ``Native`` bytes, its money columns made in C (``money_data``)
instead of by the driver's writer, which runs Python per value. With ``meterflow_native`` built, the hot tables
(window, period and rated rows) go instead as ``RowBinary`` made in Rust (``clickhouse_schema.rowbinary``,
native/src/rowbin.rs; money still by ``money_data``): the values the column insert stores, without Python per
column or value holding the GIL; a batch with a value the encoder does not take exactly goes the old way.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from meterflow.base.errors import MeterError
from meterflow.base.timeutil import now_ms
from meterflow.schemas.config import ClickHouseConfig, mask_url
from meterflow.schemas.records import Emission, PeriodAggregate, RatedRow, WindowAggregate
from meterflow.sinks.clickhouse_reviews import REVIEW_TABLES, decision_columns, review_columns
from meterflow.sinks.clickhouse_schema import (
    MONEY_TYPE,
    RAW_COLUMNS,
    TABLES,
    RowBinarySpec,
    alert_columns,
    ddl,
    dead_letter_columns,
    emission_records,
    money_data,
    period_columns,
    rated_record_columns,
    raw_event_columns,
    raw_event_rowbinary,
    rowbinary,
    rowbinary_spec,
    window_columns,
)

DEFAULT_DATABASE = "meter"
COALESCE_S = 0.5  # without recovery: how long a batch's rows wait to be inserted with later batches, at least
COALESCE_MAX_S = 2.0  # ... and at most, when inserts are slow (INSERT_SHARE)
INSERT_SHARE = 0.05  # the wait after an insert that took t: t * (1 - share) / share, inserts then taking this share
COALESCE_ITEMS = 20_000  # ... or this many emissions (about one per shard and batch) waiting


def paced_wait(least: float, took: float) -> float:
    """How long the next emissions wait to be inserted together after an insert that took ``took`` seconds: at
    least ``least`` (``COALESCE_S``), at most ``COALESCE_MAX_S``, else long enough that inserts take about
    ``INSERT_SHARE`` of the time. Each insert costs ClickHouse a part whatever its size, and the merges of those parts
    after it: on embedded chDB, its thread pool's CPU in the latency run went from 2.8 s to 1.5 s with 2 s instead of
    0.5 s between inserts (measured by hand), CPU the flow's thread and the Kafka clients need on a small machine. A
    slow insert is a loaded machine or big inserts: both are better served by fewer of them."""
    return max(least, min(COALESCE_MAX_S, took * (1.0 - INSERT_SHARE) / INSERT_SHARE))

# Every insert leaves its block as it came: a block is not collapsed at insert time as a merge of the replacing
# tables would collapse it. Each row's identity and version already make the views' FINAL (and the merges) keep its
# latest value, so what readers of the views see is the same, and the insert does less work: the throughput run's
# inserts wait on the flow's thread when 20,000 emissions are waiting, and chDB's threads run on the flow's cores
# (three alternating pairs of the native throughput run, by hand: 134,589 / 175,234 / 150,150 events/s against
# 110,173 / 153,218 / 148,883 with the default, CPU per million events 5 to 12 % lower, chDB's thread pool 0.37-0.46
# CPU s against 0.46-0.55). A server takes the same setting; the tests run it on chDB only.
INSERT_SETTINGS: Dict[str, Any] = {"optimize_on_insert": 0}

# Embedded chDB takes an insert's bytes from a file (``INSERT ... FROM INFILE``): clickhouse-connect's chDB backend
# writes each block to a temporary file of the default temporary directory, on this machine's disk. The sink writes
# it itself, to memory-backed /dev/shm where there is one: in the throughput run's py-spy profile the flow's thread
# spent 9-11 % of its samples in that file's write (the raw archive's insert at the end of the flow, by hand), and
# three alternating pairs of the native throughput run read 160,085 / 148,588 / 154,321 events/s against 121,212 /
# 141,978 / 136,737 through the backend's file (CPU per million events 7.33-7.38 against 7.52-8.70, by hand).
SPOOL_DIR = "/dev/shm"
SPOOL_PREFIX = "meterflow-insert-"  # then the writing process's pid: a killed process's files are found by it


def spool_dir() -> str:
    """Where embedded inserts' bytes wait for ClickHouse: :data:`SPOOL_DIR` if it is a writable directory, else the
    default temporary directory."""
    return SPOOL_DIR if os.path.isdir(SPOOL_DIR) and os.access(SPOOL_DIR, os.W_OK) else tempfile.gettempdir()


def _new_spool_file(directory: str, data: bytes) -> str:
    """A new file of ``directory`` named for :func:`sweep_spool`, holding ``data`` (none left when it fails)."""
    fd, path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", suffix=".insert", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


def sweep_spool(directory: str) -> int:
    """Remove the spool files of processes that are gone: a process killed during an insert leaves its file (in
    memory, for /dev/shm). The number removed; a file of a live process, or not of this sink, is left alone."""
    removed = 0
    for name in os.listdir(directory):
        if not (name.startswith(SPOOL_PREFIX) and name.endswith(".insert")):
            continue
        pid = name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass
    return removed


log = logging.getLogger("meterflow.clickhouse")

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

        lock = self._lock

        def call(*args: Any, **kwargs: Any) -> Any:
            with lock:
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
        for stmt in ddl(db):
            client.command(stmt)
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


def native_block(context: Any, columns: list) -> bytes:
    """``columns`` as the ``Native`` insert the driver would send for ``context`` (a column-oriented insert context:
    the same blocks, headers and column writers), except that ``Decimal(38, 9)`` columns are written by
    :func:`~meterflow.sinks.clickhouse_schema.money_data`, which makes the same bytes several times faster; insert
    it with ``raw_insert(..., fmt="Native")``. The ``Native`` format over HTTP (and chDB): per block the column
    and row counts (LEB128), then per column its name, its type and its data."""
    from clickhouse_connect.driver.common import write_leb128

    context.data = columns
    out = bytearray()
    for block in context.next_block():
        write_leb128(block.column_count, out)
        write_leb128(block.row_count, out)
        for name, typ, data in zip(block.column_names, block.column_types, block.column_data):
            for text in (name, typ.insert_name):
                enc = text.encode()
                write_leb128(len(enc), out)
                out += enc
            if typ.insert_name == MONEY_TYPE:
                out += money_data(data)
            else:
                context.start_column(name)
                typ.write_column(data, out, context)
    context.data = None
    return bytes(out)


def _without_dataframes() -> None:
    """clickhouse-connect asks on every insert whether the data is a pandas DataFrame, and the question imports
    pandas the first time (about half a second of every ``meter`` start-up). The sinks insert lists and arrays
    only, so in a process that has not loaded pandas the driver is told that it is not there, as where it is not
    installed (its ``options`` module resolves ``pd`` once; clickhouse-connect is pinned to 1.12.x); numpy, which
    chDB loads anyway, is resolved now. A process that already uses pandas keeps it."""
    import sys

    from clickhouse_connect.driver import options

    if "pandas" not in sys.modules:
        for name in ("pd", "pd_time_test"):
            if name not in vars(options):
                setattr(options, name, None)
    options.pd, options.np  # noqa: B018 - resolved now, not on the first insert


class _ClickHousePartition(StatelessSinkPartition[Emission]):
    def __init__(self, cfg: ClickHouseConfig, coalesce_s: float = 0.0) -> None:
        self._client, db = connect(cfg)
        self._spool = spool_dir() if resolve(cfg)[2] else None  # (embedded chDB: the inserts' bytes go by file)
        if self._spool is not None:
            for directory in {self._spool, tempfile.gettempdir()}:  # (a full spool falls back to the second)
                sweep_spool(directory)
        self._raw_table = f"{db}.raw_event_rows"
        try:
            # One reusable insert context per table: the column types are read once here, not per insert.
            self._windows, self._periods, self._rated, self._dead, self._alerts, self._raw = (
                self._client.create_insert_context(f"{db}.{table}", columns, column_oriented=True,
                                                   settings=INSERT_SETTINGS)
                for table, columns in TABLES[:6])
            self._reviews = self._client.create_insert_context(f"{db}.{REVIEW_TABLES[0][0]}", REVIEW_TABLES[0][1],
                                                               column_oriented=True, settings=INSERT_SETTINGS)
            self._decisions = self._client.create_insert_context(f"{db}.{REVIEW_TABLES[1][0]}",
                                                                 REVIEW_TABLES[1][1], column_oriented=True,
                                                                 settings=INSERT_SETTINGS)
        except Exception as exc:
            raise MeterError(f"cannot prepare inserts into ClickHouse at {mask_url(cfg.dsn)} (database {db}): {exc}; "
                             "check that its tables have this version's columns") from exc
        # The hot tables (window, period and rated rows): per kind of record its context, the RowBinary spec of the
        # native encoder (None without meterflow_native), its columns for the driver and whether it holds money.
        self._hot: Dict[str, Tuple[Any, Optional[RowBinarySpec], Callable[[list, int], list], bool]] = {
            kind: (ctx, rowbinary_spec(record, ctx.column_names, [t.name for t in ctx.column_types]), columns, money)
            for kind, ctx, record, columns, money in (
                ("windows", self._windows, WindowAggregate, window_columns, False),
                ("periods", self._periods, PeriodAggregate, period_columns, False),
                ("rated", self._rated, RatedRow, rated_record_columns, True))}
        _without_dataframes()
        # Insert batching (module doc): emissions waiting since _since, written by write_batch or the timer.
        self._delay = coalesce_s
        self._wait = coalesce_s  # the current wait: paced_wait after each insert
        self._pending: List[Emission] = []
        self._since = 0.0
        self._lock = threading.Lock()  # guards _pending, _since, _wait and _error
        self._inserting = threading.Lock()  # one insert at a time: each takes what waits, so they go in order
        self._error: Optional[BaseException] = None
        self._closed = threading.Event()
        self._due = threading.Event()  # write_batch: what waits is due (COALESCE_S old)
        self._thread: Optional[threading.Thread] = None
        if coalesce_s > 0:
            self._thread = threading.Thread(target=self._inserter, name="clickhouse-inserts", daemon=True)
            self._thread.start()

    def _raw_insert(self, table: str, columns: List[str], data: bytes, fmt: str) -> None:
        """``data`` in ``fmt`` into ``table`` with :data:`INSERT_SETTINGS`: over the client for a server, through a
        file of :func:`spool_dir` (removed after) for embedded chDB."""
        if self._spool is None:
            self._client.raw_insert(table, columns, data, fmt=fmt, settings=INSERT_SETTINGS)
            return
        from clickhouse_connect.driver.binding import quote_identifier

        path = self._spool_file(data)
        try:
            cols = ", ".join(quote_identifier(c) for c in columns)
            settings = ", ".join(f"{k} = {v}" for k, v in INSERT_SETTINGS.items())
            quoted = path.replace("\\", "\\\\").replace("'", "\\'")  # (a TMPDIR may hold any character)
            self._client.command(f"INSERT INTO {table} ({cols}) FROM INFILE '{quoted}'"
                                 f"{' SETTINGS ' + settings if settings else ''} FORMAT {fmt}")
        finally:
            os.unlink(path)

    def _spool_file(self, data: bytes) -> str:
        """A new file of the spool directory holding ``data``; of the default temporary directory when the spool is
        full (/dev/shm is small in some containers: 64 MiB by default under Docker)."""
        assert self._spool is not None
        try:
            return _new_spool_file(self._spool, data)
        except OSError as exc:
            fallback = tempfile.gettempdir()
            if exc.errno != errno.ENOSPC or fallback == self._spool:
                raise
            log.warning("%s is full: ClickHouse inserts go through %s", self._spool, fallback)
            return _new_spool_file(fallback, data)

    def _insert(self, context: Any, columns: list) -> None:
        context.data = columns
        self._client.insert(context=context)

    def _insert_money(self, context: Any, columns: list) -> None:
        """An insert into a table with money columns: the driver's Native bytes, made faster (:func:`native_block`)."""
        self._raw_insert(context.table, context.column_names, native_block(context, columns), "Native")

    def _insert_rows(self, kind: str, records: list, at_ms: int) -> None:
        """An insert of window, period or rated rows (``kind``): ``RowBinary`` made natively (:func:`rowbinary`, the
        bytes of the column insert) when it can, else the columns through the driver (``_insert``,
        ``_insert_money``)."""
        context, spec, columns, money = self._hot[kind]
        data = rowbinary(spec, records, at_ms) if spec is not None else None
        if data is not None:
            self._raw_insert(context.table, context.column_names, data, "RowBinary")
        elif money:
            self._insert_money(context, columns(records, at_ms))
        else:
            self._insert(context, columns(records, at_ms))

    def write_batch(self, items: List[Emission]) -> None:
        if self._delay <= 0:
            self._write(items)
            return
        with self._lock:
            self._raise_pending_error()
            if not self._pending:
                self._since = time.monotonic()
            self._pending += items
            full = len(self._pending) >= COALESCE_ITEMS
            if not full and time.monotonic() - self._since >= self._wait:
                self._due.set()  # the inserter thread takes it: the flow goes on meanwhile
        if full:  # the inserter is behind: this batch waits for room, so what waits stays bounded
            self._write_pending()
            with self._lock:
                self._raise_pending_error()

    def _write_pending(self) -> None:
        """Insert what waits, after any insert under way (the caller holds neither lock)."""
        with self._inserting:
            with self._lock:
                items, self._pending = self._pending, []
            if items:
                t0 = time.monotonic()
                self._write(items)
                if self._delay > 0:
                    wait = paced_wait(self._delay, time.monotonic() - t0)
                    with self._lock:
                        self._wait = wait

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def _inserter(self) -> None:
        """Inserts what waited its wait (COALESCE_S, longer after slow inserts: :func:`paced_wait`): when write_batch
        finds it due, or after COALESCE_S / 2 with no batch (an idle flow). Off the flow's thread: chDB and the HTTP
        client release the GIL while ClickHouse works, so the flow folds the next events meanwhile instead of waiting
        an insert per table. An error stops the flow at its next batch or at the end."""
        while not self._closed.is_set():
            self._due.wait(self._delay / 2)
            self._due.clear()
            with self._lock:
                ready = bool(self._pending) and self._error is None and \
                    time.monotonic() - self._since >= self._wait
            if not ready:
                continue
            try:
                self._write_pending()
            except Exception as exc:  # raised again by the flow's thread (write_batch, close)
                log.error("ClickHouse insert failed: %s", exc)
                with self._lock:
                    self._error = exc

    def close(self) -> None:
        self._closed.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join()  # (an insert under way ends first)
        with self._lock:
            self._raise_pending_error()
        self._write_pending()

    def _write(self, items: List[Emission]) -> None:
        at = now_ms()
        for kind in ("windows", "periods"):
            records = emission_records(items, kind)
            if records:
                self._insert_rows(kind, records, at)
        rated = emission_records(items, "rated")
        if rated:
            self._insert_rows("rated", rated, now_ms())
        vcols = review_columns(items, now_ms())
        if vcols:
            self._insert(self._reviews, vcols)
        ccols = decision_columns(items)
        if ccols:
            self._insert(self._decisions, ccols)
        dcols = dead_letter_columns(items)
        if dcols:
            self._insert(self._dead, dcols)
        acols = alert_columns(items)
        if acols:
            self._insert(self._alerts, acols)
        raw = raw_event_columns(items)
        if raw:
            self._insert(self._raw, raw)
        block = raw_event_rowbinary(items)  # native mediation's raw archive, already encoded
        if block:
            self._raw_insert(self._raw_table, RAW_COLUMNS, block, "RowBinary")


class ClickHouseSink(DynamicSink[Emission]):
    """Write emissions to ClickHouse (see the module docstring for the delivery guarantee)."""

    def __init__(self, cfg: ClickHouseConfig, coalesce: bool = False) -> None:
        self._cfg = cfg
        self._coalesce = coalesce  # batch inserts across write_batch calls (only for a flow without recovery)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ClickHousePartition:
        return _ClickHousePartition(self._cfg, COALESCE_S if self._coalesce else 0.0)
