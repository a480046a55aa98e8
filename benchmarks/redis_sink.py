"""What the live gateway state costs per state: ``write_batch`` of ``meterflow.sinks.redis.GatewayStateSink``
against a real ``redis-server`` (``meterflow.devservices.RedisServer``, started and stopped here), with redis-py's
default wire code (hiredis's packer and reply parser when the ``hiredis`` package is installed, as ``./dev setup``
installs it) and, side by side, redis-py's pure-Python packer and parser (hiredis hidden from that process).

    python -m benchmarks.redis_sink
    python -m benchmarks.redis_sink --states 200 --batches 200 --repeat 7 --json

Each batch is ``--states`` gateway states of distinct customers (one Emission per 50, as a native shard's
batches give them); a round writes ``--batches`` batches, each one pipelined round trip, in a process of
its own after 10 warm-up batches. The implementations take turns round by round, ``--repeat`` rounds each.
Printed per state (best and median round): CPU of the calling thread (``time.thread_time``: what the flow's
thread pays, Redis answering in its own process) and wall time (which includes Redis's work and the round
trip). Numbers depend on the machine and on what else runs on it; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from meterflow.schemas.config import RedisConfig
from meterflow.schemas.gateway import GatewayState
from meterflow.schemas.records import Emission
from meterflow.sinks.redis import GatewayStateSink

ROOT = Path(__file__).resolve().parent.parent
T = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def batches(n_batches: int, states: int) -> List[List[Emission]]:
    out = []
    for b in range(n_batches):
        gs = [GatewayState(tenant_id=f"tenant-{i % 3}", customer_id=f"cust-{i:05d}", metric="api_calls",
                           included=100000.0, used=float(b * 37 + i), remaining=100000.0 - (b * 37 + i),
                           pct=round((b * 37 + i) / 1000, 4), state="ok", period_start=T,
                           period_end=T + 720 * 3_600_000, updated_at=T + b, plan="pro") for i in range(states)]
        out.append([Emission(gateway=gs[i:i + 50]) for i in range(0, states, 50)])
    return out


def _child(url: str, states: int, n_batches: int) -> Dict[str, float]:
    """One measured round in this process (after a warm-up of 10 batches)."""
    work = batches(n_batches, states)
    part = GatewayStateSink(RedisConfig(url=url)).build("redis_gateway", 0, 1)
    for b in work[:10]:
        part.write_batch(b)
    c0, w0 = time.thread_time(), time.perf_counter()
    for b in work:
        part.write_batch(b)
    out = {"thread_s": time.thread_time() - c0, "wall_s": time.perf_counter() - w0}
    part.close()
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.redis_sink", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", type=int, default=200, help="gateway states per batch (default 200)")
    ap.add_argument("--batches", type=int, default=200, help="batches per round (default 200)")
    ap.add_argument("--repeat", type=int, default=5, help="measured rounds per implementation (default 5)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)  # one round against URL, as JSON
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.states, args.batches)))
        return 0
    from meterflow.devservices import RedisServer

    try:
        import hiredis  # noqa: F401

        have_hiredis = True
    except ImportError:
        have_hiredis = False
    names = ["hiredis", "pure-python"] if have_hiredis else ["pure-python"]
    n = args.batches * args.states
    server = RedisServer().start()
    rounds: Dict[str, List[Dict[str, float]]] = {k: [] for k in names}
    try:
        for r in range(args.repeat):  # the implementations take turns, one process per round
            for name in names:
                # (no hiredis: redis-py falls back to its pure-Python packer and parser)
                pre = "import sys; sys.modules['hiredis'] = None; " if name == "pure-python" else ""
                code = (pre + "import sys; from benchmarks.redis_sink import main; "
                        f"sys.exit(main(['--child', {server.url!r}, '--states', '{args.states}', "
                        f"'--batches', '{args.batches}']))")
                out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                                     check=True)
                rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.repeat}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    res: Dict[str, Any] = {"states_per_batch": args.states, "batches": args.batches, "repeat": args.repeat,
                           "per_state_ns": {}}
    for name in names:
        th = [x["thread_s"] * 1e9 / n for x in rounds[name]]
        wall = [x["wall_s"] * 1e9 / n for x in rounds[name]]
        res["per_state_ns"][name] = {"thread_best": min(th), "thread_median": statistics.median(th),
                                     "wall_best": min(wall), "wall_median": statistics.median(wall)}
    if args.json:
        print(json.dumps(res))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"GatewayStateSink.write_batch per gateway state ({args.states} states per batch, "
                    f"{args.batches} batches, {args.repeat} rounds)")
    for col in ("redis-py wire code", "thread CPU ns best", "median", "wall ns best", "median"):
        t.add_column(col, justify="left" if col == "redis-py wire code" else "right")
    for name in names:
        r = res["per_state_ns"][name]
        t.add_row("hiredis packer and parser" if name == "hiredis" else "pure Python (no hiredis)",
                  f"{r['thread_best']:,.0f}", f"{r['thread_median']:,.0f}", f"{r['wall_best']:,.0f}",
                  f"{r['wall_median']:,.0f}")
    Console().print(t)
    if len(names) == 2:
        a, b = res["per_state_ns"]["hiredis"], res["per_state_ns"]["pure-python"]
        print(f"hiredis / pure Python: thread CPU {a['thread_median'] / b['thread_median']:.2f}x, "
              f"wall {a['wall_median'] / b['wall_median']:.2f}x (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
