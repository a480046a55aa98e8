"""End to end: `meter run --recovery`, an invoice cut, late events, the resumed run, then `meter reconcile`.

Phase 1 meters ``part1.jsonl`` (embedded mode, JSONL in, chDB out) with an entitlements changelog that moves
``c_plan`` from plan ``pro`` (0.01 a call) to ``scale`` (0.005) inside November. The test then cuts an invoice
file from what ``meter usage`` shows at that point, the way a billing system would, planting: an under-bill
(5 calls short), an over-bill (2 calls too many), a credit line, ``c_plan`` billed at the old price, a
customer with no invoice line at all, and a tokens line in thousands (``[reconcile] units``). Phase 2 adds
late events after the cut (3 more calls of ``c_late``, ingested after ``invoiced_at``) and an October event of
``c_match`` past late_grace (``too_late``: archived, never metered), and resumes the same recovery directory.
Then a row of ``usage_period_rows`` is edited behind the flow's back, and ``meter reconcile`` runs as a
subprocess: every class with its owner and exact diffs, raw equal to metered on every clean key, the two
planted breaks ``metering_gap``. The same database then serves the CLI's output and error tests.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from meterflow.base.timeutil import ms_to_iso, parse_rfc3339_ms
from tests.e2e.support import REPO, env, run_meter, run_summary, usage_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

NOV = "2026-11-01T00:00:00Z"
OCT = "2026-10-01T00:00:00Z"
CUSTOMERS = {"c_match": 10, "c_under": 20, "c_over": 10, "c_credit": 10, "c_plan": 10, "c_late": 10,
             "c_noinv": 5, "c_gap": 8}

CONFIG = '''
[pipeline]
late_grace = "1h"
dedupe_window = "24h"

[[tenants]]
id = "acme"

[[metrics]]
code = "api_calls"
event_type = "api_call"
aggregation = "count"

[[metrics]]
code = "tokens"
event_type = "api_call"
aggregation = "sum"
property = "tokens"

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
price = { model = "per_unit", unit_amount = 0.01 }

[[plans]]
code = "scale"
[plans.entitlements.api_calls]
price = { model = "per_unit", unit_amount = 0.005 }

[reconcile]
units = { tokens = 1000 }
tolerance = 0.001
'''


def subscriptions() -> str:
    return "".join(f'\n[[subscriptions]]\ntenant_id = "acme"\ncustomer_id = "{c}"\nplan = "pro"\nperiod = "month"\n'
                   f'anchor = "{NOV}"\n' for c in CUSTOMERS)


def event(eid: str, customer: str, ts: str, tokens: int = 100) -> bytes:
    return json.dumps({"event_id": eid, "tenant_id": "acme", "customer_id": customer, "event_type": "api_call",
                       "timestamp": ts, "properties": {"tokens": tokens}}).encode()


def part1() -> list:
    lines = []
    base = parse_rfc3339_ms("2026-11-02T00:00:00Z")
    for c, n in CUSTOMERS.items():
        for i in range(n):
            lines.append(event(f"{c}-{i}", c, ms_to_iso(base + i * 60_000)))
    lines.append(event("c_match-3", "c_match", ms_to_iso(base + 3 * 60_000)))  # a retried duplicate
    return lines


def part2() -> list:
    late = [event(f"c_late-late-{i}", "c_late", f"2026-11-05T00:0{i}:00Z") for i in range(3)]
    return late + [event("c_match-october", "c_match", "2026-10-20T00:00:00Z")]  # past late_grace: too_late


CHANGELOG = {"tenant_id": "acme", "customer_id": "c_plan", "published_at": "2026-11-03T00:00:00Z",
             "subscription": {"tenant_id": "acme", "customer_id": "c_plan", "plan": "scale", "period": "month",
                              "anchor": NOV}}

INVOICE_FIELDS = ["invoice_id", "tenant_id", "customer_id", "metric", "period_start", "quantity", "amount",
                  "invoiced_at", "kind"]


def cut_invoices(periods: list, invoiced_at: str) -> list:
    """The billing system's invoice lines from what was metered at the cut (its own price book: 0.01 a call)."""
    calls = {r["customer_id"]: r["value"] for r in periods if r["metric"] == "api_calls"}
    tokens = {r["customer_id"]: r["value"] for r in periods if r["metric"] == "tokens"}
    assert calls == {c: float(n) for c, n in CUSTOMERS.items()}, calls  # the duplicate was not counted
    planted = {"c_under": -5, "c_over": 2}
    lines = []
    for c, v in calls.items():
        if c == "c_noinv":
            continue
        q = int(v) + planted.get(c, 0)
        lines.append({"invoice_id": f"inv-{c}", "customer_id": c, "metric": "api_calls", "quantity": str(q),
                      "amount": f"{q * 0.01:.2f}", "kind": "usage"})
    lines.append({"invoice_id": "cn-c_credit", "customer_id": "c_credit", "metric": "api_calls", "quantity": "2",
                  "amount": "0.02", "kind": "credit"})
    lines.append({"invoice_id": "inv-c_match", "customer_id": "c_match", "metric": "tokens",
                  "quantity": str(tokens["c_match"] / 1000), "amount": "0", "kind": "usage"})
    return [{"tenant_id": "acme", "period_start": NOV, "invoiced_at": invoiced_at, **ln} for ln in lines]


def chdb_exec(config: Path, sql: str) -> None:
    """One SQL statement on the config's chDB, in another process (the flow's tables edited behind its back)."""
    code = ("import sys\nfrom meterflow.schemas.config import load_config\nfrom meterflow.sinks.clickhouse import "
            "connect\nc, db = connect(load_config(sys.argv[1]).clickhouse)\nc.command(sys.argv[2].format(db=db))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(config), sql], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reconcile-e2e")
    cfg = tmp / "meterflow.toml"
    cfg.write_text(CONFIG + subscriptions() + f'\n[clickhouse]\ndsn = "chdb://{tmp / "ch"}"\n')
    p1, p2, changes = tmp / "part1.jsonl", tmp / "part2.jsonl", tmp / "changes.jsonl"
    p1.write_bytes(b"\n".join(part1()) + b"\n")
    changes.write_text(json.dumps(CHANGELOG) + "\n")
    recovery = tmp / "recovery"
    first = run_summary(run_meter("run", "--config", str(cfg), "--input", str(p1), "--entitlements", str(changes),
                                  "--recovery", str(recovery), "--json", "--progress-every", "0"))
    assert first["counters"]["accepted"] == sum(CUSTOMERS.values()) and first["counters"]["duplicates"] == 1
    time.sleep(0.05)
    invoiced_at = ms_to_iso(int(time.time() * 1000))  # the cut: after every phase-1 event was ingested
    time.sleep(0.05)
    invoices = cut_invoices(usage_json(cfg, "period"), invoiced_at)
    inv_csv = tmp / "invoices.csv"
    with inv_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=INVOICE_FIELDS)
        w.writeheader()
        w.writerows(invoices)
    # phase 2: late usage after the cut, and the resumed run over the additional input
    p2.write_bytes(b"\n".join(part2()) + b"\n")
    second = run_summary(run_meter("run", "--config", str(cfg), "--input", str(p1), "--input", str(p2),
                                   "--entitlements", str(changes), "--recovery", str(recovery), "--json",
                                   "--progress-every", "0"))
    assert second["counters"]["read"] == 4 and second["counters"]["accepted"] == 3, second
    assert second["counters"]["dead_lettered"] == 1, second  # the October event: too_late
    # a metering break: c_gap's period row rewritten behind the flow's back (a higher version, one call lost)
    chdb_exec(cfg, "INSERT INTO {db}.usage_period_rows SELECT * REPLACE (value - 1 AS value, version + 1000 AS "
                   "version) FROM {db}.usage_period_rows FINAL WHERE customer_id = 'c_gap' AND metric = 'api_calls'")
    return {"tmp": tmp, "cfg": cfg, "invoices": inv_csv, "changes": changes, "lines": invoices}


def reconcile_json(world, *extra: str, check: bool = True) -> dict:
    proc = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(world["invoices"]),
                     "--entitlements", str(world["changes"]), "--json", *extra, check=check)
    return json.loads(proc.stdout)


def test_every_planted_class_is_found_with_its_owner_and_exact_diffs(world):
    doc = reconcile_json(world)
    rows = {(r["customer_id"], r["metric"], r["period_start"]): r for r in doc["rows"]}
    got = {k: (r["class"], r["owner"], r["diff_units"], r["diff_amount"]) for k, r in rows.items()}
    want = {
        ("c_match", "api_calls", NOV): ("match", "", 0.0, "0.000000000"),
        ("c_match", "tokens", NOV): ("match", "", 0.0, "0"),
        ("c_under", "api_calls", NOV): ("under_bill", "revops", -5.0, "-0.050000000"),
        ("c_over", "api_calls", NOV): ("over_bill", "csm", 2.0, "0.020000000"),
        ("c_credit", "api_calls", NOV): ("credit", "finance", -2.0, "-0.020000000"),
        ("c_plan", "api_calls", NOV): ("plan_change", "billing", 0.0, "0.050000000"),
        ("c_late", "api_calls", NOV): ("timing", "watchlist", -3.0, "-0.030000000"),
        ("c_noinv", "api_calls", NOV): ("under_bill", "revops", -5.0, "-0.050000000"),
        ("c_gap", "api_calls", NOV): ("metering_gap", "engineering", 1.0, "0.000000000"),
        ("c_match", "api_calls", OCT): ("metering_gap", "engineering", 0.0, "0"),
    }
    # tokens of the other customers: metered, not invoiced, no price -> under_bill in units, 0 in money
    for c, n in CUSTOMERS.items():
        if c != "c_match":
            want[(c, "tokens", NOV)] = ("under_bill", "revops", -(n * 100.0 + (300 if c == "c_late" else 0)), "0")
    want[("c_match", "tokens", OCT)] = ("metering_gap", "engineering", 0.0, "0")
    assert {k: (v[0], v[1], v[2]) for k, v in got.items()} == {k: (v[0], v[1], v[2]) for k, v in want.items()}
    for k, v in want.items():
        assert Decimal(got[k][3]) == Decimal(v[3]), (k, got[k], v)
    # raw equals metered on every key but the two planted breaks
    for k, r in rows.items():
        if r["class"] != "metering_gap":
            assert r["raw_units"] == r["metered_units"], (k, r)
    gap, october = rows[("c_gap", "api_calls", NOV)], rows[("c_match", "api_calls", OCT)]
    assert (gap["raw_units"], gap["metered_units"], gap["invoiced_units"]) == (8.0, 7.0, 8.0)
    assert gap["evidence"]["raw_minus_metered"] == 1.0
    assert (october["raw_units"], october["metered_units"]) == (1.0, 0.0)
    assert october["evidence"]["too_late_dead_letters_of_customer"] == 1
    # the evidence of each finding
    late = rows[("c_late", "api_calls", NOV)]
    assert (late["raw_units"], late["metered_units"], late["invoiced_units"]) == (13.0, 13.0, 10.0)
    assert sorted(late["evidence"]["late_event_ids"]) == ["c_late-late-0", "c_late-late-1", "c_late-late-2"]
    assert late["evidence"]["raw_units_at_cut"] == 10.0 and late["evidence"]["late_events"] == 3
    credit = rows[("c_credit", "api_calls", NOV)]
    line = 2 + next(i for i, ln in enumerate(world["lines"]) if ln["invoice_id"] == "cn-c_credit")  # header: 1
    assert credit["evidence"]["credits"] == [{"invoice_id": "cn-c_credit", "line": line, "quantity": "2",
                                              "amount": "0.02"}]
    assert credit["evidence"]["usage_lines_units"] == 10.0
    plan = rows[("c_plan", "api_calls", NOV)]
    assert (Decimal(plan["metered_amount"]), Decimal(plan["invoiced_amount"])) == (Decimal("0.05"), Decimal("0.10"))
    assert [(c["plan"], c["published_at"]) for c in plan["evidence"]["subscription_changes"]] == \
        [("scale", "2026-11-03T00:00:00Z")]
    tokens = rows[("c_match", "tokens", NOV)]
    assert tokens["invoiced_units"] == 1000.0 == tokens["metered_units"]  # 1 invoiced unit = 1,000 tokens
    # the run: totals per class, accuracy, fingerprints of the inputs
    assert doc["totals"]["under_bill"]["keys"] == 2 + 7 and doc["totals"]["under_bill"]["owner"] == "revops"
    assert doc["totals"]["timing"] == {"keys": 1, "owner": "watchlist", "diff_units": -3.0, "diff_amount":
                                       doc["totals"]["timing"]["diff_amount"]}
    assert float(doc["totals"]["timing"]["diff_amount"]) == -0.03
    assert doc["accuracy_pct"] == pytest.approx(100.0 * (len(rows) - 3) / len(rows))
    assert doc["invoice_errors"] == [] and doc["inputs"]["invoice_lines"] == len(world["lines"])
    assert len(doc["inputs"]["invoices_sha256"]) == 64 and len(doc["inputs"]["entitlements_sha256"]) == 64
    assert len(doc["run_id"]) == 32 and doc["ran_at"].endswith("Z")


def test_out_csv_table_and_fail_on(world):
    out = world["tmp"] / "findings.csv"
    doc = reconcile_json(world, "--out", str(out))
    with out.open(newline="") as f:
        got = list(csv.DictReader(f))
    from meterflow.sinks.clickhouse_schema import RECONCILIATION_COLUMNS

    assert list(got[0]) == [c for c in RECONCILIATION_COLUMNS if c != "inputs"]
    assert len(got) == len(doc["rows"]) and {r["run_id"] for r in got} == {doc["run_id"]}
    under = next(r for r in got if r["customer_id"] == "c_under" and r["metric"] == "api_calls")
    assert (under["class"], under["owner"], float(under["diff_units"]), Decimal(under["diff_amount"])) == \
        ("under_bill", "revops", -5.0, Decimal("-0.05"))
    assert (under["period_start"], float(under["raw_units"]), float(under["invoiced_units"])) == (NOV, 20.0, 15.0)
    assert json.loads(under["evidence"]) == {"invoice_ids": ["inv-c_under"], "invoiced_at":
                                             world["lines"][0]["invoiced_at"]}

    # the table: non-matching keys and the totals per class; exit 0 whatever it found
    proc = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(world["invoices"]),
                     "--entitlements", str(world["changes"]), "--tenant", "acme", "--period-start", NOV)
    assert "totals per class" in proc.stdout and "plan_change" in proc.stdout and "watchlist" in proc.stdout
    assert "c_under" in proc.stdout and "0 invoice line(s) skipped" in proc.stdout
    assert "c_match" not in proc.stdout.split("totals per class")[0].replace("c_match-", "")  # match: not listed
    # with --fail-on: 1 when a key is in one of the classes, 0 when none is
    failed = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(world["invoices"]),
                       "--fail-on", "under_bill", "--json", check=False)
    assert failed.returncode == 1 and json.loads(failed.stdout)["totals"]["under_bill"]["keys"] == 9
    fine = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(world["invoices"]),
                     "--period-start", OCT, "--fail-on", "under_bill,over_bill", "--json", check=False)
    assert fine.returncode == 0 and {r["class"] for r in json.loads(fine.stdout)["rows"]} == {"metering_gap"}
    bad = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(world["invoices"]),
                    "--fail-on", "underbill", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "meter: error: --fail-on: unknown class 'underbill': expected some of metering_gap, match, timing, credit, "
        "plan_change, under_bill, over_bill"]


def test_every_run_is_kept_in_the_reconciliation_view(world):
    a, b = reconcile_json(world), reconcile_json(world)
    code = ("import sys, json\nfrom meterflow.schemas.config import load_config\nfrom meterflow.sinks.clickhouse "
            "import connect\nc, db = connect(load_config(sys.argv[1]).clickhouse)\nprint(json.dumps([list(r) for r "
            "in c.query(f\"SELECT run_id, customer_id, metric, toUnixTimestamp64Milli(period_start), class, owner, "
            "toString(diff_amount), inputs FROM "
            "{db}.reconciliation WHERE run_id IN ({sys.argv[2]!r}, {sys.argv[3]!r})\").result_rows]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(world["cfg"]), a["run_id"], b["run_id"]], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads(proc.stdout)
    for doc in (a, b):
        mine = {(r[1], r[2], ms_to_iso(r[3])): (r[4], r[5], Decimal(r[6]))
                for r in stored if r[0] == doc["run_id"]}
        assert mine == {(r["customer_id"], r["metric"], r["period_start"]): (r["class"], r["owner"],
                                                                            Decimal(r["diff_amount"]))
                        for r in doc["rows"]}
        assert len(mine) == len(doc["rows"]) == 2 * len(CUSTOMERS) + 2
        inputs = {json.loads(r[7])["invoices_sha256"] for r in stored if r[0] == doc["run_id"]}
        assert inputs == {doc["inputs"]["invoices_sha256"]}


def test_bad_invoice_files(world):
    tmp = world["tmp"]
    # a CSV header that lacks a column: one line, non-zero, nothing else
    no_amount = tmp / "no-amount.csv"
    no_amount.write_text("invoice_id,tenant_id,customer_id,metric,period_start,quantity,invoiced_at,kind\n"
                         f"i1,acme,c_match,api_calls,{NOV},10,{NOV},usage\n")
    proc = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(no_amount), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"meter: error: invoice file {no_amount}: the CSV header (line 1) lacks the column(s) amount; expected "
        "invoice_id,tenant_id,customer_id,metric,period_start,quantity,amount,invoiced_at,kind"]
    # JSONL: each bad line reported with its number and skipped; the good lines reconcile
    good = [json.dumps(ln) for ln in world["lines"] if ln["customer_id"] in ("c_match", "c_under")]
    bad_lines = [
        "{not json",
        json.dumps({**world["lines"][0], "metric": "gpu_hours"}),
        json.dumps({**world["lines"][0], "quantity": "ten"}),
        json.dumps({**world["lines"][0], "invoiced_at": "yesterday"}),
        json.dumps({**world["lines"][0], "period_start": "2026-11-15T00:00:00Z"}),
        json.dumps({k: v for k, v in world["lines"][0].items() if k != "kind"}),
    ]
    jsonl = tmp / "invoices.jsonl"
    jsonl.write_text("\n".join(good[:1] + bad_lines + good[1:]) + "\n")
    proc = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(jsonl), "--json")
    errs = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errs) == 6 and all(e.startswith(f"meter: invoices {jsonl}: line ") and e.endswith("(skipped)")
                                  for e in errs), errs
    assert [e.split(": line ")[1].split(":")[0] for e in errs] == ["2", "3", "4", "5", "6", "7"]
    assert "not valid JSON" in errs[0] and "unknown metric 'gpu_hours'" in errs[1]
    assert "quantity must be a number, got 'ten'" in errs[2] and "invoiced_at 'yesterday'" in errs[3]
    assert "not the start of a billing period" in errs[4] and "kind is missing" in errs[5]
    doc = json.loads(proc.stdout)
    assert len(doc["invoice_errors"]) == 6 and doc["inputs"]["invoice_lines"] == len(good)
    classes = {(r["customer_id"], r["metric"]): r["class"] for r in doc["rows"]}
    assert classes[("c_under", "api_calls")] == "under_bill" and classes[("c_over", "api_calls")] == "under_bill"
    assert classes[("c_match", "api_calls")] == "match"
    # a missing file: one line
    proc = run_meter("reconcile", "--config", str(world["cfg"]), "--invoices", str(tmp / "nope.csv"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"meter: error: invoice file {tmp / 'nope.csv'} does not exist (pass --invoices FILE)"]


@pytest.mark.parametrize("section, message", [
    ("units = { gpu_hours = 10 }", "key 'reconcile.units.gpu_hours': no metric with code 'gpu_hours'"),
    ("units = { api_calls = 0 }", "key 'reconcile.units.api_calls'"),
    ("tolerance = -1", "reconcile.tolerance"),
    ("owners = { underbill = \"x\" }", "key 'reconcile.owners.underbill': unknown class 'underbill'"),
    ("colour = 1", "reconcile"),
])
def test_reconcile_config_errors_are_one_line(world, section, message):
    cfg = world["tmp"] / "bad.toml"
    text = world["cfg"].read_text()
    head, _, tail = text.partition("[reconcile]\n")
    cfg.write_text(head + "[reconcile]\n" + section + "\n" + tail.split("\n\n", 1)[1])
    proc = run_meter("reconcile", "--config", str(cfg), "--invoices", str(world["invoices"]), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("meter: error: "), proc.stderr
    assert message in lines[0], lines[0]


# -- the subscription changes from the Kafka entitlements topic (no --entitlements FILE) ------------------------

def _kafka_config(world, bootstrap: str, topic: str, name: str) -> Path:
    cfg = world["tmp"] / name
    cfg.write_text(world["cfg"].read_text() + f'\n[kafka]\nbootstrap_servers = "{bootstrap}"\n'
                   f'entitlements_topic = "{topic}"\n')
    return cfg


@pytest.mark.kafka
def test_with_kafka_and_no_entitlements_file_the_topic_gives_the_plan_changes(world, kafka):
    from tests.e2e.support import produce, unique

    topic = unique("reconcile-entitlements")
    kafka.create_topic(topic, partitions=2)
    no_time = {**CHANGELOG, "customer_id": "c_match", "published_at": "soon"}
    produce(kafka.bootstrap, topic, [json.dumps(CHANGELOG).encode(), json.dumps(no_time).encode()], partitions=2,
            keys=[b"acme|c_plan", b"acme|c_match"])
    cfg = _kafka_config(world, kafka.bootstrap, topic, "with-kafka.toml")
    proc = run_meter("reconcile", "--config", str(cfg), "--invoices", str(world["invoices"]), "--json")
    doc = json.loads(proc.stdout)
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"meter: entitlements Kafka topic {topic}: partition 1 offset 0: published_at 'soon' is not an RFC 3339 "
        "time: the change cannot be placed in a period (skipped)"]
    plan = next(r for r in doc["rows"] if (r["customer_id"], r["metric"]) == ("c_plan", "api_calls"))
    assert (plan["class"], plan["owner"]) == ("plan_change", "billing")
    assert plan["evidence"]["subscription_changes"] == [
        {"changelog_partition": 0, "changelog_offset": 0, "published_at": "2026-11-03T00:00:00Z", "plan": "scale",
         "cancelled": False}]
    assert doc["inputs"]["entitlements_topic"] == topic and len(doc["inputs"]["entitlements_sha256"]) == 64
    # the same findings as with the changelog file meter run read
    from_file = reconcile_json(world)
    assert "entitlements_topic" not in from_file["inputs"]
    assert sorted((r["customer_id"], r["metric"], r["period_start"], r["class"]) for r in doc["rows"]) == \
        sorted((r["customer_id"], r["metric"], r["period_start"], r["class"]) for r in from_file["rows"])
    # --entitlements FILE still wins over the topic
    proc = run_meter("reconcile", "--config", str(cfg), "--invoices", str(world["invoices"]), "--entitlements",
                     str(world["changes"]), "--json")
    assert proc.stderr.strip() == "" and "entitlements_topic" not in json.loads(proc.stdout)["inputs"]
    # a topic that does not exist holds no change: c_plan's amounts differ with nothing to explain them
    cfg = _kafka_config(world, kafka.bootstrap, unique("no-such-topic"), "no-topic.toml")
    doc = json.loads(run_meter("reconcile", "--config", str(cfg), "--invoices", str(world["invoices"]),
                               "--json").stdout)
    plan = next(r for r in doc["rows"] if (r["customer_id"], r["metric"]) == ("c_plan", "api_calls"))
    assert plan["class"] == "over_bill" and "subscription_changes" not in plan["evidence"]


def test_an_unreachable_broker_is_one_error_saying_what_to_do(world):
    import socket

    from meterflow.base.errors import MeterError
    from meterflow.reconcile import read_changelog_topic
    from meterflow.schemas.config import load_config

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(_kafka_config(world, f"127.0.0.1:{port}", "usage.entitlements", "dead-broker.toml"), environ={})
    with pytest.raises(MeterError) as exc:
        read_changelog_topic(cfg, timeout=2.0)
    msg = str(exc.value)
    assert "\n" not in msg and "check kafka.bootstrap_servers" in msg and "pass --entitlements FILE" in msg, msg
