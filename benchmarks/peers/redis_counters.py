"""Per-event Redis counters: one Lua script call per event, pipelined per consumed batch.

The script deduplicates with ``SET NX EX`` on ``bench:d:{tenant|customer}:{event_id}``, adds the event
with ``HINCRBY``/``HINCRBYFLOAT`` to the hash ``bench:u:{tenant|customer}:{period}`` and fires each
threshold once with ``HSETNX`` on ``bench:f:{tenant|customer}:{period}``, all atomically on the server.
Alerts leave as soon as the batch's pipeline returns. Dedupe keys live ``--dedupe-ttl`` seconds (default
45 days: a month plus late grace), which is the state bound. The Redis database is flushed at start.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List

from benchmarks.peers.common import (
    AlertProducer,
    Rules,
    TopicReader,
    alert_key,
    base_args,
    parse_usage,
    stop_on_signals,
    touch,
    write_result,
)

LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {} end
local out = {}
local n = #ARGV
local function check(metric, used, included)
  if included <= 0 then return end
  for i = 6, n do
    if used * 100 >= tonumber(ARGV[i]) * included then
      if redis.call('HSETNX', KEYS[3], metric .. '|' .. ARGV[i], '1') == 1 then
        out[#out + 1] = metric .. '|' .. ARGV[i]
      end
    end
  end
end
check('api_calls', redis.call('HINCRBY', KEYS[2], 'api_calls', ARGV[2]), tonumber(ARGV[4]))
if ARGV[3] ~= '' then
  check('tokens', tonumber(redis.call('HINCRBYFLOAT', KEYS[2], 'tokens', ARGV[3])), tonumber(ARGV[5]))
end
return out
"""


def main() -> int:
    ap = base_args(__doc__)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--dedupe-ttl", type=int, default=45 * 86400)
    args = ap.parse_args()
    import redis

    rules = Rules.load(args.rules)
    stop = stop_on_signals()
    r = redis.Redis.from_url(args.redis_url)
    r.flushdb()
    mem0 = int(r.info("memory")["used_memory"])
    sha = r.script_load(LUA)
    reader = TopicReader(args.bootstrap, args.topic, to_end=not args.tail, stop=stop)
    alerts = AlertProducer(args.bootstrap, args.alerts_topic)
    thresholds = [f"{t:g}" for t in rules.thresholds]
    ttl = str(args.dedupe_ttl)
    inc_cache: Dict[str, tuple] = {}
    calls = 0
    touch(args.ready_file)
    for batch in reader.batches():
        if not batch:
            continue
        pipe = r.pipeline(transaction=False)
        sent: List[tuple] = []
        for _key, value in batch:
            u = parse_usage(value, rules)
            if u is None:
                continue
            inc = inc_cache.get(u.key)
            if inc is None:
                inc = inc_cache[u.key] = (repr(rules.included(u.key, "api_calls")),
                                          repr(rules.included(u.key, "tokens")))
            pipe.evalsha(sha, 3, f"bench:d:{u.key}:{u.event_id}", f"bench:u:{u.key}:{u.period_ms}",
                         f"bench:f:{u.key}:{u.period_ms}", ttl, u.api,
                         "" if u.tokens is None else repr(u.tokens), inc[0], inc[1], *thresholds)
            sent.append((u.key, u.period_ms))
        if not sent:
            continue
        calls += len(sent)
        for (key, period), fired in zip(sent, pipe.execute()):
            for f in fired:
                metric, _, t = f.decode().partition("|")
                alerts.send(alert_key(key, metric, period, float(t)))
        alerts.producer and alerts.producer.poll(0)
    alerts.flush()
    t_end = time.time()
    reader.close()
    totals: Dict[str, float] = {}
    counters_keys = 0
    for k in r.scan_iter(match="bench:u:*", count=1000):
        counters_keys += 1
        _, _, rest = k.decode().partition("bench:u:")
        key, _, period = rest.rpartition(":")
        for metric, v in r.hgetall(k).items():
            totals[f"{key}|{metric.decode()}|{period}"] = float(v)
    fired_keys = sum(1 for _ in r.scan_iter(match="bench:f:*", count=1000))
    ids = int(r.dbsize()) - counters_keys - fired_keys
    mem1 = int(r.info("memory")["used_memory"])
    write_result(args.out, "redis-counters", events=reader.count, t_first=reader.t_first, t_end=t_end,
                 totals=totals, alerts=alerts.keys, counters={"script_calls": calls},
                 state_bytes=float(mem1 - mem0), tracked_ids=ids,
                 state_how="Redis INFO used_memory growth (dedupe keys + counter and fired hashes) / dedupe keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
