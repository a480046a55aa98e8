"""The review queue's ClickHouse part: the tables hold the records' columns, the overage_reviews view joins each
item with its latest decision (status rule of README: Overage review queue), and `decide` records who, when (the
injected clock), the note and the amount, refusing unknown items, auto-applied ones and a second decision on
the same amount."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterflow.base.errors import MeterError
from meterflow.review_cmd import decide
from meterflow.schemas.config import ClickHouseConfig, Config
from meterflow.schemas.records import Emission
from meterflow.schemas.reviews import ReviewDecision, ReviewItem
from meterflow.sinks.clickhouse import ClickHouseSink, connect
from meterflow.sinks.clickhouse_reviews import OVERAGE_REVIEWS_COLUMNS, REVIEW_TABLES, query_reviews

T0 = 1_796_000_000_000


def item(rid: str, amount: str, route: str, version: int) -> ReviewItem:
    return ReviewItem(review_id=rid, tenant_id="acme", customer_id="c1", account_name="Acme", arr=5.0, metric="calls",
                      period_start=0, period_end=1000, plan="pro", included=10.0, usage=20.0, overage_units=10.0,
                      overage_amount=Decimal(amount), currency="USD", contract="custom", route=route, final=False,
                      version=version)


def test_tables_view_and_decisions(chdb_path, ch_database):
    cfg = Config(clickhouse=ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database))
    sink = ClickHouseSink(cfg.clickhouse).build("clickhouse", 0, 1)
    client, db = connect(cfg.clickhouse)
    for table, columns in REVIEW_TABLES:
        assert sorted(r[0] for r in client.query(f"DESCRIBE TABLE {db}.{table}").result_rows) == sorted(columns)
    view = [r[0] for r in client.query(f"DESCRIBE TABLE {db}.overage_reviews").result_rows]
    assert view == OVERAGE_REVIEWS_COLUMNS
    assert set(ReviewItem.__struct_fields__) - {"version", "period_start", "period_end"} < set(view)
    assert set(ReviewDecision.__struct_fields__) - {"decision_id", "review_id", "status", "overage_amount"} < set(view)

    sink.write_batch([Emission(reviews=[item("r1", "62.5", "approve", 3), item("r2", "10", "auto_apply", 1)])])
    sink.write_batch([Emission(reviews=[item("r1", "62.5", "approve", 3)])])  # a replay: same row
    with pytest.raises(MeterError, match="no review item 'r9'"):
        decide(cfg, "r9", "approve", "ann")
    with pytest.raises(MeterError, match="auto_apply route"):
        decide(cfg, "r2", "approve", "ann")
    d = decide(cfg, "r1", "approve", "ann", "fine", clock=lambda: T0)
    assert (d.status, d.decided_by, d.decided_at, d.note, d.overage_amount) == \
        ("approved", "ann", T0, "fine", Decimal("62.500000000"))
    with pytest.raises(MeterError, match="already approved by ann at 2026-11-30T00:53:20Z on its current overage"):
        decide(cfg, "r1", "reject", "bob", clock=lambda: T0 + 1)
    rows = {r["review_id"]: r for r in query_reviews(client, db)}
    assert (rows["r1"]["status"], rows["r1"]["decided_by"], rows["r1"]["decided_at"], rows["r1"]["note"]) == \
        ("approved", "ann", "2026-11-30T00:53:20Z", "fine")
    assert (rows["r2"]["status"], rows["r2"]["decided_at"]) == ("auto_applied", None)

    sink.write_batch([Emission(reviews=[item("r1", "70", "approve", 5)])])  # usage grew after the decision
    r1 = query_reviews(client, db, review_id="r1")[0]
    assert (r1["status"], r1["overage_amount"], r1["decided_by"], r1["note"]) == \
        ("pending", Decimal("70.000000000"), "ann", "fine")
    decide(cfg, "r1", "reject", "bob", "no", clock=lambda: T0 + 60_000)
    r1 = query_reviews(client, db, review_id="r1")[0]
    assert (r1["status"], r1["decided_by"], r1["decided_at"], r1["note"]) == \
        ("rejected", "bob", "2026-11-30T00:54:20Z", "no")
    assert [r["review_id"] for r in query_reviews(client, db, status="rejected")] == ["r1"]
    assert [r["review_id"] for r in query_reviews(client, db, route="auto_apply")] == ["r2"]
    sink.write_batch([Emission(reviews=[item("r1", "0", "auto_apply", 6)])])  # a correction took the overage away
    assert [r["review_id"] for r in query_reviews(client, db)] == ["r2"]
