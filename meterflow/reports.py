"""Readable output: the run summary, exact usage, charges and alerts from the ClickHouse views (queried by
:mod:`meterflow.sinks.clickhouse_schema`), and the ``meter entitlements publish`` command."""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Context, Decimal
from typing import Any, Dict, List, Optional, Tuple

import msgspec
from rich.console import Console
from rich.table import Table

from meterflow.base.timeutil import ms_to_iso


def make_console() -> Console:
    """A console for tables: the terminal's width, or a wide fixed width when piped to a file or CI log."""
    return Console() if sys.stdout.isatty() else Console(width=160)


_LABELS = {
    "read": "events read", "accepted": "accepted (unique, in time, billable)", "duplicates": "duplicates dropped",
    "excluded": "excluded (test/internal, counted not billed)",
    "dead_lettered": "dead-lettered (whole events: invalid, unknown tenant, too late)",
    "missing_property": "missing_property dead letters (one metric each; the event is accepted)",
    "unmetered": "accepted, no metric for event_type", "corrections_ignored": "corrections on non-additive metrics",
    "unevaluated": "metered, no subscription (not evaluated)", "entitlement_changes": "entitlement changes received",
    "entitlement_rejected": "entitlement changes dead-lettered", "alerts": "alerts fired",
    "entitlement_errors": "internal errors in entitlement checks (dead-lettered; a bug)",
}
_OPTIONAL = ("entitlement_changes", "entitlement_rejected", "entitlement_errors")  # shown only when non-zero


def print_run_summary(result: Any, console: Optional[Console] = None) -> None:
    from meterflow.base.stats import identity

    console = console or make_console()
    t = Table(title=f"meterflow run: {result.seconds:.2f} s, {result.events_per_second:,.0f} events/s",
              title_justify="left")
    t.add_column("counter")
    t.add_column("events", justify="right")
    for key, label in _LABELS.items():
        if key in _OPTIONAL and not result.counters.get(key):
            continue
        t.add_row(label, f"{result.counters.get(key, 0):,}")
    console.print(t)
    ok, text = identity(result.counters)
    console.print(text if ok or result.interrupted else f"{text} (a meterflow bug: please report it)",
                  highlight=False)


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
        t.add_column("final")  # period_end + late_grace passed: no event can change the row any more
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
                      _num(r["overage_units"]) if inc is not None else "-",
                      "yes" if r.get("final") else "open"]
        t.add_row(*cells)
    if len(rows) > limit:
        t.caption = f"{len(rows) - limit} more rows: narrow with --tenant/--customer/--metric or raise --limit"
    return t


def _num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.4f}"


def print_usage(args: argparse.Namespace) -> int:
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_schema import query_usage

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


# -- charges (``meter charges``) ----------------------------------------------------------------------

_CENTS = Decimal("0.01")
_WIDE = Context(prec=60)  # wider than Decimal(38, 9): quantize never rounds or raises


def exact_money(d: Decimal) -> Decimal:
    """An amount with at least two decimals and no trailing zeros beyond them, the value unchanged:
    102.000000000 -> 102.00, 0.000300000 -> 0.0003 (what ``meter charges`` prints, in the table and as JSON).

    >>> exact_money(Decimal("102.000000000")), exact_money(Decimal("0.000300000")), exact_money(Decimal("1E+2"))
    (Decimal('102.00'), Decimal('0.0003'), Decimal('100.00'))
    """
    q = d.quantize(_CENTS, context=_WIDE)
    return q if q == d else d.normalize(_WIDE)


def _money(d: Decimal) -> str:
    return format(exact_money(d), ",f")


_CHARGES_ENCODER = msgspec.json.Encoder(decimal_format="number")


def charges_json_line(row: Dict[str, Any]) -> bytes:
    """One rated row as a JSON line: the ``usage_rated`` columns, money as JSON numbers with exact digits."""
    return _CHARGES_ENCODER.encode({k: exact_money(v) if isinstance(v, Decimal) else v for k, v in row.items()})


def charges_tables(rows: List[Dict[str, Any]], limit: int, title: str = "charges") -> Tuple[Table, Table]:
    """The rated rows (the first ``limit``) and their totals per currency (over every row). The tenant column is
    left out (and named in the title) when every row is of one tenant, so the sixteen columns fit 160 characters."""
    tenants = {r["tenant_id"] for r in rows}
    one_tenant = len(tenants) == 1
    t = Table(title=f"{title}, tenant {next(iter(tenants))}" if one_tenant else title, title_justify="left")
    right = ("usage", "included", "overage units", "charge", "overage amount", "minimum", "amount")
    for c in (*(() if one_tenant else ("tenant",)), "customer", "period", "metric", "plan", "currency", "model",
              *right, "custom", "final"):
        t.add_column(c, justify="right" if c in right else "left", no_wrap=c in ("period", "currency"))
    for r in rows[:limit]:
        inc = r["included"]
        t.add_row(*(() if one_tenant else (r["tenant_id"],)), r["customer_id"], r["period_start"][:10], r["metric"],
                  r["plan"] or "-", r["currency"], r["price_model"], _num(r["usage"]),
                  "-" if inc is None else _num(inc),
                  _num(r["overage_units"]), _money(r["charge"]), _money(r["overage_amount"]), _money(r["minimum"]),
                  _money(r["amount"]), "custom" if r["custom_rate"] else "-", "final" if r["final"] else "open")
    if len(rows) > limit:
        t.caption = (f"{len(rows) - limit} more rows (counted in the totals): narrow with --tenant/--customer/"
                     "--period-start or raise --limit")
    totals: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        tot = totals.setdefault(r["currency"], {"rows": 0, "final": 0, "charge": Decimal(0),
                                                "overage_amount": Decimal(0), "amount": Decimal(0)})
        tot["rows"] += 1
        tot["final"] += r["final"]
        for k in ("charge", "overage_amount", "amount"):
            tot[k] += r[k]
    s = Table(title="totals per currency", title_justify="left",
              caption="exact; rounding is the invoice's job", caption_justify="left")
    for c in ("currency", "rows", "final rows", "charge", "overage amount", "amount"):
        s.add_column(c, justify="left" if c == "currency" else "right")
    for cur in sorted(totals):
        tot = totals[cur]
        s.add_row(cur, f"{tot['rows']:,}", f"{tot['final']:,}", _money(tot["charge"]), _money(tot["overage_amount"]),
                  _money(tot["amount"]))
    return t, s


def print_charges(args: argparse.Namespace) -> int:
    from meterflow.base.errors import MeterError
    from meterflow.base.timeutil import parse_rfc3339_ms
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_schema import query_rated

    pstart = None
    if args.period_start is not None:
        try:
            pstart = parse_rfc3339_ms(args.period_start)
        except ValueError as exc:
            raise MeterError(f"--period-start: {exc} (e.g. 2026-11-01T00:00:00Z)") from None
    if args.limit <= 0:
        raise MeterError(f"--limit must be a positive number of rows, got {args.limit}")
    cfg = load_config(args.config)
    client, db = connect(cfg.clickhouse)
    rows = query_rated(client, db, args.tenant, args.customer, pstart, args.metric)
    if args.json:
        out = sys.stdout.buffer
        for r in rows:
            out.write(charges_json_line(r) + b"\n")
        out.flush()
        return 0
    console = make_console()
    if not rows:
        console.print("no rated rows match (has `meter run` written to this ClickHouse yet? Only metrics whose "
                      "subscription gives them an entitlement or a price are rated)")
        return 0
    table, totals = charges_tables(rows, args.limit, f"charges ({len(rows)} rated rows)")
    console.print(table)
    console.print(totals)
    return 0


# -- alerts (``meter alerts``) ------------------------------------------------------------------------

def alerts_table(rows: List[Dict[str, Any]], title: str = "alerts") -> Table:
    t = Table(title=title, title_justify="left")
    for c in ("detected (UTC)", "type", "tenant", "customer", "metric", "threshold", "usage / included", "pct",
              "action", "event_id", "latency ms"):
        t.add_column(c, justify="right" if c in ("threshold", "usage / included", "pct", "latency ms") else "left")
    for r in rows:
        inc = r["included"]
        if r["type"] == "anomaly" and r.get("baseline") is not None:  # usage against its baseline, not a quota
            threshold, used = f"{r['factor']:g}x baseline", f"{_num(r['usage'])} / baseline {_num(r['baseline'])}"
        else:
            threshold = "-" if r["threshold_pct"] is None else f"{r['threshold_pct']:g}%"
            used = _num(r["usage"]) + ("" if inc is None else f" / {_num(inc)}")
        t.add_row(r["detected_at"].replace("T", " ").rstrip("Z"), r["type"], r["tenant_id"], r["customer_id"],
                  r["metric"] or "-", threshold, used,
                  "-" if r["usage_pct"] is None else f"{r['usage_pct']:.1f}", r["action"], r["event_id"] or "-",
                  "-" if r["latency_ms"] is None else f"{r['latency_ms']:,}")
    return t


def anomaly_table(rows: List[Dict[str, Any]], title: str = "anomalies") -> Table:
    """``meter alerts --type anomaly``: per alert the UTC day, the day's usage when it fired, the baseline (trailing
    daily average) and the multiple of it, next to the configured factor."""
    t = Table(title=title, title_justify="left")
    for c in ("day (UTC)", "tenant", "customer", "account", "metric", "usage that day", "baseline / day", "multiple",
              "alert above", "event_id", "latency ms"):
        t.add_column(c, justify="right" if c in ("usage that day", "baseline / day", "multiple", "alert above",
                                                 "latency ms") else "left")
    for r in rows:
        base, factor = r.get("baseline"), r.get("factor")
        t.add_row(r["period_start"][:10], r["tenant_id"], r["customer_id"], r.get("account_name") or "-", r["metric"],
                  _num(r["usage"]), "-" if base is None else _num(base),
                  "-" if not base else f"{r['usage'] / base:.2f}x", "-" if factor is None else f"{factor:g}x",
                  r["event_id"] or "-", "-" if r["latency_ms"] is None else f"{r['latency_ms']:,}")
    return t


def print_alerts(args: argparse.Namespace) -> int:
    from meterflow.base.errors import MeterError
    from meterflow.base.timeutil import parse_rfc3339_ms
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_schema import query_alerts

    since = None
    if args.since is not None:
        try:
            since = parse_rfc3339_ms(args.since)
        except ValueError as exc:
            raise MeterError(f"--since: {exc}") from None
    if args.limit is not None and args.limit <= 0:
        raise MeterError(f"--limit must be a positive number of alerts, got {args.limit}")
    cfg = load_config(args.config)
    client, db = connect(cfg.clickhouse)
    limit = args.limit if (args.limit is not None or args.json) else 200
    rows = query_alerts(client, db, args.tenant, args.customer, args.metric, args.type, since,
                        None if limit is None else limit + 1)
    more = limit is not None and len(rows) > limit
    rows = rows[1:] if more else rows
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return 0
    console = make_console()
    if not rows:
        console.print("no alerts match (has `meter run` written to this ClickHouse yet?)")
        return 0
    title = f"{len(rows)}{' latest' if more else ''}"
    t = anomaly_table(rows, f"anomaly alerts ({title})") if args.type == "anomaly" else \
        alerts_table(rows, f"alerts ({title})")
    if more:
        t.caption = "earlier alerts not shown: narrow with --since/--tenant/--customer/--type or raise --limit"
    console.print(t)
    return 0


# -- entitlements (``meter entitlements publish``) ----------------------------------------------------

def _tenant_customer(text: str, option: str) -> Tuple[str, str]:
    from meterflow.base.errors import MeterError

    tenant, sep, customer = text.partition("/")
    if not sep or not tenant or not customer:
        raise MeterError(f"{option} {text!r}: expected TENANT/CUSTOMER, e.g. acme/cust_456")
    return tenant, customer


def publish_entitlements_cmd(args: argparse.Namespace) -> int:
    """Publish the config's subscriptions (or the chosen ones) and cancellations to the entitlements topic."""
    from meterflow.base.errors import MeterError
    from meterflow.base.timeutil import now_ms
    from meterflow.schemas.alerts import ENTITLEMENT_ENCODER, EntitlementMessage
    from meterflow.schemas.config import load_config
    from meterflow.sinks.kafka import publish_entitlements

    cfg = load_config(args.config)
    if cfg.kafka is None:
        raise MeterError(f"entitlements publish needs a [kafka] section in {cfg.source_path} "
                         "(bootstrap_servers, entitlements_topic)")
    subs = {(s.tenant_id, s.customer_id): s for s in cfg.subscriptions}
    chosen = [_tenant_customer(c, "--customer") for c in args.customer]
    cancels = [_tenant_customer(c, "--cancel") for c in args.cancel]
    for t, c in chosen:
        if (t, c) not in subs:
            raise MeterError(f"--customer {t}/{c}: no [[subscriptions]] entry for it in {cfg.source_path}")
    tenants = {t.id for t in cfg.tenants}
    for t, c in cancels:
        if t not in tenants:
            raise MeterError(f"--cancel {t}/{c}: tenant {t!r} is not in [[tenants]] of {cfg.source_path}")
        if (t, c) in chosen:
            raise MeterError(f"{t}/{c} is given to both --customer and --cancel")
    if not chosen and not cancels:
        chosen = list(subs)
    if not chosen and not cancels:
        raise MeterError(f"nothing to publish: {cfg.source_path} has no [[subscriptions]] (use --cancel to end one)")
    published_at = ms_to_iso(now_ms())
    msgs = [EntitlementMessage(tenant_id=t, customer_id=c, subscription=subs[(t, c)], published_at=published_at)
            for t, c in dict.fromkeys(chosen)]
    msgs += [EntitlementMessage(tenant_id=t, customer_id=c, cancelled=True, published_at=published_at)
             for t, c in dict.fromkeys(cancels)]
    records = [(f"{m.tenant_id}|{m.customer_id}".encode(), ENTITLEMENT_ENCODER.encode(m)) for m in msgs]
    k = cfg.kafka
    where = [None] * len(records) if args.dry_run else \
        publish_entitlements(k.bootstrap_servers, k.entitlements_topic, records, k.client_config)
    verb = "would publish" if args.dry_run else "published"
    table = Table(title=f"{verb} {len(msgs)} entitlement records to {k.entitlements_topic}", title_justify="left")
    for c in ("tenant", "customer", "change", "plan", "period", "anchor", "partition/offset"):
        table.add_column(c)
    for m, w in zip(msgs, where):
        s = m.subscription
        table.add_row(m.tenant_id, m.customer_id, "cancelled" if m.cancelled else "subscription",
                      s.plan if s else "-", s.period if s else "-", s.anchor.isoformat() if s else "-",
                      "-" if w is None else f"{w[0]}/{w[1]}")
    make_console().print(table)
    return 0
