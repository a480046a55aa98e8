"""``meter reconcile`` (README: Reconciliation): raw events vs metered usage vs invoice lines, per key.

Reads the invoice file (CSV with a header, or JSONL; a bad line is reported with its number and skipped),
recomputes raw units in ClickHouse (:mod:`meterflow.raw_leg`), reads ``usage_by_period`` and ``usage_rated``,
classifies every key (:func:`meterflow.operators.reconcile.classify`), stores the run in ``reconciliation``
and prints it. Exit status 0 when the run completed; with ``--fail-on`` 1 when a key is in those classes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgspec

from meterflow.base.errors import MeterError
from meterflow.base.periods import period_bounds
from meterflow.base.timeutil import dt_to_ms, ms_to_iso, now_ms, parse_rfc3339_ms
from meterflow.operators.reconcile import (
    INVOICE_FIELDS,
    Figures,
    InvoiceLine,
    Key,
    classify,
    net_invoices,
    parse_invoice_line,
)
from meterflow.schemas.config import RECONCILE_CLASSES, Config
from meterflow.schemas.records import ReconciliationRow
from meterflow.sinks.clickhouse_schema import RECONCILIATION_COLUMNS


class InvoiceFile(msgspec.Struct, frozen=True, kw_only=True):
    lines: List[InvoiceLine]
    errors: List[str]  # "line N: why", in file order
    sha256: str
    read: int  # records read (header and blank lines not counted)


def read_invoices(path: str, cfg: Config) -> InvoiceFile:
    """Validate an invoice file line by line: JSONL when its first non-blank character is ``{``, else CSV with
    a header. A line whose period_start is not the start of the customer's billing period is an error too."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise MeterError(f"invoice file {p} does not exist (pass --invoices FILE)") from None
    except OSError as exc:
        raise MeterError(f"cannot read invoice file {p}: {exc.strerror}") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MeterError(f"invoice file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    metrics = [m.code for m in cfg.metrics]
    units = dict(cfg.reconcile.units)
    subs = {(s.tenant_id, s.customer_id): (s.period, dt_to_ms(s.anchor)) for s in cfg.subscriptions}
    records: List[Tuple[int, Any]] = []
    errors: List[str] = []
    if text.lstrip().startswith("{"):
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                records.append((n, json.loads(raw)))
            except ValueError as exc:
                errors.append(f"line {n}: not valid JSON: {exc}")
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [f for f in INVOICE_FIELDS if f not in header]
        if missing:
            raise MeterError(f"invoice file {p}: the CSV header (line 1) lacks the column(s) {', '.join(missing)}; "
                             f"expected {','.join(INVOICE_FIELDS)}")
        reader.fieldnames = header
        for row in reader:
            n = reader.line_num
            if None in row:
                errors.append(f"line {n}: {len(header) + len(row[None])} values for {len(header)} columns")
                continue
            if not any((v or "").strip() for v in row.values()):
                continue
            records.append((n, row))
    tenants = {t.id for t in cfg.tenants}
    lines: List[InvoiceLine] = []
    for n, rec in records:
        try:
            ln = parse_invoice_line(rec, n, metrics, units)
            if ln.tenant_id not in tenants:
                raise ValueError(f"unknown tenant {ln.tenant_id!r} (not in [[tenants]])")
            kind, anchor = subs.get((ln.tenant_id, ln.customer_id), ("month", 0))
            start, _ = period_bounds(ln.period_start, kind, anchor)
            if start != ln.period_start:
                raise ValueError(f"period_start {ms_to_iso(ln.period_start)} is not the start of a billing period "
                                 f"of customer {ln.customer_id!r} (the period holding it starts {ms_to_iso(start)})")
        except ValueError as exc:
            errors.append(f"line {n}: {exc}")
            continue
        lines.append(ln)
    return InvoiceFile(lines=lines, errors=errors, sha256=digest, read=len(records) + sum(
        1 for e in errors if "not valid JSON" in e or "values for" in e))


class Changelog(msgspec.Struct, frozen=True, kw_only=True):
    """Subscription changes from an entitlements changelog file (``meter run --entitlements``'s JSONL) or the
    Kafka entitlements topic."""

    changes: Dict[Tuple[str, str], List[Dict[str, Any]]]  # (tenant, customer) -> records with their time
    errors: List[str]
    sha256: str
    topic: str = ""  # the Kafka topic it was read from ("" for a file)


def read_changelog(path: str) -> Changelog:
    """The changelog records that carry ``published_at`` (when the change took effect), per customer. A line
    that is not a changelog record, or has no valid ``published_at``, is reported with its number and skipped."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MeterError(f"cannot read entitlements changelog {p}: {exc.strerror} (pass --entitlements FILE, "
                         f"the JSONL file meter run read)") from None
    records = [(f"line {n}", {"changelog_line": n}, raw) for n, raw in enumerate(data.splitlines(), 1)]
    return _changelog(records, hashlib.sha256(data).hexdigest())


def read_changelog_topic(cfg: Config, timeout: float = 30.0) -> Changelog:
    """The same records from ``kafka.entitlements_topic``, read from the beginning of every partition to its end
    offset at call time (within ``timeout`` seconds; a missing topic has none). The topic is compacted, so only
    each customer's latest record is sure to be there; the sha256 is over the values in partition and offset
    order, one per line."""
    from meterflow.sources.kafka import read_topic

    k = cfg.kafka
    if k is None:
        raise MeterError(f"{cfg.source_path} has no [kafka] section: pass --entitlements FILE")
    try:
        found = read_topic(k.bootstrap_servers, k.entitlements_topic, k.client_config, timeout)
    except MeterError as exc:
        raise MeterError(f"{exc} (the subscription changes of meter reconcile; or pass --entitlements FILE)") from exc
    records = [(f"partition {p} offset {o}", {"changelog_partition": p, "changelog_offset": o}, v)
               for p, o, v in found]
    return msgspec.structs.replace(_changelog(records, hashlib.sha256(b"\n".join(v for _p, _o, v in found))
                                              .hexdigest()), topic=k.entitlements_topic)


def _changelog(records: List[Tuple[str, Dict[str, Any], bytes]], sha256: str) -> Changelog:
    """``(where, reference, raw record)`` parsed: the changes with ``published_at``, per customer; a bad record
    is reported with ``where`` and skipped (an empty one, a blank line or a tombstone, is no record)."""
    from meterflow.schemas.alerts import ENTITLEMENT_DECODER

    changes: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    errors: List[str] = []
    for where, ref, raw in records:
        if not raw.strip():
            continue
        try:
            msg = ENTITLEMENT_DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            errors.append(f"{where}: not a changelog record: {exc}")
            continue
        try:
            at = parse_rfc3339_ms(msg.published_at or "")
        except ValueError:
            errors.append(f"{where}: published_at {msg.published_at!r} is not an RFC 3339 time: the change "
                          f"cannot be placed in a period")
            continue
        plan = "" if msg.cancelled or msg.subscription is None else msg.subscription.plan
        changes.setdefault((msg.tenant_id, msg.customer_id), []).append(
            {**ref, "published_at": ms_to_iso(at), "at_ms": at, "plan": plan, "cancelled": msg.cancelled})
    return Changelog(changes=changes, errors=errors, sha256=sha256)


def _changes_in_period(changelog: Optional[Changelog], cfg: Config, key: Key) -> List[Dict[str, Any]]:
    """The changelog records of the key's customer that took effect inside the key's period."""
    if changelog is None:
        return []
    recs = changelog.changes.get((key[0], key[1]), [])
    if not recs:
        return []
    sub = next((s for s in cfg.subscriptions if (s.tenant_id, s.customer_id) == key[:2]), None)
    kind, anchor = (sub.period, dt_to_ms(sub.anchor)) if sub is not None else ("month", 0)
    start, end = period_bounds(key[3], kind, anchor)
    return [{k: v for k, v in r.items() if k != "at_ms"} for r in recs if start <= r["at_ms"] < end]


def _metered(client: Any, db: str, tenant: Optional[str]) -> Tuple[Dict[Key, float], Dict[Key, Tuple[Decimal, str]]]:
    where = "WHERE tenant_id = {tenant:String}" if tenant is not None else ""
    params = {"tenant": tenant or ""}
    units = {(t, c, m, int(ps)): float(v) for t, c, m, ps, v in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), value "
        f"FROM {db}.usage_by_period {where}", parameters=params).result_rows}
    amounts = {(t, c, m, int(ps)): (Decimal(a), cur) for t, c, m, ps, a, cur in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), toString(amount), currency "
        f"FROM {db}.usage_rated {where}", parameters=params).result_rows}
    return units, amounts


def _plan_changes(client: Any, db: str, tenant: Optional[str]) -> Dict[Tuple[str, str, int], List[Dict[str, Any]]]:
    """plan_changed alerts per (tenant, customer, period_start): the subscription changes the flow recorded."""
    where = "AND tenant_id = {tenant:String}" if tenant is not None else ""
    out: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for t, c, ps, aid, plan, prev, action, at in client.query(
            f"SELECT tenant_id, customer_id, toUnixTimestamp64Milli(period_start), alert_id, plan, previous_plan, "
            f"action, toUnixTimestamp64Milli(event_time) FROM {db}.alerts_log WHERE type = 'plan_changed' {where} "
            f"ORDER BY detected_at", parameters={"tenant": tenant or ""}).result_rows:
        out.setdefault((t, c, int(ps)), []).append({"alert_id": aid, "plan": plan, "previous_plan": prev,
                                                    "action": action, "at": ms_to_iso(at) if at else ""})
    return out


def _too_late(client: Any, db: str, tenant: Optional[str]) -> Dict[Tuple[str, str], int]:
    where = "AND tenant_id = {tenant:String}" if tenant is not None else ""
    return {(t, c): int(n) for t, c, n in client.query(
        f"SELECT tenant_id, JSONExtractString(payload, 'customer_id') AS c, count() FROM {db}.dead_letters "
        f"WHERE reason = 'too_late' {where} GROUP BY tenant_id, c", parameters={"tenant": tenant or ""}).result_rows}


def _fingerprints(client: Any, db: str, tenant: Optional[str], invoices: InvoiceFile, cfg: Config) -> Dict[str, Any]:
    where = "WHERE tenant_id = {tenant:String}" if tenant is not None else ""
    params = {"tenant": tenant or ""}

    def one(sql: str) -> List[Any]:
        return [str(x) for x in client.query(sql, parameters=params).result_rows[0]]

    try:
        config_sha = hashlib.sha256(Path(cfg.source_path).read_bytes()).hexdigest()
    except OSError:
        config_sha = ""
    return {"invoices_sha256": invoices.sha256, "invoice_lines": len(invoices.lines),
            "invoice_errors": len(invoices.errors), "config_sha256": config_sha,
            "raw_events": one(f"SELECT count(), sum(cityHash64(tenant_id, event_id, source)) FROM {db}.raw_events "
                              f"{where}"),
            "usage_by_period": one(f"SELECT count(), sum(cityHash64(tenant_id, customer_id, metric, period_start, "
                                   f"value)) FROM {db}.usage_by_period {where}"),
            "usage_rated": one(f"SELECT count(), sum(cityHash64(tenant_id, customer_id, metric, period_start, "
                               f"toString(amount))) FROM {db}.usage_rated {where}"),
            "tenant": tenant or "", }


class Run(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    ran_at: int
    inputs: Dict[str, Any]
    rows: List[ReconciliationRow]
    invoice_errors: List[str]


def reconcile(client: Any, db: str, cfg: Config, invoices: InvoiceFile, tenant: Optional[str] = None,
              period_start: Optional[int] = None, clock: Any = now_ms,
              changelog: Optional[Changelog] = None) -> Run:
    """Classify every key of any source and store the run in ``reconciliation``. A subscription change inside
    a key's period is a ``plan_changed`` alert of the flow, or a ``changelog`` record (``--entitlements``)."""
    lines = [ln for ln in invoices.lines if tenant is None or ln.tenant_id == tenant]
    invoiced = net_invoices(lines)
    from meterflow.raw_leg import raw_units

    raw = raw_units(client, db, cfg, tenant, {k: v.cut for k, v in invoiced.items()})
    metered, rated = _metered(client, db, tenant)
    changes = _plan_changes(client, db, tenant)
    too_late = _too_late(client, db, tenant)
    keys = sorted(set(raw) | set(metered) | set(invoiced))
    if period_start is not None:
        keys = [k for k in keys if k[3] == period_start]
    run_id, ran_at = uuid.uuid4().hex, clock()
    inputs = _fingerprints(client, db, tenant, invoices, cfg)
    if changelog is not None:
        inputs["entitlements_sha256"] = changelog.sha256
        if changelog.topic:
            inputs["entitlements_topic"] = changelog.topic
    inputs_json = json.dumps(inputs, sort_keys=True)
    tol = cfg.reconcile.tolerance
    rows = []
    for k in keys:
        r = raw.get(k)
        inv = invoiced.get(k)
        amount, currency = rated.get(k, (Decimal(0), ""))
        pc = changes.get((k[0], k[1], k[3]), []) + _changes_in_period(changelog, cfg, k)
        f = Figures(raw_units=r.value if r else 0.0, metered_units=metered.get(k, 0.0), metered_amount=amount,
                    invoiced=inv, raw_units_at_cut=(r.value_at_cut if r and r.value_at_cut is not None else
                                                    (0.0 if inv is not None else None)),
                    plan_changed=bool(pc))
        cls = classify(f, tol)
        evidence: Dict[str, Any] = {}
        if inv is not None:
            evidence["invoice_ids"] = inv.invoice_ids
            evidence["invoiced_at"] = ms_to_iso(inv.cut)
            if inv.credits:
                evidence["credits"] = inv.credits
                evidence["usage_lines_units"] = inv.usage_units
            if r is not None and r.late_events:
                evidence["late_events"] = r.late_events
                evidence["late_event_ids"] = r.late_ids
                evidence["raw_units_at_cut"] = f.raw_units_at_cut
        if pc:
            evidence["subscription_changes"] = pc
        if cls == "metering_gap":
            evidence["raw_minus_metered"] = f.raw_units - f.metered_units
            if too_late.get(k[:2]):
                evidence["too_late_dead_letters_of_customer"] = too_late[k[:2]]
        rows.append(ReconciliationRow(
            run_id=run_id, ran_at=ran_at, inputs=inputs_json, tenant_id=k[0], customer_id=k[1], metric=k[2],
            period_start=k[3], currency=currency, raw_units=f.raw_units, metered_units=f.metered_units,
            metered_amount=amount, invoiced_units=f.invoiced_units, invoiced_amount=f.invoiced_amount,
            diff_units=f.invoiced_units - f.metered_units, diff_amount=f.invoiced_amount - amount, cls=cls,
            owner=cfg.reconcile.owner(cls), evidence=json.dumps(evidence, sort_keys=True)))
    if rows:
        cols = [list(c) for c in zip(*map(msgspec.structs.astuple, rows))]
        client.insert(f"{db}.reconciliation_rows", cols, column_names=RECONCILIATION_COLUMNS, column_oriented=True)
    return Run(run_id=run_id, ran_at=ran_at, inputs=inputs, rows=rows, invoice_errors=invoices.errors)


def totals(rows: Sequence[ReconciliationRow]) -> Dict[str, Dict[str, Any]]:
    """Per class: keys, diff_units, diff_amount, owner (classes in the contract's order, only those found)."""
    out: Dict[str, Dict[str, Any]] = {}
    for cls in RECONCILE_CLASSES:
        rs = [r for r in rows if r.cls == cls]
        if rs:
            out[cls] = {"keys": len(rs), "owner": rs[0].owner, "diff_units": sum(r.diff_units for r in rs),
                        "diff_amount": sum((r.diff_amount for r in rs), Decimal(0))}
    return out


def accuracy(rows: Sequence[ReconciliationRow]) -> Optional[float]:
    """Share of keys (with raw or metered usage) whose raw units equal the metered units, in percent."""
    used = [r for r in rows if r.raw_units or r.metered_units]
    if not used:
        return None
    return 100.0 * sum(1 for r in used if r.cls != "metering_gap") / len(used)


def _row_dict(r: ReconciliationRow) -> Dict[str, Any]:
    d = msgspec.structs.asdict(r)
    d["class"] = d.pop("cls")
    d["period_start"] = ms_to_iso(r.period_start)
    d["ran_at"] = ms_to_iso(r.ran_at)
    d["evidence"] = json.loads(r.evidence)
    del d["inputs"]
    for f in ("metered_amount", "invoiced_amount", "diff_amount"):
        d[f] = str(d[f])
    return d


def reconcile_cmd(args: argparse.Namespace) -> int:
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect

    cfg = load_config(args.config)
    fail_on = [c.strip() for c in (args.fail_on or "").split(",") if c.strip()]
    for c in fail_on:
        if c not in RECONCILE_CLASSES:
            raise MeterError(f"--fail-on: unknown class {c!r}: expected some of {', '.join(RECONCILE_CLASSES)}")
    period_start = None
    if args.period_start:
        try:
            period_start = parse_rfc3339_ms(args.period_start)
        except ValueError as exc:
            raise MeterError(f"--period-start {args.period_start!r}: {exc}") from None
    invoices = read_invoices(args.invoices, cfg)
    changes_from = getattr(args, "entitlements", None)
    if changes_from:
        changelog: Optional[Changelog] = read_changelog(changes_from)
    elif cfg.kafka is not None:  # the topic meter run reads in Kafka mode
        changes_from = f"Kafka topic {cfg.kafka.entitlements_topic}"
        changelog = read_changelog_topic(cfg)
    else:
        changelog = None
    client, db = connect(cfg.clickhouse)
    run = reconcile(client, db, cfg, invoices, args.tenant, period_start, changelog=changelog)
    import sys

    for e in run.invoice_errors:
        print(f"meter: invoices {args.invoices}: {e} (skipped)", file=sys.stderr)
    for e in (changelog.errors if changelog is not None else []):
        print(f"meter: entitlements {changes_from}: {e} (skipped)", file=sys.stderr)
    tots = totals(run.rows)
    acc = accuracy(run.rows)
    if args.json:
        doc = {"run_id": run.run_id, "ran_at": ms_to_iso(run.ran_at), "inputs": run.inputs,
               "invoice_errors": run.invoice_errors, "accuracy_pct": acc,
               "totals": {c: {**t, "diff_amount": str(t["diff_amount"])} for c, t in tots.items()},
               "rows": [_row_dict(r) for r in run.rows]}
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_run(run, tots, acc)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            cols = [c for c in RECONCILIATION_COLUMNS if c != "inputs"]
            w.writerow(cols)
            for r in run.rows:
                d = _row_dict(r)
                w.writerow([json.dumps(d[c], sort_keys=True) if c == "evidence" else d[c] for c in cols])
    return 1 if fail_on and any(r.cls in fail_on for r in run.rows) else 0


def print_run(run: Run, tots: Dict[str, Dict[str, Any]], acc: Optional[float]) -> None:
    from rich.table import Table

    from meterflow.reports import make_console

    console = make_console()
    t = Table(title=f"reconciliation {run.run_id} ({ms_to_iso(run.ran_at)})")
    for col in ("tenant", "customer", "metric", "period_start", "raw", "metered", "invoiced", "diff units",
                "metered amt", "invoiced amt", "diff amt", "class", "owner"):
        t.add_column(col, justify="right" if col in ("raw", "metered", "invoiced", "diff units", "metered amt",
                                                      "invoiced amt", "diff amt") else "left")
    shown = [r for r in run.rows if r.cls != "match"]
    for r in shown[:40]:
        t.add_row(r.tenant_id, r.customer_id, r.metric, ms_to_iso(r.period_start), f"{r.raw_units:,.6g}",
                  f"{r.metered_units:,.6g}", f"{r.invoiced_units:,.6g}", f"{r.diff_units:+,.6g}",
                  f"{r.metered_amount:,.2f}", f"{r.invoiced_amount:,.2f}", f"{r.diff_amount:+,.2f}", r.cls, r.owner)
    if shown:
        console.print(t)
        if len(shown) > 40:
            console.print(f"... and {len(shown) - 40} more keys that do not match (--json or --out FILE.csv: all)")
    s = Table(title="totals per class (diff = invoiced - metered)")
    for col in ("class", "owner", "keys", "diff units", "diff amount"):
        s.add_column(col, justify="right" if col in ("keys", "diff units", "diff amount") else "left")
    for cls, v in tots.items():
        s.add_row(cls, v["owner"], str(v["keys"]), f"{v['diff_units']:+,.6g}", f"{v['diff_amount']:+,.2f}")
    console.print(s)
    console.print(f"{len(run.rows)} keys; raw vs metered accuracy: "
                  f"{'n/a (no usage)' if acc is None else f'{acc:.2f} %'} of keys with usage; "
                  f"{len(run.invoice_errors)} invoice line(s) skipped")
