"""End to end: a recovery directory written by the build before issue 10 resumes with today's build.

``tests/fixtures/recovery_v4`` (its README says how it was made) holds what ``meter run --recovery`` of
commit 5c61185 left after metering ``part1.jsonl`` and the changelog ``changes.jsonl``: pickled
state version 4 snapshots naming ``operators.aggregate.*``, ``operators.dedupe.IdTable`` and
``schemas.*`` classes, a module layout that no longer exists. It also holds that run's outputs (every
ClickHouse view, and the alert JSONL file).

Today's ``meter run`` resumes a copy of it with the same command plus ``--input part2.jsonl`` (Bytewax
resumes each input file where the snapshot left it, so part1 and the changelog are not read again); the
old run's outputs together with the resumed run's must equal, exactly, a clean run of today's build over
part1 + part2 (one file, in that order, so every event meets the same watermark as in the two runs).
Wall-clock columns (received_at, detected_at, ingested_at) and what derives from the input file's name
(a dead letter's source, its dl_id) are compared after mapping lines of the whole file back to the part they came from.

The changelog record moved ``cust_plan`` (who has no event before the upgrade) to another plan with an
override and a wallet; the clean run gets that subscription from its config instead (the changelog's
record of a customer that has no events yet is the same as its config subscription), so it does not
depend on when a second input is read. If the record were lost in the conversion, cust_plan's part2
events would be evaluated under the config's plan ``prepaid``: other alerts, another ``included``.

``tests/fixtures/recovery_v5`` does the same for the build before the native core (d11a167: shard state 1,
state version 5), resumed with either core, and a copy of it rewritten to a later build's versions is refused.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.e2e.support import REPO, env, meter_argv, run_summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIXTURE = REPO / "tests" / "fixtures" / "recovery_v4"
DUMP = FIXTURE / "dump_views.py"
WALL_CLOCK = {"received_at", "detected_at", "ingested_at"}
# p95/p99 entitlements are evaluated once per batch, on the batch's last event of the metric (README,
# "Entitlements and alerts"): where the resumed run's batches split the input (at the end of part1) the clean
# run's need not, so which event carries such an alert may differ; its id, usage and everything else may not.
BATCH_BOUND = {"event_id", "event_time"}
PER_BATCH_METRICS = {"latency_p95", "latency_p99"}
CUST_PLAN_FROM_CHANGELOG = '''
[[subscriptions]]
tenant_id = "acme"
customer_id = "cust_plan"
plan = "starter"
period = "month"
anchor = "2026-10-31T10:00:00+02:00"
account_name = "Acme Plan"
arr = 1200.0
[subscriptions.overrides.api_calls]
included = 6
thresholds = [50, 100]
[subscriptions.wallet]
balance = 3.0
credit_rates = { api_calls = 0.125 }
on_exhausted = "alert"
low_balance_pct = 40.0
'''


def _config(tmp: Path, name: str, base: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(base + f'\n[clickhouse]\ndsn = "chdb://{tmp / ("ch-" + name)}"\n\n'
                           f'[alerts]\njsonl = "{tmp / ("alerts-" + name + ".jsonl")}"\n')
    return path


def _meter(cwd: Path, *args: str, named_core: bool = False) -> subprocess.CompletedProcess:
    """``meter ARGS`` in ``cwd``: the input paths stay the relative names the old run recorded as its parts
    (``named_core``: the configuration names its pipeline.core, kept under pytest --core native)."""
    proc = subprocess.run(meter_argv(*args), cwd=cwd, env=env(named_core), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"meter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _views(config: Path) -> Dict[str, List[Dict[str, Any]]]:
    proc = subprocess.run([sys.executable, str(DUMP), str(config)], cwd=REPO, env=env(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return json.loads(proc.stdout)


def _alerts_file(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _part_source(source: str, part1_lines: int) -> str:
    """``.../whole.jsonl:N`` or ``.../partK.jsonl:N`` as ``partK.jsonl:M`` (M the line within the part)."""
    path, _, line = source.rpartition(":")
    name, n = Path(path).name, int(line)
    if name == "whole.jsonl":
        return f"part1.jsonl:{n}" if n <= part1_lines else f"part2.jsonl:{n - part1_lines}"
    return f"{name}:{n}"


def _latest(rows: List[Dict[str, Any]], identity, version) -> Dict[tuple, Dict[str, Any]]:
    """What a ReplacingMergeTree(version) view shows of ``rows`` written in order: per identity the row of
    the highest version (the first such written wins a tie; identical anyway)."""
    out: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        k = identity(r)
        if k not in out or version(r) > version(out[k]):
            out[k] = r
    return out


def _window_id(r):
    return (r["tenant_id"], r["customer_id"], r["metric"], r["window_start"], tuple(sorted(r["dimensions"].items())))


def _period_id(r):
    return (r["tenant_id"], r["customer_id"], r["metric"], r["period_start"])


NEW_ALERT_COLUMNS = {"threshold_amount", "amount", "baseline", "factor"}


def _comparable(alert: Dict[str, Any]) -> Dict[str, Any]:
    skip = WALL_CLOCK | (BATCH_BOUND if alert["metric"] in PER_BATCH_METRICS else set())
    # Columns added since the old build (spend and anomaly alerts) are NULL for these alert types anyway.
    return {k: v for k, v in alert.items() if k not in skip and (v is not None or k not in NEW_ALERT_COLUMNS)}


def _alert_view(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:  # the earliest detection of an alert_id is the one the view keeps: the first written
        out.setdefault(r["alert_id"], _comparable(r))
    return out


def _dead_letters(rows: List[Dict[str, Any]], part1_lines: int) -> Counter:
    return Counter(json.dumps({**{k: v for k, v in r.items() if k not in WALL_CLOCK | {"dl_id"}},
                               "source": _part_source(r["source"], part1_lines)}, sort_keys=True) for r in rows)


def test_a_recovery_directory_of_the_build_before_issue_10_resumes_exactly(tmp_path):
    part1, part2 = (FIXTURE / "part1.jsonl").read_bytes(), (FIXTURE / "part2.jsonl").read_bytes()
    part1_lines = part1.count(b"\n")
    for name in ("part1.jsonl", "part2.jsonl", "changes.jsonl"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    (tmp_path / "whole.jsonl").write_bytes(part1 + part2)
    recovery = tmp_path / "recovery"
    shutil.copytree(FIXTURE / "recovery", recovery)
    base = (FIXTURE / "config.toml").read_text()

    # today's build resumes the old directory: the old command (its inputs are read to their end already)
    # with one more input file
    resumed_cfg = _config(tmp_path, "resumed", base)
    resumed = run_summary(_meter(tmp_path, "run", "--config", str(resumed_cfg), "--input", "part1.jsonl",
                                 "--input", "part2.jsonl", "--entitlements", "changes.jsonl", "--recovery",
                                 str(recovery), "--json", "--progress-every", "0"))
    assert resumed["counters"]["read"] == part2.count(b"\n"), resumed  # part1 and the changelog: not again
    assert resumed["counters"]["duplicates"] >= 1, resumed  # a retry of a part1 id: remembered across the upgrade

    # the reference: a clean run of today's build over everything, cust_plan's changelog record as config
    clean_base = base[:base.index("# changes.jsonl moves cust_plan")] + CUST_PLAN_FROM_CHANGELOG
    clean_cfg = _config(tmp_path, "clean", clean_base)
    clean = run_summary(_meter(tmp_path, "run", "--config", str(clean_cfg), "--input", "whole.jsonl", "--json",
                               "--progress-every", "0"))
    before = json.loads((FIXTURE / "summary-part1.json").read_text())["counters"]  # the old run's --json summary
    for counter in ("read", "accepted", "duplicates", "excluded", "dead_lettered", "missing_property",
                    "corrections_ignored", "alerts"):
        assert before[counter] + resumed["counters"][counter] == clean["counters"][counter], counter

    old = json.loads(gzip.decompress((FIXTURE / "outputs-part1.json.gz").read_bytes()))
    new, ref = _views(resumed_cfg), _views(clean_cfg)

    windows = _latest(old["usage_by_window"] + new["usage_by_window"], _window_id, lambda r: r["events"])
    ref_windows = _latest(ref["usage_by_window"], _window_id, lambda r: r["events"])
    assert windows == ref_windows
    # `final` came with the Rate stage: the old build evicted closed rows without it, so a row that closed in
    # the old run stays without it; every row the upgraded run wrote carries the clean run's `final`.
    def without_final(rows):
        return {k: {c: v for c, v in r.items() if c != "final"} for k, r in rows.items()}

    periods = _latest(old["usage_by_period"] + new["usage_by_period"], _period_id,
                      lambda r: r["events"] + r["excluded_events"])
    ref_periods = _latest(ref["usage_by_period"], _period_id, lambda r: r["events"] + r["excluded_events"])
    assert without_final(periods) == without_final(ref_periods)
    new_periods = _latest(new["usage_by_period"], _period_id, lambda r: r["events"] + r["excluded_events"])
    assert new_periods and all(r["final"] == ref_periods[k]["final"] for k, r in new_periods.items())
    assert _alert_view(old["alerts_log"] + new["alerts_log"]) == _alert_view(ref["alerts_log"])
    assert _dead_letters(old["dead_letters"] + new["dead_letters"], part1_lines) == \
        _dead_letters(ref["dead_letters"], part1_lines)

    # the alert JSONL file: each alert once, the old run's followed by the resumed run's
    strip = lambda alerts: [_comparable(a) for a in alerts]  # noqa: E731
    got = strip(_alerts_file(FIXTURE / "alerts-part1.jsonl") + _alerts_file(tmp_path / "alerts-resumed.jsonl"))
    want = strip(_alerts_file(tmp_path / "alerts-clean.jsonl"))
    assert sorted(got, key=json.dumps) == sorted(want, key=json.dumps)

    # and the upgrade did what it is for: part2 moved usage on, cust_plan under its changelog plan
    want = _alerts_file(tmp_path / "alerts-clean.jsonl")
    cust_plan = [a for a in want if a["customer_id"] == "cust_plan"]
    assert cust_plan and {a["plan"] for a in cust_plan} <= {"starter", "pro"}
    assert any(a["type"] == "wallet_low" for a in cust_plan)
    assert {a["type"] for a in want} >= {"threshold_crossed", "blocked", "unblocked", "plan_changed", "wallet_low",
                                         "wallet_exhausted"}
    assert len(periods) > len(_latest(old["usage_by_period"], _period_id, lambda r: 0))


def test_gateway_sync_reads_the_old_recovery_directory(tmp_path):
    # `meter gateway sync` rebuilds each customer's meter from the snapshots without running the flow
    from meterflow.gateway_sync import current_states
    from meterflow.schemas.config import load_config
    from meterflow.schemas.gateway import GatewayState, WalletState

    cfg = load_config(FIXTURE / "config.toml")
    recovery = shutil.copytree(FIXTURE / "recovery", tmp_path / "recovery")  # SQLite may add -shm/-wal files
    states = [s for items in current_states(cfg, recovery, at_ms=1) for s in items]
    gateway = {(s.customer_id, s.metric): s for s in states if isinstance(s, GatewayState)}
    wallets = {s.customer_id: s for s in states if isinstance(s, WalletState)}
    old = json.loads(gzip.decompress((FIXTURE / "outputs-part1.json.gz").read_bytes()))
    used = {r["period_start"]: r["value"] for r in old["usage_by_period"]
            if (r["customer_id"], r["metric"]) == ("cust_hard", "api_calls")}
    hard = gateway[("cust_hard", "api_calls")]
    # blocked since 20 calls; the old run's own usage_by_period says how many it had counted
    assert (hard.state, hard.blocked_by, hard.included) == ("blocked", "quota", 20.0)
    assert hard.used == used["2026-10-15T00:00:00"] > 20
    assert gateway[("cust_auto", "api_calls")].plan == "pro"  # moved there by auto_overage before the upgrade
    assert wallets["cust_wallet"].state == "low" and wallets["cust_wallet"].balance == 9.0
    assert wallets["cust_plan"].balance == 3.0  # the changelog's subscription, converted from its pickle


def test_the_old_snapshots_convert_to_named_records_and_back(tmp_path):
    import sqlite3

    from meterflow.base.stats import FlowStats
    from meterflow.dataflows.metering import load_shard_state, shard_snapshots
    from meterflow.operators.legacy_state import decode_legacy_snapshot
    from meterflow.operators.meter import CustomerMeter
    from meterflow.operators.rules import Rules
    from meterflow.schemas.config import load_config
    from meterflow.schemas.state import decode_meter_state
    from tests.operators.state_support import canonical

    rules = Rules(load_config(FIXTURE / "config.toml"))
    recovery = shutil.copytree(FIXTURE / "recovery", tmp_path / "recovery")  # SQLite may add -shm/-wal files
    conn = sqlite3.connect(f"file:{recovery / 'part-0.sqlite3'}?mode=ro", uri=True)
    rows = conn.execute("SELECT ser_change FROM snaps WHERE step_id = 'meterflow.meter'").fetchall()
    conn.close()
    kinds = set()
    for (data,) in rows:
        for key, old in shard_snapshots(load_shard_state(data), 4).items():
            assert b"operators.dedupe" in old  # what made the old directories depend on the module layout
            record = decode_legacy_snapshot(old)
            kinds |= {w.acc.__struct_config__.tag for w in record.windows}
            meter = CustomerMeter.from_snapshot(rules, old, stats=FlowStats())
            new = meter.snapshot()
            assert canonical(decode_meter_state(new)) == canonical(record) and meter.key == key
            again = CustomerMeter.from_snapshot(rules, new, stats=FlowStats()).snapshot()
            assert canonical(decode_meter_state(again)) == canonical(record)
    assert kinds == {"count", "sum", "max", "min", "unique_count", "latest", "p95", "p99"}


# -- the build before the native core (d11a167): state version 5, shard state version 1 -----------------------

FIXTURE_V5 = REPO / "tests" / "fixtures" / "recovery_v5"
# Wall-clock columns of the views, and a dead letter's id (derived from its source, the input file's name).
V5_UNCOMPARED = WALL_CLOCK | {"updated_at", "dl_id"}


def _outputs(*args: str) -> str:
    """``recovery_v5/outputs.py ARGS`` in its own process (chDB opens one data path per process)."""
    proc = subprocess.run([sys.executable, str(FIXTURE_V5 / "outputs.py"), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _v5_views(config: Path, part1_lines: int) -> Dict[str, List[str]]:
    """Every view of ``config``'s ClickHouse, each row without its wall-clock columns and with its dead-letter
    source as the part it came from, as sorted JSON strings."""
    out = {}
    for view, rows in json.loads(_outputs("views", str(config))).items():
        out[view] = sorted(json.dumps({**{k: v for k, v in r.items() if k not in V5_UNCOMPARED},
                                       **({"source": _part_source(r["source"], part1_lines)} if "source" in r
                                          else {})}, sort_keys=True) for r in rows)
    return out


@pytest.mark.parametrize("core", ["python", "native"])
def test_a_recovery_directory_of_the_build_before_the_native_core_resumes_exactly(tmp_path, core):
    """``recovery_v5`` (README there): what ``meter run --recovery`` of d11a167 left after part1 and the
    changelog. Its ClickHouse rows (``outputs-part1.json.gz``) are loaded into the resumed run's store first, so
    the resumed run writes on top of them as it would in production; every view must then equal, row for row, a
    clean run of today's build (Python core) over part1 + part2, whichever core resumes."""
    part1, part2 = (FIXTURE_V5 / "part1.jsonl").read_bytes(), (FIXTURE_V5 / "part2.jsonl").read_bytes()
    part1_lines = part1.count(b"\n")
    for name in ("part1.jsonl", "part2.jsonl", "changes.jsonl"):
        shutil.copy(FIXTURE_V5 / name, tmp_path / name)
    (tmp_path / "whole.jsonl").write_bytes(part1 + part2)
    recovery = shutil.copytree(FIXTURE_V5 / "recovery", tmp_path / "recovery")
    base = (FIXTURE_V5 / "config.toml").read_text()
    if core == "native":
        from meterflow.operators.native import AVAILABLE

        if not AVAILABLE:  # pragma: no cover - depends on the build
            pytest.skip("meterflow_native is not built (./dev setup with cargo)")
    resumed_base = base.replace("[pipeline]\n", f'[pipeline]\ncore = "{core}"\n', 1)

    resumed_cfg = _config(tmp_path, "resumed", resumed_base)
    _outputs("load", str(resumed_cfg), str(FIXTURE_V5 / "outputs-part1.json.gz"))
    resumed = run_summary(_meter(tmp_path, "run", "--config", str(resumed_cfg), "--input", "part1.jsonl",
                                 "--input", "part2.jsonl", "--entitlements", "changes.jsonl", "--recovery",
                                 str(recovery), "--json", "--progress-every", "0", named_core=True))
    assert resumed["core"].startswith(core), resumed
    assert resumed["counters"]["read"] == part2.count(b"\n"), resumed  # part1 and the changelog: not again
    assert resumed["counters"]["duplicates"] >= 3, resumed  # part1's last ids retried: remembered across the upgrade

    clean_base = base[:base.index("# changes.jsonl moves cust_plan")] + CUST_PLAN_FROM_CHANGELOG
    clean_cfg = _config(tmp_path, "clean", clean_base)
    clean = run_summary(_meter(tmp_path, "run", "--config", str(clean_cfg), "--input", "whole.jsonl", "--json",
                               "--progress-every", "0"))
    before = json.loads((FIXTURE_V5 / "summary-part1.json").read_text())["counters"]
    for counter in ("read", "accepted", "duplicates", "excluded", "dead_lettered", "missing_property",
                    "corrections_ignored", "alerts"):
        assert before[counter] + resumed["counters"][counter] == clean["counters"][counter], counter

    got, want = _v5_views(resumed_cfg, part1_lines), _v5_views(clean_cfg, part1_lines)
    assert set(got) == set(want)
    # One deliberate change since d11a167: cust_auto's week of 2026-10-19 closed just before its auto_overage move
    # (starter -> pro) and no flush came between the two, so d11a167 rated that week's final rows under pro
    # (included 20); today they keep starter, the plan the week closed under (included 5: README Limits). Those
    # rows were written final in part1, before the snapshot, and the resumed run leaves them as they are.
    def closed_before_move(row: str) -> bool:
        r = json.loads(row)
        return r.get("customer_id") == "cust_auto" and r.get("period_start") == "2026-10-19T00:00:00"

    for view in ("usage_by_period", "usage_rated"):
        history = [json.loads(r) for r in got[view] if closed_before_move(r)]
        today = [json.loads(r) for r in want[view] if closed_before_move(r)]
        assert [(r["final"], r["included"]) for r in history if r["metric"] == "api_calls"] == [(1, 20.0)], history
        assert [(r["final"], r["included"]) for r in today if r["metric"] == "api_calls"] == [(1, 5.0)], today
        assert {r.get("plan", "pro") for r in history} == {"pro"} and {r.get("plan", "starter") for r in today} \
            == {"starter"}, (history, today)  # (the rated rows: pro's, tokens included; starter's)
        if view == "usage_by_period":  # the same rows but for the included amount
            assert [{**r, "included": None} for r in history] == [{**r, "included": None} for r in today]
        got[view] = [r for r in got[view] if not closed_before_move(r)]
        want[view] = [r for r in want[view] if not closed_before_move(r)]
    for view in want:
        missing = sorted(set(want[view]) - set(got[view]))[:3]
        extra = sorted(set(got[view]) - set(want[view]))[:3]
        assert got[view] == want[view], f"{view}: missing {missing}, extra {extra}"

    # the alert JSONL file: each alert once, the old run's followed by the resumed run's
    strip = lambda alerts: sorted(json.dumps({k: v for k, v in a.items() if k not in WALL_CLOCK},  # noqa: E731
                                             sort_keys=True) for a in alerts)
    old_alerts = _alerts_file(FIXTURE_V5 / "alerts-part1.jsonl")
    new_alerts = _alerts_file(tmp_path / "alerts-resumed.jsonl")
    assert strip(old_alerts + new_alerts) == strip(_alerts_file(tmp_path / "alerts-clean.jsonl"))

    # what the state carried across the upgrade showed in part2's outputs
    def types(alerts, customer):
        return Counter(a["type"] for a in alerts if a["customer_id"] == customer)

    assert types(new_alerts, "cust_wallet")["wallet_exhausted"] == 1  # the units drawn in part1 counted
    assert types(new_alerts, "cust_other")["anomaly"] >= 1  # judged on the daily usage kept in the snapshot
    assert types(new_alerts, "cust_review") == Counter()  # its review item: opened before, not again
    assert types(new_alerts, "cust_rev2")["review_opened"] == 1
    assert {a["plan"] for a in new_alerts if a["customer_id"] == "cust_plan"} <= {"starter", "pro"}
    assert types(new_alerts, "cust_plan")["wallet_low"] == 1  # the changelog's wallet, kept in the snapshot
    reviews = {r["customer_id"]: r for r in map(json.loads, want["overage_reviews"])}
    assert set(reviews) == {"cust_review", "cust_rev2"} and all(r["final"] for r in reviews.values())
    assert reviews["cust_review"]["route"] == "approve" and reviews["cust_rev2"]["route"] == "review"
    finals = [r for r in map(json.loads, got["usage_by_period"]) if r["final"]]
    assert {r["customer_id"] for r in finals} >= {"cust_hard", "cust_wallet", "cust_review"}


def _rewrite_meter_snapshots(recovery: Path, change) -> None:
    """Replace each meter-step snapshot ``(version, shards, {key: bytes})`` in ``recovery`` by ``change`` of it."""
    import pickle
    import sqlite3

    from meterflow.dataflows.metering import load_shard_state

    conn = sqlite3.connect(recovery / "part-0.sqlite3")
    with conn:
        rows = conn.execute("SELECT rowid, ser_change FROM snaps WHERE step_id = 'meterflow.meter'").fetchall()
        for rowid, data in rows:
            conn.execute("UPDATE snaps SET ser_change = ? WHERE rowid = ?",
                         (pickle.dumps(change(load_shard_state(data)), protocol=5), rowid))
    conn.close()


def _newer_record(state):
    import msgspec

    version, shards, snaps = state
    if "acme|cust_hard" in snaps:
        record = msgspec.msgpack.decode(snaps["acme|cust_hard"])
        snaps = {**snaps, "acme|cust_hard": msgspec.msgpack.encode({**record, "version": 6})}
    return (version, shards, snaps)


NEWER = {
    "record": (_newer_record, "meter: error: cannot resume from the recovery directory: snapshot of "
               "'acme|cust_hard' has state version 6, newer than this build reads (5; it converts 3 and 4): the "
               "recovery directory was written by a later meterflow; resume it with that build (or a later one), "
               "or start with a new recovery directory"),
    "shard": (lambda state: (2, *state[1:]), "meter: error: the recovery directory's meter snapshots have shard "
              "state version 2, newer than this build reads (1): they were written by a later meterflow; resume "
              "the directory with that build (or a later one), or start with a new recovery directory"),
}


@pytest.mark.parametrize("kind", sorted(NEWER))
def test_a_recovery_directory_of_a_later_build_is_refused_in_one_line(tmp_path, kind):
    change, line = NEWER[kind]
    for name in ("part1.jsonl", "part2.jsonl", "changes.jsonl"):
        shutil.copy(FIXTURE_V5 / name, tmp_path / name)
    recovery = shutil.copytree(FIXTURE_V5 / "recovery", tmp_path / "recovery")
    _rewrite_meter_snapshots(recovery, change)
    cfg = _config(tmp_path, "newer", (FIXTURE_V5 / "config.toml").read_text())
    proc = subprocess.run(meter_argv("run", "--config", str(cfg), "--input", "part1.jsonl", "--input", "part2.jsonl",
                                     "--entitlements", "changes.jsonl", "--recovery", str(recovery),
                                     "--progress-every", "0"),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
    assert (proc.returncode, proc.stderr) == (2, line + "\n")
    assert not (tmp_path / "alerts-newer.jsonl").exists() or not (tmp_path / "alerts-newer.jsonl").read_text()

    # meter gateway sync reads the same snapshots: the same reason, the same advice
    from meterflow.base.errors import MeterError
    from meterflow.gateway_sync import current_states
    from meterflow.schemas.config import load_config

    with pytest.raises(MeterError, match="newer than this build reads .*resume (it|the directory) with that build"):
        list(current_states(load_config(cfg), recovery, at_ms=1))


def test_the_v5_snapshots_load_into_the_native_fold():
    """The old-build snapshots resume into the native fold, with the fixture's ``[anomaly]`` (every customer has
    anomaly cells, which the native fold keeps too) and without it alike: each customer it takes is loaded with
    its state (``NativeMeters.load`` refuses nothing), the wallet customer (and any other the native fold does not take:
an ``auto_overage`` upgrade, a p95/p99 entitlement) stays on Python."""
    import sqlite3
    import tomllib

    from meterflow.base.stats import FlowStats
    from meterflow.dataflows.metering import _ShardLogic, load_shard_state
    from meterflow.operators.mediate import Mediator
    from meterflow.operators.rules import Rules
    from meterflow.schemas.config import parse_config

    native = pytest.importorskip("meterflow.operators.native")
    if not native.AVAILABLE:  # pragma: no cover - depends on the build
        pytest.skip("meterflow_native is not built (./dev setup with cargo)")
    # immutable: SQLite writes no -shm/-wal files beside the checked-in fixture
    conn = sqlite3.connect(f"file:{FIXTURE_V5 / 'recovery' / 'part-0.sqlite3'}?mode=ro&immutable=1", uri=True)
    shards = conn.execute("SELECT ser_change FROM snaps WHERE step_id = 'meterflow.meter' "
                          "ORDER BY state_key, snap_epoch").fetchall()
    conn.close()
    raw = tomllib.loads((FIXTURE_V5 / "config.toml").read_text())
    raw["pipeline"]["core"] = "native"
    held: Dict[bool, set] = {}
    for anomaly in (True, False):
        if not anomaly:
            del raw["anomaly"]
        cfg = parse_config(raw, "recovery_v5.toml", environ={})
        held[anomaly] = set()
        for (data,) in shards:
            nm = native.NativeMeters(cfg)
            logic = _ShardLogic(Rules(cfg), 4, load_shard_state(data), True, Mediator(cfg, FlowStats()), native=nm)
            assert nm.loaded == len(nm.keys) == len({k for k, m in logic._meters.items() if nm.admits(m)})
            held[anomaly] |= nm.keys
    assert held[True] == held[False]
    assert len(held[False]) >= 3 and not any(k.endswith("|cust_wallet") for k in held[False]), held[False]
