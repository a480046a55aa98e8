"""The overage review queue end to end: `meter run` (JSONL, embedded chDB) opens review items, `meter review
list/approve/reject` decides on them, and a second run that grows an item's usage makes it `pending` again with
the earlier decision still shown. The decisions live in ClickHouse, outside the flow's state."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.support import run_meter, write_jsonl

CONFIG = """
[pipeline]
late_grace = "1h"
max_clock_skew = "1000d"

[[tenants]]
id = "acme"

[[metrics]]
code = "calls"
event_type = "api_call"

[[plans]]
code = "pro"
[plans.entitlements.calls]
included = 10
overage_rate = 2.5

[[subscriptions]]
tenant_id = "acme"
customer_id = "big"
plan = "pro"
anchor = "2026-11-01T00:00:00Z"
account_name = "Big Corp"
arr = 250000.0
[subscriptions.overrides.calls]
overage_rate = 10.0

[[subscriptions]]
tenant_id = "acme"
customer_id = "small"
plan = "pro"
anchor = "2026-11-01T00:00:00Z"
account_name = "Small LLC"

[[subscriptions]]
tenant_id = "acme"
customer_id = "within"
plan = "pro"
anchor = "2026-11-01T00:00:00Z"

[review]
bands = [50.0, 500.0, 2000.0]
routes = ["auto_apply", "approve", "review", "sales"]
"""


def events(customer: str, first: int, last: int, day: int = 3):
    return [json.dumps({"event_id": f"{customer}-{i}", "tenant_id": "acme", "customer_id": customer,
                        "event_type": "api_call", "timestamp": f"2026-11-{day:02d}T10:00:{i % 60:02d}Z"}).encode()
            for i in range(first, last)]


def listing(cfg: Path, *extra: str):
    proc = run_meter("review", "list", "--config", str(cfg), "--json", *extra)
    return {(r["customer_id"]): r for r in map(json.loads, proc.stdout.splitlines())}


def test_run_decide_grow_and_the_decision_is_still_shown(tmp_path):
    cfg = tmp_path / "meter.toml"
    alerts = tmp_path / "alerts.jsonl"
    cfg.write_text(CONFIG + f'\n[alerts]\njsonl = "{alerts}"\n\n[clickhouse]\ndsn = "chdb://{tmp_path / "ch"}"\n')
    # big: 20 calls = 10 over at its custom 10.0 = 100 (approve); small: 14 = 4 over at 2.5 = 10 (auto_apply);
    # within: 10 of 10 included (no item)
    first = write_jsonl(tmp_path / "one.jsonl", events("big", 0, 20) + events("small", 0, 14) +
                        events("within", 0, 10))
    run_meter("run", "--config", str(cfg), "--input", str(first), "--json")
    items = listing(cfg)
    assert set(items) == {"big", "small"}
    big, small = items["big"], items["small"]
    assert (big["overage_amount"], big["route"], big["status"], big["contract"], big["account_name"]) == \
        ("100", "approve", "pending", "custom", "Big Corp")
    assert (big["usage"], big["included"], big["overage_units"], big["arr"], big["final"]) == \
        (20, 10, 10, 250000, False)
    assert big["decided_by"] == "" and big["decided_at"] is None
    assert (small["overage_amount"], small["route"], small["status"], small["contract"]) == \
        ("10", "auto_apply", "auto_applied", "standard")
    assert set(listing(cfg, "--status", "pending")) == {"big"}
    assert set(listing(cfg, "--route", "auto_apply")) == {"small"}

    notes = [json.loads(line) for line in alerts.read_text().splitlines()]
    notes = {(a["customer_id"], a["type"]): a for a in notes if a["type"].startswith("review_")}
    assert set(notes) == {("big", "review_opened"), ("small", "review_opened")}
    opened = notes[("big", "review_opened")]
    assert opened["action"] == "approve" and "Big Corp" in opened["detail"] and opened["amount"] == 100
    assert notes[("small", "review_opened")]["detail"].startswith(f"review {small['review_id']}: customer notice")

    rid = big["review_id"]
    proc = run_meter("review", "approve", rid, "--config", str(cfg), "--by", "alice", "--note", "agreed on the call")
    assert proc.stdout.startswith(f"approved review {rid} on overage 100 by alice at ")
    approved = listing(cfg)["big"]
    assert (approved["status"], approved["decided_by"], approved["note"]) == ("approved", "alice", "agreed on the call")
    again = run_meter("review", "reject", rid, "--config", str(cfg), "--by", "bob", check=False)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already approved by alice" in again.stderr
    missing = run_meter("review", "approve", "nope", "--config", str(cfg), "--by", "bob", check=False)
    assert missing.returncode != 0 and missing.stderr.startswith("meter: error: no review item 'nope'")
    auto = run_meter("review", "approve", small["review_id"], "--config", str(cfg), "--by", "bob", check=False)
    assert auto.returncode != 0 and "auto_apply route" in auto.stderr

    # The second run replays the first input and grows big's usage: 30 calls, 20 over, 200 (still approve).
    second = write_jsonl(tmp_path / "two.jsonl", events("big", 0, 30, day=4))
    run_meter("run", "--config", str(cfg), "--input", str(first), "--input", str(second), "--json")
    grown = listing(cfg)["big"]
    assert (grown["overage_amount"], grown["route"], grown["status"]) == ("200", "approve", "pending")
    assert (grown["decided_by"], grown["note"], grown["decided_at"]) == \
        ("alice", "agreed on the call", approved["decided_at"])
    proc = run_meter("review", "reject", rid, "--config", str(cfg), "--by", "bob", "--note", "too much")
    final = listing(cfg)["big"]
    assert (final["status"], final["decided_by"], final["note"]) == ("rejected", "bob", "too much")
    table = run_meter("review", "list", "--config", str(cfg)).stdout
    assert "Big Corp" in table and "rejected" in table and "auto_applied" in table


def test_a_config_without_review_sends_no_review_notifications(tmp_path):
    cfg = tmp_path / "meter.toml"
    alerts = tmp_path / "alerts.jsonl"
    text = CONFIG[:CONFIG.index("[review]")]
    cfg.write_text(text + f'\n[alerts]\njsonl = "{alerts}"\n\n[clickhouse]\ndsn = "chdb://{tmp_path / "ch"}"\n')
    first = write_jsonl(tmp_path / "one.jsonl", events("big", 0, 20) + events("small", 0, 14))
    run_meter("run", "--config", str(cfg), "--input", str(first), "--json")
    types = [json.loads(line)["type"] for line in alerts.read_text().splitlines()]
    assert types and not [t for t in types if t.startswith("review_")]
    assert set(listing(cfg)) == {"big", "small"}  # the queue itself follows the default bands
