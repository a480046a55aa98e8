"""The ``meter`` command line (contract section 3)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import List, Optional

from operators.errors import MeterError

EPILOG = """examples:
  meter demo                                        sample events -> pipeline -> embedded ClickHouse -> summary
  meter run --config meterflow.toml --input events.jsonl
  meter run --config meterflow.toml --recovery var/recovery      (Kafka mode when [kafka] is configured)
  meter usage --config meterflow.toml --customer cust_456 --by window
"""


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
    r.add_argument("--recovery", metavar="DIR",
                   help="Bytewax recovery directory (SQLite snapshots; created and initialised on first use). "
                   "A restarted run resumes from the last snapshot with no loss and no double count")
    r.add_argument("--stop-at-end", action="store_true",
                   help="Kafka mode: read up to the topic's end offsets at start-up, then stop (backfills)")
    r.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines on stderr (0 to disable; default 5)")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")

    d = sub.add_parser("demo", help="run a realistic sample through the embedded pipeline and show the result",
                       description="Generate sample usage (several tenants, skewed customers, duplicates, late and "
                       "bad events), run it through the dataflow into embedded ClickHouse under var/demo, and print "
                       "what was metered.")
    d.add_argument("--events", type=int, default=50_000, help="number of sample events (default 50000)")
    d.add_argument("--dir", default="var/demo", help="working directory for config, input and ClickHouse")
    d.add_argument("--seed", type=int, default=7)

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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "demo":
            from meterflow.demo import run_demo

            return run_demo(args.events, args.dir, args.seed)
        if args.command == "usage":
            from meterflow.reports import print_usage

            return print_usage(args)
    except MeterError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"meter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meter: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a worker error surfaces wrapped by Bytewax: show the most useful cause
        if args.debug:
            traceback.print_exc()
        chain, cur = [], exc
        while cur is not None and cur not in chain:
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        ours = next((e for e in chain if isinstance(e, MeterError)), None)
        if ours is not None:
            print(f"meter: error: {ours}", file=sys.stderr)
            return 2
        root = chain[-1]
        text = str(root).strip().splitlines()
        print(f"meter: error: {type(root).__name__}: {text[-1] if text else ''} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from meterflow.reports import print_run_summary
    from meterflow.runner import run_flow
    from schemas.config import load_config

    cfg = load_config(args.config)
    result = run_flow(cfg, args.input, workers=args.workers, recovery_dir=args.recovery,
                      stop_at_end=args.stop_at_end,
                      progress_out=sys.stderr if args.progress_every > 0 else None,
                      progress_every=args.progress_every or 5.0, entitlements=args.entitlements)
    if args.json:
        print(json.dumps({"counters": result.counters, "seconds": round(result.seconds, 3),
                          "events_per_second": round(result.events_per_second, 1)}))
    else:
        print_run_summary(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
