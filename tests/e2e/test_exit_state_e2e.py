"""What an embedded `meter run` leaves behind at exit (issue 9, parts 5 and 6), end to end.

Real `meter run` subprocesses on embedded ClickHouse (chDB) with JSONL input that stops at its end, a real
webhook receiver on loopback and the session's real redis-server:

* alerts: the webhook outbox is drained for ``alerts.webhook.drain_timeout`` at exit, so a receiver that
  recovers near the end gets everything before the process exits; what a receiver that stays down did not
  get is said in exactly one line and delivered by the next run with the same configuration;
* gateway state: states that could not reach Redis before exit are republished by the next run resumed
  from the same ``--recovery`` directory (even with no new input), and by ``meter gateway sync``.
"""

from __future__ import annotations

import random
import socket
import uuid
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

from tests.e2e import alert_support as al
from tests.e2e.alert_support import METRIC, Sub
from tests.e2e.support import run_meter
from tests.operators import alert_model as am

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SECRET = "whsec-exit"


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _workload(tenant: str, tag: str) -> Tuple[List[Sub], List[am.Ev]]:
    """Five customers over their thresholds (hard and soft), one unsubscribed: ~15 alerts."""
    subs = [Sub(tenant, "cust_a", "hard8"), Sub(tenant, "cust_b", "soft30"), Sub(tenant, "cust_c", "hard20"),
            Sub(tenant, "cust_d", "soft30", {"thresholds": [10, 20, 30, 40, 50]}), Sub(tenant, "cust_f", "hard8")]
    counts = {"cust_a": 10, "cust_b": 31, "cust_c": 21, "cust_d": 14, "cust_e": 5, "cust_f": 3}
    rng = random.Random(9)
    evs: List[am.Ev] = []
    for c, n in counts.items():
        evs += al.customer_events(rng, tenant, c, n, f"x{tag}")
    rng.shuffle(evs)
    return subs, evs


def _write_events(path: Path, evs: Sequence[am.Ev]) -> Path:
    path.write_bytes(b"".join(al.event_bytes(e, 0) + b"\n" for e in evs))
    return path


def _left_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if "left in the outbox" in line]


def _outbox_records(spool: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) - _acked(p) for p in spool.glob("outbox-*.jsonl"))


def _acked(outbox: Path) -> int:
    import json

    off = outbox.with_suffix(".offset")
    return json.loads(off.read_text())["records"] if off.exists() else 0


# -- 5: alerts left behind at exit ---------------------------------------------------------------------

def test_a_receiver_that_recovers_near_the_end_gets_every_alert_before_exit(tmp_path):
    tag = _tag()
    tenant = f"drain{tag}"
    subs, evs = _workload(tenant, tag)
    events = _write_events(tmp_path / "events.jsonl", evs)
    spool = tmp_path / "outbox"
    # Down for the first two requests, asking for 30 s each time (Retry-After, honoured up to max_backoff
    # = 60 s): the retry scheduled before the end of the input is ~30 s after it. Then it recovers.
    with al.WebhookReceiver(SECRET, fail_first=2, slow_seconds=0, fail_status=503, retry_after=30) as hook:
        cfg_path = tmp_path / "meter.toml"
        text = al.config_toml([tenant], subs, chdb_dir=tmp_path / "ch", kafka=None,
                              alerts_jsonl=tmp_path / "alerts.jsonl",
                              webhook={"url": hook.url, "secret": SECRET, "spool_dir": str(spool)})
        cfg_path.write_text(text)
        want = {a[0] for v in al.model_alerts(al.parse(text), evs).values() for a in v}
        assert len(want) >= 12
        proc = run_meter("run", "--config", str(cfg_path), "--input", str(events), "--progress-every", "0",
                         timeout=120)
        got = set(hook.deduped())  # read the moment the process has exited
        statuses = list(hook.statuses)
    assert got == want, f"{len(want - got)} of {len(want)} alerts were not delivered before exit:\n{proc.stderr}"
    assert statuses[:2] == [503, 503], statuses[:4]
    assert _left_lines(proc.stderr) == [], proc.stderr
    assert _outbox_records(spool) == 0
    assert not hook.bad_signatures


def test_a_receiver_down_at_exit_gets_one_clear_line_and_the_next_run_delivers(tmp_path):
    tag = _tag()
    tenant = f"left{tag}"
    subs, evs = _workload(tenant, tag)
    events = _write_events(tmp_path / "events.jsonl", evs)
    empty = _write_events(tmp_path / "empty.jsonl", [])
    spool = tmp_path / "outbox"
    with al.WebhookReceiver(SECRET, fail_first=10**9, slow_seconds=0, fail_status=503) as hook:
        cfg_path = tmp_path / "meter.toml"
        text = al.config_toml([tenant], subs, chdb_dir=tmp_path / "ch", kafka=None,
                              webhook={"url": hook.url, "secret": SECRET, "spool_dir": str(spool),
                                       "max_backoff": "2s", "drain_timeout": "1s"})
        cfg_path.write_text(text)
        want = {a[0] for v in al.model_alerts(al.parse(text), evs).values() for a in v}
        proc = run_meter("run", "--config", str(cfg_path), "--input", str(events), "--progress-every", "0",
                         timeout=120)
        lines = _left_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        line = lines[0]
        assert f"{len(want)} alerts left in the outbox" in line and str(spool.resolve()) in line, line
        assert "outbox-0.jsonl" in line and "HTTP 503" in line and "next `meter run`" in line, line
        assert _outbox_records(spool) == len(want)
        assert hook.deduped() == {}

        # The receiver is back: the next run with the same configuration (here with no new events)
        # delivers what was left, and has nothing left to say.
        with hook.lock:
            hook.fail_first = 0
        proc2 = run_meter("run", "--config", str(cfg_path), "--input", str(empty), "--progress-every", "0",
                          timeout=120)
        got = set(hook.deduped())
    assert got == want
    assert _left_lines(proc2.stderr) == [], proc2.stderr
    assert _outbox_records(spool) == 0


# -- 6: gateway state when Redis is down at the end of a run -------------------------------------------

def _closed_port_url() -> str:
    """A Redis URL nobody listens on: connections are refused, like a Redis that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def _redis_configs(tmp_path: Path, tenant: str, subs: Sequence[Sub], redis_url: str) -> Tuple[Path, Path]:
    """The same configuration twice: Redis unreachable, and the session's real redis-server."""
    paths = []
    for name, url in (("down", _closed_port_url()), ("up", redis_url)):
        p = tmp_path / f"meter-{name}.toml"
        p.write_text(al.config_toml([tenant], subs, chdb_dir=tmp_path / "ch", kafka=None, redis_url=url,
                                    redis_timeout=0.3))
        paths.append(p)
    return paths[0], paths[1]


def _run_with_redis_down(tmp_path: Path, tenant: str, tag: str, redis_url: str, client):
    subs, evs = _workload(tenant, tag)
    events = _write_events(tmp_path / "events.jsonl", evs)
    down, up = _redis_configs(tmp_path, tenant, subs, redis_url)
    recovery = tmp_path / "recovery"
    proc = run_meter("run", "--config", str(down), "--input", str(events), "--recovery", str(recovery),
                     "--progress-every", "0", "--json", timeout=120)
    want = al.hand_gateway(subs, evs)
    assert want == am.expected_gateway(al.parse(down.read_text()), evs)[0]
    assert len(want) == len(subs)
    assert f"closing with {len(want)} gateway state keys unsent" in proc.stderr, proc.stderr
    keys = [(tenant, s.customer, METRIC) for s in subs]
    assert al.redis_hashes(client, keys) == {k: {} for k in keys}, "nothing reached Redis"
    return subs, evs, events, up, recovery, keys, want


def _check_hashes(client, keys, want: Dict) -> None:
    hashes = al.redis_hashes(client, keys)
    assert al.gateway_view(hashes) == want
    for k, h in hashes.items():
        assert {"included", "used", "remaining", "pct", "state", "period_end", "updated_at"} <= set(h), h
        assert h["period_end"] == "2026-12-01T00:00:00Z"
        assert float(h["remaining"]) == max(0.0, want[k][1] - want[k][0])


@pytest.mark.redis
def test_gateway_state_unsent_at_exit_is_republished_by_the_resumed_run(redis_server, client, tmp_path):
    tag = _tag()
    tenant = f"gwresume{tag}"
    subs, evs, events, up, recovery, keys, want = _run_with_redis_down(tmp_path, tenant, tag, redis_server.url,
                                                                     client)
    # Redis is back. The same command resumes from the recovery directory: the input is read to its end
    # already, so no event changes any customer, yet every customer's gateway state is written.
    proc = run_meter("run", "--config", str(up), "--input", str(events), "--recovery", str(recovery),
                     "--progress-every", "0", "--json", timeout=120)
    assert "unsent" not in proc.stderr, proc.stderr
    assert '"read": 0' in proc.stdout, proc.stdout
    _check_hashes(client, keys, want)


@pytest.mark.redis
def test_meter_gateway_sync_writes_every_state_from_the_recovery_directory(redis_server, client, tmp_path):
    tag = _tag()
    tenant = f"gwsync{tag}"
    subs, evs, events, up, recovery, keys, want = _run_with_redis_down(tmp_path, tenant, tag, redis_server.url,
                                                                     client)
    down = tmp_path / "meter-down.toml"
    failed = run_meter("gateway", "sync", "--config", str(down), "--recovery", str(recovery), check=False)
    err = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(err) == 1, failed.stderr
    assert err[0].startswith("meter: error: ") and "Redis" in err[0] and "unreachable" in err[0], err
    assert "Traceback" not in failed.stderr

    done = run_meter("gateway", "sync", "--config", str(up), "--recovery", str(recovery))
    _check_hashes(client, keys, want)
    assert f"{len(want)} gateway states" in done.stdout, done.stdout
    first = al.redis_hashes(client, keys)
    # Idempotent: a second sync writes the same hashes (only updated_at moves).
    run_meter("gateway", "sync", "--config", str(up), "--recovery", str(recovery))
    again = al.redis_hashes(client, keys)
    strip = lambda hs: {k: {f: v for f, v in h.items() if f != "updated_at"} for k, h in hs.items()}  # noqa: E731
    assert strip(again) == strip(first)

    # A directory that holds no snapshots is an error that says so, not a silent success.
    missing = run_meter("gateway", "sync", "--config", str(up), "--recovery", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("meter: error: "), missing.stderr
