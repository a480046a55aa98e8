"""The ClickHouse contract module: every table holds exactly the columns its records' Structs give the
sink, every view shows the contract's columns (README: Outputs) in a fixed order derived from the records, and
the alert columns follow the Alert Struct, so a new field cannot be left out of one of them."""

from __future__ import annotations

import doctest
import os

import pytest

from meterflow.base.errors import MeterError
from meterflow.schemas.alerts import ALERT_FIELDS, ALERT_TIME_FIELDS, Alert, alert_id
from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import (
    DeadLetter,
    Emission,
    PeriodAggregate,
    RatedRow,
    RawEvents,
    ReconciliationRow,
    WindowAggregate,
)
from meterflow.sinks import clickhouse_schema as schema
from meterflow.sinks.clickhouse import ClickHouseSink, connect

# The columns each view has at least (README: Outputs and delivery guarantees), with the types stated there.
CONTRACT_VIEWS = {
    "usage_by_window": {"tenant_id": None, "customer_id": None, "metric": None, "window_start": None,
                        "window_end": None, "dimensions": "Map(String, String)", "value": "Float64",
                        "events": "UInt64"},
    "usage_by_period": {"tenant_id": None, "customer_id": None, "metric": None, "period_start": None,
                        "period_end": None, "value": "Float64", "included": "Nullable(Float64)",
                        "overage_units": "Float64", "final": "UInt8"},
    "usage_rated": {"tenant_id": None, "customer_id": None, "metric": None, "period_start": None, "period_end": None,
                    "plan": None, "currency": None, "price_model": None, "usage": "Float64",
                    "included": "Nullable(Float64)", "overage_units": "Float64", "charge": "Decimal(38, 9)",
                    "overage_amount": "Decimal(38, 9)", "minimum": "Decimal(38, 9)", "amount": "Decimal(38, 9)",
                    "custom_rate": "UInt8", "final": "UInt8"},
    "alerts_log": dict.fromkeys(["alert_id", "type", "tenant_id", "customer_id", "metric", "period_start",
                                 "threshold_pct", "usage", "included", "usage_pct", "enforcement", "action",
                                 "event_id", "event_time", "detected_at"]),
    "dead_letters": {"received_at": None, "reason": None, "detail": None, "source": None, "payload": "String"},
    "raw_events": {"tenant_id": "String", "customer_id": "String", "event_id": "String", "event_type": None,
                   "timestamp": "DateTime64(3, 'UTC')", "properties": "String", "correction": "UInt8",
                   "ingested_at": "DateTime64(3, 'UTC')", "source": "String"},
    "reconciliation": {"run_id": "String", "ran_at": None, "tenant_id": None, "customer_id": None, "metric": None,
                       "period_start": None, "raw_units": "Float64", "metered_units": "Float64",
                       "metered_amount": "Decimal(38, 9)", "invoiced_units": "Float64",
                       "invoiced_amount": "Decimal(38, 9)", "diff_units": "Float64", "diff_amount": "Decimal(38, 9)",
                       "class": None, "owner": None, "evidence": "String", "inputs": "String"},
}


def describe(client, db: str, name: str):
    return [(r[0], r[1]) for r in client.query(f"DESCRIBE TABLE {db}.{name}").result_rows]


def test_tables_and_views_have_the_derived_columns(chdb_path, ch_database):
    client, db = connect(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database))
    for table, columns in schema.TABLES:
        assert sorted(c for c, _ in describe(client, db, table)) == sorted(columns), table
    records = {"usage_by_window": WindowAggregate, "usage_by_period": PeriodAggregate, "usage_rated": RatedRow,
               "dead_letters": DeadLetter, "alerts_log": Alert, "raw_events": RawEvents,
               "reconciliation": ReconciliationRow}
    assert [v for v, _, _ in schema.VIEWS] == list(records)
    for view, columns, _table in schema.VIEWS:
        got = describe(client, db, view)
        assert [c for c, _ in got] == columns, view
        fields = {"class" if f == "cls" else f for f in records[view].__struct_fields__}
        assert set(columns) == fields - {"version", "deleted"}, view
        types = dict(got)
        for col, typ in CONTRACT_VIEWS[view].items():
            assert col in types and (typ is None or types[col] == typ), (view, col, types.get(col))
    # the contract's order where it differs from the record's
    assert schema.ALERTS_LOG_COLUMNS[8:10] == ["usage", "included"] and ALERT_FIELDS[8:10] == ("included", "usage")
    assert schema.DEAD_LETTERS_COLUMNS == ["received_at", "reason", "detail", "source", "payload", "tenant_id",
                                           "metric", "dl_id"]


def test_alert_columns_follow_the_alert_struct():
    a = Alert(alert_id=alert_id("threshold_crossed", "acme", "c1", "m", 0, 90.0), type="threshold_crossed",
              tenant_id="acme", customer_id="c1", metric="m", period_start="1970-01-01T00:00:00Z",
              period_end="1970-01-02T00:00:00Z", threshold_pct=90.0, included=10.0, usage=9.0, usage_pct=90.0,
              enforcement="soft", action="notify", event_id="e1", event_time="1970-01-01T00:00:01Z",
              ingested_at="", detected_at="1970-01-01T00:00:02.5Z", plan="pro", wallet_balance=3.0)
    wallet = Alert(alert_id="w", type="wallet_low", tenant_id="acme", customer_id="c1", metric="",
                   period_start="", period_end="", threshold_pct=None, included=None, usage=1.0, usage_pct=None,
                   enforcement="", action="notify", event_id="", event_time="", ingested_at="",
                   detected_at="1970-01-01T00:00:03Z")
    cols = schema.alert_columns([Emission(), Emission(alerts=[a]), Emission(alerts=[wallet])])
    assert schema.ALERT_COLUMNS == [*Alert.__struct_fields__, "rank"] and len(cols) == len(schema.ALERT_COLUMNS)
    row = {name: col[0] for name, col in zip(schema.ALERT_COLUMNS, cols)}
    times = {"period_start": 0, "period_end": 86_400_000, "event_time": 1000, "ingested_at": None,
             "detected_at": 2500}
    assert set(times) == set(ALERT_TIME_FIELDS)
    assert row == {**{f: getattr(a, f) for f in ALERT_FIELDS}, **times, "rank": (1 << 62) - 2500}
    wrow = {name: col[1] for name, col in zip(schema.ALERT_COLUMNS, cols)}
    assert (wrow["period_start"], wrow["period_end"], wrow["event_time"]) == (0, 0, None)
    assert schema.alert_columns([Emission()]) is None


def test_an_invalid_alert_time_names_the_alert_and_field():
    bad = Alert(alert_id="x1", type="blocked", tenant_id="t", customer_id="c", metric="m", period_start="soon",
                period_end="", threshold_pct=None, included=None, usage=0.0, usage_pct=None, enforcement="hard",
                action="block", event_id="", event_time="", ingested_at="", detected_at="1970-01-01T00:00:00Z")
    with pytest.raises(MeterError, match="alert x1 has an invalid period_start"):
        schema.alert_columns([Emission(alerts=[bad])])


def test_rows_written_are_read_back_by_the_cli_queries(chdb_path, ch_database):
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_q")
    T = 1_793_491_200_000
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    part.write_batch([Emission(periods=[PeriodAggregate(tenant_id="acme", customer_id="c1", metric="m",
                                                        period_start=T, period_end=T + 1000, value=5.0,
                                                        included=None, overage_units=0.0, events=5,
                                                        excluded_events=1, version=6)])])
    part.close()
    client, db = connect(cfg)
    rows = schema.query_usage(client, db)
    assert list(rows[0]) == schema.USAGE_BY_PERIOD_COLUMNS
    assert rows == [
        {"tenant_id": "acme", "customer_id": "c1", "metric": "m", "period_start": "2026-11-01T00:00:00Z",
         "period_end": "2026-11-01T00:00:01Z", "value": 5.0, "included": None, "overage_units": 0.0, "events": 5,
         "excluded_events": 1, "final": 0}]
    assert schema.query_alerts(client, db) == []


def test_docstring_examples():
    result = doctest.testmod(schema)
    assert result.attempted >= 1 and result.failed == 0


def test_tables_of_an_earlier_build_gain_the_new_columns(chdb_path, ch_database):
    """A database created before the Rate stage (no ``final`` on period rows, no spend or anomaly columns on
    alerts) is upgraded in place when the sink connects, keeping its rows."""
    import clickhouse_connect

    from meterflow.sinks.clickhouse import _EMBEDDED, _EMBEDDED_LOCK

    with _EMBEDDED_LOCK:
        raw = _EMBEDDED.get(f"chdb://{chdb_path}") or clickhouse_connect.get_client(dsn=f"chdb://{chdb_path}")
        _EMBEDDED[f"chdb://{chdb_path}"] = raw
    raw.command(f"CREATE DATABASE IF NOT EXISTS {ch_database}")
    raw.command(f"""CREATE TABLE {ch_database}.usage_period_rows (
        tenant_id String, customer_id String, metric LowCardinality(String),
        period_start DateTime64(3, 'UTC'), period_end DateTime64(3, 'UTC'),
        value Float64, included Nullable(Float64), overage_units Float64,
        events UInt64, excluded_events UInt64, version UInt64, updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, customer_id, metric, period_start)""")
    raw.command(f"INSERT INTO {ch_database}.usage_period_rows "
                "VALUES ('acme', 'c1', 'm', 0, 1000, 3, NULL, 0, 3, 0, 3, 0)")
    client, db = connect(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database))
    cols = [c for c, _ in describe(client, db, "usage_period_rows")]
    assert "final" in cols and cols.index("final") == cols.index("version") + 1
    assert client.query(f"SELECT value, final FROM {db}.usage_by_period").result_rows == [(3.0, 0)]
    alert_cols = [c for c, _ in describe(client, db, "alert_rows")]
    assert {"threshold_amount", "amount", "baseline", "factor"} <= set(alert_cols)


def test_rated_rows_keep_exact_money_and_a_tombstone_hides_a_row(chdb_path, ch_database):
    from decimal import Decimal

    from meterflow.schemas.records import RatedRow

    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_r")
    T = 1_793_491_200_000

    def row(metric, version, charge, deleted=False):
        return RatedRow(tenant_id="acme", customer_id="c1", metric=metric, period_start=T, period_end=T + 1000,
                        plan="pro", currency="EUR", price_model="per_unit", usage=340000.0, included=None,
                        overage_units=0.0, charge=Decimal(charge), overage_amount=Decimal(0), minimum=Decimal(0),
                        amount=Decimal(charge), custom_rate=False, final=False, version=version, deleted=deleted)

    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    part.write_batch([Emission(rated=[row("calls", 3, "101.999999999"), row("tokens", 3, "0.000000001")])])
    part.write_batch([Emission(rated=[row("calls", 4, "102.000000000"), row("tokens", 5, "0", deleted=True)])])
    part.close()
    client, db = connect(cfg)
    rows = client.query(f"SELECT metric, charge, amount, currency FROM {db}.usage_rated").result_rows
    assert rows == [("calls", Decimal("102"), Decimal("102"), "EUR")]
    assert [c for c, _ in describe(client, db, "usage_rated")] == schema.USAGE_RATED_COLUMNS


@pytest.mark.skipif(not __import__("meterflow.operators.native", fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="the native core is not built")
def test_native_raw_archive_rows_equal_the_column_insert(chdb_path, ch_database):
    """Native mediation's raw archive (RowBinary bytes, RawRows) lands in raw_events exactly as the same
    events inserted column-wise: unicode, escapes, floats, corrections, both source forms and an event the
    Python Mediator made (a property int beyond 64 bits)."""
    import json

    from meterflow.operators.native import NativeMediator
    from meterflow.schemas.config import parse_config
    from meterflow.schemas.records import RawRows

    cfg = parse_config({"tenants": [{"id": "acme"}, {"id": "bêta"}],
                        "metrics": [{"code": "calls", "event_type": "api_call", "aggregation": "count"}]},
                       "t.toml", environ={})
    T = 1_793_491_200_000

    def line(i, **kw):
        ev = {"event_id": f"e{i}", "tenant_id": "acme", "customer_id": f"c{i % 3}", "event_type": "api_call",
              "timestamp": f"2026-11-01T00:00:0{i}.5Z", "properties": {"tokens": i * 1.25, "s": "x\u2028\"é"}}
        ev.update(kw)
        return json.dumps(ev, ensure_ascii=i % 2 == 0).encode()

    batch = [(("events", 0, 10 + i), line(i)) for i in range(4)]
    batch += [(("in.jsonl", 7), line(5, correction=True, tenant_id="bêta", properties={})),
              (("events", 1, 3), line(6, properties={"big": 2**80, "f": 1e-7})),
              (("events", 1, 4), b"not json")]
    _bundles, dead, raw = NativeMediator(cfg, clock=lambda: T + 3_600_000).split(batch, True)
    assert len(dead) == 1 and type(raw) is RawRows and raw.rows == 6
    # the rows written as run parses the lines equal those of the staged lines parsed again (archiving off)
    med = NativeMediator(cfg, clock=lambda: T + 3_600_000)._med
    good = batch[:5]
    assert med.run(good, 0, T + 3_600_000, 0)[0] == 5
    again = med.archive(7, lambda me: None)
    med.take(0)
    med.archiving = True
    med.run(good, 0, T + 3_600_000, 0)
    assert med.archive(7, lambda me: None) == again and again[0] == 5
    cols = raw.columns()
    by_src = {s: i for i, s in enumerate(cols.source)}  # (customers in order of their first events)
    assert sorted(by_src) == ["events/0/10", "events/0/11", "events/0/12", "events/0/13", "events/1/3", "in.jsonl:7"]
    assert json.loads(cols.properties[by_src["events/1/3"]]) == {"big": 2**80, "f": 1e-7}
    assert cols.correction[by_src["in.jsonl:7"]] is True and cols.position[by_src["in.jsonl:7"]] == 7
    native_db, columns_db = ch_database + "_rawb", ch_database + "_rawc"
    for db, em in ((native_db, Emission(raw_events=raw)), (columns_db, Emission(raw_events=cols))):
        part = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=db)).build("clickhouse", 0, 1)
        part.write_batch([em])
        part.close()
    client, _ = connect(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=native_db))
    got = [client.query(f"SELECT * FROM {db}.raw_events ORDER BY source").result_rows
           for db in (native_db, columns_db)]
    assert len(got[0]) == 6 and got[0] == got[1]


def _period(customer: str, value: float, version: int) -> Emission:
    T = 1_793_491_200_000
    return Emission(periods=[PeriodAggregate(tenant_id="acme", customer_id=customer, metric="m", period_start=T,
                                             period_end=T + 1000, value=value, included=None, overage_units=0.0,
                                             events=version, excluded_events=0, version=version)])


def _stored(client, db: str):
    return sorted((r["customer_id"], r["value"]) for r in schema.query_usage(client, db))


def test_an_insert_keeps_every_version_of_its_block_and_the_views_read_the_latest(chdb_path, ch_database):
    """INSERT_SETTINGS: an insert does not collapse its block as a merge would (``optimize_on_insert = 0``): two
    versions of one row inserted together are both in the table until a merge, and the view (FINAL) reads the latest,
    as it does for versions inserted apart; the raw archive's rows go with the same settings."""
    from meterflow.sinks import clickhouse as ch

    assert ch.INSERT_SETTINGS == {"optimize_on_insert": 0}
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_oi")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)  # (with recovery: each batch inserted at once)
    part.write_batch([_period("c1", 1.0, 1), _period("c1", 3.0, 2), _period("c2", 2.0, 1)])
    part.write_batch([_period("c2", 5.0, 3)])
    rows = client.query(f"SELECT customer_id, value FROM {db}.usage_period_rows ORDER BY customer_id, version")
    assert rows.result_rows == [("c1", 1.0), ("c1", 3.0), ("c2", 2.0), ("c2", 5.0)]  # (no merge yet)
    assert _stored(client, db) == [("c1", 3.0), ("c2", 5.0)]
    part.close()


def test_embedded_inserts_go_through_a_spool_file_that_is_removed_after(chdb_path, ch_database, tmp_path,
                                                                         monkeypatch):
    """Embedded chDB: an insert's bytes go to a file of spool_dir() (/dev/shm where it is writable, else the default
    temporary directory) and ClickHouse reads them with INSERT ... FROM INFILE and INSERT_SETTINGS; the file is gone
    after, and after a failed insert too."""
    import tempfile

    from meterflow.sinks import clickhouse as ch

    monkeypatch.setattr(ch, "SPOOL_DIR", str(tmp_path / "missing"))
    assert ch.spool_dir() == tempfile.gettempdir()
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(ch, "SPOOL_DIR", str(spool))
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_sp")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    sql = []
    real = part._client.command

    def command(cmd, *a, **k):
        sql.append((cmd, sorted(p.name for p in spool.iterdir())))
        return real(cmd, *a, **k)

    monkeypatch.setattr(part._client, "command", command, raising=False)
    part.write_batch([_period("c1", 1.0, 1), _period("c2", 2.0, 1)])
    assert _stored(client, db) == [("c1", 1.0), ("c2", 2.0)]
    (cmd, files), = sql
    assert cmd.startswith(f"INSERT INTO {db}.usage_period_rows (") and f"FROM INFILE '{spool}/" in cmd
    assert cmd.endswith("SETTINGS optimize_on_insert = 0 FORMAT RowBinary") or cmd.endswith(
        "SETTINGS optimize_on_insert = 0 FORMAT Native")
    assert len(files) == 1 and list(spool.iterdir()) == []  # (there during the insert, gone after)
    assert files[0].startswith(f"{ch.SPOOL_PREFIX}{os.getpid()}-") and files[0].endswith(".insert")

    def broken(cmd, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(part._client, "command", broken, raising=False)
    with pytest.raises(RuntimeError, match="disk full"):
        part.write_batch([_period("c3", 3.0, 1)])
    assert list(spool.iterdir()) == []


def test_a_full_spool_falls_back_to_the_temporary_directory(chdb_path, ch_database, tmp_path, monkeypatch):
    """/dev/shm is small in some containers: an insert whose spool file finds it full (ENOSPC) goes through the
    default temporary directory instead, its rows stored and no file left in either; another error is raised."""
    import errno
    import tempfile

    from meterflow.sinks import clickhouse as ch

    spool, tmp = tmp_path / "spool", tmp_path / "tm'p"  # (a quote in the path, as a TMPDIR may have)
    spool.mkdir()
    tmp.mkdir()
    monkeypatch.setattr(ch, "SPOOL_DIR", str(spool))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real = ch._new_spool_file
    used = []

    def full(directory, data, fail=errno.ENOSPC):
        used.append(directory)
        if directory == str(spool):
            raise OSError(fail, os.strerror(fail))
        return real(directory, data)

    monkeypatch.setattr(ch, "_new_spool_file", full)
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_fs")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    part.write_batch([_period("c1", 1.0, 1)])
    assert used == [str(spool), str(tmp)] and _stored(client, db) == [("c1", 1.0)]
    assert list(spool.iterdir()) == [] and list(tmp.iterdir()) == []
    monkeypatch.setattr(ch, "_new_spool_file", lambda d, data: full(d, data, errno.EACCES))
    with pytest.raises(PermissionError):
        part.write_batch([_period("c2", 2.0, 1)])
    part.close()


def test_a_killed_process_s_spool_files_are_swept_when_a_partition_is_built(chdb_path, ch_database, tmp_path,
                                                                             monkeypatch):
    """A process killed during an insert leaves its spool file: the next partition built removes the files of
    processes that are gone, and leaves those of live processes and anything else in the directory."""
    import subprocess
    import sys

    from meterflow.sinks import clickhouse as ch

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in (f"{ch.SPOOL_PREFIX}{dead}-abc.insert", f"{ch.SPOOL_PREFIX}{os.getpid()}-def.insert",
                 f"{ch.SPOOL_PREFIX}1-ghi.insert", "other.insert", f"{ch.SPOOL_PREFIX}x-y.insert"):
        (spool / name).write_bytes(b"rows")
    monkeypatch.setattr(ch, "SPOOL_DIR", str(spool))
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_sw")
    part = ClickHouseSink(cfg).build("clickhouse", 0, 1)
    assert sorted(p.name for p in spool.iterdir()) == sorted([
        f"{ch.SPOOL_PREFIX}{os.getpid()}-def.insert", f"{ch.SPOOL_PREFIX}1-ghi.insert", "other.insert",
        f"{ch.SPOOL_PREFIX}x-y.insert"])  # (pid 1 is alive)
    part.close()


def test_without_recovery_inserts_are_batched_and_nothing_is_left_behind(chdb_path, ch_database, monkeypatch):
    """A flow without recovery: batches wait (up to COALESCE_S) to be inserted together, one insert per table; an
    idle partition's rows go out by the timer; close inserts the rest. With recovery each batch is inserted at once."""
    import time

    from meterflow.sinks import clickhouse as ch

    monkeypatch.setattr(ch, "COALESCE_S", 0.4)
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_co")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg, coalesce=True).build("clickhouse", 0, 1)
    inserts = []
    real = part._insert_rows  # (the period rows' insert, natively encoded or not)
    monkeypatch.setattr(part, "_insert_rows", lambda kind, rows, at: (inserts.append(len(rows)), real(kind, rows, at)))
    part.write_batch([_period("c1", 1.0, 1)])
    part.write_batch([_period("c2", 2.0, 1), _period("c1", 3.0, 2)])
    assert _stored(client, db) == [] and inserts == []  # waiting for the next ones
    deadline = time.monotonic() + 5
    while not inserts and time.monotonic() < deadline:  # no batch comes: the timer inserts them
        time.sleep(0.05)
    assert inserts == [3]  # the three rows of both batches in one insert
    assert _stored(client, db) == [("c1", 3.0), ("c2", 2.0)]
    part.write_batch([_period("c3", 4.0, 1)])
    part.close()  # the end of the flow: what waits is inserted
    assert inserts == [3, 1]
    assert _stored(client, db) == [("c1", 3.0), ("c2", 2.0), ("c3", 4.0)]

    now = ClickHouseSink(cfg).build("clickhouse", 0, 1)  # with a recovery directory: no waiting
    now.write_batch([_period("c4", 5.0, 1)])
    assert ("c4", 5.0) in _stored(client, db)
    now.close()


def test_after_a_slow_insert_the_next_rows_wait_longer_to_go_in_one_insert(chdb_path, ch_database, monkeypatch):
    """Pacing without recovery (:func:`paced_wait`): after an insert that took t, the next emissions wait about 19 t
    (inserts then take a twentieth of the time), between COALESCE_S and COALESCE_MAX_S; a fast insert brings the wait
    back to COALESCE_S. Nothing waits past close."""
    import time

    from meterflow.sinks import clickhouse as ch

    assert ch.paced_wait(0.5, 0.01) == 0.5  # a light flow: its rows within COALESCE_S
    assert ch.paced_wait(0.5, 0.06) == pytest.approx(1.14)
    assert ch.paced_wait(0.5, 1.0) == ch.COALESCE_MAX_S == 2.0
    assert ch.paced_wait(30.0, 1.0) == 30.0  # (never below the configured wait)
    monkeypatch.setattr(ch, "COALESCE_S", 0.2)
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_pw")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg, coalesce=True).build("clickhouse", 0, 1)
    inserts = []
    real = part._insert_rows

    def slow(kind, rows, at):
        time.sleep(0.06)
        inserts.append((time.monotonic(), len(rows)))
        real(kind, rows, at)

    monkeypatch.setattr(part, "_insert_rows", slow)
    part.write_batch([_period("c1", 1.0, 1)])
    deadline = time.monotonic() + 5
    while part._wait == 0.2 and time.monotonic() < deadline:  # (the timer's insert, then its pacing)
        time.sleep(0.02)
    assert len(inserts) == 1 and part._wait >= 19 * 0.06  # the insert took at least 0.06 s
    t = time.monotonic()
    part.write_batch([_period("c2", 2.0, 1)])
    part.write_batch([_period("c3", 3.0, 1)])
    time.sleep(0.5)  # 2.5 times COALESCE_S: still waiting
    assert len(inserts) == 1
    while len(inserts) == 1 and time.monotonic() < deadline + 5:
        time.sleep(0.02)
    assert inserts[1][1] == 2 and inserts[1][0] - t >= 19 * 0.06  # both batches in one insert, after the paced wait
    assert _stored(client, db) == [("c1", 1.0), ("c2", 2.0), ("c3", 3.0)]
    fast = []  # (an insert that takes no time: the wait goes back to COALESCE_S)
    monkeypatch.setattr(part, "_insert_rows", lambda kind, rows, at: fast.extend(r.customer_id for r in rows))
    part.write_batch([_period("c4", 4.0, 1)])
    part.close()
    assert fast == ["c4"] and part._wait == 0.2


def test_a_failed_batched_insert_stops_the_flow_at_its_next_batch(chdb_path, ch_database, monkeypatch):
    from meterflow.sinks import clickhouse as ch

    monkeypatch.setattr(ch, "COALESCE_S", 0.2)
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_cf")
    part = ClickHouseSink(cfg, coalesce=True).build("clickhouse", 0, 1)

    def fail(kind, rows, at):
        raise RuntimeError("disk full")

    monkeypatch.setattr(part, "_insert_rows", fail)
    part.write_batch([_period("c1", 1.0, 1)])
    import time

    deadline = time.monotonic() + 5
    while part._error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="disk full"):
        part.write_batch([_period("c2", 1.0, 1)])
    part._closed.set()


def test_a_due_insert_runs_off_the_flows_thread_and_a_full_queue_waits_for_it(chdb_path, ch_database, monkeypatch):
    """Without recovery the inserts run on the partition's thread: write_batch hands a due insert over and returns
    while ClickHouse works (here an insert held until the test lets it go), the batches written meanwhile go in the
    next insert, in order; a batch that finds COALESCE_ITEMS waiting waits for the insert under way and inserts them
    itself, so what waits stays bounded; close inserts the rest."""
    import threading

    from meterflow.sinks import clickhouse as ch

    monkeypatch.setattr(ch, "COALESCE_S", 30.0)  # (no idle insert during the test: each is made due by hand)
    monkeypatch.setattr(ch, "COALESCE_ITEMS", 4)
    cfg = ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database + "_th")
    client, db = connect(cfg)
    part = ClickHouseSink(cfg, coalesce=True).build("clickhouse", 0, 1)
    inserts, started, release = [], threading.Event(), threading.Event()
    real = part._insert_rows

    def held(kind, rows, at):
        inserts.append((threading.current_thread().name, sorted(r.customer_id for r in rows)))  # (thread, customers)
        started.set()
        assert release.wait(10)
        real(kind, rows, at)

    monkeypatch.setattr(part, "_insert_rows", held)
    part.write_batch([_period("c1", 1.0, 1)])
    part._since -= 60  # c1 has waited COALESCE_S
    part.write_batch([_period("c2", 2.0, 1)])  # due: handed to the inserter, which is held in the insert
    assert started.wait(10)
    assert inserts == [("clickhouse-inserts", ["c1", "c2"])] and not release.is_set()
    part.write_batch([_period("c3", 3.0, 1), _period("c4", 4.0, 1)])  # two wait for the next insert
    writer = threading.Thread(target=part.write_batch, args=([_period("c5", 5.0, 1), _period("c6", 6.0, 1)],))
    writer.start()  # four waiting: this batch inserts them, after the insert under way
    writer.join(0.3)
    assert writer.is_alive() and len(inserts) == 1  # waiting for the held insert
    release.set()
    writer.join(10)
    assert not writer.is_alive()
    assert inserts[1] == (writer.name, ["c3", "c4", "c5", "c6"])
    part.write_batch([_period("c7", 7.0, 1)])
    part.close()
    assert [c for _t, cs in inserts for c in cs] == ["c1", "c2", "c3", "c4", "c5", "c6", "c7"]
    assert _stored(client, db) == [(f"c{i}", float(i)) for i in range(1, 8)]
