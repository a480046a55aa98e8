"""``meter review list|approve|reject`` (README: Overage review queue).

The queue is read from ClickHouse's ``overage_reviews`` view; a decision is written to ``review_decision_rows``
(durable, outside the flow: replays, restarts and later updates of the item never touch it) and, with
``[kafka]``, also published to ``kafka.review_decisions_topic`` (keyed by review_id) for tools and audit. With
embedded chDB the data path is open in one process at a time: while ``meter run`` writes it, these commands
are refused with the running process named; use a ClickHouse server (``clickhouse.dsn = "http://..."``) to
decide while the flow runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List

from meterflow.base.errors import MeterError
from meterflow.base.timeutil import ms_to_iso, now_ms
from meterflow.schemas.config import Config, load_config
from meterflow.schemas.reviews import ReviewDecision, decision_id

_VERB = {"approve": "approved", "reject": "rejected"}


def decide(cfg: Config, rid: str, action: str, by: str, note: str = "",
           clock: Callable[[], int] = now_ms) -> ReviewDecision:
    """Record ``action`` (approve | reject) on the review item ``rid`` at its current overage amount: one
    MeterError line when the item does not exist, is auto-applied, or already has a decision on that amount."""
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_reviews import decision_exists, insert_decision, query_reviews

    if not by.strip():
        raise MeterError("--by: name the person deciding (e.g. --by alice@example.com)")
    client, db = connect(cfg.clickhouse)
    rows = query_reviews(client, db, review_id=rid)
    if not rows:
        raise MeterError(f"no review item {rid!r} in {db}.overage_reviews: `meter review list --config "
                         f"{cfg.source_path}` shows the queue")
    item = rows[0]
    amount = item["overage_amount"]
    if item["route"] == "auto_apply":
        raise MeterError(f"review item {rid} ({_money(amount)} {item['currency']}) is on the auto_apply route: it "
                         "is applied without a decision")
    did = decision_id(rid, amount)
    earlier = decision_exists(client, db, did)
    if earlier is not None:
        raise MeterError(f"review item {rid} was already {earlier['status']} by {earlier['decided_by']} at "
                         f"{ms_to_iso(earlier['at'])} on its current overage amount {_money(amount)} "
                         f"{item['currency']}: a new decision is possible once the amount changes")
    d = ReviewDecision(decision_id=did, review_id=rid, status=_VERB[action], decided_by=by, decided_at=clock(),
                       note=note, overage_amount=amount)
    insert_decision(client, db, d)
    if cfg.kafka is not None:
        from meterflow.schemas.reviews import REVIEW_ENCODER
        from meterflow.sinks.kafka import publish_entitlements as publish

        k = cfg.kafka
        publish(k.bootstrap_servers, k.review_decisions_topic, [(rid.encode(), REVIEW_ENCODER.encode(d))],
                k.client_config)
    return d


def _money(d: Any) -> str:
    return format(d.normalize(), "f")


def review_cmd(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.review_command == "list":
        return _list(cfg, args)
    d = decide(cfg, args.review_id, args.review_command, args.by, args.note or "")
    print(f"{d.status} review {d.review_id} on overage {_money(d.overage_amount)} by {d.decided_by} at "
          f"{ms_to_iso(d.decided_at)}")
    return 0


def _list(cfg: Config, args: argparse.Namespace) -> int:
    from rich.table import Table

    from meterflow.reports import make_console
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_reviews import query_reviews

    client, db = connect(cfg.clickhouse)
    rows: List[Dict[str, Any]] = query_reviews(client, db, args.route, args.status)
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps({**r, "overage_amount": _money(r["overage_amount"])}) + "\n")
        return 0
    console = make_console()
    if not rows:
        console.print("no review items match (has `meter run` rated an overage yet?)")
        return 0
    t = Table(title=f"overage review queue ({len(rows)})", title_justify="left")
    for c in ("review_id", "account", "tenant/customer", "metric", "period (UTC)", "usage / included", "overage",
              "contract", "route", "status", "final", "decided", "note"):
        t.add_column(c, justify="right" if c in ("usage / included", "overage") else "left")
    for r in rows:
        inc = r["included"]
        decided = f"{r['decided_by']} {r['decided_at'][:16].replace('T', ' ')}" if r["decided_at"] else "-"
        t.add_row(r["review_id"], r["account_name"] or "-", f"{r['tenant_id']}/{r['customer_id']}", r["metric"],
                  r["period_start"][:10], f"{_num(r['usage'])} / {'-' if inc is None else _num(inc)}",
                  f"{_money(r['overage_amount'])} {r['currency']}", r["contract"], r["route"], r["status"],
                  "yes" if r["final"] else "no", decided, r["note"] or "")
    console.print(t)
    return 0


def _num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.4f}"


def add_parser(sub: Any) -> None:
    from meterflow.schemas.reviews import ROUTES, STATUSES

    rv = sub.add_parser("review", help="the overage review queue: list, approve, reject",
                        description="The overage review queue (README: Overage review queue), read from "
                        "ClickHouse's overage_reviews view. A decision records who, when, the note and the overage "
                        "amount it was made on; when the amount changes later, the item is pending again.")
    rsub = rv.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    ls = rsub.add_parser("list", help="the review items, largest overage first")
    ls.add_argument("--config", required=True, metavar="FILE")
    ls.add_argument("--route", choices=ROUTES, help="only this route")
    ls.add_argument("--status", choices=STATUSES, help="only this status")
    ls.add_argument("--json", action="store_true", help="JSON lines (the overage_reviews columns)")
    for action in ("approve", "reject"):
        p = rsub.add_parser(action, help=f"{action} a review item at its current overage amount")
        p.add_argument("review_id", metavar="REVIEW_ID")
        p.add_argument("--config", required=True, metavar="FILE")
        p.add_argument("--by", required=True, metavar="NAME", help="who decides")
        p.add_argument("--note", metavar="TEXT", help="why (kept with the decision)")
