"""Readable output: the run summary and exact usage from the ClickHouse views."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from operators.timeutil import ms_to_iso

def make_console() -> Console:
    """A console for tables: the terminal's width, or a wide fixed width when piped to a file or CI log."""
    return Console() if sys.stdout.isatty() else Console(width=160)


_LABELS = {
    "read": "events read", "accepted": "accepted (unique)", "duplicates": "duplicates dropped",
    "excluded": "excluded (test/internal, counted not billed)", "dead_lettered": "dead-lettered",
    "unmetered": "accepted, no metric for event_type", "corrections_ignored": "corrections on non-additive metrics",
}


def print_run_summary(result: Any, console: Optional[Console] = None) -> None:
    console = console or make_console()
    t = Table(title=f"meterflow run: {result.seconds:.2f} s, {result.events_per_second:,.0f} events/s",
              title_justify="left")
    t.add_column("counter")
    t.add_column("events", justify="right")
    for key, label in _LABELS.items():
        t.add_row(label, f"{result.counters.get(key, 0):,}")
    console.print(t)


def query_usage(client: Any, db: str, by: str = "period", tenant: Optional[str] = None,
                customer: Optional[str] = None, metric: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of ``usage_by_period`` or ``usage_by_window`` (exact: the views deduplicate)."""
    view = "usage_by_period" if by == "period" else "usage_by_window"
    start = "period_start" if by == "period" else "window_start"
    conds, params = [], {}
    for col, val in (("tenant_id", tenant), ("customer_id", customer), ("metric", metric)):
        if val is not None:
            conds.append(f"{col} = {{{col}:String}}")
            params[col] = val
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    extra = ", toUnixTimestamp64Milli(period_start) AS ps, toUnixTimestamp64Milli(period_end) AS pe" if by == "period" \
        else ", toUnixTimestamp64Milli(window_start) AS ps, toUnixTimestamp64Milli(window_end) AS pe"
    q = client.query(f"SELECT *{extra} FROM {db}.{view} {where} ORDER BY tenant_id, customer_id, metric, {start}",
                     parameters=params)
    rows = []
    for r in q.named_results():
        r = dict(r)
        s, e = r.pop("ps"), r.pop("pe")
        if by == "period":
            r["period_start"], r["period_end"] = ms_to_iso(s), ms_to_iso(e)
        else:
            r["window_start"], r["window_end"] = ms_to_iso(s), ms_to_iso(e)
        rows.append(r)
    return rows


def usage_table(rows: List[Dict[str, Any]], by: str, limit: int, title: str = "usage") -> Table:
    t = Table(title=title, title_justify="left")
    for c in ("tenant", "customer", "metric", "start (UTC)"):
        t.add_column(c)
    if by == "window":
        t.add_column("dimensions")
    t.add_column("value", justify="right")
    t.add_column("events", justify="right")
    if by == "period":
        t.add_column("included", justify="right")
        t.add_column("used %", justify="right")
        t.add_column("overage", justify="right")
    for r in rows[:limit]:
        cells = [r["tenant_id"], r["customer_id"], r["metric"],
                 (r["period_start"] if by == "period" else r["window_start"])[:16].replace("T", " ")]
        if by == "window":
            cells.append(",".join(f"{k}={v}" for k, v in sorted(r["dimensions"].items())))
        cells += [_num(r["value"]), f"{r['events']:,}"]
        if by == "period":
            inc = r["included"]
            cells += ["-" if inc is None else _num(inc),
                      "-" if not inc else f"{100.0 * r['value'] / inc:.1f}",
                      _num(r["overage_units"]) if inc is not None else "-"]
        t.add_row(*cells)
    if len(rows) > limit:
        t.caption = f"{len(rows) - limit} more rows: narrow with --tenant/--customer/--metric or raise --limit"
    return t


def _num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.4f}"


def print_usage(args: argparse.Namespace) -> int:
    from schemas.config import load_config
    from sinks.clickhouse import connect

    cfg = load_config(args.config)
    client, db = connect(cfg.clickhouse)
    rows = query_usage(client, db, args.by, args.tenant, args.customer, args.metric)
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps(r, default=str) + "\n")
        return 0
    console = make_console()
    if not rows:
        console.print("no usage matches (has `meter run` written to this ClickHouse yet?)")
        return 0
    console.print(usage_table(rows, args.by, args.limit, f"usage by {args.by}"))
    return 0
