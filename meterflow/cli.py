"""The ``meter`` command line (README: Running it)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
import textwrap
import traceback
from pathlib import Path
from typing import List, Optional, Tuple

from meterflow.base.errors import MeterError

EPILOG = """examples:
  meter demo                                        sample events -> pipeline -> embedded ClickHouse -> summary
  meter run --config meterflow.toml --input events.jsonl
  meter run --config meterflow.toml --recovery var/recovery      (Kafka mode when [kafka] is configured)
  meter usage --config meterflow.toml --customer cust_456 --by window
  meter charges --config meterflow.toml --period-start 2026-11-01T00:00:00Z     (usage in money, per currency)
  meter alerts --config meterflow.toml --customer cust_456 --since 2026-11-01T00:00:00Z
  meter alerts --config meterflow.toml --type blocked --json       (JSON lines, every field)
  meter entitlements publish --config meterflow.toml --dry-run      (what would be published)
  meter entitlements publish --config meterflow.toml --customer acme/cust_456
  meter entitlements publish --config meterflow.toml --cancel acme/cust_old
  meter gateway sync --config meterflow.toml --recovery var/recovery    (rewrite every gateway hash in Redis)
  meter review list --config meterflow.toml --status pending
  meter review approve REVIEW_ID --config meterflow.toml --by alice --note "agreed with the customer"
"""

CHARGES_DESCRIPTION = (
    "Print the usage_rated view of ClickHouse (embedded chDB or a server): one row per customer, metric and "
    "billing period whose subscription gives the metric an entitlement or a price, rated under the customer's "
    "current plan and custom contract. charge = the price card applied to the period's usage (or overage_rate "
    "above included without a card); overage amount = charge(usage) - charge(min(usage, included)); amount = "
    "max(minimum, charge), the figure to invoice; custom = a custom contract sets the metric's price, rate or "
    "included; final = period_end + late_grace is before the flow's watermark, so no event can change the row "
    "any more (open rows still grow). Amounts are exact decimals (Decimal(38, 9)), never rounded; totals are "
    "per currency.")
CHARGES_EPILOG = """examples:
  meter charges --config meterflow.toml
  meter charges --config meterflow.toml --customer cust_456 --period-start 2026-11-01T00:00:00Z
  meter charges --config meterflow.toml --tenant acme --json     (JSON lines: 102.00, not 101.99999999999999)
"""

PUBLISH_DESCRIPTION = (
    "Publish each [[subscriptions]] entry of the config (or only those chosen with --customer) as an entitlement "
    "record to kafka.entitlements_topic, keyed tenant|customer, and wait until the broker acknowledges every "
    "record. The running dataflow applies each record as the customer's complete current subscription (plan, "
    "period, anchor, overrides, wallet). --cancel ends a subscription: the customer is then metered without "
    "entitlements. Needs [kafka] in the config.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meter", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="meterflow: real-time usage metering and entitlement enforcement on Bytewax.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run the metering dataflow",
                       description="Run the metering dataflow. Without [kafka] in the config it reads JSONL from "
                       "--input and stops at its end; with [kafka] it consumes the events topic until stopped "
                       "(Ctrl-C), or up to the current end with --stop-at-end.")
    r.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (see README)")
    r.add_argument("--input", action="append", default=[], metavar="FILE|-",
                   help="JSONL events file, or - for standard input (repeatable); overrides Kafka input")
    r.add_argument("--entitlements", action="append", default=[], metavar="FILE",
                   help="JSONL file of entitlement changes (the usage.entitlements record format), applied "
                   "alongside the events; in Kafka mode the entitlements topic is read instead")
    r.add_argument("--workers", type=int, default=1, metavar="N", help="Bytewax workers in this process (default 1)")
    r.add_argument("--addresses", metavar="HOST:PORT;...",
                   help="run as one process of a Bytewax cluster: every process's address, separated by ';' (the "
                   "same list for each process; with --process-id). Process 0 writes embedded chDB and the "
                   "alert file (README: Running a cluster)")
    r.add_argument("--process-id", type=int, metavar="N", help="this process's index in --addresses (0 based)")
    r.add_argument("--recovery", metavar="DIR",
                   help="Bytewax recovery directory (SQLite snapshots; created and initialised on first use). "
                   "A restarted run resumes from the last snapshot with no loss and no double count. In a cluster, "
                   "give every process the same DIR (one machine) and restart them all with the same shape")
    r.add_argument("--stop-at-end", action="store_true",
                   help="Kafka mode: read up to the topic's end offsets at start-up, then stop (backfills)")
    r.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines on stderr (0 to disable; default 5)")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")
    r.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve the flow's Prometheus metrics on http://0.0.0.0:N/metrics while it runs")

    sv = sub.add_parser("serve", help="the HTTP service: ingest, entitlement and usage APIs, metrics, console",
                        description="Run the HTTP service (README: HTTP service): POST /v1/events to the events "
                        "topic, GET /v1/entitlements/..., GET /v1/usage/..., /healthz, /metrics and the console "
                        "at /. Needs [kafka]; [redis] for the gateway state; [server] for its settings.")
    sv.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (see README)")
    sv.add_argument("--host", help="address to listen on (default [server] host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port to listen on (default [server] port, 8080)")

    d = sub.add_parser("demo", help="run a realistic sample through the embedded pipeline and show the result",
                       description="Generate sample usage (several tenants, skewed customers, duplicates, late and "
                       "bad events), run it through the dataflow into embedded ClickHouse under var/demo, and print "
                       "what was metered.")
    d.add_argument("--events", type=int, default=50_000, help="number of sample events (default 50000)")
    d.add_argument("--dir", default="var/demo", help="working directory for config, input and ClickHouse")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--reconcile", action="store_true", help="then reconcile the sample against a generated invoice "
                   "file with planted under-bills, over-bills, a credit and a timing difference (meter reconcile)")

    u = sub.add_parser("usage", help="exact usage from ClickHouse",
                       description="Print exact usage from the ClickHouse views (embedded chDB or a server).")
    u.add_argument("--config", required=True, metavar="FILE")
    u.add_argument("--tenant")
    u.add_argument("--customer")
    u.add_argument("--metric")
    u.add_argument("--by", choices=["window", "period"], default="period",
                   help="billing-period totals (default) or rollup windows")
    u.add_argument("--limit", type=int, default=200, help="rows to print (default 200; --json prints all)")
    u.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    c = sub.add_parser("charges", help="usage in money: the rated rows, from ClickHouse",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(CHARGES_DESCRIPTION, 100), epilog=CHARGES_EPILOG)
    c.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (its [clickhouse] is read)")
    c.add_argument("--tenant", help="only this tenant")
    c.add_argument("--customer", help="only this customer id")
    c.add_argument("--period-start", metavar="ISO", help="only the billing periods that start at this RFC 3339 "
                   "time, e.g. 2026-11-01T00:00:00Z")
    c.add_argument("--metric", help="only this metric code")
    c.add_argument("--limit", type=int, default=200,
                   help="rows to print (default 200; the totals count every row; --json prints all)")
    c.add_argument("--json", action="store_true", help="JSON lines, one per rated row with every column of "
                   "usage_rated; amounts are JSON numbers with their exact decimal digits")

    from meterflow.schemas.alerts import ALERT_TYPES

    a = sub.add_parser("alerts", help="alerts fired, from ClickHouse",
                       description="Print the alerts the dataflow fired (the alerts_log view of ClickHouse, embedded "
                       "chDB or a server), ordered by detection time. latency ms = detected_at - event_time, the "
                       "breach-to-alert latency end to end.")
    a.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (its [clickhouse] is read)")
    a.add_argument("--tenant", help="only this tenant")
    a.add_argument("--customer", help="only this customer id")
    a.add_argument("--metric", help="only this metric code")
    a.add_argument("--type", choices=ALERT_TYPES, help="only this alert type")
    a.add_argument("--since", metavar="ISO", help="only alerts detected at or after this RFC 3339 time, "
                   "e.g. 2026-11-01T00:00:00Z")
    a.add_argument("--limit", type=int, metavar="N",
                   help="print the latest N alerts (default 200 for the table; --json prints all unless given)")
    a.add_argument("--json", action="store_true",
                   help="JSON lines with every field (the contract's alert record plus latency_ms)")

    rc = sub.add_parser("reconcile", help="raw events vs metered usage vs invoice lines, per key",
                        description="Three-way reconciliation (README: Reconciliation). Exit 0 when the run "
                                    "completed; with --fail-on, 1 when a key falls in one of those classes.")
    rc.add_argument("--config", required=True, help="the TOML configuration file")
    rc.add_argument("--invoices", required=True, help="invoice lines: CSV with a header, or JSONL")
    rc.add_argument("--tenant", help="only this tenant")
    rc.add_argument("--period-start", help="only keys of this period start (RFC 3339)")
    rc.add_argument("--entitlements", metavar="FILE", help="the entitlements changelog JSONL that meter run read "
                    "(--entitlements): its records' published_at place subscription changes in periods; without "
                    "it, kafka.entitlements_topic is read from the beginning when [kafka] is configured")
    rc.add_argument("--json", action="store_true", help="one JSON document: the run and its rows")
    rc.add_argument("--out", help="also write the rows to this CSV file")
    rc.add_argument("--fail-on", help="comma-separated classes that make the exit status 1")
    e = sub.add_parser("entitlements", help="manage subscriptions on the entitlements topic",
                       description="Manage the usage.entitlements changelog topic (compacted, keyed "
                       "tenant|customer) that a running Kafka-mode dataflow follows for subscription changes.")
    esub = e.add_subparsers(dest="entitlements_command", metavar="ACTION", required=True)
    ep = esub.add_parser("publish", help="publish subscriptions from the config file",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description=textwrap.fill(PUBLISH_DESCRIPTION, 100),
                         epilog="examples:\n"
                         "  meter entitlements publish --config meterflow.toml --dry-run\n"
                         "  meter entitlements publish --config meterflow.toml --customer acme/cust_456\n"
                         "  meter entitlements publish --config meterflow.toml --cancel acme/cust_old\n")
    ep.add_argument("--config", required=True, metavar="FILE", help="TOML configuration with [kafka] and the "
                    "[[subscriptions]] to publish")
    ep.add_argument("--customer", action="append", default=[], metavar="TENANT/CUSTOMER",
                    help="publish only this customer's subscription (repeatable; default: every subscription, "
                    "unless only --cancel is given)")
    ep.add_argument("--cancel", action="append", default=[], metavar="TENANT/CUSTOMER",
                    help="publish a cancellation for this customer (repeatable)")
    ep.add_argument("--dry-run", action="store_true", help="show what would be published; send nothing")

    g = sub.add_parser("gateway", help="live gateway state in Redis",
                       description="Manage the live gateway state in Redis (README: Outputs).")
    gsub = g.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    gs = gsub.add_parser("sync", help="write every customer's gateway state from a recovery directory",
                         description="Rebuild each customer's meter state from the snapshots in a recovery "
                         "directory and write the gateway hash of every metric's current period (and wallet "
                         "hashes) to [redis], with the same absolute writes as the flow: idempotent. Use it "
                         "while the flow is stopped, e.g. after a run ended with Redis down or after Redis "
                         "restarted empty (a resumed meter run --recovery DIR does the same on start).")
    gs.add_argument("--config", required=True, metavar="FILE", help="TOML configuration with [redis]")
    gs.add_argument("--recovery", required=True, metavar="DIR", help="the recovery directory of meter run")

    from meterflow.review_cmd import add_parser as add_review_parser

    add_review_parser(sub)

    sub.add_parser("bench", add_help=False, help="benchmarks against the peers (same as python -m benchmarks; "
                   "meter bench --help for its options)")
    _debug_everywhere(p)
    return p


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` is accepted after any subcommand too (``meter run --debug ...``), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "bench" and "--debug" not in sub._option_string_actions:
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                     help="show the full traceback (and Bytewax's Rust panic report) on errors")
                _debug_everywhere(sub)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    quiet = None
    if not args.debug:  # a fatal error is one line; --debug shows the Rust panic report and the traceback
        from meterflow import panics

        quiet = panics.start()
        _quiet_driver_warnings()
    try:
        rc = _dispatch(args)
    except BaseException as exc:
        if quiet is not None:
            quiet.stop(failed=True)
        if isinstance(exc, SystemExit):
            raise
        if args.debug:
            traceback.print_exc()
        line, rc = failure_line(exc, getattr(args, "recovery", None), debug=args.debug)
        print(line, file=sys.stderr)
        return rc
    if quiet is not None:
        quiet.stop(failed=False)
    return rc


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "demo":
        from meterflow.demo import run_demo

        code = run_demo(args.events, args.dir, args.seed)
        if code == 0 and args.reconcile:
            from meterflow.demo_reconcile import reconcile_demo

            code = reconcile_demo(args.dir)
        return code
    if args.command == "usage":
        from meterflow.reports import print_usage

        return print_usage(args)
    if args.command == "charges":
        from meterflow.reports import print_charges

        return print_charges(args)
    if args.command == "alerts":
        from meterflow.reports import print_alerts

        return print_alerts(args)
    if args.command == "reconcile":
        from meterflow.reconcile import reconcile_cmd

        return reconcile_cmd(args)
    if args.command == "entitlements":
        from meterflow.reports import publish_entitlements_cmd

        return publish_entitlements_cmd(args)
    if args.command == "serve":
        from meterflow.schemas.config import load_config
        from meterflow.service import serve

        return serve(load_config(args.config), args.host, args.port)
    if args.command == "review":
        from meterflow.review_cmd import review_cmd

        return review_cmd(args)
    if args.command == "gateway":
        from meterflow.gateway_sync import sync_cmd

        return sync_cmd(args)
    return 0


_RUST_LOCATION = re.compile(r"^\(src/[\w/]+\.rs:\d+:\d+\)\s*")
_BYTEWAX_STEP = re.compile(r' in step "([^"]+)"')


def failure_line(exc: BaseException, recovery_dir: Optional[str] = None, debug: bool = False) -> Tuple[str, int]:
    """The one line (and exit status) that reports ``exc`` to the operator.

    Bytewax wraps an exception raised in a step in its own errors (``__cause__``); the line reports the
    first MeterError of that chain (its message says what to do), a full recovery store as the directory
    to free, and anything else as the innermost exception's type and last message line."""
    chain: List[BaseException] = []
    cur: Optional[BaseException] = exc
    while cur is not None and all(cur is not e for e in chain):
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(e, KeyboardInterrupt) for e in chain):  # Ctrl-C, possibly raised inside a worker
        return "meter: interrupted", 130
    ours = next((e for e in chain if isinstance(e, MeterError)), None)
    if ours is not None:
        return f"meter: error: {ours}", 2
    if any("DiskFull" in str(e) or "database or disk is full" in str(e) for e in chain):
        where = f"recovery directory {Path(recovery_dir).resolve()}" if recovery_dir else "the recovery directory"
        return (f"meter: error: {where} is full (SQLite: database or disk is full while writing a snapshot): free "
                "space on its file system, or move the directory with its files to a disk with room and pass that "
                "path to --recovery; then run the same command again to resume from the last complete snapshot"), 1
    nospace = next((e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if nospace is not None:
        return (f"meter: error: no space left on the device of {nospace.filename or 'an output file'}: free space "
                "there, then run the same command again"), 1
    root = chain[-1]
    text = _RUST_LOCATION.sub("", str(root).strip()).splitlines()
    step = next((m.group(1) for e in chain for m in [_BYTEWAX_STEP.search(str(e))] if m), None)
    where = f" in step {step}" if step else ""
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return f"meter: error: {type(root).__name__}: {text[-1] if text else ''}{where}{hint}", 1


class _DropRaisedWarning(logging.Filter):
    """clickhouse-connect logs this warning just before raising the error it describes (reported anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Unexpected Http Driver Exception"


def _quiet_driver_warnings() -> None:
    logging.getLogger("clickhouse_connect.driver._backend.http_sync").addFilter(_DropRaisedWarning())


def _cmd_run(args: argparse.Namespace) -> int:
    from meterflow.reports import print_run_summary
    from meterflow.runner import cluster_addresses, run_flow
    from meterflow.schemas.config import load_config

    addresses = cluster_addresses(args.addresses, args.process_id)
    cfg = load_config(args.config)
    if args.metrics_port is not None:
        from meterflow.sinks.metrics import start_metrics_server

        start_metrics_server(args.metrics_port)
    result = run_flow(cfg, args.input, workers=args.workers, recovery_dir=args.recovery,
                      stop_at_end=args.stop_at_end,
                      progress_out=sys.stderr if args.progress_every > 0 else None,
                      progress_every=args.progress_every or 5.0, entitlements=args.entitlements,
                      addresses=addresses, process_id=args.process_id or 0)
    if args.json:
        from meterflow.base.stats import identity
        from meterflow.operators.native import core_in_use

        balanced, text = identity(result.counters)
        print(json.dumps({"counters": result.counters, "seconds": round(result.seconds, 3),
                          "events_per_second": round(result.events_per_second, 1),
                          "identity": text, "balanced": balanced, "core": core_in_use(cfg)}))
    else:
        print_run_summary(result)
        if cfg.pipeline.core == "native":  # what runs where (README: Native core)
            from meterflow.operators.native import core_in_use

            print(f"core: {core_in_use(cfg)}")
    if result.interrupted:
        print("meter: interrupted", file=sys.stderr)
        return 130
    return 0


def _cmd_bench(argv: List[str]) -> int:
    """``meter bench ARGS`` runs ``python -m benchmarks ARGS`` in the source checkout this meterflow runs from.

    The harness is not part of the installed package: it runs as its own process from the checkout, so
    the CLI neither imports it nor edits ``sys.path``.
    """
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        print("meter: error: meter bench needs a source checkout (benchmarks/ next to meterflow/): clone the "
              "repository, run ./dev setup, then ./.venv/bin/meter bench or python -m benchmarks there",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=root)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
