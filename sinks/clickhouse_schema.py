"""The ClickHouse contract (README: Outputs), written once: tables, views, how records become columns, and the
read-side queries of ``meter usage``, ``meter alerts`` and ``meter charges``.

Every column list is derived from the record Struct it stores (:mod:`meterflow.schemas.records`,
:class:`~meterflow.schemas.alerts.Alert`): an insert's columns are the record's fields in declaration order
followed by the derived ones, so a batch's columns are its records transposed; a view's columns are its
record's fields without the internal ``version``. Two views keep the contract's order where it differs from
the record's: ``alerts_log`` lists ``usage`` before ``included``, and ``dead_letters`` starts with the
contract's five columns and ends with its id. The table DDL (types, engines, sort keys) is written out
below; ``tests/sinks`` check it against these lists.

Upserts: the tables are ``ReplacingMergeTree(version)`` keyed by the row's identity and the views read
``FINAL``; an alert's ``rank`` = 2^62 - detected_at ms grows for earlier detections, so the first detection
of an ``alert_id`` is the one ``alerts_log`` keeps. :mod:`meterflow.sinks.clickhouse` connects and writes.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from itertools import chain, repeat
from operator import and_, attrgetter
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple

from msgspec.structs import astuple

from meterflow.base.errors import MeterError
from meterflow.base.timeutil import ms_to_iso, parse_rfc3339_ms
from meterflow.schemas.alerts import ALERT_FIELDS, ALERT_TIME_FIELDS, Alert
from meterflow.schemas.records import (
    DeadLetter,
    Emission,
    PeriodAggregate,
    RatedRow,
    RawEvents,
    RawRows,
    ReconciliationRow,
    WindowAggregate,
)
from meterflow.sinks.clickhouse_reviews import review_ddl

_WINDOW_FIELDS: Tuple[str, ...] = WindowAggregate.__struct_fields__
_PERIOD_FIELDS: Tuple[str, ...] = PeriodAggregate.__struct_fields__
_DEAD_FIELDS: Tuple[str, ...] = DeadLetter.__struct_fields__
_RATED_FIELDS: Tuple[str, ...] = RatedRow.__struct_fields__
_RAW_FIELDS: Tuple[str, ...] = RawEvents.__struct_fields__


def _moved(fields: Sequence[str], name: str, before: str) -> List[str]:
    """``fields`` with ``name`` moved just before ``before``."""
    rest = [f for f in fields if f != name]
    i = rest.index(before)
    return [*rest[:i], name, *rest[i:]]


# Insert column orders: the record's fields, then the derived ones.
WINDOW_COLUMNS = [*_WINDOW_FIELDS, "dims_key", "updated_at"]
PERIOD_COLUMNS = [*_PERIOD_FIELDS, "updated_at"]
RATED_COLUMNS = [*_RATED_FIELDS, "updated_at"]
DEAD_COLUMNS = list(_DEAD_FIELDS)
ALERT_COLUMNS = [*ALERT_FIELDS, "rank"]
RAW_COLUMNS = list(_RAW_FIELDS)
# The record's ``cls`` is the column ``class`` (a Python keyword).
RECONCILIATION_COLUMNS = ["class" if f == "cls" else f for f in ReconciliationRow.__struct_fields__]

# View column orders (``SELECT *`` returns them in this order).
USAGE_BY_WINDOW_COLUMNS = [f for f in _WINDOW_FIELDS if f != "version"]
USAGE_BY_PERIOD_COLUMNS = [f for f in _PERIOD_FIELDS if f != "version"]
USAGE_RATED_COLUMNS = [f for f in _RATED_FIELDS if f not in ("version", "deleted")]
_DEAD_LEAD = ("received_at", "reason", "detail", "source", "payload")
DEAD_LETTERS_COLUMNS = [*_DEAD_LEAD, *(f for f in _DEAD_FIELDS if f not in _DEAD_LEAD and f != "dl_id"), "dl_id"]
ALERTS_LOG_COLUMNS = _moved(ALERT_FIELDS, "usage", before="included")
RAW_EVENTS_COLUMNS = list(_RAW_FIELDS)

_TABLES = [
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
        events UInt64, excluded_events UInt64, version UInt64, final UInt8 DEFAULT 0,
        updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY (tenant_id, customer_id, metric, period_start)""",
    """CREATE TABLE IF NOT EXISTS {db}.usage_rated_rows (
        tenant_id String, customer_id String, metric LowCardinality(String),
        period_start DateTime64(3, 'UTC'), period_end DateTime64(3, 'UTC'),
        plan String, currency LowCardinality(String), price_model LowCardinality(String),
        usage Float64, included Nullable(Float64), overage_units Float64,
        charge Decimal(38, 9), overage_amount Decimal(38, 9), minimum Decimal(38, 9), amount Decimal(38, 9),
        custom_rate UInt8, final UInt8, version UInt64, account_name String, arr Float64, deleted UInt8,
        updated_at DateTime64(3, 'UTC')
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
        wallet_balance Nullable(Float64), wallet_remaining Nullable(Float64), detail String,
        threshold_amount Nullable(Float64), amount Nullable(Float64), baseline Nullable(Float64),
        factor Nullable(Float64), rank UInt64
    ) ENGINE = ReplacingMergeTree(rank)
    ORDER BY alert_id""",
    # The raw archive: one row per accepted event read (duplicates included: each has its own source), keyed
    # by the event and where it was read, so a replay of the same input rewrites its rows instead of adding.
    """CREATE TABLE IF NOT EXISTS {db}.raw_event_rows (
        tenant_id String, customer_id String, event_id String, event_type LowCardinality(String),
        timestamp DateTime64(3, 'UTC'), properties String, correction UInt8,
        ingested_at DateTime64(3, 'UTC'), source String, position Int64
    ) ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(timestamp)
    ORDER BY (tenant_id, customer_id, event_id, source)""",
    # Every `meter reconcile` run, one row per key: written once per run, never updated.
    """CREATE TABLE IF NOT EXISTS {db}.reconciliation_rows (
        run_id String, ran_at DateTime64(3, 'UTC'), inputs String, tenant_id String, customer_id String,
        metric LowCardinality(String), period_start DateTime64(3, 'UTC'), currency LowCardinality(String),
        raw_units Float64, metered_units Float64, metered_amount Decimal(38, 9), invoiced_units Float64,
        invoiced_amount Decimal(38, 9), diff_units Float64, diff_amount Decimal(38, 9),
        class LowCardinality(String), owner String, evidence String
    ) ENGINE = ReplacingMergeTree
    ORDER BY (run_id, tenant_id, customer_id, metric, period_start)""",
]

# Columns added since the first release: tables created by an earlier build gain them on start.
_UPGRADES = [
    "ALTER TABLE {db}.usage_period_rows ADD COLUMN IF NOT EXISTS final UInt8 DEFAULT 0 AFTER version",
    *(f"ALTER TABLE {{db}}.alert_rows ADD COLUMN IF NOT EXISTS {c} Nullable(Float64) AFTER {after}"
      for c, after in (("threshold_amount", "detail"), ("amount", "threshold_amount"), ("baseline", "amount"),
                       ("factor", "baseline"))),
]

# (table, insert columns), in the order of _TABLES.
TABLES = [("usage_window_rows", WINDOW_COLUMNS), ("usage_period_rows", PERIOD_COLUMNS),
          ("usage_rated_rows", RATED_COLUMNS), ("dead_letter_rows", DEAD_COLUMNS), ("alert_rows", ALERT_COLUMNS),
          ("raw_event_rows", RAW_COLUMNS), ("reconciliation_rows", RECONCILIATION_COLUMNS)]
# (view, its columns, the table it reads FINAL).
VIEWS = [("usage_by_window", USAGE_BY_WINDOW_COLUMNS, "usage_window_rows"),
         ("usage_by_period", USAGE_BY_PERIOD_COLUMNS, "usage_period_rows"),
         ("usage_rated", USAGE_RATED_COLUMNS, "usage_rated_rows"),
         ("dead_letters", DEAD_LETTERS_COLUMNS, "dead_letter_rows"),
         ("alerts_log", ALERTS_LOG_COLUMNS, "alert_rows"),
         ("raw_events", RAW_EVENTS_COLUMNS, "raw_event_rows"),
         ("reconciliation", RECONCILIATION_COLUMNS, "reconciliation_rows")]


def ddl(db: str) -> List[str]:
    """The statements that create the tables and (re)create the views in database ``db``, in order."""
    views = [f"CREATE OR REPLACE VIEW {db}.{view} AS SELECT {', '.join(cols)} FROM {db}.{table} FINAL"
             + (" WHERE deleted = 0" if table == "usage_rated_rows" else "")
             for view, cols, table in VIEWS]
    return [stmt.format(db=db) for stmt in (*_TABLES, *_UPGRADES)] + views + review_ddl(db)


# -- write side: records as insert columns ---------------------------------------------------------------

_RANK_BASE = 1 << 62  # rank = _RANK_BASE - detected_at ms: the earliest detection of an alert_id wins
_NULLABLE_TIMES = ("event_time", "ingested_at")  # empty -> NULL; the other alert times empty -> the epoch


def dims_key(dims: Dict[str, str]) -> str:
    r"""The dimensions as one sortable string (part of a window row's identity).

    >>> dims_key({}), dims_key({"region": "eu", "model": "m"})
    ('', 'model=m\x1fregion=eu')
    """
    if len(dims) == 1:  # the common case, without a sort (a third of a window row's encoding otherwise)
        [(k, v)] = dims.items()
        return f"{k}={v}"
    return "\x1f".join([f"{k}={v}" for k, v in sorted(dims.items())]) if dims else ""  # (keys differ: by key)


_DIMS = _WINDOW_FIELDS.index("dimensions")


def _transposed(records: list) -> list:
    """The records' fields as columns (one tuple per field, in declaration order): ``astuple`` and ``zip`` run
    in C, so no Python code runs per row and field."""
    return list(zip(*map(astuple, records)))


def window_columns(ws: List[WindowAggregate], at_ms: int) -> list:
    """Window rows as ``usage_window_rows`` columns (``WINDOW_COLUMNS``)."""
    wcols = _transposed(ws)
    return wcols + [[dims_key(d) if d else "" for d in wcols[_DIMS]], [at_ms] * len(ws)]


def period_columns(ps: List[PeriodAggregate], at_ms: int) -> list:
    """Period rows as ``usage_period_rows`` columns (``PERIOD_COLUMNS``)."""
    return _transposed(ps) + [[at_ms] * len(ps)]


def rated_record_columns(rs: List[RatedRow], at_ms: int) -> list:
    """Rated rows as ``usage_rated_rows`` columns (``RATED_COLUMNS``)."""
    return _transposed(rs) + [[at_ms] * len(rs)]


def emission_records(items: List[Emission], kind: str) -> list:
    """The records of one kind (``"windows"``, ``"periods"``, ``"rated"``, ``"dead_letters"``) of a batch of
    emissions, in order."""
    get = attrgetter(kind)
    return list(chain.from_iterable([rs for rs in map(get, items) if rs]))


def emission_columns(items: List[Emission], at_ms: int) -> Tuple[Optional[list], Optional[list], Optional[list]]:
    """A batch of emissions as the columns of (window rows, period rows, dead-letter rows) — each None when the
    batch has no such row — in the orders ``WINDOW_COLUMNS``, ``PERIOD_COLUMNS``, ``DEAD_COLUMNS``."""
    ws, ps, ds = (emission_records(items, kind) for kind in ("windows", "periods", "dead_letters"))
    return (window_columns(ws, at_ms) if ws else None, period_columns(ps, at_ms) if ps else None,
            _transposed(ds) if ds else None)


def dead_letter_columns(items: List[Emission]) -> Optional[list]:
    """The dead letters of a batch of emissions as ``dead_letter_rows`` columns (``DEAD_COLUMNS``), None without."""
    ds = emission_records(items, "dead_letters")
    return _transposed(ds) if ds else None


def rated_columns(items: List[Emission], at_ms: int) -> Optional[list]:
    """The rated rows of a batch of emissions as ``usage_rated_rows`` columns (``RATED_COLUMNS``), None without."""
    rs = emission_records(items, "rated")
    return rated_record_columns(rs, at_ms) if rs else None


MONEY_TYPE = "Decimal(38, 9)"  # every money column (rated and reconciliation rows)
_MONEY_PREC, _MONEY_SCALE = 38, 9
_INT128 = (1 << 128) - 1  # v & _INT128: the two's complement of v in 16 bytes, for to_bytes without signed=


def money_data(col: Sequence[Any]) -> bytes:
    """A ``Decimal(38, 9)`` column's data in ClickHouse's ``Native`` (and ``RowBinary``) format: per value the
    Int128 of value x 10^9, little-endian — the bytes clickhouse-connect's writer (``BigDecimal``) makes, which
    computes ``int(Decimal(str(x)) * 10^9)`` at precision 38 in Python per value. Here, for ``Decimal`` values,
    ``scaleb(x, 9)`` (exact up to 38 digits, as the product: it only moves the exponent) and ``int`` (truncates
    toward zero, as the driver's) run mapped in C; a column with few distinct values (zero minimums and overage
    amounts) encodes each once.

    >>> money_data([Decimal("1.5"), Decimal("-0.000000001")]).hex()
    '002f6859000000000000000000000000ffffffffffffffffffffffffffffffff'

    A value whose Int128 does not exist (beyond +-1.7e29) is refused, as the driver refuses it.
    """
    ctx = decimal.getcontext().copy()  # the driver's: the current context at precision 38
    ctx.prec = _MONEY_PREC
    if set(map(type, col)) != {Decimal}:  # not only Decimals (an int): as the driver, value by value
        with decimal.localcontext(ctx):
            mult = Decimal(f"{10 ** _MONEY_SCALE}.{'0' * _MONEY_SCALE}")
            return b"".join(_int128_bytes([int(Decimal(str(x)) * mult) for x in col]))
    distinct = set(col)
    if 4 * len(distinct) <= len(col):
        keys = list(distinct)
        encoded = dict(zip(keys, _int128_bytes(_scaled(ctx, keys))))
        return b"".join(map(encoded.__getitem__, col))
    return b"".join(_int128_bytes(_scaled(ctx, col)))


def _scaled(ctx: decimal.Context, col: Sequence[Decimal]) -> List[int]:
    return list(map(int, map(ctx.scaleb, col, repeat(_MONEY_SCALE, len(col)))))


def _int128_bytes(ints: List[int]) -> List[bytes]:
    n = len(ints)
    if n and (max(ints) >= 1 << 127 or min(ints) < -(1 << 127)):
        bad = next(i for i in ints if not -(1 << 127) <= i < 1 << 127)
        raise MeterError(f"ClickHouse sink: the money value {Decimal(bad).scaleb(-_MONEY_SCALE)} is beyond "
                         f"{MONEY_TYPE}")
    little: Literal["little"] = "little"
    return list(map(int.to_bytes, map(and_, ints, repeat(_INT128, n)), repeat(16, n), repeat(little, n)))


# -- the hot tables as RowBinary, encoded natively ---------------------------------------------------------

try:  # built by ./dev setup (maturin develop) when cargo is there
    import meterflow_native as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None
if not hasattr(_native, "rowbinary"):  # pragma: no cover - a build older than the encoder
    _native = None

# The column codes of native/src/rowbin.rs, by the column's type as the insert context names it.
_RB_STRING, _RB_DT64, _RB_MAP, _RB_F64, _RB_NF64, _RB_U64, _RB_BOOL, _RB_DIMS_KEY, _RB_AT, _RB_MONEY, _RB_DECIMAL = \
    range(11)
_RB_TYPES = {"String": _RB_STRING, "LowCardinality(String)": _RB_STRING, "DateTime64(3, 'UTC')": _RB_DT64,
             "Map(String, String)": _RB_MAP, "Float64": _RB_F64, "Nullable(Float64)": _RB_NF64,
             "UInt64": _RB_U64, "UInt8": _RB_BOOL, MONEY_TYPE: _RB_DECIMAL}


class RowBinarySpec(NamedTuple):
    """How :func:`rowbinary` encodes a table's rows: per insert column (code, the record's field index), the same
    with the money columns taken from ``money_data`` bytes (code, money column), and the money fields' getters."""

    codes: List[Tuple[int, int]]
    money_codes: List[Tuple[int, int]]
    money: List[Callable[[Any], Any]]


def rowbinary_spec(record: type, columns: Sequence[str], types: Sequence[str]) -> Optional[RowBinarySpec]:
    """The spec for the rows of Struct ``record`` inserted as ``columns`` of ClickHouse types ``types`` (as the
    insert context names them): the record's fields, ``dims_key`` (of its ``dimensions``) and ``updated_at`` (the
    insert's time); None when ``meterflow_native`` is not built or a column is not one it encodes."""
    if _native is None:
        return None
    fields: Tuple[str, ...] = record.__struct_fields__  # type: ignore[attr-defined]
    codes: List[Tuple[int, int]] = []
    money_codes: List[Tuple[int, int]] = []
    money: List[Callable[[Any], Any]] = []
    for name, typ in zip(columns, types, strict=True):
        code = _RB_TYPES.get(typ)
        if name in fields and code is not None:
            codes.append((code, fields.index(name)))
            if code == _RB_DECIMAL:
                money_codes.append((_RB_MONEY, len(money)))
                money.append(attrgetter(name))
            else:
                money_codes.append(codes[-1])
        elif name == "dims_key" and code == _RB_STRING and "dimensions" in fields:
            codes.append((_RB_DIMS_KEY, fields.index("dimensions")))
            money_codes.append(codes[-1])
        elif name == "updated_at" and code == _RB_DT64:
            codes.append((_RB_AT, 0))
            money_codes.append(codes[-1])
        else:
            return None
    return RowBinarySpec(codes, money_codes, money)


def _plain_context() -> bool:
    """The current decimal context limits no exponent a money value has (``rowbin.rs`` money_of takes exponents in
    [-69, 29] only, where ``money_data``'s scaleb is exact under any context with the default limits)."""
    ctx = decimal.getcontext()
    return ctx.Emax >= 99 and ctx.Emin <= -99 and not ctx.clamp


def rowbinary(spec: RowBinarySpec, records: list, at_ms: int) -> Optional[bytes]:
    """``records`` as ``RowBinary`` rows of the table ``spec`` was made for (``updated_at`` = ``at_ms``): the values
    the column insert stores, made natively (native/src/rowbin.rs), money included (the Int128 ``money_data`` makes,
    from the Decimal's digits); a money column with a value that is not a plain Decimal of at most 38 digits is made
    by :func:`money_data` itself (so a value beyond Decimal(38, 9) is refused as there). None when a value is not
    one the native encoder writes exactly as the driver (not an exact str, int, float, bool or dict of strs):
    insert the columns then."""
    rows = list(map(astuple, records))
    if not spec.money or _plain_context():
        data = _native.rowbinary(rows, spec.codes, at_ms)
        if data is not None or not spec.money:
            return data
    money = [money_data(list(map(get, records))) for get in spec.money]
    return _native.rowbinary(rows, spec.money_codes, at_ms, money)


def raw_event_columns(items: List[Emission]) -> Optional[list]:
    """The raw archive columns of a batch of emissions (``RAW_COLUMNS``), None without: each emission already
    carries its batch as columns (:class:`~meterflow.schemas.records.RawEvents`), so this only concatenates."""
    raws = [e.raw_events for e in items if type(e.raw_events) is RawEvents]
    if not raws:
        return None
    if len(raws) == 1:
        return list(astuple(raws[0]))
    return [list(chain.from_iterable(col)) for col in zip(*map(astuple, raws))]


def raw_event_rowbinary(items: List[Emission]) -> Optional[bytes]:
    """The raw archive rows a batch of emissions carries already encoded (:class:`~meterflow.schemas.records.RawRows`,
    native mediation) as one ``RowBinary`` insert of ``RAW_COLUMNS``, None without: the rows concatenated."""
    blocks = [e.raw_events.data for e in items if type(e.raw_events) is RawRows and e.raw_events.rows]
    if not blocks:
        return None
    return blocks[0] if len(blocks) == 1 else b"".join(blocks)


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


def _alert_getter(field: str) -> Callable[[Alert], Any]:
    if field in ALERT_TIME_FIELDS:
        optional = field in _NULLABLE_TIMES
        return lambda a: alert_time_ms(a, field, optional)
    return attrgetter(field)


_ALERT_GET = [_alert_getter(f) for f in ALERT_FIELDS]
_DETECTED = ALERT_FIELDS.index("detected_at")


def alert_columns(items: List[Emission]) -> Optional[list]:
    """The alerts of a batch of emissions as ``alert_rows`` columns (``ALERT_COLUMNS``), None without alerts."""
    alerts = list(chain.from_iterable([e.alerts for e in items if e.alerts]))
    if not alerts:
        return None
    cols = [list(map(get, alerts)) for get in _ALERT_GET]
    cols.append([max(0, _RANK_BASE - d) for d in cols[_DETECTED]])
    return cols


# -- read side: ``meter usage``, ``meter alerts`` and ``meter charges`` --------------------------------------

def _where(filters: Sequence[Tuple[str, Optional[str]]]) -> Tuple[List[str], Dict[str, Any]]:
    conds, params = [], {}
    for col, val in filters:
        if val is not None:
            conds.append(f"{col} = {{{col}:String}}")
            params[col] = val
    return conds, params


def query_usage(client: Any, db: str, by: str = "period", tenant: Optional[str] = None,
                customer: Optional[str] = None, metric: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of ``usage_by_period`` or ``usage_by_window`` (exact: the views deduplicate), their columns in the
    view's order, times as RFC 3339 text."""
    view, cols = ("usage_by_period", USAGE_BY_PERIOD_COLUMNS) if by == "period" else \
        ("usage_by_window", USAGE_BY_WINDOW_COLUMNS)
    start, end = ("period_start", "period_end") if by == "period" else ("window_start", "window_end")
    conds, params = _where((("tenant_id", tenant), ("customer_id", customer), ("metric", metric)))
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    select = ", ".join([*cols, f"toUnixTimestamp64Milli({start}) AS ps", f"toUnixTimestamp64Milli({end}) AS pe"])
    q = client.query(f"SELECT {select} FROM {db}.{view} {where} ORDER BY tenant_id, customer_id, metric, {start}",
                     parameters=params)
    rows = []
    for r in q.named_results():
        r = dict(r)
        s, e = r.pop("ps"), r.pop("pe")
        r[start], r[end] = ms_to_iso(s), ms_to_iso(e)
        rows.append(r)
    return rows


_MONEY = ("charge", "overage_amount", "minimum", "amount")


def query_rated(client: Any, db: str, tenant: Optional[str] = None, customer: Optional[str] = None,
                period_start_ms: Optional[int] = None, metric: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of ``usage_rated`` (``meter charges``) ordered by tenant, customer, period, metric: the view's columns
    in its order, times as RFC 3339 text, money as exact ``Decimal`` (read as the Decimal(38, 9) strings
    ClickHouse holds, never through a float), ``custom_rate`` and ``final`` as booleans."""
    conds, params = _where((("tenant_id", tenant), ("customer_id", customer), ("metric", metric)))
    if period_start_ms is not None:
        conds.append("period_start = fromUnixTimestamp64Milli({ps:Int64}, 'UTC')")
        params["ps"] = period_start_ms
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    cols = [*(f"toString({c}) AS {c}" if c in _MONEY else c for c in USAGE_RATED_COLUMNS
              if c not in ("period_start", "period_end")),
            "toUnixTimestamp64Milli(period_start) AS ps", "toUnixTimestamp64Milli(period_end) AS pe"]
    q = client.query(f"SELECT {', '.join(cols)} FROM {db}.usage_rated {where} "
                     "ORDER BY tenant_id, customer_id, period_start, metric", parameters=params)
    rows = []
    for r in q.named_results():
        row: Dict[str, Any] = {}
        for c in USAGE_RATED_COLUMNS:
            if c == "period_start":
                row[c] = ms_to_iso(r["ps"])
            elif c == "period_end":
                row[c] = ms_to_iso(r["pe"])
            elif c in _MONEY:
                row[c] = Decimal(r[c])
            elif c in ("custom_rate", "final"):
                row[c] = bool(r[c])
            else:
                row[c] = r[c]
        rows.append(row)
    return rows


_ALERT_VALUES = [f for f in ALERT_FIELDS if f not in ALERT_TIME_FIELDS]


def query_alerts(client: Any, db: str, tenant: Optional[str] = None, customer: Optional[str] = None,
                 metric: Optional[str] = None, type_: Optional[str] = None, since_ms: Optional[int] = None,
                 limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows of ``alerts_log`` ordered by detected_at, event_time (the latest ``limit`` when given), shaped like
    the contract's alert JSON (the record's fields in its order, RFC 3339 times, ``""`` when absent) plus
    ``latency_ms`` = detected_at - event_time (None without a causing event)."""
    conds, params = _where((("tenant_id", tenant), ("customer_id", customer), ("metric", metric), ("type", type_)))
    if since_ms is not None:
        conds.append("detected_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
        params["since"] = since_ms
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    cols = ", ".join([*_ALERT_VALUES, *(f"toUnixTimestamp64Milli({c}) AS {c}_ms" for c in ALERT_TIME_FIELDS)])
    if limit is None:
        order = "ORDER BY detected_at, event_time, alert_id"
    else:  # the latest `limit`, printed oldest first
        order = f"ORDER BY detected_at DESC, event_time DESC NULLS FIRST, alert_id DESC LIMIT {int(limit)}"
    q = client.query(f"SELECT {cols} FROM {db}.alerts_log {where} {order}", parameters=params)
    rows = []
    for r in q.named_results():
        row: Dict[str, Any] = {}
        for c in ALERT_FIELDS:
            if c in ALERT_TIME_FIELDS:
                ms = r[f"{c}_ms"]
                row[c] = "" if ms is None or (ms == 0 and c.startswith("period")) else ms_to_iso(ms)
            else:
                row[c] = r[c]
        ev, det = r["event_time_ms"], r["detected_at_ms"]
        row["latency_ms"] = None if ev is None else det - ev
        rows.append(row)
    return rows if limit is None else rows[::-1]
