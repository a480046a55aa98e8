"""The overage review queue in Kafka mode, on the REAL broker (``kafka`` fixture) and real chDB, `meter run` a real
subprocess: the ``usage.reviews`` topic carries the items (keyed by review_id, a growing version per key, a
``route`` header; a consumer keeping the highest version sees exactly the ``overage_reviews`` items), and a
decision made with `meter review approve` while `meter run --recovery` holds the chDB path is published only,
read by the flow from ``usage.review-decisions`` and written to ClickHouse: it is in ``overage_reviews`` after the
flow is SIGKILLed, and still there (with the item ``pending`` again) after a resumed run grows the item's usage.
A bad record on the decisions topic is an ``invalid_decision`` dead letter; the command's one-line errors (an
unknown item, an auto_apply item, a second decision on the same amount) hold without ClickHouse too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from meterflow.schemas.reviews import review_id
from meterflow.sources.kafka import read_key
from tests.e2e import alert_support as al
from tests.e2e.support import LiveRun, consume_all, kafka_section, produce, read_views, run_meter, unique
from tests.e2e.test_review_e2e import CONFIG, events

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

PERIOD_START = 1_793_491_200_000  # 2026-11-01T00:00:00Z, the subscriptions' anchor
BIG = review_id("acme", "big", "calls", PERIOD_START)
SMALL = review_id("acme", "small", "calls", PERIOD_START)


def _config(tmp_path: Path, bootstrap: str) -> tuple:
    prefix = unique("e2e-review")
    k = {**kafka_section(bootstrap, f"{prefix}-events", prefix), "reviews_topic": f"{prefix}-reviews",
         "review_decisions_topic": f"{prefix}-decisions"}
    cfg = tmp_path / "meter.toml"
    text = CONFIG.replace("[pipeline]\n", '[pipeline]\nflush_interval = "200ms"\n', 1)
    cfg.write_text(text + f'\n[clickhouse]\ndsn = "chdb://{tmp_path / "ch"}"\n\n[kafka]\n' +
                   "".join(f'{key} = "{v}"\n' for key, v in k.items()))
    return cfg, k


def _items_on_topic(bootstrap: str, topic: str) -> dict:
    """A consumer's view of the reviews topic: the highest version per review_id (and every key's versions)."""
    best, versions = {}, {}
    for key, value, headers in consume_all(bootstrap, topic):
        r = json.loads(value)
        assert key == r["review_id"].encode() and dict(headers)["route"] == r["route"].encode(), (key, r, headers)
        versions.setdefault(r["review_id"], []).append(r["version"])
        if r["review_id"] not in best or r["version"] >= best[r["review_id"]]["version"]:
            best[r["review_id"]] = r
    for vs in versions.values():
        assert vs == sorted(vs), f"versions of one key go down on the topic: {vs}"
    return best


def _listing(cfg: Path) -> dict:
    proc = run_meter("review", "list", "--config", str(cfg), "--json")
    return {r["review_id"]: r for r in map(json.loads, proc.stdout.splitlines())}


def _same_items(topic_items: dict, listed: dict) -> None:
    assert set(topic_items) == set(listed)
    for rid, t in topic_items.items():
        v = listed[rid]
        assert (v["overage_amount"], v["route"], v["usage"], v["included"], v["overage_units"], v["final"],
                v["contract"], v["account_name"], v["customer_id"]) == \
            (format(t["overage_amount"], "g"), t["route"], t["usage"], t["included"], t["overage_units"], t["final"],
             t["contract"], t["account_name"], t["customer_id"]), (t, v)


def test_decision_while_the_flow_runs_lands_and_survives_a_sigkill_and_resume(kafka, tmp_path):
    cfg, k = _config(tmp_path, kafka.bootstrap)
    kafka.create_topic(k["events_topic"], partitions=2)
    kafka.create_topic(k["reviews_topic"], partitions=2)
    kafka.create_topic(k["dead_letter_topic"], partitions=1)
    bootstrap = kafka.bootstrap
    # big: 20 calls, 10 over at its custom 10.0 = 100 (approve); small: 14 = 4 over at 2.5 = 10 (auto_apply)
    first = events("big", 0, 20) + events("small", 0, 14) + events("within", 0, 10)
    produce(bootstrap, k["events_topic"], first, 2)
    recovery = tmp_path / "recovery"
    argv = ["run", "--config", str(cfg), "--recovery", str(recovery), "--workers", "1", "--progress-every", "0.2"]
    live = LiveRun(argv, tmp_path / "run1.out")
    try:
        live.wait_until_read(len(first), timeout=90)
        al.wait_for("both items on the reviews topic",
                    lambda: {BIG, SMALL} <= set(_items_on_topic(bootstrap, k["reviews_topic"])), 30, live)
        on_topic = _items_on_topic(bootstrap, k["reviews_topic"])
        assert (on_topic[BIG]["overage_amount"], on_topic[BIG]["route"]) == (100, "approve")

        # chDB is held by the run: the command checks the item on the reviews topic and publishes only
        proc = run_meter("review", "approve", BIG, "--config", str(cfg), "--by", "alice", "--note", "on the call")
        assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"approved review {BIG} on overage 100 by "
                                                                        "alice at "), proc.stdout
        assert f"published to {k['review_decisions_topic']} only: embedded ClickHouse is in use by pid " \
            f"{live.proc.pid}" in proc.stdout, proc.stdout
        twice = run_meter("review", "reject", BIG, "--config", str(cfg), "--by", "bob", check=False)
        assert twice.returncode != 0 and twice.stderr.count("\n") == 1 and \
            twice.stderr.startswith(f"meter: error: review item {BIG} was already approved by alice at "), twice.stderr
        auto = run_meter("review", "approve", SMALL, "--config", str(cfg), "--by", "bob", check=False)
        assert auto.returncode != 0 and "auto_apply route" in auto.stderr and auto.stderr.count("\n") == 1
        unknown = run_meter("review", "approve", "f" * 32, "--config", str(cfg), "--by", "bob", check=False)
        assert unknown.returncode != 0 and unknown.stderr.startswith(
            f"meter: error: no review item '{'f' * 32}' on Kafka topic '{k['reviews_topic']}'"), unknown.stderr
        [published] = read_key(bootstrap, k["review_decisions_topic"], BIG.encode())
        assert json.loads(published)["decided_by"] == "alice"
        # another tool's bad record on the decisions topic: a dead letter, the flow goes on
        produce(bootstrap, k["review_decisions_topic"], [b'{"review_id": "' + BIG.encode() + b'"}'], 1,
                keys=[BIG.encode()])
        # its dead letter on the dead-letter topic: the flow has read the decisions topic past the decision
        al.wait_for("the invalid_decision dead letter on the topic",
                    lambda: any(dict(h).get("reason") == b"invalid_decision"
                                for _k, _v, h in consume_all(bootstrap, k["dead_letter_topic"])), 30, live)
        time.sleep(0.5)  # the ClickHouse sink writes the same batch
    finally:
        live.kill()

    # chDB is free again: the killed run had written the decision to ClickHouse
    killed = _listing(cfg)[BIG]
    assert (killed["status"], killed["decided_by"], killed["note"]) == ("approved", "alice", "on the call"), killed
    resumed = run_meter(*argv[:-2], "--stop-at-end", "--json", "--progress-every", "0", timeout=120)
    assert resumed.returncode == 0
    listed = _listing(cfg)
    big = listed[BIG]
    assert (big["status"], big["decided_by"], big["note"], big["overage_amount"]) == \
        ("approved", "alice", "on the call", "100"), big
    _same_items(_items_on_topic(bootstrap, k["reviews_topic"]), listed)
    dead = [d for d in read_views(cfg)["dead_letters"] if d[0] == "invalid_decision"]
    assert len(dead) == 1 and "not a review decision record" in dead[0][1] and \
        dead[0][2] == f"{k['review_decisions_topic']}/0/1", dead

    # the item grows after the decision (30 calls, 20 over, 200): pending again, the decision still shown
    produce(bootstrap, k["events_topic"], events("big", 20, 30), 2)
    run_meter(*argv[:-2], "--stop-at-end", "--json", "--progress-every", "0", timeout=120)
    grown = _listing(cfg)
    assert (grown[BIG]["status"], grown[BIG]["overage_amount"], grown[BIG]["decided_by"], grown[BIG]["note"],
            grown[BIG]["decided_at"]) == ("pending", "200", "alice", "on the call", big["decided_at"])
    assert grown[SMALL]["status"] == "auto_applied"
    _same_items(_items_on_topic(bootstrap, k["reviews_topic"]), grown)
