"""End to end: alerts, enforcement and live gateway state through the real `meter run` process.

Everything is real: the Apache Kafka broker (``kafka`` fixture), redis-server (``redis_server``, killed and
restarted for the outage test), embedded ClickHouse (chDB, read back in a separate process), `meter run`
subprocesses killed with a real SIGKILL, and a local HTTP webhook receiver that fails on purpose.
Each test uses its own topics, tenants (so its own Redis keys), temporary directories and ClickHouse path.

Expected alerts come from the independent reference model ``tests/operators/alert_model.py`` and, for the
randomised workload, also from a hand computation (``alert_support.hand_alerts``) that must agree with it.

1. a randomised stream (two tenants, ~20 customers on hard and soft plans with custom overrides, unsubscribed
   customers, retried duplicates, bad events, out-of-order event times) on a 2-partition events topic keyed
   ``tenant|customer``, `meter run --stop-at-end --workers 2 --recovery`: the alert JSONL file, the
   ``alerts_log`` view and the alerts topic (deduplicated by key) hold exactly the expected alerts, Redis
   holds exactly the expected gateway states and ``QuotaGate.check`` agrees;
2. the same kind of workload with a SIGKILL of `meter run --recovery` while events are still arriving and
   alerts are being written, then a restart to completion: every expected alert id exactly once in the JSONL
   file, the same set in ``alerts_log`` and on the alerts topic, Redis right;
3. a mid-period upgrade and downgrade through the entitlements topic while a streaming `meter run` runs;
4. a Redis outage while a streaming `meter run` meters and alerts; Redis catches up after its restart;
5. the webhook sink through the flow against a receiver that answers 500, times out once, then recovers;
6. Ctrl-C of a streaming `meter run` stops cleanly: outputs flushed, exit 130 with one line, no panic;
7. late events for a period that is over (inside late_grace) after the first event of the next one, across a
   SIGKILL and resume and a changelog record: the earlier period never blocks again, Redis stays on the
   current period (sampled all along), the JSONL file and ``alerts_log`` equal the model (issue 17).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import signal
import threading
import time
import uuid
from typing import Dict, List, Tuple

import pytest
import redis

from meterflow.gate import QuotaGate
from meterflow.schemas.alerts import alert_id
from tests.e2e import alert_support as al
from tests.e2e.alert_support import METRIC, PERIOD_END, PERIOD_START, Sub
from tests.e2e.support import LiveRun, kafka_section, read_views, run_meter, run_summary, unique
from tests.operators import alert_model as am

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(240)]


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _topics(kafka, prefix: str, entitlements: bool = False) -> Dict[str, str]:
    """Fresh topics: events (2 partitions, keyed tenant|customer), aggregated, dead letters, alerts (one
    partition, so a consumer sees each customer's alerts in the order they were sent) and optionally the
    compacted entitlements changelog."""
    p = unique(prefix)
    k = kafka_section(kafka.bootstrap, f"{p}-events", p)
    kafka.create_topic(k["events_topic"], partitions=2)
    kafka.create_topic(k["aggregated_topic"], partitions=2)
    kafka.create_topic(k["dead_letter_topic"], partitions=1)
    kafka.create_topic(k["alerts_topic"], partitions=1)
    if entitlements:
        kafka.create_topic(k["entitlements_topic"], partitions=1, config={"cleanup.policy": "compact"})
    return k


def _gate() -> Dict[str, object]:
    return {"now_getter": lambda: al.GATE_NOW}


def _check_alert_fields(records, subs) -> None:
    """Fields beyond the identity: included, usage at the crossing, enforcement, plan and period of each
    threshold/blocked alert of the config's subscriptions (count metric: usage = the crossing event's rank)."""
    by_key = {(s.tenant, s.customer): s for s in subs}
    for a in records:
        s = by_key[(a["tenant_id"], a["customer_id"])]
        inc, _ths, enf = s.entitlement()
        assert a["included"] == inc and a["enforcement"] == enf and a["plan"] == s.plan, a
        assert am.ms(a["period_end"]) == PERIOD_END, a
        want_usage = -(-a["threshold_pct"] * inc // 100) if a["type"] == "threshold_crossed" else inc
        assert a["usage"] == want_usage, f"usage at the crossing should be {want_usage}: {a}"
        assert a["usage_pct"] == pytest.approx(a["usage"] * 100 / inc), a


def _check_redis(redis_url: str, client, subs, unsubscribed, want_gw) -> None:
    keys = [(s.tenant, s.customer, METRIC) for s in subs] + [(t, c, METRIC) for t, c in unsubscribed]
    hashes = al.redis_hashes(client, keys)
    got = al.gateway_view(hashes)
    assert got == want_gw, "Redis gateway state != expected:\n" + "\n".join(
        f"  {k}: redis {got.get(k)} expected {want_gw.get(k)}" for k in sorted(set(got) | set(want_gw))
        if got.get(k) != want_gw.get(k))
    for (t, c) in unsubscribed:
        assert not hashes[(t, c, METRIC)], f"an unsubscribed customer has gateway state: {hashes[(t, c, METRIC)]}"
    for k, h in hashes.items():
        if not h:
            continue
        used, inc, _st = want_gw[k]
        assert float(h["remaining"]) == max(0.0, inc - used), h
        assert float(h["pct"]) == pytest.approx(used * 100 / inc), h
        assert am.ms(h["period_end"]) == PERIOD_END and am.ms(h["period_start"]) == PERIOD_START, h
        assert h["blocked_by"] == ("quota" if h["state"] == "blocked" else ""), h
    gate = QuotaGate(redis_url, **_gate())
    try:
        for k, (used, inc, st) in want_gw.items():
            d = gate.check(*k)
            assert d.known and d.state == st and d.used == used and d.included == inc, (k, d)
            assert d.allowed == (st != "blocked"), f"QuotaGate allowed={d.allowed} for {k} in state {st}"
        for (t, c) in unsubscribed:
            d = gate.check(t, c, METRIC)
            assert d.allowed and not d.known and d.reason == "no_entitlement", d
    finally:
        gate.close()


def _random_workload_setup(kafka, redis_server, tmp_path, seed, topic_prefix, **kafka_extra):
    """A random workload (al.make_workload) and its configuration file with every sink on: returns
    (tag, workload, kafka settings, alerts JSONL path, config path, parsed config)."""
    tag = _tag()
    w = al.make_workload(seed=seed, tag=tag)
    k = {**_topics(kafka, topic_prefix), **kafka_extra}
    jsonl = tmp_path / "alerts.jsonl"
    text = al.config_toml(w.tenants, w.subs, chdb_dir=tmp_path / "ch", kafka=k, redis_url=redis_server.url,
                          alerts_jsonl=jsonl)
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(text)
    return tag, w, k, jsonl, cfg_path, al.parse(text)


def _flat(per_customer: Dict[Tuple[str, str], List[tuple]]) -> List[tuple]:
    return [a for v in per_customer.values() for a in v]


# -- 1 ---------------------------------------------------------------------------------------------------

def test_randomised_stream_alerts_and_gateway_state_match_the_reference(kafka, redis_server, client, tmp_path):
    tag, w, k, jsonl, cfg_path, cfg = _random_workload_setup(kafka, redis_server, tmp_path, 20261121,
                                                             "e2e-alerts-rand")
    expected = al.model_alerts(cfg, w.items)
    assert expected == al.hand_alerts(w.subs, w.items), "the reference model and the hand computation disagree"
    want_gw = am.expected_gateway(cfg, w.items)[0]
    assert want_gw == al.hand_gateway(w.subs, w.items), "the reference model and the hand computation disagree"
    n_alerts = len(_flat(expected))
    # the workload exercises what the test claims
    states = {st for _u, _i, st in want_gw.values()}
    assert states == {"ok", "approaching", "over", "blocked"}, states
    assert {a[1] for a in _flat(expected)} == {"threshold_crossed", "blocked"} and n_alerts >= 30
    assert w.duplicates >= 10 and w.bad >= 5 and len(w.messages) >= 400

    al.KeyedProducer(kafka.bootstrap, k["events_topic"]).send(w.messages)
    proc = run_meter("run", "--config", str(cfg_path), "--stop-at-end", "--workers", "2", "--recovery",
                     str(tmp_path / "recovery"), "--json", "--progress-every", "0", timeout=120)
    counters = run_summary(proc)["counters"]
    assert counters["read"] == len(w.messages), counters
    assert counters["duplicates"] == w.duplicates and counters["dead_lettered"] == w.bad, counters
    assert counters["alerts"] == n_alerts, counters

    # the alert JSONL file: each id once, each customer's alerts in order, on the crossing events
    records = al.read_jsonl(jsonl)
    ids = [a["alert_id"] for a in records]
    assert len(ids) == len(set(ids)), "duplicate alert ids in the JSONL file"
    assert al.by_customer(records) == expected
    _check_alert_fields(records, w.subs)

    # the alerts topic, deduplicated by key as the contract tells consumers to
    topic_alerts, n_msgs = al.alerts_topic_view(kafka.bootstrap, k["alerts_topic"])
    assert n_msgs >= n_alerts
    assert al.by_customer(topic_alerts) == expected

    # alerts_log: deduplicated by alert_id, the same alerts
    rows = al.read_alerts_log(cfg_path)
    assert len(rows) == len({r["alert_id"] for r in rows}) == n_alerts, f"{len(rows)} rows for {n_alerts} alerts"
    assert al.log_tuples(rows) == {c: set(v) for c, v in expected.items()}

    # the CLI's view of alerts_log (`meter alerts --json`), and one filter of it
    cli = [json.loads(line) for line in run_meter("alerts", "--config", str(cfg_path), "--json").stdout.splitlines()
           if line.strip()]
    assert {c: set(v) for c, v in al.by_customer(cli).items()} == {c: set(v) for c, v in expected.items()}
    blocked = [json.loads(line) for line in run_meter("alerts", "--config", str(cfg_path), "--json", "--type",
                                                      "blocked").stdout.splitlines() if line.strip()]
    assert sorted(a["alert_id"] for a in blocked) == sorted(a[0] for a in _flat(expected) if a[1] == "blocked")

    # Redis after the flow drained, and what a gateway decides from it
    _check_redis(redis_server.url, client, w.subs, w.unsubscribed, want_gw)


# -- 2 ---------------------------------------------------------------------------------------------------

def test_sigkill_while_alerting_then_resume_gives_each_alert_exactly_once(kafka, redis_server, client, tmp_path):
    # small source batches: the flow works through the stream in many small steps while it is killed
    tag, w, k, jsonl, cfg_path, cfg = _random_workload_setup(kafka, redis_server, tmp_path, 7_2026,
                                                             "e2e-alerts-crash", batch_size=16)
    expected = al.model_alerts(cfg, w.items)
    assert expected == al.hand_alerts(w.subs, w.items)
    want_gw = am.expected_gateway(cfg, w.items)[0]
    n_alerts = len(_flat(expected))
    recovery = tmp_path / "recovery"
    argv = ["run", "--config", str(cfg_path), "--recovery", str(recovery), "--workers", "2", "--json"]

    producer = al.KeyedProducer(kafka.bootstrap, k["events_topic"])
    sent = [0]
    errors: List[BaseException] = []

    consuming = threading.Event()
    sent_at_kill = [0]

    def produce_paced() -> None:  # the stream keeps arriving while the flow runs (and is killed)
        try:
            step = 8
            for i in range(0, len(w.messages), step):
                producer.send(w.messages[i:i + step])
                sent[0] = min(i + step, len(w.messages))
                if i == 0:
                    consuming.wait(60)  # the rest once the flow reads the topic
                time.sleep(0.05)
        except BaseException as exc:  # reported below
            errors.append(exc)

    live = LiveRun([*argv, "--progress-every", "0.1"], tmp_path / "crash.out")
    feeder = threading.Thread(target=produce_paced, daemon=True)
    try:
        feeder.start()
        live.wait_until_read(1, timeout=60)
        consuming.set()
        al.wait_for("the first alerts in the JSONL file", lambda: len(al.read_jsonl(jsonl)) >= 3, 60, live,
                    interval=0.01)
    finally:
        consuming.set()
        sent_at_kill[0] = sent[0]
        rc = live.kill()
        feeder.join(60)
    assert not errors, errors
    assert rc == -signal.SIGKILL, f"meter run was not killed by SIGKILL (exit {rc})"
    at_kill = al.read_jsonl(jsonl)
    print(f"killed with {len(at_kill)} of {n_alerts} alerts written, {sent_at_kill[0]} of {len(w.messages)} "
          f"messages produced, progress {live.reads[-5:]}")
    assert 3 <= len(at_kill) < n_alerts, "the kill did not happen part way through the alerts"
    assert sent_at_kill[0] < len(w.messages), "the stream had been produced completely before the kill"
    assert sent[0] == len(w.messages)

    proc = run_meter(*argv, "--stop-at-end", "--progress-every", "0", timeout=120)
    resumed = run_summary(proc)["counters"]
    assert 0 < resumed["read"] <= len(w.messages), resumed

    records = al.read_jsonl(jsonl)
    ids = [a["alert_id"] for a in records]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"alert ids written twice to the JSONL file after the resume: {dupes}"
    assert sorted(ids) == sorted(a[0] for a in _flat(expected))
    assert al.by_customer(records) == expected  # in order, on the crossing events
    _check_alert_fields(records, w.subs)

    rows = al.read_alerts_log(cfg_path)
    assert len(rows) == len({r["alert_id"] for r in rows}) == n_alerts
    assert al.log_tuples(rows) == {c: set(v) for c, v in expected.items()}

    topic_alerts, n_msgs = al.alerts_topic_view(kafka.bootstrap, k["alerts_topic"])
    assert {a["alert_id"] for a in topic_alerts} == set(ids) and n_msgs >= n_alerts
    print(f"alerts topic: {n_msgs} messages for {n_alerts} alerts (re-sent after the resume: {n_msgs - n_alerts})")

    _check_redis(redis_server.url, client, w.subs, w.unsubscribed, want_gw)


# -- 3 ---------------------------------------------------------------------------------------------------

def test_mid_period_upgrade_unblocks_and_downgrade_fires_only_new_thresholds(kafka, redis_server, tmp_path):
    tag = _tag()
    tenant = f"initech{tag}"
    x = Sub(tenant, "cust_x", "hard8")  # blocked at its 8th event
    y = Sub(tenant, "cust_y", "soft30")
    upgrade = Sub(tenant, "cust_x", "scale")  # 40 included, hard
    downgrade = Sub(tenant, "cust_x", "hard8", {"included": 16, "thresholds": [50, 75, 90, 100, 150, 250]})
    k = _topics(kafka, "e2e-alerts-plan", entitlements=True)
    jsonl = tmp_path / "alerts.jsonl"
    text = al.config_toml([tenant], [x, y], chdb_dir=tmp_path / "ch", kafka=k, redis_url=redis_server.url,
                          alerts_jsonl=jsonl)
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(text)
    cfg = al.parse(text)
    rng = random.Random(3)
    ev_x = al.customer_events(rng, tenant, "cust_x", 40, f"p{tag}")
    ev_y = al.customer_events(rng, tenant, "cust_y", 5, f"p{tag}")
    producer = al.KeyedProducer(kafka.bootstrap, k["events_topic"])

    def send(evs):
        producer.send([(al.key(e.tenant, e.customer), al.event_bytes(e, i % 3)) for i, e in enumerate(evs)])

    def publish(sub: Sub, name: str) -> float:
        """`meter entitlements publish` of ``sub`` (a config holding just that subscription); returns the
        monotonic time at which the command started (latencies below include the command's own start-up)."""
        path = tmp_path / f"{name}.toml"
        path.write_text(al.config_toml([tenant], [sub], chdb_dir=tmp_path / "ch-unused", kafka=k))
        t0 = time.monotonic()
        run_meter("entitlements", "publish", "--config", str(path), "--customer", f"{tenant}/{sub.customer}",
                  timeout=60)
        return t0

    def aid(type_, threshold=None, seq=0):
        return alert_id(type_, tenant, "cust_x", METRIC, PERIOD_START, threshold, seq)

    client = redis_server.client()
    gate = QuotaGate(redis_server.url, **_gate())
    xkey = f"meter:{tenant}:cust_x:{METRIC}"

    def x_state():
        h = {a.decode(): b.decode() for a, b in client.hgetall(xkey).items()}
        return (float(h["used"]), float(h["included"]), h["state"]) if h else None

    def x_alerts():
        return [al.tuple_of(a) for a in al.read_jsonl(jsonl) if a["customer_id"] == "cust_x"]

    live = LiveRun(["run", "--config", str(cfg_path), "--workers", "1", "--progress-every", "0.2"],
                   tmp_path / "run.out")
    try:
        # 8 events: 75 % at the 6th, 90 % and 100 % (and blocked) at the 8th
        send(ev_x[:8] + ev_y)
        al.wait_for("cust_x blocked in Redis", lambda: x_state() == (8.0, 8.0, "blocked"), 60, live)
        d = gate.check(tenant, "cust_x", METRIC)
        assert not d.allowed and d.state == "blocked" and d.blocked_by == "quota", d
        first = [(aid("threshold_crossed", 75), "threshold_crossed", METRIC, PERIOD_START, 75.0, ev_x[5].event_id,
                  "notify"),
                 (aid("threshold_crossed", 90), "threshold_crossed", METRIC, PERIOD_START, 90.0, ev_x[7].event_id,
                  "notify"),
                 (aid("threshold_crossed", 100), "threshold_crossed", METRIC, PERIOD_START, 100.0,
                  ev_x[7].event_id, "block"),
                 (aid("blocked", 100.0, 1), "blocked", METRIC, PERIOD_START, 100.0, ev_x[7].event_id, "block")]
        al.wait_for("the first four alerts", lambda: x_alerts() == first, 10, live)

        # upgrade: 8 of 40 -> ok, unblocked (no event caused it) within one batch
        t0 = publish(upgrade, "upgrade")
        unblocked = (aid("unblocked", None, 1), "unblocked", METRIC, PERIOD_START, None, "", "unblock")
        al.wait_for("the upgrade in Redis (ok, 8 of 40)", lambda: x_state() == (8.0, 40.0, "ok"), 5, live)
        al.wait_for("the unblocked alert", lambda: x_alerts() == first + [unblocked], 5, live)
        latency = time.monotonic() - t0
        assert latency < 5, f"the upgrade took {latency:.2f} s to reach Redis and the alert file"
        print(f"upgrade in Redis and the alert file {latency * 1000:.0f} ms after `meter entitlements publish` "
              "started")
        d = gate.check(tenant, "cust_x", METRIC)
        assert d.allowed and d.state == "ok" and d.included == 40, d
        un = [a for a in al.read_jsonl(jsonl) if a["alert_id"] == unblocked[0]][0]
        assert un["plan"] == "scale" and un["included"] == 40 and un["usage"] == 8, un

        # 24 more: 32 of 40 = 80 %, approaching; 75 % was already fired this period: nothing new
        send(ev_x[8:32])
        al.wait_for("32 of 40 approaching", lambda: x_state() == (32.0, 40.0, "approaching"), 10, live)
        time.sleep(0.3)
        assert x_alerts() == first + [unblocked], "a threshold fired twice in one period"

        # downgrade to 16 with new thresholds: 32 of 16 = 200 %: only 50 and 150 are new, and blocked again
        t0 = publish(downgrade, "downgrade")
        second = [(aid("threshold_crossed", 50), "threshold_crossed", METRIC, PERIOD_START, 50.0, "", "notify"),
                  (aid("threshold_crossed", 150), "threshold_crossed", METRIC, PERIOD_START, 150.0, "", "block"),
                  (aid("blocked", 100.0, 2), "blocked", METRIC, PERIOD_START, 100.0, "", "block")]
        al.wait_for("the downgrade in Redis (blocked, 32 of 16)", lambda: x_state() == (32.0, 16.0, "blocked"), 5,
                    live)
        al.wait_for("the downgrade's alerts", lambda: x_alerts() == first + [unblocked] + second, 5, live)
        latency2 = time.monotonic() - t0
        assert latency2 < 5, f"the downgrade took {latency2:.2f} s to reach Redis and the alert file"
        assert not gate.check(tenant, "cust_x", METRIC).allowed

        # 8 more: 40 of 16 = 250 % fires the last threshold on the event that crosses it
        send(ev_x[32:40])
        last = (aid("threshold_crossed", 250), "threshold_crossed", METRIC, PERIOD_START, 250.0, ev_x[39].event_id,
                "block")
        al.wait_for("40 of 16 blocked", lambda: x_state() == (40.0, 16.0, "blocked"), 10, live)
        al.wait_for("the 250 % alert", lambda: x_alerts() == first + [unblocked] + second + [last], 5, live)
        assert not [a for a in al.read_jsonl(jsonl) if a["customer_id"] == "cust_y"], "cust_y is below 75 %"
    finally:
        al.stop_run(live)
        gate.close()
        client.close()

    # the reference model agrees on the whole sequence (versions = the changelog offsets 0 and 1)
    model = al.model_alerts(cfg, [*ev_x[:8], *ev_y, am.Change(tenant, "cust_x", 0, upgrade.as_dict()),
                                  *ev_x[8:32], am.Change(tenant, "cust_x", 1, downgrade.as_dict()), *ev_x[32:]])
    want = first + [unblocked] + second + [last]
    assert model == {(tenant, "cust_x"): want}
    rows = al.read_alerts_log(cfg_path)
    assert al.log_tuples(rows) == {(tenant, "cust_x"): set(want)}


# -- 4 ---------------------------------------------------------------------------------------------------

def _period_totals(bootstrap: str, topic: str, customers) -> Dict[str, float]:
    """A downstream consumer's view of the aggregated topic: the latest api_calls period value per customer."""
    best: Dict[str, Tuple[int, float]] = {}
    for _k, v, _h in al.consume_all(bootstrap, topic):
        r = json.loads(v)
        if r.get("type") == "period" and r["metric"] == METRIC and r["customer_id"] in customers:
            cur = best.get(r["customer_id"])
            if cur is None or r["version"] >= cur[0]:
                best[r["customer_id"]] = (r["version"], r["value"])
    return {c: v for c, (_n, v) in best.items()}


def test_redis_outage_metering_and_alerts_continue_and_redis_catches_up(kafka, redis_server, tmp_path):
    tag = _tag()
    tenant = f"umbrella{tag}"
    subs = [Sub(tenant, f"cust_{i}", plan) for i, plan in
            enumerate(["hard8", "hard8", "soft30", "soft30", "hard20", "hard20"])]
    ticker = (tenant, "cust_ticker")  # unsubscribed: keeps batches flowing after Redis is back
    k = _topics(kafka, "e2e-alerts-redis")
    jsonl = tmp_path / "alerts.jsonl"
    text = al.config_toml([tenant], subs, chdb_dir=tmp_path / "ch", kafka=k, redis_url=redis_server.url,
                          redis_timeout=0.5, alerts_jsonl=jsonl)
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(text)
    cfg = al.parse(text)
    rng = random.Random(4)
    # per customer: ~40 % before the outage, over the thresholds during it, a few more after it
    plan_counts = {"hard8": (3, 6, 2), "soft30": (12, 16, 2), "hard20": (8, 13, 1)}
    phases: List[List[am.Ev]] = [[], [], []]
    for s in subs:
        n = plan_counts[s.plan]
        evs = al.customer_events(rng, tenant, s.customer, sum(n), f"r{tag}")
        phases[0] += evs[:n[0]]
        phases[1] += evs[n[0]:n[0] + n[1]]
        phases[2] += evs[n[0] + n[1]:]
    ticks: List[am.Ev] = []
    producer = al.KeyedProducer(kafka.bootstrap, k["events_topic"])

    def send(evs):
        producer.send([(al.key(e.tenant, e.customer), al.event_bytes(e, 0)) for e in evs])

    def gw_now():
        try:
            c = redis_server.client(socket_timeout=1)
            try:
                return al.gateway_view(al.redis_hashes(c, [(s.tenant, s.customer, METRIC) for s in subs]))
            finally:
                c.close()
        except redis.RedisError:
            return None

    want1 = am.expected_gateway(cfg, phases[0])[0]
    want2_alerts = al.model_alerts(cfg, phases[0] + phases[1])
    assert not al.model_alerts(cfg, phases[0]) and len(_flat(want2_alerts)) >= 10
    stop_ticks = threading.Event()

    def tick() -> None:
        i = 0
        while not stop_ticks.is_set():
            e = am.Ev(tenant, ticker[1], f"tick{tag}-{i}", "api_call", al.EVENTS_FROM + i * 1000, {})
            ticks.append(e)
            send([e])
            i += 1
            stop_ticks.wait(0.25)

    ticker_thread = threading.Thread(target=tick, daemon=True)
    live = LiveRun(["run", "--config", str(cfg_path), "--workers", "1", "--progress-every", "0.2"],
                   tmp_path / "run.out")
    outage = [0.0, 0.0]
    try:
        send(phases[0])
        al.wait_for("Redis to show the usage before the outage", lambda: gw_now() == want1, 60, live)

        redis_server.kill()
        outage[0] = time.time()
        assert not redis_server.ping(), "redis-server still answers after SIGKILL"
        half = len(phases[1]) // 2  # two waves: the Redis sink sees batches while it backs off
        send(phases[1][:half])
        time.sleep(1.5)
        send(phases[1][half:])
        got = al.wait_for("the outage's alerts in the JSONL file",
                          lambda: (lambda r: r if al.by_customer(r) == want2_alerts else None)(al.read_jsonl(jsonl)),
                          30, live)
        assert live.proc.poll() is None, "meter run stopped during the Redis outage"
        assert all(am.ms(a["detected_at"]) >= outage[0] * 1000 - 1 for a in got), "alerts detected before the kill?"
        # usage keeps being metered: the aggregated topic (what ClickHouse also receives) has the outage's totals
        want_totals = {s.customer: float(plan_counts[s.plan][0] + plan_counts[s.plan][1]) for s in subs}

        al.wait_for("the outage's usage on the aggregated topic",
                    lambda: _period_totals(kafka.bootstrap, k["aggregated_topic"], want_totals) == want_totals, 30,
                    live, interval=0.3)
        outage[1] = time.time()

        redis_server.restart()
        send(phases[2])
        ticker_thread.start()
        items = phases[0] + phases[1] + phases[2]
        want_final = am.expected_gateway(cfg, items)[0]
        al.wait_for("Redis to catch up with the final gateway state", lambda: gw_now() == want_final, 60, live,
                    interval=0.2)
        caught_up = time.time() - outage[1]
        print(f"outage {outage[1] - outage[0]:.1f} s; Redis caught up {caught_up:.1f} s after its restart")
        stop_ticks.set()
        ticker_thread.join(10)
        # let the flow drain what was produced (rows leave within pipeline.flush_interval) before stopping it
        want_ch = {s.customer: float(sum(plan_counts[s.plan])) for s in subs}
        want_ch[ticker[1]] = float(len(ticks))
        al.wait_for("the final usage on the aggregated topic",
                    lambda: _period_totals(kafka.bootstrap, k["aggregated_topic"], want_ch) == want_ch, 30, live,
                    interval=0.3)
    finally:
        stop_ticks.set()
        if ticker_thread.is_alive():
            ticker_thread.join(10)
        if not redis_server.is_running():
            redis_server.restart()
        al.stop_run(live)

    client = redis_server.client()
    try:
        _check_redis(redis_server.url, client, subs, [ticker], want_final)
    finally:
        client.close()
    all_items = items + ticks
    expected = al.model_alerts(cfg, all_items)
    assert al.by_customer(al.read_jsonl(jsonl)) == expected
    rows = al.read_alerts_log(cfg_path)
    assert al.log_tuples(rows) == {c: set(v) for c, v in expected.items()}
    views = read_views(cfg_path)
    totals = {r[1]: r[5] for r in views["periods"] if r[2] == METRIC}
    assert totals == want_ch, f"usage_by_period {totals} != {want_ch}"


# -- 5 ---------------------------------------------------------------------------------------------------

def test_webhook_through_the_flow_survives_errors_and_a_timeout(kafka, tmp_path):
    tag = _tag()
    tenant = f"hooli{tag}"
    secret = f"whsec-{uuid.uuid4().hex}"
    subs = [Sub(tenant, "cust_a", "hard8"), Sub(tenant, "cust_b", "soft30"), Sub(tenant, "cust_c", "hard20"),
            Sub(tenant, "cust_d", "soft30", {"thresholds": [10, 20, 30, 40, 50]})]
    counts = {"cust_a": 10, "cust_b": 31, "cust_c": 21, "cust_d": 14, "cust_e": 5}
    rng = random.Random(5)
    evs: List[am.Ev] = []
    for c, n in counts.items():
        evs += al.customer_events(rng, tenant, c, n, f"w{tag}")
    rng.shuffle(evs)
    k = _topics(kafka, "e2e-alerts-hook")
    jsonl = tmp_path / "alerts.jsonl"
    with al.WebhookReceiver(secret, fail_first=3, slow_seconds=2.5) as hook:
        text = al.config_toml([tenant], subs, chdb_dir=tmp_path / "ch", kafka=k, alerts_jsonl=jsonl,
                              webhook={"url": hook.url, "secret": secret, "timeout": "1s", "max_backoff": "1s",
                                       "spool_dir": str(tmp_path / "outbox")})
        cfg_path = tmp_path / "meter.toml"
        cfg_path.write_text(text)
        cfg = al.parse(text)
        # events are delivered in arrival order per customer: order the model's input the same way
        expected = al.model_alerts(cfg, evs)
        want_ids = {a[0] for a in _flat(expected)}
        assert len(want_ids) >= 15
        al.KeyedProducer(kafka.bootstrap, k["events_topic"]).send(
            [(al.key(e.tenant, e.customer), al.event_bytes(e, 2)) for e in evs])
        live = LiveRun(["run", "--config", str(cfg_path), "--workers", "1", "--progress-every", "0.2"],
                       tmp_path / "run.out")
        try:
            al.wait_for("every alert at the webhook", lambda: set(hook.deduped()) >= want_ids, 90, live,
                        interval=0.1)
            time.sleep(1.0)  # anything more would arrive now
        finally:
            al.stop_run(live)
        # the slow request's thread records its copy after sleeping: let it finish
        al.wait_for("the timed-out request to finish", lambda: hook.statuses.count(200) >= len(want_ids) + 1, 10)

    got = hook.deduped()
    assert set(got) == want_ids, f"missing {want_ids - set(got)}, unexpected {set(got) - want_ids}"
    assert not hook.bad_signatures, f"{len(hook.bad_signatures)} requests with a bad X-Meter-Signature"
    assert hook.statuses[:3] == [500, 500, 500], hook.statuses[:6]
    # the timed-out request was processed by the receiver and redelivered: the Idempotency-Key dedupes it
    assert any(len(bodies) > 1 for bodies in got.values()), "no redelivery after the timeout"
    records = []
    with hook.lock:
        received = list(hook.received)
    for headers, body in received:
        a = json.loads(body)
        assert headers["Idempotency-Key"] == a["alert_id"] and headers["X-Meter-Alert-Type"] == a["type"], headers
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Meter-Signature"] == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    for aid_, bodies in got.items():
        assert len(set(bodies)) == 1, f"alert {aid_} redelivered with a different body"
        records.append(json.loads(bodies[0]))
    # first deliveries arrive in emission order: per customer, the expected sequence
    first_seen: Dict[str, int] = {}
    for i, (headers, _b) in enumerate(received):
        first_seen.setdefault(headers["Idempotency-Key"], i)
    records.sort(key=lambda a: first_seen[a["alert_id"]])
    assert al.by_customer(records) == expected
    assert {a["alert_id"] for a in al.read_jsonl(jsonl)} == want_ids


# -- stopping ---------------------------------------------------------------------------------------------

def test_ctrl_c_stops_a_streaming_run_with_exit_130(kafka, tmp_path):
    tag = _tag()
    tenant = f"ctrlc{tag}"
    k = _topics(kafka, "e2e-alerts-ctrlc")
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(al.config_toml([tenant], [Sub(tenant, "cust_a", "hard8")], chdb_dir=tmp_path / "ch",
                                       kafka=k, alerts_jsonl=tmp_path / "alerts.jsonl"))
    evs = al.customer_events(random.Random(1), tenant, "cust_a", 5, f"c{tag}")
    al.KeyedProducer(kafka.bootstrap, k["events_topic"]).send(
        [(al.key(e.tenant, e.customer), al.event_bytes(e, 0)) for e in evs])
    live = LiveRun(["run", "--config", str(cfg_path), "--progress-every", "0.2"], tmp_path / "run.out")
    try:
        live.wait_until_read(len(evs), timeout=60)
    finally:
        rc = al.stop_run(live)
    err = "".join(live.stderr)
    assert rc == 130 and err.rstrip().endswith("meter: interrupted") and "panicked" not in err, \
        f"exit {rc}, stderr:\n{err[-1500:]}"


# -- 7 ---------------------------------------------------------------------------------------------------

def test_late_events_after_the_period_changed_never_block_it_again_across_a_sigkill(kafka, redis_server, tmp_path):
    """Issue 17 / README: Outputs: hard-enforced customers send late November events (inside late_grace)
    after their first December event, then the run is SIGKILLed and resumed, more late events come, December
    blocks and a changelog record lowers a quota. November is blocked once and unblocked once, never again;
    the late events still fire November's thresholds; Redis describes December from the first December event
    on, sampled all along; the JSONL file and ``alerts_log`` equal the reference model."""
    tag = _tag()
    tenant = f"latecorp{tag}"
    x = Sub(tenant, "cust_x", "hard8", {"thresholds": [75, 90, 100, 120]})  # November blocked at its 8th
    y = Sub(tenant, "cust_y", "hard8")  # November reaches 100 % only through late events
    lowered = Sub(tenant, "cust_y", "hard8", {"included": 1})
    k = _topics(kafka, "e2e-alerts-late", entitlements=True)
    jsonl = tmp_path / "alerts.jsonl"
    text = al.config_toml([tenant], [x, y], chdb_dir=tmp_path / "ch", kafka=k, redis_url=redis_server.url,
                          alerts_jsonl=jsonl, pipeline_extra='epoch_interval = "250ms"\n')
    cfg_path = tmp_path / "meter.toml"
    cfg_path.write_text(text)
    cfg = al.parse(text)
    dec, jan = PERIOD_END, am.ms("2027-01-01T00:00:00Z")
    nov_lo, nov_hi = am.ms("2026-11-25T00:00:00Z"), am.ms("2026-11-30T20:00:00Z")
    late_lo = am.ms("2026-11-30T20:00:00Z")  # watermark stays below Dec 1 02:00: late_grace (6h) accepts them
    dec_lo, dec_hi = dec + 1_800_000, dec + 5_400_000
    rng = random.Random(17)

    def evs(c, n, prefix, lo, hi):
        return al.customer_events(rng, tenant, c, n, f"{prefix}{tag}", lo, hi)

    phases = [
        evs("cust_x", 9, "a", nov_lo, nov_hi) + evs("cust_y", 6, "a", nov_lo, nov_hi),  # 0: November
        evs("cust_x", 1, "b", dec_lo, dec_hi) + evs("cust_y", 1, "b", dec_lo, dec_hi),  # 1: first December events
        evs("cust_x", 2, "c", late_lo, dec) + evs("cust_y", 2, "c", late_lo, dec),      # 2: late November
        # 3 (produced while no flow runs, read by the resumed run): late November, then December to 100 %
        evs("cust_x", 2, "d", late_lo, dec) + evs("cust_y", 2, "d", late_lo, dec) +
        evs("cust_x", 7, "e", dec_lo, dec_hi),
    ]
    tail = evs("cust_y", 1, "f", late_lo, dec) + evs("cust_y", 1, "g", dec_lo, dec_hi)  # after the change
    producer = al.KeyedProducer(kafka.bootstrap, k["events_topic"])

    def send(items):
        producer.send([(al.key(e.tenant, e.customer), al.event_bytes(e, i % 3)) for i, e in enumerate(items)])

    client = redis_server.client()

    def state(c):
        h = {a.decode(): b.decode() for a, b in client.hgetall(f"meter:{tenant}:{c}:{METRIC}").items()}
        return (float(h["used"]), float(h["included"]), h["state"], am.ms(h["period_start"]),
                am.ms(h["period_end"])) if h else None

    def alerts_of(c):
        return [al.tuple_of(a) for a in al.read_jsonl(jsonl) if a["customer_id"] == c]

    samples: List[Tuple[str, tuple]] = []
    sampling = threading.Event()

    def sample() -> None:  # Redis as a gateway sees it, every few ms from the first December state on
        sampler = redis_server.client()
        try:
            while sampling.is_set():
                for c in ("cust_x", "cust_y"):
                    h = sampler.hgetall(f"meter:{tenant}:{c}:{METRIC}")
                    samples.append((c, (h.get(b"period_start"), h.get(b"period_end"), h.get(b"state"))))
                time.sleep(0.005)
        finally:
            sampler.close()

    argv = ["run", "--config", str(cfg_path), "--recovery", str(tmp_path / "recovery"), "--workers", "1",
            "--progress-every", "0.2"]
    sampler = threading.Thread(target=sample, daemon=True)
    live = LiveRun(argv, tmp_path / "run1.out")
    try:
        send(phases[0])
        al.wait_for("November blocked for cust_x", lambda: state("cust_x") == (9.0, 8.0, "blocked", PERIOD_START,
                                                                                 dec), 60, live)
        al.wait_for("November ok for cust_y", lambda: (state("cust_y") or (0,))[0] == 6.0, 10, live)
        send(phases[1])
        al.wait_for("December in Redis", lambda: state("cust_x") == (1.0, 8.0, "ok", dec, jan) and
                    state("cust_y") == (1.0, 8.0, "ok", dec, jan), 20, live)
        # a replay after the SIGKILL starts from the last snapshot: let one hold December (epochs of 250 ms), so
        # what the sampler sees is the flow's logic, not a rewind to before the first December event
        time.sleep(1.0)
        sampling.set()
        sampler.start()
        send(phases[2])  # x: November's 10th event crosses 120 %; y: its 8th crosses 90 % and 100 %
        al.wait_for("the late events' thresholds", lambda: len(alerts_of("cust_x")) >= 6 and
                    len(alerts_of("cust_y")) >= 3, 20, live)
        time.sleep(0.5)
    finally:
        rc = live.kill()
    assert rc == -signal.SIGKILL, f"meter run was not killed by SIGKILL (exit {rc})"
    try:
        send(phases[3])
        live = LiveRun(argv, tmp_path / "run2.out")
        try:
            al.wait_for("December blocked for cust_x after the resume",
                        lambda: state("cust_x") == (8.0, 8.0, "blocked", dec, jan), 60, live)
            path = tmp_path / "lowered.toml"
            path.write_text(al.config_toml([tenant], [lowered], chdb_dir=tmp_path / "ch-unused", kafka=k))
            run_meter("entitlements", "publish", "--config", str(path), "--customer", f"{tenant}/cust_y", timeout=60)
            al.wait_for("December blocked for cust_y by the lowered quota",
                        lambda: state("cust_y") == (1.0, 1.0, "blocked", dec, jan), 20, live)
            send(tail)
            al.wait_for("cust_y's last December event", lambda: state("cust_y") == (2.0, 1.0, "blocked", dec, jan),
                        20, live)
            time.sleep(0.3)
        finally:
            al.stop_run(live)
    finally:
        sampling.clear()
        sampler.join(10)
        client.close()

    # Redis never went back to November once December started, whatever the late events and the restart did
    assert len(samples) > 100
    bad = [s for s in samples if not s[1][0] or (am.ms(s[1][0].decode()), am.ms(s[1][1].decode())) != (dec, jan)]
    assert not bad, f"{len(bad)} of {len(samples)} Redis reads not on December, first {bad[:3]}"

    def aid(c, type_, start, threshold=None, seq=0):
        return alert_id(type_, tenant, c, METRIC, start, threshold, seq)

    def ids(items):
        return [e.event_id for e in items]

    xa, ya = ids([e for p in phases for e in p if e.customer == "cust_x"]), ids(
        [e for p in phases + [tail] for e in p if e.customer == "cust_y"])
    nov, blk, unb = PERIOD_START, "block", "unblock"
    want_x = [(aid("cust_x", "threshold_crossed", nov, 75), "threshold_crossed", METRIC, nov, 75.0, xa[5], "notify"),
              (aid("cust_x", "threshold_crossed", nov, 90), "threshold_crossed", METRIC, nov, 90.0, xa[7], "notify"),
              (aid("cust_x", "threshold_crossed", nov, 100), "threshold_crossed", METRIC, nov, 100.0, xa[7], blk),
              (aid("cust_x", "blocked", nov, 100.0, 1), "blocked", METRIC, nov, 100.0, xa[7], blk),
              (aid("cust_x", "unblocked", nov, None, 1), "unblocked", METRIC, nov, None, xa[9], unb),
              # November's 10th event, late: its threshold fires, November is not blocked again
              (aid("cust_x", "threshold_crossed", nov, 120), "threshold_crossed", METRIC, nov, 120.0, xa[10], blk),
              # December (the current period) blocks at its 8th event
              (aid("cust_x", "threshold_crossed", dec, 75), "threshold_crossed", METRIC, dec, 75.0, xa[-3], "notify"),
              (aid("cust_x", "threshold_crossed", dec, 90), "threshold_crossed", METRIC, dec, 90.0, xa[-1], "notify"),
              (aid("cust_x", "threshold_crossed", dec, 100), "threshold_crossed", METRIC, dec, 100.0, xa[-1], blk),
              (aid("cust_x", "blocked", dec, 100.0, 1), "blocked", METRIC, dec, 100.0, xa[-1], blk)]
    want_y = [(aid("cust_y", "threshold_crossed", nov, 75), "threshold_crossed", METRIC, nov, 75.0, ya[5], "notify"),
              (aid("cust_y", "threshold_crossed", nov, 90), "threshold_crossed", METRIC, nov, 90.0, ya[8], "notify"),
              (aid("cust_y", "threshold_crossed", nov, 100), "threshold_crossed", METRIC, nov, 100.0, ya[8], blk),
              # the lowered quota re-evaluates December only: 1 of 1
              (aid("cust_y", "threshold_crossed", dec, 75), "threshold_crossed", METRIC, dec, 75.0, "", "notify"),
              (aid("cust_y", "threshold_crossed", dec, 90), "threshold_crossed", METRIC, dec, 90.0, "", "notify"),
              (aid("cust_y", "threshold_crossed", dec, 100), "threshold_crossed", METRIC, dec, 100.0, "", blk),
              (aid("cust_y", "blocked", dec, 100.0, 1), "blocked", METRIC, dec, 100.0, "", blk)]
    want = {(tenant, "cust_x"): want_x, (tenant, "cust_y"): want_y}
    items = [*phases[0], *phases[1], *phases[2], *phases[3], am.Change(tenant, "cust_y", 0, lowered.as_dict()), *tail]
    assert al.model_alerts(cfg, items) == want, "the reference model disagrees with the hand-written alerts"
    assert am.expected_gateway(cfg, items)[0] == {(tenant, "cust_x", METRIC): (8.0, 8.0, "blocked"),
                                                  (tenant, "cust_y", METRIC): (2.0, 1.0, "blocked")}

    records = al.read_jsonl(jsonl)
    got_ids = [a["alert_id"] for a in records]
    assert len(got_ids) == len(set(got_ids)), "an alert id was written twice to the JSONL file"
    assert al.by_customer(records) == want
    rows = al.read_alerts_log(cfg_path)
    assert al.log_tuples(rows) == {c: set(v) for c, v in want.items()}
    assert sorted((r["customer_id"], r["period_start_ms"]) for r in rows if r["type"] == "blocked") == \
        [("cust_x", nov), ("cust_x", dec), ("cust_y", dec)]
