"""A recovery directory shared by the processes of one Bytewax cluster (``meterflow.runner.open_recovery``).

Every process of a cluster passes the same directory: each takes the lock of its own process id, the first to
arrive initialises the partitions (one per process) and records the shape, and the others check it. Refused, with
one line that says what to do: a second process with the same id, a run on its own next to process 0, and a
restart of another shape (process count or workers per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meterflow.base.errors import MeterError
from meterflow.runner import RECOVERY_MARKER, open_recovery


def _open(d, **kw):
    rec, lock = open_recovery(str(d), 256, **kw)
    return lock


def test_the_processes_of_one_cluster_share_a_directory_and_a_second_process_with_an_id_is_refused(tmp_path):
    d = tmp_path / "rec"
    locks = [_open(d, processes=2, process_id=i) for i in range(2)]
    assert sorted(p.name for p in d.glob("part-*.sqlite3")) == ["part-0.sqlite3", "part-1.sqlite3"]
    assert json.loads((d / RECOVERY_MARKER).read_text()) == {"shards": 256, "processes": 2, "workers": 1}
    with pytest.raises(MeterError, match=r"is in use by another meter run as process 1 \(pid \d+ on host .*, "
                                         r"process 1 of a cluster of 2\): .*give this one its own --recovery"):
        _open(d, processes=2, process_id=1)
    with pytest.raises(MeterError, match=r"is in use by another meter run \(pid \d+ .*process 0 of a cluster"):
        _open(d)  # one process on its own excludes process 0 (and the shape would be refused too)
    for lock in locks:
        lock.release()
    _open(d, processes=2, process_id=1).release()  # a restart of the same shape resumes


@pytest.mark.parametrize("shape, line", [
    (dict(processes=3, process_id=0), "recovery directory {d} holds snapshots of a cluster of 2 processes with "
     "--workers 1 each, but this run is a cluster of 3 processes with --workers 1 each: start the same 2 processes "
     "(--addresses with 2 host:port entries) with --workers 1 to resume, or start with a new recovery directory"),
    (dict(processes=2, process_id=1, workers=2), "recovery directory {d} holds snapshots of a cluster of 2 "
     "processes with --workers 1 each, but this run is a cluster of 2 processes with --workers 2 each: start the "
     "same 2 processes (--addresses with 2 host:port entries) with --workers 1 to resume, or start with a new "
     "recovery directory"),
    (dict(), "recovery directory {d} holds snapshots of a cluster of 2 processes with --workers 1 each, but this "
     "run is one process: start the same 2 processes (--addresses with 2 host:port entries) with --workers 1 to "
     "resume, or start with a new recovery directory"),
])
def test_a_restart_of_another_cluster_shape_is_refused_with_the_shape_to_use(tmp_path, shape, line):
    d = tmp_path / "rec"
    _open(d, processes=2, process_id=0).release()
    with pytest.raises(MeterError) as err:
        _open(d, **shape)
    assert str(err.value) == line.format(d=d)
    assert sorted(p.name for p in d.glob("part-*.sqlite3")) == ["part-0.sqlite3", "part-1.sqlite3"]


def test_a_one_process_directory_is_refused_to_a_cluster_and_keeps_its_workers_freedom(tmp_path):
    d = tmp_path / "rec"
    _open(d, workers=2).release()
    assert json.loads((d / RECOVERY_MARKER).read_text()) == {"shards": 256}  # as before clusters resumed
    _open(d, workers=4).release()  # one process may change --workers (Bytewax rescales its workers)
    with pytest.raises(MeterError) as err:
        _open(d, processes=2, process_id=1)
    assert str(err.value) == (f"recovery directory {d} holds snapshots of one process, but this run is a cluster "
                              "of 2 processes with --workers 1 each: run it as one process (no --addresses) to "
                              "resume, or start with a new recovery directory")


def test_processes_starting_together_initialise_the_directory_once(tmp_path):
    d = tmp_path / "rec"
    # They start together when the go file appears (a file, not a wall-clock instant: the clock guard moves this
    # process's clock, not theirs).
    go = tmp_path / "go"
    code = ("import os, sys, time; from meterflow.runner import open_recovery; "
            "print('ready', flush=True); "
            "exec('while not os.path.exists(sys.argv[3]): time.sleep(0.001)'); "
            "rec, lock = open_recovery(sys.argv[1], 256, processes=4, process_id=int(sys.argv[2])); "
            "print('ok', flush=True)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d), str(i), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:  # every one imported and waiting
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-1000:] for o in outs]
    assert sorted(p.name for p in d.glob("part-*.sqlite3")) == [f"part-{i}.sqlite3" for i in range(4)]
    assert json.loads((d / RECOVERY_MARKER).read_text()) == {"shards": 256, "processes": 4, "workers": 1}
    assert not [p for p in d.iterdir() if p.name.startswith(".")], "scratch files left behind"
    # every partition is a complete Bytewax partition of 4 (the one init wrote them all)
    import sqlite3

    for i in range(4):
        con = sqlite3.connect(d / f"part-{i}.sqlite3")
        assert con.execute("SELECT part_index, part_count FROM parts").fetchall() == [(i, 4)]
        con.close()
