"""Poll-based detection, the way published peers do it: events batch-inserted into ClickHouse, and a job
that every ``--interval`` seconds aggregates usage per customer and metric and compares it with quotas
(Lago's clock is 60 s; 1 s is the best case).

Storage is embedded ClickHouse (chDB) in this process: a MergeTree table ``ev`` ordered by
``(k, event_id)`` holding one row per valid billable event (duplicates included). The poll deduplicates by
``GROUP BY k, event_id`` and sums per customer and calendar month, so it scans every event of the period
on every tick. Inserts are batched (``--insert-rows`` rows or ``--insert-every`` seconds, whichever comes
first). chDB is one engine per process, so inserts and polls take turns on one lock.

A poll sees a snapshot: a threshold reached and then undone by a correction between two polls is not
seen (an event-driven contender fires it). At the end of a drained topic one last poll runs at once, so
throughput is not charged for waiting on the clock; the clock is what the latency run measures.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Set

from benchmarks.peers.common import (
    AlertProducer,
    Rules,
    TopicReader,
    alert_key,
    base_args,
    crossed,
    parse_usage,
    stop_on_signals,
    total_key,
    touch,
    write_result,
)

COLUMNS = ["k", "event_id", "period_ms", "api", "tokens"]
AGGREGATE = ("SELECT k, period_ms, sum(api), sum(tokens) FROM (SELECT k, event_id, any(period_ms) AS period_ms, "
             "any(api) AS api, any(tokens) AS tokens FROM bench.ev GROUP BY k, event_id) GROUP BY k, period_ms")


class Poller:
    def __init__(self, client, lock: threading.Lock, rules: Rules, alerts: AlertProducer) -> None:
        self.client, self.lock, self.rules, self.alerts = client, lock, rules, alerts
        self.fired: Set[str] = set()
        self.totals: Dict[str, float] = {}
        self.query_ms: List[float] = []

    def poll(self) -> None:
        t = time.perf_counter()
        with self.lock:
            rows = self.client.query(AGGREGATE).result_rows
        self.query_ms.append((time.perf_counter() - t) * 1000)
        rules = self.rules
        totals: Dict[str, float] = {}
        for key, period, api, tokens in rows:
            for metric, used in (("api_calls", api), ("tokens", tokens)):
                if used is None:
                    continue
                totals[total_key(key, metric, period)] = float(used)
                for th in crossed(float(used), rules.included(key, metric), rules.thresholds):
                    ak = alert_key(key, metric, period, th)
                    if ak not in self.fired:
                        self.fired.add(ak)
                        self.alerts.send(ak)
        self.alerts.flush()
        self.totals = totals


def main() -> int:
    ap = base_args(__doc__)
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    ap.add_argument("--insert-rows", type=int, default=20000)
    ap.add_argument("--insert-every", type=float, default=0.5)
    ap.add_argument("--chdb", help="chDB data path (default: a temporary directory)")
    args = ap.parse_args()
    import clickhouse_connect

    rules = Rules.load(args.rules)
    stop = stop_on_signals()
    path = args.chdb or tempfile.mkdtemp(prefix="bench-chdb-")
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.command("DROP TABLE IF EXISTS bench.ev")
    client.command("CREATE TABLE bench.ev (k String, event_id String, period_ms Int64, api Int8, "
                   "tokens Nullable(Float64)) ENGINE = MergeTree ORDER BY (k, event_id)")
    lock = threading.Lock()
    alerts = AlertProducer(args.bootstrap, args.alerts_topic)
    poller = Poller(client, lock, rules, alerts)
    reader = TopicReader(args.bootstrap, args.topic, to_end=not args.tail, stop=stop)
    done = threading.Event()

    def clock() -> None:  # the job: every interval, from the start of the run
        while not done.wait(args.interval):
            poller.poll()

    job = threading.Thread(target=clock, daemon=True, name="poll-job")
    job.start()
    touch(args.ready_file)
    buf: List[list] = []
    last_insert = time.monotonic()
    inserted = 0

    def insert() -> None:
        nonlocal buf, last_insert, inserted
        if buf:
            with lock:
                client.insert("bench.ev", buf, column_names=COLUMNS)
            inserted += len(buf)
            buf = []
        last_insert = time.monotonic()

    for batch in reader.batches():
        for _key, value in batch:
            u = parse_usage(value, rules)
            if u is not None:
                buf.append([u.key, u.event_id, u.period_ms, u.api, u.tokens])
        if len(buf) >= args.insert_rows or (buf and time.monotonic() - last_insert >= args.insert_every):
            insert()
    insert()
    done.set()
    job.join()
    poller.poll()  # the final figures (throughput runs: at once rather than at the next tick)
    t_end = time.time()
    reader.close()
    with lock:
        parts = client.query("SELECT sum(bytes_on_disk), sum(rows) FROM system.parts "
                             "WHERE database = 'bench' AND table = 'ev' AND active").result_rows
    disk: Optional[float] = float(parts[0][0]) if parts and parts[0][0] is not None else None
    q = sorted(poller.query_ms)
    write_result(args.out, f"poll-clickhouse-{args.interval:g}s", events=reader.count, t_first=reader.t_first,
                 t_end=t_end, totals=poller.totals, alerts=sorted(poller.fired),
                 counters={"rows_inserted": inserted, "polls": len(q),
                           "poll_query_ms_p50": q[len(q) // 2] if q else None,
                           "poll_query_ms_max": q[-1] if q else None},
                 state_bytes=disk, tracked_ids=inserted,
                 state_how="ClickHouse bytes on disk of the events table / rows (the raw events are its dedupe state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
