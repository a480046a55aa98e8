"""The raw leg of the reconciliation: raw units per (tenant, customer, metric, period_start) recomputed from
``raw_events`` with ClickHouse SQL of its own (never the flow's operators), so it cross-checks the streaming
path. All the work runs in ClickHouse; Python only writes the SQL from the configuration.

Semantics (README: Reconciliation), each written again here in SQL:

- dedupe by event id per tenant: the first arrival (ingested_at, then line/offset, then source) wins;
- exclusions: the tenant's ``excluded_customers`` and ``exclude_when`` (exact JSON equality: ``true`` is not ``1``);
- a metric's ``event_type`` and ``where``; an event whose property is missing, null or (where a number is
  needed) not a number is not counted for that metric;
- corrections negate count and sum; the other aggregations ignore them;
- billing periods: the customer's subscription (``period``, ``anchor``; day-of-month clamped like
  ``addMonths``), calendar months in UTC without one;
- count, sum, max, min, unique_count (distinct JSON values: "1" is not 1, 1 is not 1.0), latest (greatest
  timestamp, a tie to the later arrival), p95/p99 nearest-rank (the ceil(p x n)-th smallest).

Stage 1 materialises the deduplicated events with their period in a scratch Memory table; stage 2 is one
``UNION ALL`` of a ``GROUP BY`` per metric over it. With ``cuts`` (key -> the latest invoiced_at), each key
also gets the units of its events ingested at or before the cut and the ids of those ingested after.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Tuple

from meterflow.base.timeutil import dt_to_ms
from meterflow.schemas.config import Config, MetricConfig

Key = Tuple[str, str, str, int]


def _lit(v: Any) -> str:
    """A SQL literal of a configured scalar."""
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if type(v) is bool:
        return "true" if v else "false"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def _matches_sql(props: str, wanted: Dict[str, Any]) -> str:
    """Exact JSON equality of every wanted property (README: exclusions and ``where``)."""
    conds = []
    for k, v in wanted.items():
        key = _lit(k)
        if isinstance(v, str):
            conds.append(f"(JSONType({props}, {key}) = 'String' AND JSONExtractString({props}, {key}) = {_lit(v)})")
        elif type(v) is bool:
            conds.append(f"(JSONType({props}, {key}) = 'Bool' AND JSONExtractBool({props}, {key}) = {int(v)})")
        else:
            conds.append(f"(JSONType({props}, {key}) IN ('Int64', 'UInt64', 'Double') AND "
                         f"JSONExtractFloat({props}, {key}) = {_lit(float(v))})")
    return " AND ".join(conds) if conds else "1"


def _excluded_sql(cfg: Config) -> str:
    branches = []
    for t in cfg.tenants:
        parts = []
        if t.excluded_customers:
            parts.append(f"customer_id IN ({', '.join(_lit(c) for c in t.excluded_customers)})")
        if t.exclude_when:
            parts.append(_matches_sql("properties", dict(t.exclude_when)))
        if parts:
            branches.append(f"tenant_id = {_lit(t.id)}, {' OR '.join(parts)}")
    if not branches:
        return "0"
    return f"multiIf({', '.join(branches)}, 0)"


_PERIOD_SQL = """
    if(kind = '', 'month', kind) AS kind0,
    fromUnixTimestamp64Milli(anchor, 'UTC') AS a_dt, fromUnixTimestamp64Milli(ts, 'UTC') AS t_dt,
    multiIf(kind0 = 'quarter', 3, kind0 = 'year', 12, 1) AS step,
    (toInt64(toYear(t_dt)) - toInt64(toYear(a_dt))) * 12 + toInt64(toMonth(t_dt)) - toInt64(toMonth(a_dt)) AS md,
    intDiv(md - positiveModulo(md, step), step) AS k0,
    k0 - toInt64(addMonths(a_dt, k0 * step) > t_dt) AS k1,
    k1 + toInt64(addMonths(a_dt, (k1 + 1) * step) <= t_dt) AS k2,
    if(kind0 IN ('day', 'week'),
       ts - positiveModulo(ts - anchor, if(kind0 = 'day', 86400000, 604800000)),
       toUnixTimestamp64Milli(addMonths(a_dt, k2 * step))) AS period_start"""


def _agg_sql(m: MetricConfig, cond: str) -> str:
    """The metric's value over the group's rows where ``cond`` holds, as Float64."""
    p = _lit(m.property or "")
    num = f"JSONExtractFloat(properties, {p})"
    agg = m.aggregation
    if agg == "count":
        return f"toFloat64(sumIf(if(correction, -1, 1), {cond}))"
    if agg == "sum":
        return (f"(toFloat64(sumIf(toInt128(if(correction, -1, 1)) * toInt128(JSONExtractInt(properties, {p})), "
                f"{cond} AND jt = 'Int64') + sumIf(toInt128(if(correction, -1, 1)) * "
                f"toInt128(JSONExtractUInt(properties, {p})), {cond} AND jt = 'UInt64')) + "
                f"sumKahanIf(if(correction, -1., 1.) * {num}, {cond} AND jt = 'Double'))")
    if agg in ("max", "min"):
        return f"toFloat64({agg}If({num}, {cond}))"
    if agg == "latest":
        return f"toFloat64(argMaxIf({num}, (ts, ingested, position), {cond}))"
    if agg == "unique_count":
        ukey = (f"multiIf(jt = 'String', concat('s', JSONExtractString(properties, {p})), "
                f"jt = 'Bool', concat('b', toString(JSONExtractBool(properties, {p}))), "
                f"jt = 'Double', concat('f', toString({num})), jt = 'Int64', "
                f"concat('i', toString(JSONExtractInt(properties, {p}))), "
                f"concat('i', toString(JSONExtractUInt(properties, {p}))))")
        return f"toFloat64(uniqExactIf({ukey}, {cond}))"
    q = 0.95 if agg == "p95" else 0.99
    arr = f"arraySort(groupArrayIf({num}, {cond}))"
    return (f"if(length({arr}) = 0, 0., arrayElement({arr}, "
            f"toUInt64(greatest(1, ceil(round({q} * length({arr}), 9))))))")


def _metric_sql(m: MetricConfig, scratch: str) -> str:
    conds = [f"event_type = {_lit(m.event_type)}", "NOT excluded"]
    if m.where:
        conds.append(_matches_sql("properties", dict(m.where)))
    if m.aggregation != "count":
        if m.aggregation == "unique_count":
            conds.append("jt IN ('String', 'Bool', 'Int64', 'UInt64', 'Double')")
        else:
            conds.append(f"jt IN ('Int64', 'UInt64', 'Double') AND abs(JSONExtractFloat(properties, "
                         f"{_lit(m.property or '')})) < 1e300")
        if m.aggregation not in ("sum",):
            conds.append("NOT correction")
    jt = f"JSONType(properties, {_lit(m.property)})" if m.property and m.aggregation != "count" else "''"
    at_cut = "(cut > 0 AND ingested <= cut)"
    late = "(cut > 0 AND ingested > cut)"
    return f"""
    SELECT tenant_id, customer_id, {_lit(m.code)} AS metric, period_start,
           {_agg_sql(m, '1')} AS value, {_agg_sql(m, at_cut)} AS value_at_cut, cut,
           countIf({late}) AS late_events, arraySlice(groupArrayIf(event_id, {late}), 1, 20) AS late_ids
    FROM (SELECT e.*, {jt} AS jt, c.cut AS cut FROM {scratch} AS e
          LEFT JOIN (SELECT tupleElement(x, 1) AS tenant_id, tupleElement(x, 2) AS customer_id,
                            tupleElement(x, 4) AS period_start, tupleElement(x, 5) AS cut
                     FROM (SELECT arrayJoin({{cuts:Array(Tuple(String, String, String, Int64, Int64))}}) AS x)
                     WHERE tupleElement(x, 3) = {_lit(m.code)}) AS c
          ON c.tenant_id = e.tenant_id AND c.customer_id = e.customer_id AND c.period_start = e.period_start)
    WHERE {' AND '.join(conds)}
    GROUP BY tenant_id, customer_id, period_start, cut"""


class RawUnits:
    """One key's raw figures."""

    __slots__ = ("value", "value_at_cut", "late_events", "late_ids")

    def __init__(self, value: float, value_at_cut: Optional[float], late_events: int, late_ids: List[str]) -> None:
        self.value, self.value_at_cut, self.late_events, self.late_ids = value, value_at_cut, late_events, late_ids


def raw_units(client: Any, db: str, cfg: Config, tenant: Optional[str] = None,
              cuts: Optional[Dict[Key, int]] = None) -> Dict[Key, RawUnits]:
    """Raw units per key from ``raw_events`` (see the module docstring), optionally for one tenant."""
    subs = [(s.tenant_id, s.customer_id, s.period, dt_to_ms(s.anchor)) for s in cfg.subscriptions]
    scratch = f"{db}.reconcile_scratch_{uuid.uuid4().hex[:12]}"
    tenant_where = "WHERE tenant_id = {tenant:String}" if tenant is not None else ""
    params: Dict[str, Any] = {"subs": subs, "tenant": tenant or "",
                              "cuts": [(*k[:3], k[3], ms) for k, ms in (cuts or {}).items()]}
    stage1 = f"""
    CREATE TABLE {scratch} ENGINE = Memory AS
    SELECT tenant_id, event_id, customer_id, event_type, ts, properties, correction, ingested, position,
           {_excluded_sql(cfg)} AS excluded, {_PERIOD_SQL}
    FROM (
        SELECT tenant_id, event_id, e.1 AS customer_id, e.2 AS event_type, e.3 AS ts, e.4 AS properties,
               e.5 AS correction, e.6 AS ingested, e.7 AS position
        FROM (SELECT tenant_id, event_id,
                     argMin((customer_id, event_type, toUnixTimestamp64Milli(timestamp), properties, correction = 1,
                             toUnixTimestamp64Milli(ingested_at), position),
                            (ingested_at, position, source)) AS e
              FROM {db}.raw_events {tenant_where} GROUP BY tenant_id, event_id)
    ) AS ev
    LEFT JOIN (SELECT tupleElement(s, 1) AS tenant_id, tupleElement(s, 2) AS customer_id,
                      tupleElement(s, 3) AS kind, tupleElement(s, 4) AS anchor
               FROM (SELECT arrayJoin({{subs:Array(Tuple(String, String, String, Int64))}}) AS s)) AS sub
    ON sub.tenant_id = ev.tenant_id AND sub.customer_id = ev.customer_id"""
    out: Dict[Key, RawUnits] = {}
    if not cfg.metrics:
        return out
    client.command(stage1, parameters=params)
    try:
        sql = " UNION ALL ".join(_metric_sql(m, scratch) for m in cfg.metrics)
        for t, c, metric, ps, value, at_cut, cut, late, late_ids in client.query(sql, parameters=params).result_rows:
            out[(t, c, metric, int(ps))] = RawUnits(float(value), float(at_cut) if cut else None, int(late),
                                                    list(late_ids))
    finally:
        client.command(f"DROP TABLE IF EXISTS {scratch}")
    return out
