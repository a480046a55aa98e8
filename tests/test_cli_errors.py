"""How `meter` reports a fatal error: one line, the detail only with --debug (fast, in-process parts).

The end-to-end counterparts (real Bytewax panics, a real full disk, two real processes) are in
tests/e2e/test_operator_errors.py.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from meterflow.base.errors import MeterError
from meterflow.cli import _parser, failure_line
from meterflow.panics import PanicFilter
from meterflow.runner import RECOVERY_LOCK, RecoveryLock, open_recovery

PANIC = (b"thread '<unnamed>' panicked at src/operators.rs:764:33:\n"
         b"Box<dyn Any>\n"
         b"stack backtrace:\n"
         b"   0: std::panicking::begin_panic\n"
         b"             at /rustc/library/std/src/panicking.rs:1\n"
         b"note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.\n")


def _bytewax_wrapped(inner: BaseException) -> BaseException:
    """``inner`` as Bytewax hands it back: two BytewaxRuntimeError-like wrappers chained by __cause__."""
    try:
        try:
            try:
                raise inner
            except BaseException as e:
                raise RuntimeError("(src/operators.rs:115:28): error while iterating through batch") from e
        except RuntimeError as e:
            raise RuntimeError('(src/operators.rs:786:50): error calling `StatefulBatchLogic.on_batch` in step '
                               '"meterflow.meter" for key "0"') from e
    except RuntimeError as outer:
        return outer


def test_a_meter_error_inside_a_step_is_reported_by_its_own_message():
    exc = _bytewax_wrapped(MeterError("meter step: customer acme|c1: bad snapshot; start a new recovery directory"))
    assert failure_line(exc) == ("meter: error: meter step: customer acme|c1: bad snapshot; start a new recovery "
                                 "directory", 2)


def test_a_bug_inside_a_step_names_the_exception_and_the_step():
    exc = _bytewax_wrapped(ZeroDivisionError("division by zero"))
    assert failure_line(exc) == ("meter: error: ZeroDivisionError: division by zero in step meterflow.meter "
                                 "(rerun with --debug for the traceback)", 1)
    assert failure_line(exc, debug=True) == ("meter: error: ZeroDivisionError: division by zero in step "
                                             "meterflow.meter", 1)


def test_an_interrupt_raised_inside_a_worker_is_an_interrupt():
    assert failure_line(_bytewax_wrapped(KeyboardInterrupt())) == ("meter: interrupted", 130)


def test_a_cyclic_exception_chain_terminates():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert failure_line(a)[0].startswith("meter: error: ValueError: b")


def test_a_full_recovery_store_names_the_directory_and_what_to_do(tmp_path):
    # The text Bytewax 0.21.1 raises when SQLite hits a full disk (seen in the e2e test on a real tmpfs).
    exc = RuntimeError("(src/run.rs:167:13) called `Result::unwrap()` on an `Err` value: SqliteFailure(Error { "
                       "code: DiskFull, extended_code: 13 }, Some(\"database or disk is full\"))")
    line, rc = failure_line(exc, str(tmp_path / "rec"))
    assert rc == 1
    assert line == (f"meter: error: recovery directory {tmp_path / 'rec'} is full (SQLite: database or disk is full "
                    "while writing a snapshot): free space on its file system, or move the directory with its "
                    "files to a disk with room and pass that path to --recovery; then run the same command again "
                    "to resume from the last complete snapshot")


def test_no_space_for_an_output_file_names_the_file():
    exc = _bytewax_wrapped(OSError(errno.ENOSPC, "No space left on device", "/data/alerts.jsonl"))
    assert failure_line(exc) == ("meter: error: no space left on the device of /data/alerts.jsonl: free space "
                                 "there, then run the same command again", 1)


@pytest.mark.parametrize("argv, debug", [
    (["run", "--config", "c.toml"], False),
    (["--debug", "run", "--config", "c.toml"], True),
    (["run", "--config", "c.toml", "--debug"], True),
    (["usage", "--debug", "--config", "c.toml"], True),
    (["alerts", "--config", "c.toml", "--debug"], True),
    (["demo", "--debug"], True),
    (["entitlements", "publish", "--config", "c.toml", "--debug"], True),
    (["entitlements", "publish", "--config", "c.toml"], False),
])
def test_debug_is_accepted_before_or_after_any_subcommand(argv, debug):
    assert _parser().parse_args(argv).debug is debug


def test_the_stderr_filter_passes_lines_through_until_a_panic_report_and_drops_the_report(capfd):
    f = PanicFilter()
    os.write(2, b"%3|1764570000.000|FAIL|rdkafka#consumer-1| broker down\n")
    os.write(2, b"partial ")
    os.write(2, b"line\n")
    os.write(2, b"progress: read=5\n")
    os.write(2, PANIC)
    os.write(2, b"Traceback printed after the panic\n")
    f.stop(failed=True)
    print("meter: error: the one line", file=sys.stderr, flush=True)
    assert capfd.readouterr().err == ("%3|1764570000.000|FAIL|rdkafka#consumer-1| broker down\npartial line\n"
                                      "progress: read=5\nmeter: error: the one line\n")


def test_the_stderr_filter_writes_held_text_out_when_the_command_does_not_fail(capfd):
    f = PanicFilter()
    os.write(2, b"before\n" + PANIC + b"no newline at the end")
    f.stop(failed=False)
    assert capfd.readouterr().err == "before\n" + PANIC.decode() + "no newline at the end"


def test_a_recovery_directory_is_locked_for_one_holder_and_free_again_after_release(tmp_path):
    d = tmp_path / "rec"
    lock = RecoveryLock(str(d))
    with pytest.raises(MeterError) as err:
        open_recovery(str(d))
    msg = str(err.value)
    assert msg.startswith(f"recovery directory {d} is in use by another meter run (pid {os.getpid()} on host "
                          f"{socket.gethostname()}, started 20")
    assert msg.endswith("two runs on one directory resume from each other's snapshots; stop that run first, or "
                        "give this one its own --recovery directory")
    assert not any(d.glob("part-*.sqlite3"))  # refused before anything was initialised
    lock.release()
    recovery, lock2 = open_recovery(str(d))
    assert (d / "part-0.sqlite3").exists() and (d / RECOVERY_LOCK).exists()
    lock2.release()
    RecoveryLock(str(d)).release()


def test_the_recovery_lock_dies_with_its_holder(tmp_path):
    d = tmp_path / "rec"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from meterflow.runner import RecoveryLock; "
                               "RecoveryLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(d)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(MeterError, match=f"in use by another meter run \\(pid {holder.pid} on host "):
            RecoveryLock(str(d))
    finally:
        holder.kill()
        holder.wait(10)
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the flock when the killed holder's files close
        try:
            RecoveryLock(str(d)).release()
            break
        except MeterError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
