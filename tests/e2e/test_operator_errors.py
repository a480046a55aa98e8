"""End to end: a fatal error reaches the operator as one `meter: error:` line that says what to do.

Real subprocesses throughout: the `meter` console script (or the real main() with a failing meter step,
tests/e2e/failing_step.py) with ``RUST_BACKTRACE=1``, so that Bytewax's Rust panic hook prints its full
backtrace on fd 2 unless meter keeps it back; a real full disk (a 2 MiB tmpfs mounted in a private
user+mount namespace with ``unshare -rm``, which needs no root on Linux); two real `meter run`
processes on one recovery directory; a real second process on one embedded ClickHouse path.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meterflow.sample import generate_events, sample_config_toml, tenant_ids
from tests.e2e.failing_step import MESSAGE
from tests.e2e.support import REPO, env, meter_argv, read_views, run_meter, write_config, write_jsonl
from tests.e2e.test_crash_resume import _assert_same_views

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAILING_STEP = str(Path(__file__).with_name("failing_step.py"))
BACKTRACE = {"RUST_BACKTRACE": "1"}
START_MS = 1776160800000  # 2026-04-14T10:00:00Z


def _config(tmp: Path, name: str = "c", tenants: int = 1, pipeline_extra: str = "") -> Path:
    base = sample_config_toml(tenant_ids(tenants), {}, "2026-03-15T00:00:00Z")
    return write_config(tmp / f"{name}.toml", base, tmp / f"ch-{name}", pipeline_extra=pipeline_extra)


def _events(tmp: Path, n: int = 20, customers: int = 5, tenants: int = 1) -> Path:
    return write_jsonl(tmp / f"events-{n}.jsonl", generate_events(n, tenants=tenants, customers=customers,
                                                                     start_ms=START_MS, span_ms=86_400_000))


def _run(argv, extra_env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env={**env(), **BACKTRACE, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("kind, line, rc", [
    ("meter", f"meter: error: {MESSAGE}", 2),
    ("bug", "meter: error: ZeroDivisionError: division by zero in step meterflow.meter (rerun with --debug for "
            "the traceback)", 1),
])
def test_a_failing_step_is_one_line_and_the_panic_report_and_traceback_only_with_debug(tmp_path, kind, line, rc):
    cfg, events = _config(tmp_path), _events(tmp_path)
    proc = _run([sys.executable, FAILING_STEP, kind, "run", "--config", str(cfg), "--input", str(events)])
    assert (proc.returncode, proc.stderr) == (rc, line + "\n")
    debug = _run([sys.executable, FAILING_STEP, kind, "run", "--config", str(cfg), "--input", str(events), "--debug"])
    assert debug.returncode == rc
    err = debug.stderr.splitlines()
    assert err[0].startswith("thread '") and " panicked at src/" in err[0]
    assert "stack backtrace:" in err  # RUST_BACKTRACE=1: the Rust backtrace is shown with --debug
    assert "Traceback (most recent call last):" in err
    assert 'step "meterflow.meter"' in debug.stderr  # the Bytewax wrapper, in the chained traceback
    assert err[-1] == line.replace(" (rerun with --debug for the traceback)", "")


def test_an_unreachable_clickhouse_server_is_one_line_naming_the_dsn(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = sample_config_toml(tenant_ids(1), {}, "2026-03-15T00:00:00Z")
    cfg = tmp_path / "c.toml"
    cfg.write_text(base + f'\n[clickhouse]\ndsn = "http://127.0.0.1:{port}/meter"\n')
    proc = _run(meter_argv("run", "--config", str(cfg), "--input", str(_events(tmp_path))))
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"meter: error: cannot open ClickHouse at http://127.0.0.1:{port}/meter (database meter): ")
    assert "Connection refused" in line
    assert line.endswith("check that clickhouse.dsn names a reachable ClickHouse server")


class _StdinRun:
    """`meter run --input -` that keeps running (and holding what it opened) until its stdin is closed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(meter_argv("run", "--input", "-", "--progress-every", "0", *args), cwd=REPO,
                                     env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def finish(self, lines: bytes = b"") -> tuple:
        out, err = self.proc.communicate(lines, timeout=120)
        return self.proc.returncode, out.decode(), err.decode()

    def wait_for(self, what, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"meter run exited {self.proc.returncode} before {what}: "
                                     f"{self.proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, f"meter run: no {what} within {timeout} s"
            time.sleep(0.05)


def test_a_second_run_on_a_recovery_directory_is_refused_naming_the_holder(tmp_path):
    rec = tmp_path / "rec"
    first = _StdinRun("--config", str(_config(tmp_path, "first")), "--recovery", str(rec))
    try:
        lock = rec / "meterflow.lock"
        first.wait_for("recovery lock", lambda: lock.exists() and lock.read_text().strip())
        assert lock.read_text().startswith(f"pid {first.proc.pid} on host {socket.gethostname()}, started ")
        # Its own ClickHouse path, so that nothing but the recovery directory is shared.
        second = run_meter("run", "--config", str(_config(tmp_path, "second")), "--input", str(_events(tmp_path)),
                           "--recovery", str(rec), check=False)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"meter: error: recovery directory {rec} is in use by another meter run (pid {first.proc.pid} on host "
            f"{socket.gethostname()}, started {lock.read_text().split(', started ')[1].strip()}): two runs on one "
            "directory resume from each other's snapshots; stop that run first, or give this one its own "
            "--recovery directory"]
        assert not (tmp_path / "ch-second").exists()  # refused before the flow started
    finally:
        rc, out, err = first.finish(_events(tmp_path).read_bytes())
    assert rc == 0, err
    assert json.loads(run_meter("usage", "--config", str(tmp_path / "first.toml"), "--json").stdout.splitlines()[0])
    # The first run released the lock when it exited: the directory is usable again.
    from meterflow.runner import RecoveryLock

    RecoveryLock(str(rec)).release()


def test_a_second_process_on_embedded_clickhouse_is_refused_naming_the_path_and_the_holder(tmp_path):
    from meterflow.sinks.clickhouse import embedded_holder

    cfg = _config(tmp_path)
    path = (tmp_path / "ch-c").resolve()
    first = _StdinRun("--config", str(cfg))
    try:
        first.wait_for("chDB open", lambda: embedded_holder(path) is not None)
        reader = run_meter("usage", "--config", str(cfg), check=False)
        assert reader.returncode == 2
        [line] = reader.stderr.splitlines()  # chDB's own "Cannot lock file" line is not printed either
        assert line.startswith(f"meter: error: embedded ClickHouse at {path} is in use by another process (pid "
                               f"{first.proc.pid}: meter run --input - --progress-every 0 --config {cfg}, started ")
        assert line.endswith("chDB opens a data path in one process at a time, so this command is refused; run it "
                             "after that process exits, or set clickhouse.dsn to a ClickHouse server (e.g. "
                             "http://localhost:8123/meter) for readers that run while meter run writes")
    finally:
        rc, _out, err = first.finish(_events(tmp_path).read_bytes())
    assert rc == 0, err
    assert embedded_holder(path) is None
    assert run_meter("usage", "--config", str(cfg), "--json").stdout.strip()  # the reader works once it is free


def test_a_full_recovery_disk_is_one_line_naming_the_directory_and_a_rerun_with_space_resumes(tmp_path):
    unshare = shutil.which("unshare")
    assert unshare, "this test needs util-linux unshare (user+mount namespaces) to mount a small tmpfs"
    events = _events(tmp_path, n=20_000, customers=2_000, tenants=3)
    epochs = 'epoch_interval = "50ms"'  # several snapshots fit before the disk is full
    cfg = _config(tmp_path, "full", tenants=3, pipeline_extra=epochs)
    clean_cfg = _config(tmp_path, "clean", tenants=3, pipeline_extra=epochs)
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    rec = mnt / "rec"
    run = " ".join(meter_argv("run", "--config", str(cfg), "--input", str(events), "--recovery", str(rec),
                              "--progress-every", "0", "--json"))
    # One private mount namespace: the 2 MiB tmpfs holds the first snapshots and fills up on a later one;
    # then it is given room (remount, as an operator would free space) and the same command is run again.
    script = (f"mount -t tmpfs -o size=2m tmpfs {mnt} || exit 97\n"
              f"{run} >{tmp_path}/out1 2>{tmp_path}/err1; echo $? >{tmp_path}/rc1\n"
              f"mount -o remount,size=64m {mnt} || exit 98\n"
              f"{run} >{tmp_path}/out2 2>{tmp_path}/err2; echo $? >{tmp_path}/rc2\n")
    ns = subprocess.run([unshare, "-rm", "sh", "-c", script], cwd=REPO, env={**env(), **BACKTRACE},
                        capture_output=True, text=True, timeout=240)
    assert ns.returncode == 0, f"unshare -rm / mount tmpfs failed ({ns.returncode}): {ns.stderr}"
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "1", err1
    assert err1 == (f"meter: error: recovery directory {rec} is full (SQLite: database or disk is full while "
                    "writing a snapshot): free space on its file system, or move the directory with its files to a "
                    "disk with room and pass that path to --recovery; then run the same command again to resume "
                    "from the last complete snapshot\n")
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    resumed = json.loads((tmp_path / "out2").read_text().splitlines()[-1])["counters"]["read"]
    assert 0 < resumed < len(events.read_bytes().splitlines())  # it resumed from a snapshot, not from the start
    run_meter("run", "--config", str(clean_cfg), "--input", str(events), "--progress-every", "0", "--json")
    _assert_same_views(read_views(clean_cfg), read_views(cfg))
