"""``meter demo --reconcile``: after the demo's run, reconcile its sample against a generated invoice file.

The invoice file is what a billing system would have cut from the demo's metered usage (every period row
invoiced at its metered units and rated amount), with planted findings on ``api_calls``: two under-bills, two
over-bills, a credit note, and a timing difference (one customer's invoice cut while its events were still
arriving: it bills the units of the events ingested up to then). Then ``meter reconcile``'s own code runs on it.
"""

from __future__ import annotations

import csv
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from meterflow.base.timeutil import ms_to_iso, now_ms

CENT = Decimal("0.01")
FIELDS = ["invoice_id", "tenant_id", "customer_id", "metric", "period_start", "quantity", "amount", "invoiced_at",
          "kind"]
Key = Tuple[str, str, str, int]


def _money(x: Decimal) -> str:
    return str(x.quantize(CENT, rounding=ROUND_HALF_UP))


def _qty(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _timing_cut(client: Any, db: str, keys: List[Key]) -> Optional[Tuple[Key, int]]:
    """A key whose api_call events were ingested at more than one time, and a cut between them."""
    for k in keys:
        times = [int(r[0]) for r in client.query(
            f"SELECT DISTINCT toUnixTimestamp64Milli(ingested_at) AS t FROM {db}.raw_events WHERE tenant_id = "
            f"{{t:String}} AND customer_id = {{c:String}} AND event_type = 'api_call' ORDER BY t",
            parameters={"t": k[0], "c": k[1]}).result_rows]
        if len(times) >= 2:
            return k, times[(len(times) - 1) // 2]
    return None


def write_demo_invoices(client: Any, db: str, cfg: Any, path: Path) -> Dict[str, List[Key]]:
    """Write the invoice file; returns the planted keys per class."""
    from meterflow.raw_leg import raw_units

    metered = {(t, c, m, int(ps)): float(v) for t, c, m, ps, v in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), value "
        f"FROM {db}.usage_by_period").result_rows}
    amounts = {(t, c, m, int(ps)): Decimal(a) for t, c, m, ps, a in client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start), toString(amount) "
        f"FROM {db}.usage_rated").result_rows}
    cut_at = now_ms()
    calls = sorted((k for k, v in metered.items() if k[2] == "api_calls" and v >= 20 and k in amounts),
                   key=lambda k: (-metered[k], k))
    planted: Dict[str, List[Key]] = {"timing": [], "under_bill": calls[1:3], "over_bill": calls[3:5],
                                     "credit": calls[5:6]}
    timing = _timing_cut(client, db, calls[:1] + calls[6:])
    at_cut: Dict[Key, float] = {}
    if timing is not None:
        tk, tcut = timing
        r = raw_units(client, db, cfg, tk[0], {tk: tcut}).get(tk)
        if r is not None and r.value_at_cut is not None and r.value_at_cut < metered[tk]:
            planted["timing"] = [tk]
            at_cut[tk] = r.value_at_cut
    rows = []
    for n, k in enumerate(sorted(metered)):
        value, amount = metered[k], amounts.get(k, Decimal(0))
        qty, invoiced_at = value, cut_at
        if k in planted["under_bill"]:
            qty = value - max(1, round(value * 0.1))
        elif k in planted["over_bill"]:
            qty = value + max(1, round(value * 0.05))
        elif k in at_cut:
            qty, invoiced_at = at_cut[k], timing[1]  # type: ignore[index]
        amt = amount * Decimal(repr(qty)) / Decimal(repr(value)) if value else amount
        base = {"tenant_id": k[0], "customer_id": k[1], "metric": k[2], "period_start": ms_to_iso(k[3]),
                "invoiced_at": ms_to_iso(invoiced_at)}
        rows.append({"invoice_id": f"INV-{n:05d}", **base, "quantity": _qty(qty), "amount": _money(amt),
                     "kind": "usage"})
        if k in planted["credit"]:
            cq = max(1, round(value * 0.05))
            rows.append({"invoice_id": f"CN-{n:05d}", **base, "quantity": str(cq),
                         "amount": _money(amount * cq / Decimal(repr(value))), "kind": "credit"})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return planted


def reconcile_demo(workdir: str) -> int:
    """The reconciliation step of ``meter demo --reconcile`` over the demo's working directory."""
    from meterflow.reconcile import accuracy, print_run, read_invoices, reconcile, totals
    from meterflow.reports import make_console
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect

    console = make_console()
    wd = Path(workdir)
    cfg_path = wd / "meterflow.toml"
    cfg = load_config(cfg_path)
    client, db = connect(cfg.clickhouse)
    inv_path = wd / "invoices.csv"
    planted = write_demo_invoices(client, db, cfg, inv_path)
    console.print(f"\n[bold]reconciliation[/]: the sample against a generated invoice file {inv_path}")
    console.print("planted on api_calls: " + ", ".join(f"{len(v)} {c}" for c, v in planted.items()))
    if not planted["timing"]:
        console.print("no timing difference planted: every customer's events were read in one batch (more --events)")
    run = reconcile(client, db, cfg, read_invoices(str(inv_path), cfg))
    print_run(run, totals(run.rows), accuracy(run.rows))
    console.print(f"again, or as JSON / CSV for finance tools: meter reconcile --config {cfg_path} --invoices "
                  f"{inv_path} [--json] [--out findings.csv] [--fail-on under_bill]")
    return 0
