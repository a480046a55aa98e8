"""What a gateway pays per call: QuotaGate.check, check_many and wallet holds on a real redis-server.

Starts Debian's ``redis-server`` on a free loopback port (meterflow.devservices.RedisServer), fills
``--keys`` gateway hashes and ``--wallets`` wallets through the real GatewayStateSink (its throughput is
reported too), then times, single-threaded:

* ``PING`` and a bare redis-py ``HGETALL``: the floor any Redis read pays on this machine;
* ``check`` of a random key: latency p50/p99/max in µs and calls/s;
* ``check_many`` of 10 random keys (one pipelined round trip);
* ``hold`` + ``release`` pairs on random wallets (two Lua scripts).

Loopback hides network latency: with Redis on another host, add its round trip to every figure.

    python -m benchmarks.gate_check --keys 100000 --calls 50000
    python -m benchmarks.gate_check --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from typing import Callable, Dict, List

from meterflow.base.stats import FlowStats
from meterflow.devservices import RedisServer
from meterflow.gate import QuotaGate
from meterflow.schemas.config import RedisConfig
from meterflow.schemas.gateway import GatewayState, WalletState
from meterflow.schemas.records import Emission
from meterflow.sinks.redis import GatewayStateSink

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z
PERIOD_END = 1_796_083_200_000
STATES = ("ok", "ok", "ok", "approaching", "over", "blocked")


def fill(url: str, keys: int, wallets: int, batch: int = 1000) -> Dict[str, float]:
    """Write the hashes through the sink, ``batch`` states per write_batch; returns keys/s."""
    rnd = random.Random(7)
    part = GatewayStateSink(RedisConfig(url=url), stats=FlowStats()).build("bench", 0, 1)
    states: List[Emission] = []
    for i in range(keys):
        used = float(rnd.randint(0, 1200))
        states.append(Emission(gateway=[GatewayState(
            tenant_id="bench", customer_id=f"c{i // 4}", metric=f"m{i % 4}", included=1000.0, used=used,
            remaining=max(0.0, 1000.0 - used), pct=used / 10, state=rnd.choice(STATES), period_start=T0,
            period_end=PERIOD_END, updated_at=T0 + i, plan="pro")]))
    for i in range(wallets):
        states.append(Emission(wallets=[WalletState(
            tenant_id="bench", customer_id=f"w{i}", balance=1e9, spent=0.0, remaining=1e9, state="ok",
            on_exhausted="block", updated_at=T0)]))
    t = time.perf_counter()
    for i in range(0, len(states), batch):
        part.write_batch(states[i:i + batch])
    elapsed = time.perf_counter() - t
    part.close()
    return {"keys": float(len(states)), "keys_per_s": len(states) / elapsed}


def timed(fn: Callable[[int], object], n: int, per_call: int = 1) -> Dict[str, float]:
    """Per-call latency percentiles (µs) and throughput of ``fn(i)`` for i in range(n)."""
    for i in range(min(n, 500)):  # warm-up: connections, script cache
        fn(i)
    lat: List[int] = []
    clock = time.perf_counter_ns
    t = time.perf_counter()
    for i in range(n):
        s = clock()
        fn(i)
        lat.append(clock() - s)
    elapsed = time.perf_counter() - t
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return {"n": float(n), "p50_us": lat[len(lat) // 2] / 1e3, "p99_us": p99 / 1e3,
            "max_us": lat[-1] / 1e3, "per_s": n / elapsed, "items_per_s": n * per_call / elapsed}


def run(keys: int, calls: int, wallets: int) -> Dict[str, object]:
    with RedisServer() as server:
        filled = fill(server.url, keys, wallets)
        gate = QuotaGate(server.url, timeout=2.0)
        rnd = random.Random(11)
        targets = [("bench", f"c{k // 4}", f"m{k % 4}") for k in (rnd.randrange(keys) for _ in range(calls))]
        many = [[targets[(i * 10 + j) % calls] for j in range(10)] for i in range(max(1, calls // 10))]
        wl = [f"w{rnd.randrange(wallets)}" for _ in range(calls)]
        raw = gate.client
        results = {
            "ping": timed(lambda i: raw.ping(), calls),
            "hgetall": timed(lambda i: raw.hgetall("meter:%s:%s:%s" % targets[i]), calls),
            "check": timed(lambda i: gate.check(*targets[i]), calls),
            "check_many_10": timed(lambda i: gate.check_many(many[i]), len(many), per_call=10),
            "hold_release": timed(lambda i: gate.release("bench", wl[i], gate.hold("bench", wl[i], 1.0).hold_id),
                                  calls // 2),
        }
        blocked = sum(not gate.check(*t).allowed for t in targets[:1000])
        info = raw.info("server")
        gate.close()
    return {"redis_version": info.get("redis_version"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "keys": keys, "wallets": wallets, "fill": filled,
            "blocked_share_of_1000_checks": blocked / 1000, "results": results}


def print_table(report: Dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = {"ping": "PING (floor)", "hgetall": "redis-py HGETALL (floor)", "check": "QuotaGate.check",
              "check_many_10": "QuotaGate.check_many(10 keys)", "hold_release": "hold + release (pair)"}
    table = Table(title=f"QuotaGate on redis-server {report['redis_version']} (loopback, 1 thread, "
                        f"{report['keys']:,} keys, Python {report['python']}, {report['cpus']} CPUs)")
    for col in ("operation", "p50 µs", "p99 µs", "max µs", "calls/s", "keys/s"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for name, r in report["results"].items():  # type: ignore[union-attr]
        table.add_row(labels[name], f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['max_us']:.0f}",
                      f"{r['per_s']:,.0f}", f"{r['items_per_s']:,.0f}" if name.startswith("check") else "")
    console = Console()
    console.print(table)
    fill_: Dict[str, float] = report["fill"]  # type: ignore[assignment]
    console.print(f"GatewayStateSink fill: {fill_['keys']:,.0f} keys at {fill_['keys_per_s']:,.0f} keys/s "
                  "(1,000 states per write_batch, one round trip each)")


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gate_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000, help="gateway hashes to fill (default 100000)")
    ap.add_argument("--wallets", type=int, default=1_000, help="wallets for the hold benchmark (default 1000)")
    ap.add_argument("--calls", type=int, default=50_000, help="timed check calls (default 50000; check_many "
                                                              "makes calls/10, hold+release calls/2)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = ap.parse_args(argv)
    if min(args.keys, args.wallets, args.calls) < 10:
        ap.error("--keys, --wallets and --calls must be at least 10")
    report = run(args.keys, args.calls, args.wallets)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
