"""Rated rows reach ClickHouse through the sink's own ``Native`` block (``native_block``: the driver's bytes, the
money columns made by ``money_data``) instead of the driver's insert. These tests pin that the new path writes
exactly what the driver's column insert wrote: byte for byte, and as read back from chDB, for generated rows
(money with 9 decimals and with more, negative and near the Decimal(38, 9) limits, None included, unicode)."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.base.errors import MeterError
from meterflow.schemas.config import ClickHouseConfig
from meterflow.schemas.records import Emission, RatedRow
from meterflow.sinks import clickhouse_schema as schema
from meterflow.sinks.clickhouse import ClickHouseSink, connect, native_block

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
T = 1_793_491_200_000

# Decimal(38, 9): up to 29 integer digits. Values with 9 decimals (what rating stores), with more (a rate times
# a float usage: the driver truncates toward zero), negative, zero, and near the limits.
money = st.one_of(
    st.decimals(min_value=Decimal("-1e29") + 1, max_value=Decimal("1e29") - 1, places=9, allow_nan=False),
    st.decimals(min_value=-10**6, max_value=10**6, allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal(0), Decimal("-0"), Decimal("0E-9"), Decimal("0.30000000000000004"),
                     Decimal("99999999999999999999999999999.999999999"), Decimal("-0.0000000009"),
                     Decimal("1.00000000000000000000000000000000000000000001")]),
)
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=140)  # 128 bytes and more: 2-byte lengths
floats = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def rated_rows(draw):
    return RatedRow(tenant_id=draw(text), customer_id=draw(text), metric=draw(st.sampled_from(["calls", "tökens"])),
                    period_start=draw(st.integers(0, 2**40)), period_end=draw(st.integers(0, 2**40)),
                    plan=draw(text), currency=draw(st.sampled_from(["EUR", "USD", "€"])),
                    price_model=draw(st.sampled_from(["per_unit", "tiered"])), usage=draw(floats),
                    included=draw(st.none() | floats), overage_units=draw(floats), charge=draw(money),
                    overage_amount=draw(money), minimum=draw(st.sampled_from([Decimal(0), Decimal("5.5")]) | money),
                    amount=draw(money), custom_rate=draw(st.booleans()), final=draw(st.booleans()),
                    version=draw(st.integers(0, 2**64 - 1)), account_name=draw(text), arr=draw(floats),
                    deleted=draw(st.booleans()))


def driver_bytes(context, columns) -> bytes:
    """What ``client.insert`` sends for these columns (without its ``INSERT ... FORMAT Native`` line)."""
    from clickhouse_connect.driver.transform import NativeTransform

    context.data = columns
    sent = b"".join(NativeTransform.build_insert(context))
    context.data = None
    return sent[sent.index(b"FORMAT Native\n") + len(b"FORMAT Native\n"):]


def driver_money(col) -> bytes:
    from clickhouse_connect.datatypes.registry import get_from_name

    out = bytearray()
    get_from_name(schema.MONEY_TYPE)._write_column_binary(col, out, None)
    return bytes(out)


@settings(max_examples=300, **SETTINGS)
@given(st.lists(money, min_size=1, max_size=40), st.booleans())
def test_money_data_is_the_drivers_decimal_writer(col, repeated):
    col = col * 5 if repeated else col  # few distinct values: each encoded once
    assert schema.money_data(col) == driver_money(col)


def test_money_data_of_ints_and_a_changed_context_and_beyond_the_limit():
    assert schema.money_data([0, 7, -3]) == driver_money([0, 7, -3])  # not Decimals: the driver's way
    with decimal.localcontext() as ctx:
        ctx.rounding = decimal.ROUND_DOWN  # rounds a coefficient of more than 38 digits, as the driver does
        col = [Decimal("1.00000000000000000000000000000000000000000009"), Decimal("2.5")]
        assert schema.money_data(col) == driver_money(col)
    for bad in (Decimal("2e29"), Decimal("-1.8e29")):
        with pytest.raises(MeterError, match="beyond Decimal\\(38, 9\\)"):
            schema.money_data([Decimal(1), bad])


@pytest.fixture(scope="module")
def partitions(chdb_path):
    """A sink partition writing the new way and one whose rated rows go through the driver's insert."""
    new = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database="meter_money_new")).build("ch", 0, 1)
    old = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database="meter_money_old")).build("ch", 0, 1)
    client, _ = connect(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database="meter_money_new"))
    yield new, old, client
    new.close()
    old.close()


@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.lists(rated_rows(), max_size=4), min_size=1, max_size=6))
def test_rated_rows_are_written_as_the_drivers_column_insert(partitions, batches):
    new, old, client = partitions
    items = [Emission(rated=rows) for rows in batches]
    cols = schema.rated_columns(items, 42)
    if cols is None:
        return
    assert native_block(new._rated, cols) == driver_bytes(old._rated, cols)
    for db in ("meter_money_new", "meter_money_old"):
        client.command(f"TRUNCATE TABLE {db}.usage_rated_rows")
    new._insert_money(new._rated, cols)  # what write_batch does with them
    old._insert(old._rated, cols)  # the driver's column insert, as the sink did before
    got = [client.query(f"SELECT *, toString(charge), toString(overage_amount), toString(minimum), toString(amount) "
                        f"FROM {db}.usage_rated_rows FINAL ORDER BY ALL").result_rows
           for db in ("meter_money_new", "meter_money_old")]
    keys = {(r.tenant_id, r.customer_id, r.metric, r.period_start) for rows in batches for r in rows}
    # (FINAL, as the views read: one row per key; an insert keeps every version, INSERT_SETTINGS)
    assert len(got[0]) == len(keys) and got[0] == got[1]
    assert new._rated.table == "meter_money_new.usage_rated_rows"


def test_a_rated_batch_larger_than_a_driver_block_is_the_same_blocks(partitions):
    """The driver splits a large insert into blocks (about 2 MiB each): native_block makes the same blocks."""
    new, old, _client = partitions
    row = RatedRow(tenant_id="acme", customer_id="c" * 300, metric="calls", period_start=T, period_end=T + 1,
                   plan="pro", currency="EUR", price_model="per_unit", usage=1.5, included=None, overage_units=0.0,
                   charge=Decimal("0.000000001"), overage_amount=Decimal(0), minimum=Decimal(0),
                   amount=Decimal("12345678901234567890.123456789"), custom_rate=True, final=False, version=3)
    cols = schema.rated_columns([Emission(rated=[row] * 20_000)], 7)
    block = native_block(new._rated, cols)
    assert block == driver_bytes(old._rated, cols) and block.count(b"\x0caccount_name") == 3  # 8192 + 8192 + 3616 rows
