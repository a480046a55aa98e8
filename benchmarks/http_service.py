"""``meter serve`` on loopback: GET /v1/entitlements latency and HTTP ingest events/s into Kafka.

Starts Debian's redis-server and an Apache Kafka broker (meterflow.devservices, the jars ``./dev setup``
fetches), fills gateway hashes, starts the real ``meter serve`` process, then, from one client thread over one
keep-alive connection (httpx):

* ``GET /v1/entitlements/{t}/{c}/{m}`` of random keys: p50/p99/max in ms and calls/s (auth, one Redis HGETALL,
  JSON);
* ``POST /v1/events``, one event per request and batches of 100: events/s, each answer 202 only after the
  broker acknowledged (idempotent producer, acks=all).

Loopback hides network latency: add the round trips of the real network to every figure.

    python -m benchmarks.http_service --calls 5000 --events 2000
    python -m benchmarks.http_service --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List

import httpx

from meterflow.base.timeutil import ms_to_iso
from meterflow.devservices import KafkaBroker, RedisServer
from meterflow.schemas.gateway import GatewayState, state_fields

KEY = "bench-api-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def _pcts(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return {"p50_ms": round(s[len(s) // 2] * 1000, 3), "p99_ms": round(p99 * 1000, 3), "max_ms": round(s[-1] * 1000, 3)}


def run(calls: int, events: int, keys: int) -> Dict[str, object]:
    redis_server, broker = RedisServer(), KafkaBroker()
    redis_server.start()
    broker.start()
    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-http-"))
    proc = None
    try:
        topic = f"bench-http-{uuid.uuid4().hex[:6]}"
        broker.create_topic(topic, partitions=4)
        client = redis_server.client()
        now = int(time.time() * 1000)
        pipe = client.pipeline(transaction=False)
        for i in range(keys):
            g = GatewayState(tenant_id="bench", customer_id=f"c{i}", metric="api_calls", included=1000.0,
                             used=float(i % 1200), remaining=0.0, pct=None, state="ok", period_start=now,
                             period_end=now + 86_400_000, updated_at=now)
            pipe.hset(g.redis_key, mapping=state_fields(g))
        pipe.execute()
        cfg = tmp / "bench.toml"
        cfg.write_text(f'[[tenants]]\nid = "bench"\napi_keys = ["{KEY}"]\n[[metrics]]\ncode = "api_calls"\n'
                       f'event_type = "api_call"\n[kafka]\nbootstrap_servers = "{broker.bootstrap}"\n'
                       f'events_topic = "{topic}"\n[redis]\nurl = "{redis_server.url}"\n'
                       f'[clickhouse]\ndsn = "chdb://{tmp}/ch"\n[server]\nmax_batch = 100\n')
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        meter = Path(sys.executable).with_name("meter")
        proc = subprocess.Popen([str(meter), "serve", "--config", str(cfg), "--port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                            timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("meter serve did not start")
            time.sleep(0.1)
        rnd = random.Random(7)
        for _ in range(200):  # warm-up
            http.get(f"/v1/entitlements/bench/c{rnd.randrange(keys)}/api_calls")
        lat = []
        t0 = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            r = http.get(f"/v1/entitlements/bench/c{rnd.randrange(keys)}/api_calls")
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["known"], r.text
        check = {"calls": calls, "calls_per_s": round(calls / (time.perf_counter() - t0)), **_pcts(lat)}

        def event(i: int) -> dict:
            return {"event_id": f"b{uuid.uuid4().hex}", "tenant_id": "bench", "customer_id": f"c{i % keys}",
                    "event_type": "api_call", "timestamp": ms_to_iso(now)}

        lat = []
        t0 = time.perf_counter()
        for i in range(events):
            t = time.perf_counter()
            r = http.post("/v1/events", json=event(i))
            lat.append(time.perf_counter() - t)
            assert r.status_code == 202, r.text
        single = {"events": events, "events_per_s": round(events / (time.perf_counter() - t0)), **_pcts(lat)}
        lat = []
        n = events * 10 // 100 * 100
        t0 = time.perf_counter()
        for i in range(0, n, 100):
            t = time.perf_counter()
            r = http.post("/v1/events", json=[event(i + j) for j in range(100)])
            lat.append(time.perf_counter() - t)
            assert r.status_code == 202 and r.json()["accepted"] == 100, r.text
        batched = {"events": n, "events_per_s": round(n / (time.perf_counter() - t0)), **_pcts(lat)}
        http.close()
        return {"machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
                "keys": keys, "entitlements_check": check, "ingest_single": single, "ingest_batch_100": batched}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        broker.stop()
        redis_server.cleanup()


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000, help="GET /v1/entitlements calls (default 5000)")
    p.add_argument("--events", type=int, default=2000, help="single-event POSTs; batches send 10x as many events")
    p.add_argument("--keys", type=int, default=10000, help="gateway hashes in Redis (default 10000)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.calls, args.events, args.keys)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
