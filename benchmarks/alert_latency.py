"""Breach-to-alert latency through the real pipeline: event produced to Kafka -> alert consumed.

Starts a real Kafka broker (and Redis) with the project's dev-service scripts, runs ``meter run`` on
them as a separate process, produces usage events at a fixed rate whose customers cross their
thresholds throughout the run, and consumes the alerts topic. Each event's ``timestamp`` is the
wall-clock time it was produced, so for every ``threshold_crossed``/``blocked`` alert:

* end to end  = alert consumed - event produced  (what an account manager's system sees),
* in the flow = ``detected_at - ingested_at``     (mediate -> meter -> evaluate),
* to the flow = ``ingested_at - event_time``      (broker + source poll),
* from the flow = alert consumed - ``detected_at`` (the rest of the flow's pass, the alert sink, broker, consumer).

It also reads the Redis gateway hash right after each ``blocked`` alert arrives and reports how
often the gateway state was already ``blocked`` (the gateway state lag is bounded by the same batch).

    python -m benchmarks.alert_latency --rate 5000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import orjson

from meterflow.base.timeutil import parse_rfc3339_ms
from meterflow.devservices import KafkaBroker, RedisServer

RESULTS = Path(__file__).resolve().parent / "results"


def _config(bootstrap: str, redis_url: str, customers: int, included: List[int], chdb: str) -> str:
    lines = [
        "[pipeline]", 'rollup_window = "1m"', 'flush_interval = "1s"', 'epoch_interval = "2s"', "",
        '[[tenants]]', 'id = "acme"', "",
        '[[metrics]]', 'code = "api_calls"', 'event_type = "api_call"', 'aggregation = "count"', "",
    ]
    for i in range(customers):
        lines += ["[[plans]]", f'code = "p{i}"', "[plans.entitlements.api_calls]", f"included = {included[i]}",
                  'thresholds = [75, 90, 100]', 'enforcement = "hard"', ""]
    for i in range(customers):
        lines += ["[[subscriptions]]", 'tenant_id = "acme"', f'customer_id = "c{i}"', f'plan = "p{i}"',
                  'anchor = "2026-01-01T00:00:00Z"', ""]
    lines += ["[kafka]", f'bootstrap_servers = "{bootstrap}"', 'batch_size = 2000', "",
              "[clickhouse]", f'dsn = "chdb://{chdb}"', "", "[redis]", f'url = "{redis_url}"', ""]
    return "\n".join(lines)


def _pcts(xs: List[float]) -> Dict[str, float]:
    if not xs:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    s = sorted(xs)
    return {"n": len(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(len(s) * 0.99))], "max": s[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000, help="events per second produced (default 5000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to produce (default 20)")
    ap.add_argument("--customers", type=int, default=200, help="customers crossing thresholds (default 200)")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of the events topic (default 2)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    import redis
    from confluent_kafka import Consumer, Producer
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    per_customer = args.rate * args.seconds / args.customers
    # Customers' quotas spread over the run so that crossings happen all the time, not in one burst.
    included = [max(4, int(per_customer * (0.1 + 0.8 * i / max(1, args.customers - 1)))) for i in range(args.customers)]
    work = Path(tempfile.mkdtemp(prefix="meterflow-alert-bench-"))
    with KafkaBroker() as kafka, RedisServer() as rsrv:
        for topic, parts in (("usage.events", args.partitions), ("usage.alerts", 1), ("usage.entitlements", 1)):
            kafka.create_topic(topic, partitions=parts)
        cfg = work / "bench.toml"
        cfg.write_text(_config(kafka.bootstrap, rsrv.url, args.customers, included, str(work / "ch")))
        log = open(work / "flow.log", "wb")
        flow = subprocess.Popen([sys.executable, "-m", "meterflow.cli", "run", "--config", str(cfg),
                                 "--progress-every", "0"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
        received: Dict[str, tuple] = {}
        stop = threading.Event()
        rclient = redis.Redis.from_url(rsrv.url)
        gate_checks: List[bool] = []

        def consume() -> None:
            c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "bench", "auto.offset.reset": "earliest",
                          "fetch.wait.max.ms": 5, "log_level": 2})
            c.subscribe(["usage.alerts"])
            while not stop.is_set():
                first = c.poll(0.05)  # returns as soon as one alert is there (consume() would wait its timeout)
                if first is None:
                    continue
                for msg in [first] + c.consume(500, 0):
                    if msg.error():
                        continue
                    now = time.time() * 1000
                    a = orjson.loads(msg.value())
                    if a["alert_id"] not in received:
                        received[a["alert_id"]] = (now, a)
                        if a["type"] == "blocked":
                            st = rclient.hget(f"meter:acme:{a['customer_id']}:api_calls", "state")
                            gate_checks.append(st == b"blocked")
            c.close()

        th = threading.Thread(target=consume, daemon=True)
        th.start()
        p = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 1, "enable.idempotence": True, "log_level": 2})
        # Warm up: one customer with its own tiny quota; wait for its alert so the flow is surely running.
        console.print(f"[dim]flow starting (log {work / 'flow.log'})...[/]")
        deadline = time.time() + 120
        n = 0
        while not received and time.time() < deadline:
            p.produce("usage.events", orjson.dumps({"event_id": f"w{n}", "tenant_id": "acme", "customer_id": "c0",
                                                    "event_type": "api_call", "timestamp": int(time.time() * 1000)}),
                      key=b"acme|c0")
            n += 1
            p.flush()
            time.sleep(0.2)
        if not received:
            console.print("[red]the flow produced no alert within 120 s; see the flow log[/]")
            os.killpg(flow.pid, signal.SIGKILL)
            return 1
        warm = set(received)
        console.print(f"producing {args.rate:,} events/s for {args.seconds:.0f} s to {args.partitions} partitions, "
                      f"{args.customers} customers")
        t0 = time.time()
        sent = 0
        tick = 0.01
        while True:
            el = time.time() - t0
            if el >= args.seconds:
                break
            due = int(el * args.rate)
            while sent < due:
                cust = 1 + sent % (args.customers - 1)
                ts = int(time.time() * 1000)
                p.produce("usage.events", orjson.dumps({"event_id": f"e{sent}", "tenant_id": "acme",
                                                        "customer_id": f"c{cust}", "event_type": "api_call",
                                                        "timestamp": ts}), key=f"acme|c{cust}".encode())
                sent += 1
            p.poll(0)
            time.sleep(tick)
        p.flush()
        p = None  # close the producer while the broker is still up
        time.sleep(3.0)  # the last alerts
        stop.set()
        th.join(5)
        os.killpg(flow.pid, signal.SIGINT)
        try:
            flow.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(flow.pid, signal.SIGKILL)
        log.close()
    e2e, inflow, toflow, outflow = [], [], [], []
    for aid, (got, a) in received.items():
        if aid in warm or not a["event_id"].startswith("e"):
            continue
        ev = parse_rfc3339_ms(a["event_time"])
        ing = parse_rfc3339_ms(a["ingested_at"])
        det = parse_rfc3339_ms(a["detected_at"])
        e2e.append(got - ev)
        inflow.append(det - ing)
        toflow.append(ing - ev)
        outflow.append(got - det)
    counts = [0] * args.customers
    for k in range(sent):
        counts[1 + k % (args.customers - 1)] += 1
    expected = sum((counts[i] * 100 >= 75 * included[i]) + (counts[i] * 100 >= 90 * included[i])
                   + 2 * (counts[i] >= included[i]) for i in range(1, args.customers))
    res = {"rate": args.rate, "seconds": args.seconds, "events": sent, "alerts": len(e2e),
           "end_to_end_ms": _pcts(e2e), "in_flow_ms": _pcts(inflow), "to_flow_ms": _pcts(toflow),
           "from_flow_ms": _pcts(outflow),
           "blocked_visible_in_redis": f"{sum(gate_checks)}/{len(gate_checks)}",
           "expected_alerts": expected}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alert_latency.json").write_text(json.dumps(res, indent=2))
    if args.json:
        print(json.dumps(res))
        return 0
    t = Table(title=f"breach-to-alert latency at {args.rate:,} events/s ({sent:,} events, {len(e2e)} alerts)")
    for col in ("path", "n", "p50 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for name, key in (("event produced -> alert consumed", "end_to_end_ms"),
                      ("ingested -> detected (in the flow)", "in_flow_ms"),
                      ("event time -> ingested (broker+poll)", "to_flow_ms"),
                      ("detected -> consumed (sink+broker)", "from_flow_ms")):
        r = res[key]
        t.add_row(name, str(r["n"]), f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['max']:.1f}")
    Console().print(t)
    print(f"alerts received {len(e2e)} of {expected} expected (threshold_crossed 75/90/100 + blocked)")
    print(f"gateway state already 'blocked' in Redis when the blocked alert arrived: {res['blocked_visible_in_redis']}")
    print(f"results written to {RESULTS / 'alert_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
