"""Window, period and rated rows reach ClickHouse as ``RowBinary`` made by the native encoder
(``clickhouse_schema.rowbinary``, native/src/rowbin.rs) instead of the driver's column insert. These tests pin that
the new path stores exactly what the column insert stored: read back from chDB byte for byte (``SELECT *`` as
RowBinary, so NaN payloads and the sign of zero count) for generated rows (unicode, dimensions, None, NaN and
infinities, ints in float fields, money near the Decimal(38, 9) limits, bools); the exact bytes of a few hand-made
rows against an encoding written out here; and that a value the encoder does not take goes the old way."""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import Emission, PeriodAggregate, RatedRow, WindowAggregate
from meterflow.sinks import clickhouse_schema as schema
from meterflow.sinks.clickhouse import ClickHouseSink, connect

pytestmark = pytest.mark.skipif(schema._native is None, reason="meterflow_native is not built")

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
T = 1_793_491_200_000
NEW, OLD = "meter_rowbin_new", "meter_rowbin_old"
KINDS = {"windows": ("usage_window_rows", "tenant_id, customer_id, metric, window_start, dims_key"),
         "periods": ("usage_period_rows", "tenant_id, customer_id, metric, period_start"),
         "rated": ("usage_rated_rows", "tenant_id, customer_id, metric, period_start")}

text = st.text(max_size=140)  # any code point but surrogates (128 bytes and more: 2-byte lengths)
keys = st.sampled_from(["", "a", "b", "region", "zöne", "\x1f", "k=v", "\U0001f600", "\uffff"]) | text
floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324,
                                                  1.7976931348623157e308]),
                   st.integers(-2**70, 2**70))  # an int in a float field: the driver's float(x)
uint64 = st.integers(0, 2**64 - 1)
times = st.integers(-2**42, 2**44)
money = st.one_of(
    st.decimals(min_value=Decimal("-1e29") + 1, max_value=Decimal("1e29") - 1, places=9, allow_nan=False),
    st.decimals(min_value=-10**6, max_value=10**6, allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal(0), Decimal("-0"), Decimal("0E-9"), Decimal("99999999999999999999999999999.999999999"),
                     Decimal("-99999999999999999999999999999.999999999"), Decimal("-0.0000000009")]),
)


@st.composite
def window_rows(draw):
    return WindowAggregate(tenant_id=draw(text), customer_id=draw(text), metric=draw(st.sampled_from(["calls", "tö"])),
                           window_start=draw(times), window_end=draw(times),
                           dimensions=draw(st.dictionaries(keys, text, max_size=4)), value=draw(floats),
                           events=draw(uint64), version=draw(uint64))


@st.composite
def period_rows(draw):
    return PeriodAggregate(tenant_id=draw(text), customer_id=draw(text), metric=draw(st.sampled_from(["calls", "tö"])),
                           period_start=draw(times), period_end=draw(times), value=draw(floats),
                           included=draw(st.none() | floats), overage_units=draw(floats), events=draw(uint64),
                           excluded_events=draw(uint64), version=draw(uint64), final=draw(st.booleans()))


@st.composite
def rated_rows(draw):
    return RatedRow(tenant_id=draw(text), customer_id=draw(text), metric=draw(st.sampled_from(["calls", "tökens"])),
                    period_start=draw(times), period_end=draw(times), plan=draw(text),
                    currency=draw(st.sampled_from(["EUR", "USD", "€"])),
                    price_model=draw(st.sampled_from(["per_unit", "tiered"])), usage=draw(floats),
                    included=draw(st.none() | floats), overage_units=draw(floats), charge=draw(money),
                    overage_amount=draw(money), minimum=draw(st.sampled_from([Decimal(0), Decimal("5.5")]) | money),
                    amount=draw(money), custom_rate=draw(st.booleans()), final=draw(st.booleans()),
                    version=draw(uint64), account_name=draw(text), arr=draw(floats), deleted=draw(st.booleans()))


@pytest.fixture(scope="module")
def partitions(chdb_path):
    """A sink partition writing the new way and one to insert the old way (the driver's column insert)."""
    new = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=NEW)).build("ch", 0, 1)
    old = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=OLD)).build("ch", 0, 1)
    client, _ = connect(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=NEW))
    assert all(spec is not None for _ctx, spec, _cols, _money in new._hot.values())
    yield new, old, client
    new.close()
    old.close()


def old_insert(part, kind, rows, at):
    """What ``_write`` did with these rows before: the driver's column insert (``native_block`` for money)."""
    if kind == "windows":
        part._insert(part._windows, schema.window_columns(rows, at))
    elif kind == "periods":
        part._insert(part._periods, schema.period_columns(rows, at))
    else:
        part._insert_money(part._rated, schema.rated_record_columns(rows, at))


def stored(client, kind):
    """Each database's table as RowBinary (every byte of every value), in key order, and its row count."""
    table, order = KINDS[kind]
    out = []
    for db in (NEW, OLD):
        data = client.raw_query(f"SELECT * FROM {db}.{table} ORDER BY {order}", fmt="RowBinary")
        out.append((bytes(data), client.command(f"SELECT count() FROM {db}.{table}")))
    return out


def same_as_old(parts, kind, rows, at):
    new, old, client = parts
    table = KINDS[kind][0]
    for db in (NEW, OLD):
        client.command(f"TRUNCATE TABLE {db}.{table}")
    new._insert_rows(kind, rows, at)
    old_insert(old, kind, rows, at)
    (got, n_new), (want, n_old) = stored(client, kind)
    assert n_new == n_old and n_new > 0
    assert got == want


@settings(max_examples=60, **SETTINGS)
@given(st.sampled_from(list(KINDS)), st.data())
def test_rowbinary_rows_are_stored_as_the_column_insert_stored_them(partitions, kind, data):
    rows = data.draw(st.lists({"windows": window_rows(), "periods": period_rows(), "rated": rated_rows()}[kind],
                              min_size=1, max_size=12))
    at = data.draw(times)
    spec = partitions[0]._hot[kind][1]
    assert schema.rowbinary(spec, rows, at) is not None  # (the new path: every value is one the encoder takes)
    same_as_old(partitions, kind, rows, at)


def test_a_batch_of_emissions_is_written_as_before(partitions):
    """write_batch end to end: the three tables hold what the column inserts held, the other tables unchanged."""
    new, old, client = partitions
    ws = [WindowAggregate(tenant_id="acme", customer_id=f"c{i}", metric="calls", window_start=T, window_end=T + 1,
                          dimensions={"region": "eu", "az": str(i)} if i % 2 else {}, value=i / 3, events=i, version=i)
          for i in range(50)]
    ps = [PeriodAggregate(tenant_id="acme", customer_id=f"c{i}", metric="calls", period_start=T, period_end=T + 9,
                          value=float(i), included=None if i % 3 else 10.0, overage_units=0.0, events=i,
                          excluded_events=0, version=i, final=i % 2 == 0) for i in range(50)]
    for db in (NEW, OLD):
        for table, _ in KINDS.values():
            client.command(f"TRUNCATE TABLE {db}.{table}")
    new.write_batch([Emission(windows=ws[:20], periods=ps[:10]), Emission(windows=ws[20:], periods=ps[10:])])
    at = client.command(f"SELECT toUnixTimestamp64Milli(max(updated_at)) FROM {NEW}.usage_window_rows")
    old_insert(old, "windows", ws, at)
    old_insert(old, "periods", ps, at)
    for kind in ("windows", "periods"):
        (got, n), (want, _) = stored(client, kind)
        assert n == 50 and got == want


def leb(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([b])
        out += bytes([b | 0x80])


def s(text: str) -> bytes:
    enc = text.encode()
    return leb(len(enc)) + enc


def test_the_bytes_of_hand_made_rows():
    """RowBinary written out by hand: String = LEB128 length + UTF-8 (LowCardinality the same), DateTime64(3) =
    Int64 LE ms, Map = LEB128 count + key, value..., Float64 LE, Nullable = 1 (NULL) or 0 + value, UInt64 LE,
    UInt8, Decimal(38, 9) = Int128 LE of value x 10^9."""
    specs = {kind: schema.rowbinary_spec(record, cols, types) for kind, record, cols, types in (
        ("windows", WindowAggregate, schema.WINDOW_COLUMNS,
         ["String", "String", "LowCardinality(String)", "DateTime64(3, 'UTC')", "DateTime64(3, 'UTC')",
          "Map(String, String)", "Float64", "UInt64", "UInt64", "String", "DateTime64(3, 'UTC')"]),
        ("periods", PeriodAggregate, schema.PERIOD_COLUMNS,
         ["String", "String", "LowCardinality(String)", "DateTime64(3, 'UTC')", "DateTime64(3, 'UTC')", "Float64",
          "Nullable(Float64)", "Float64", "UInt64", "UInt64", "UInt64", "UInt8", "DateTime64(3, 'UTC')"]),
        ("rated", RatedRow, schema.RATED_COLUMNS,
         ["String", "String", "LowCardinality(String)", "DateTime64(3, 'UTC')", "DateTime64(3, 'UTC')", "String",
          "LowCardinality(String)", "LowCardinality(String)", "Float64", "Nullable(Float64)", "Float64",
          schema.MONEY_TYPE, schema.MONEY_TYPE, schema.MONEY_TYPE, schema.MONEY_TYPE, "UInt8", "UInt8", "UInt64",
          "String", "Float64", "UInt8", "DateTime64(3, 'UTC')"]))}
    q, d, Q = (lambda v: struct.pack("<q", v)), (lambda v: struct.pack("<d", v)), (lambda v: struct.pack("<Q", v))
    long = "ü" * 70  # 140 bytes: a two-byte length

    w1 = WindowAggregate(tenant_id="acme", customer_id=long, metric="calls", window_start=-5, window_end=T,
                         dimensions={"zone": "ä", "az": "", "b": "x=y"}, value=-0.0, events=0, version=2**64 - 1)
    w2 = WindowAggregate(tenant_id="", customer_id="c", metric="m", window_start=0, window_end=1, dimensions={},
                         value=3, events=1, version=2)
    want = (s("acme") + b"\x8c\x01" + long.encode() + s("calls") + q(-5) + q(T)
            + leb(3) + s("zone") + s("ä") + s("az") + s("") + s("b") + s("x=y") + d(-0.0) + Q(0) + Q(2**64 - 1)
            + s("az=\x1fb=x=y\x1fzone=ä") + q(42)
            + s("") + s("c") + s("m") + q(0) + q(1) + leb(0) + d(3.0) + Q(1) + Q(2) + s("") + q(42))
    assert schema.rowbinary(specs["windows"], [w1, w2], 42) == want

    p1 = PeriodAggregate(tenant_id="t", customer_id="c", metric="m", period_start=1, period_end=2, value=math.inf,
                         included=None, overage_units=math.nan, events=3, excluded_events=4, version=5, final=True)
    p2 = PeriodAggregate(tenant_id="t", customer_id="c", metric="m", period_start=1, period_end=2, value=1.5,
                         included=-2.25, overage_units=0.0, events=3, excluded_events=4, version=5)
    head = s("t") + s("c") + s("m") + q(1) + q(2)
    want = (head + d(math.inf) + b"\x01" + struct.pack("<d", math.nan) + Q(3) + Q(4) + Q(5) + b"\x01" + q(7)
            + head + d(1.5) + b"\x00" + d(-2.25) + d(0.0) + Q(3) + Q(4) + Q(5) + b"\x00" + q(7))
    assert schema.rowbinary(specs["periods"], [p1, p2], 7) == want

    def i128(v: int) -> bytes:
        return (v & ((1 << 128) - 1)).to_bytes(16, "little")

    r = RatedRow(tenant_id="t", customer_id="c", metric="m", period_start=1, period_end=2, plan="pro", currency="€",
                 price_model="tiered", usage=2.0, included=1.0, overage_units=1.0, charge=Decimal("-1.5"),
                 overage_amount=Decimal("0.0000000019"), minimum=Decimal(0),
                 amount=Decimal("99999999999999999999999999999.999999999"), custom_rate=True, final=False, version=9,
                 account_name="Ünïcode Ltd", arr=12.5, deleted=True)
    want = (s("t") + s("c") + s("m") + q(1) + q(2) + s("pro") + s("€") + s("tiered") + d(2.0) + b"\x00" + d(1.0)
            + d(1.0) + i128(-1_500_000_000) + i128(1) + i128(0) + i128(10**38 - 1) + b"\x01\x00" + Q(9)
            + s("Ünïcode Ltd") + d(12.5) + b"\x01" + q(-1))
    assert schema.rowbinary(specs["rated"], [r], -1) == want


class Text(str):
    pass


@pytest.mark.parametrize("change", [dict(customer_id=Text("c")), dict(events=2.5), dict(window_start=True),
                                    dict(value="1.5"), dict(dimensions={"a": Text("b")})])
def test_a_value_the_encoder_does_not_take_goes_the_old_way(partitions, change):
    """Not an exact str, int, float, bool or dict of strs: rowbinary gives None and _insert_rows inserts the columns
    through the driver, which stores what it stored before (a float in a UInt64 truncated, True as 1, ...)."""
    fields = dict(tenant_id="t", customer_id="c", metric="m", window_start=T, window_end=T + 1, dimensions={"a": "b"},
                  value=1.0, events=3, version=4)
    row = WindowAggregate(**{**fields, **change})
    assert schema.rowbinary(partitions[0]._hot["windows"][1], [row], 5) is None
    same_as_old(partitions, "windows", [row], 5)


@pytest.mark.parametrize("change", [dict(customer_id="\ud800"), dict(value=10**400), dict(events=-1),
                                    dict(dimensions={"a": 1})])
def test_a_value_the_driver_refuses_is_refused_as_before(partitions, change):
    """A lone surrogate, an int no float holds, a negative UInt64, a dimension that is not a str: the driver's error."""
    new, old, _ = partitions
    fields = dict(tenant_id="t", customer_id="c", metric="m", window_start=T, window_end=T + 1, dimensions={},
                  value=1.0, events=3, version=4)
    row = WindowAggregate(**{**fields, **change})
    with pytest.raises(Exception) as was:
        old_insert(old, "windows", [row], 5)
    with pytest.raises(type(was.value)):
        new._insert_rows("windows", [row], 5)


def test_without_the_native_extension_the_columns_go_through_the_driver(monkeypatch, chdb_path):
    monkeypatch.setattr(schema, "_native", None)
    part = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database="meter_rowbin_py")).build("ch", 0, 1)
    assert all(spec is None for _ctx, spec, _cols, _money in part._hot.values())
    inserts = []
    real = part._insert
    monkeypatch.setattr(part, "_insert", lambda ctx, cols: (inserts.append(ctx.table), real(ctx, cols)))
    part.write_batch([Emission(windows=[WindowAggregate(tenant_id="t", customer_id="c", metric="m", window_start=T,
                                                        window_end=T + 1, dimensions={}, value=1.0, events=1,
                                                        version=1)])])
    part.close()
    assert inserts == ["meter_rowbin_py.usage_window_rows"]


wide_money = st.one_of(
    money,
    st.decimals(allow_nan=False, allow_infinity=False),  # any exponent and number of digits
    st.integers(-10**29 + 1, 10**29 - 1).map(lambda i: Decimal(i).scaleb(-9)),
    st.floats(-1e20, 1e20).map(Decimal),  # a float's exact digits: often more than 38
    st.sampled_from([Decimal("1E+20"), Decimal("-1.7E+29"), Decimal("1.70141183460469231731687303715884105727E+29"),
                     Decimal("-1.70141183460469231731687303715884105728E+29"), Decimal("5E-70"), Decimal("-0E+40"),
                     Decimal("0.0000000099999999999999999999999999999")]),
)


@settings(max_examples=300, **SETTINGS)
@given(st.lists(wide_money, min_size=1, max_size=8))
def test_native_money_is_money_data(col):
    """The money columns made from the Decimals' digits (rowbin.rs money_of) are money_data's bytes; a value it does
    not take (more than 38 digits, an exponent far out) has the batch's money made by money_data; beyond Int128 both
    refuse it."""
    spec = schema.rowbinary_spec(RatedRow, schema.RATED_COLUMNS, [
        "String", "String", "LowCardinality(String)", "DateTime64(3, 'UTC')", "DateTime64(3, 'UTC')", "String",
        "LowCardinality(String)", "LowCardinality(String)", "Float64", "Nullable(Float64)", "Float64",
        schema.MONEY_TYPE, schema.MONEY_TYPE, schema.MONEY_TYPE, schema.MONEY_TYPE, "UInt8", "UInt8", "UInt64",
        "String", "Float64", "UInt8", "DateTime64(3, 'UTC')"])
    rows = [RatedRow(tenant_id="t", customer_id="c", metric="m", period_start=1, period_end=2, plan="", currency="",
                     price_model="", usage=0.0, included=None, overage_units=0.0, charge=x, overage_amount=Decimal(0),
                     minimum=-x, amount=x, custom_rate=False, final=False, version=1) for x in col]
    from msgspec.structs import astuple

    try:
        want = schema._native.rowbinary(list(map(astuple, rows)), spec.money_codes, 0,
                                        [schema.money_data(list(map(get, rows))) for get in spec.money])
    except Exception as exc:
        with pytest.raises(type(exc)):
            schema.rowbinary(spec, rows, 0)
        return
    assert schema.rowbinary(spec, rows, 0) == want
    if all(len(x.as_tuple().digits) <= 29 and -9 <= x.as_tuple().exponent <= 0 for x in col):
        assert schema._native.rowbinary(list(map(astuple, rows)), spec.codes, 0) == want  # (made natively)
