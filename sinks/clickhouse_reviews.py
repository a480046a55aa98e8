"""The review queue's part of the ClickHouse contract (README: Overage review queue): the items table, the
decisions table, the ``overage_reviews`` view joining each item with its latest decision, and the read and
write sides of ``meter review``.

``review_item_rows`` is ``ReplacingMergeTree(version)`` keyed by ``review_id`` (the version is the rated row's:
a replay rewrites the same rows). ``review_decision_rows`` only ever gains rows (decisions are data, never
updated); it is ``ReplacingMergeTree(rank)`` keyed by ``(review_id, decision_id)`` with ``rank`` = 2^62 -
decided_at ms, so one decision per item and amount is kept, the first, however often it is written.

``overage_reviews`` status: ``auto_applied`` on the ``auto_apply`` route (only ever the first route); else the
latest decision's status when it was made on the item's current ``overage_amount``; else ``pending`` (still
showing the latest decision's decided_by, decided_at and note). Items whose amount went back to 0 (a
correction) are not shown.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Dict, List, Optional

from msgspec.structs import astuple

from meterflow.base.timeutil import ms_to_iso
from meterflow.schemas.records import Emission
from meterflow.schemas.reviews import ReviewDecision, ReviewItem

REVIEW_ITEM_COLUMNS = [*ReviewItem.__struct_fields__, "updated_at"]
DECISION_COLUMNS = [*ReviewDecision.__struct_fields__, "rank"]
# The contract's overage_reviews columns, in order.
OVERAGE_REVIEWS_COLUMNS = ["review_id", "tenant_id", "customer_id", "account_name", "arr", "metric", "period_start",
                           "period_end", "plan", "included", "usage", "overage_units", "overage_amount", "currency",
                           "contract", "route", "status", "final", "updated_at", "decided_by", "decided_at", "note"]
_RANK_BASE = 1 << 62

REVIEW_TABLES = [("review_item_rows", REVIEW_ITEM_COLUMNS), ("review_decision_rows", DECISION_COLUMNS)]

_DDL = [
    """CREATE TABLE IF NOT EXISTS {db}.review_item_rows (
        review_id String, tenant_id String, customer_id String, account_name String, arr Float64,
        metric LowCardinality(String), period_start DateTime64(3, 'UTC'), period_end DateTime64(3, 'UTC'),
        plan String, included Nullable(Float64), usage Float64, overage_units Float64,
        overage_amount Decimal(38, 9), currency LowCardinality(String), contract LowCardinality(String),
        route LowCardinality(String), final UInt8, version UInt64, updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY review_id""",
    """CREATE TABLE IF NOT EXISTS {db}.review_decision_rows (
        decision_id String, review_id String, status LowCardinality(String), decided_by String,
        decided_at DateTime64(3, 'UTC'), note String, overage_amount Decimal(38, 9), rank UInt64
    ) ENGINE = ReplacingMergeTree(rank)
    ORDER BY (review_id, decision_id)""",
]

_LATEST = "(decided_at, decision_id)"
_ITEM_COLS = [c for c in OVERAGE_REVIEWS_COLUMNS if c not in ("status", "decided_by", "decided_at", "note")]
_VIEW = f"""CREATE OR REPLACE VIEW {{db}}.overage_reviews AS
    SELECT {', '.join(f'i.{c} AS {c}' for c in _ITEM_COLS[:16])},
        multiIf(i.route = 'auto_apply', 'auto_applied',
                d.d_at IS NOT NULL AND d.d_amount = i.overage_amount, toString(d.d_status),
                'pending') AS status,
        i.final AS final, i.updated_at AS updated_at, d.d_by AS decided_by, d.d_at AS decided_at,
        d.d_note AS note
    FROM (SELECT * FROM {{db}}.review_item_rows FINAL WHERE overage_amount > 0) AS i
    LEFT JOIN (
        SELECT review_id, argMax(status, {_LATEST}) AS d_status, argMax(decided_by, {_LATEST}) AS d_by,
            toNullable(max(decided_at)) AS d_at, argMax(note, {_LATEST}) AS d_note,
            argMax(overage_amount, {_LATEST}) AS d_amount
        FROM {{db}}.review_decision_rows FINAL GROUP BY review_id
    ) AS d ON i.review_id = d.review_id"""


def review_ddl(db: str) -> List[str]:
    """The statements that create the review tables and (re)create the ``overage_reviews`` view."""
    return [stmt.format(db=db) for stmt in (*_DDL, _VIEW)]


def review_columns(items: List[Emission], at_ms: int) -> Optional[list]:
    """The review items of a batch of emissions as ``review_item_rows`` columns, None without."""
    rs = list(chain.from_iterable([e.reviews for e in items if e.reviews]))
    if not rs:
        return None
    return list(zip(*map(astuple, rs))) + [[at_ms] * len(rs)]


def insert_decision(client: Any, db: str, d: ReviewDecision) -> None:
    client.insert(f"{db}.review_decision_rows", [[*astuple(d), max(0, _RANK_BASE - d.decided_at)]],
                  column_names=DECISION_COLUMNS)


def query_reviews(client: Any, db: str, route: Optional[str] = None, status: Optional[str] = None,
                  review_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of ``overage_reviews`` (the largest amounts first), times as RFC 3339 text (``decided_at`` None
    without a decision), the amount as an exact Decimal."""
    conds, params = [], {}
    for col, val in (("route", route), ("status", status), ("review_id", review_id)):
        if val is not None:
            conds.append(f"{col} = {{{col}:String}}")
            params[col] = val
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    times = ("period_start", "period_end", "updated_at", "decided_at")
    cols = [c for c in OVERAGE_REVIEWS_COLUMNS if c not in times]
    select = ", ".join([*cols, *(f"toUnixTimestamp64Milli({c}) AS {c}_ms" for c in times)])
    q = client.query(f"SELECT {select} FROM {db}.overage_reviews {where} "
                     "ORDER BY overage_amount DESC, tenant_id, customer_id, metric, period_start", parameters=params)
    rows = []
    for r in q.named_results():
        row: Dict[str, Any] = {}
        for c in OVERAGE_REVIEWS_COLUMNS:
            if c in times:
                ms = r[f"{c}_ms"]
                row[c] = None if ms is None else ms_to_iso(ms)
            else:
                row[c] = r[c]
        row["final"] = bool(row["final"])
        rows.append(row)
    return rows


def decision_exists(client: Any, db: str, decision_id: str) -> Optional[Dict[str, Any]]:
    q = client.query(f"SELECT status, decided_by, toUnixTimestamp64Milli(decided_at) AS at FROM "
                     f"{db}.review_decision_rows FINAL WHERE decision_id = {{d:String}} LIMIT 1",
                     parameters={"d": decision_id})
    rows = list(q.named_results())
    return dict(rows[0]) if rows else None
