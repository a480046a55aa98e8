"""Run the metering dataflow in this process: recovery set-up, progress lines and the final summary."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from meterflow.base.errors import MeterError
from meterflow.base.gc_tuning import tune_gc
from meterflow.base.stats import STATS
from meterflow.base.timeutil import parse_duration_ms
from meterflow.schemas.config import Config
from meterflow.sources.stop import STOP


@dataclass(frozen=True)
class RunResult:
    counters: Dict[str, int]
    seconds: float
    interrupted: bool = False

    @property
    def events_per_second(self) -> float:
        return self.counters["read"] / self.seconds if self.seconds > 0 else 0.0


RECOVERY_MARKER = "meterflow-recovery.json"  # what a recovery directory's snapshots need to be read back


def prepare_recovery(directory: str, partitions: int = 1, shards: Optional[int] = None, *, processes: int = 1,
                     workers: int = 1):
    """A Bytewax RecoveryConfig for ``directory``, initialising the SQLite partitions on first use.

    With ``shards`` (``pipeline.shards``), the directory records it on first use and a later run with
    another shard count is refused here, before Bytewax starts, with the fix in the message (the
    meter step refuses such snapshots too, but only from inside a running worker).

    ``processes`` > 1 (a cluster; every process passes the same directory): the directory records the
    cluster's shape, ``processes`` and ``workers`` per process, on first use, and a run of another shape
    is refused (a directory of one process records no shape: it is refused to a cluster, and a cluster's
    to one process). The whole check-and-initialise holds ``DIR/meterflow-init.lock`` (flock, blocking),
    so processes starting together initialise the directory once: the first creates the partitions (in a
    scratch folder, moved in when complete, the marker last) and the others find them."""
    import fcntl
    import os

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / RECOVERY_INIT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes (or the process dies)
        return _prepare_locked(d, partitions, shards, processes, workers)
    finally:
        os.close(fd)


def _prepare_locked(d: Path, partitions: int, shards: Optional[int], processes: int, workers: int):
    import json
    import os
    import shutil

    from bytewax.recovery import RecoveryConfig, init_db_dir

    marker = d / RECOVERY_MARKER
    fresh = not any(d.glob("part-*.sqlite3"))
    if not fresh:
        recorded_layout = read_layout(d) or {}
        if shards is not None and not marker.exists():
            raise MeterError(f"recovery directory {d} was written by a build without pipeline.shards (its "
                             "snapshots are per customer): finish it with that build, or start with a new "
                             "recovery directory")
        recorded = recorded_layout.get("shards")
        if shards is not None and recorded != shards:
            raise MeterError(f"recovery directory {d} holds snapshots taken with pipeline.shards = {recorded}, "
                             f"but the configuration has pipeline.shards = {shards}: set pipeline.shards = "
                             f"{recorded} (or METER_PIPELINE_SHARDS) to resume, or start with a new recovery "
                             "directory")
        _check_shape(d, recorded_layout, processes, workers)
    if fresh:
        scratch = d / f".meterflow-init-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        init_db_dir(scratch, partitions)
        for part in sorted(scratch.glob("part-*.sqlite3")):
            os.replace(part, d / part.name)
        shutil.rmtree(scratch, ignore_errors=True)
    if shards is not None and not marker.exists():
        layout: Dict[str, int] = {"shards": shards}
        if processes > 1:
            layout.update(processes=processes, workers=workers)
        tmp = d / f".{RECOVERY_MARKER}.{os.getpid()}"
        tmp.write_text(json.dumps(layout) + "\n")
        os.replace(tmp, marker)
    return RecoveryConfig(str(d))


def _check_shape(d: Path, recorded: Dict[str, Any], processes: int, workers: int) -> None:
    """Refuse a run whose cluster shape differs from the one that wrote the directory's snapshots."""
    was = recorded.get("processes", 1)
    if was == processes and (processes == 1 or recorded.get("workers") == workers):
        return

    def shape(p: int, w: Optional[int]) -> str:
        return "one process" if p == 1 else f"a cluster of {p} processes with --workers {w} each"

    if was == 1:
        fix = "run it as one process (no --addresses) to resume"
    else:
        fix = (f"start the same {was} processes (--addresses with {was} host:port entries) with --workers "
               f"{recorded.get('workers')} to resume")
    raise MeterError(f"recovery directory {d} holds snapshots of {shape(was, recorded.get('workers'))}, but this "
                     f"run is {shape(processes, workers)}: {fix}, or start with a new recovery directory")


RECOVERY_INIT_LOCK = "meterflow-init.lock"  # held (flock) while a process checks and initialises the directory
RECOVERY_LOCK = "meterflow.lock"  # held (flock) by the process running on a recovery directory (process 0)


def lock_name(process_id: int = 0) -> str:
    """The lock file of process ``process_id`` of a cluster: ``meterflow.lock`` for process 0 and a run on its
    own (so the two exclude each other), ``meterflow-pN.lock`` for process N of a cluster."""
    return RECOVERY_LOCK if process_id == 0 else f"meterflow-p{process_id}.lock"


class RecoveryLock:
    """An exclusive lock on a recovery directory, held by one ``meter run`` for its whole run.

    Two runs on one directory would each resume from the other's in-progress snapshots. The lock is
    ``flock`` on ``DIR/meterflow.lock``, which records the holder's pid, host and start time; the
    kernel releases it when the holder exits, however it exits, so a stale file never blocks a
    restart. (flock is per open file: a second lock of the same directory in one process is refused too.)

    In a cluster every process shares the directory and takes the lock of its own process id
    (:func:`lock_name`), so the processes of one cluster run together while a second process with the same
    id (of another cluster, or a run on its own against process 0) is refused.
    """

    def __init__(self, directory: str, process_id: int = 0, processes: int = 1) -> None:
        import fcntl
        import os
        import socket

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / lock_name(process_id)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            who = "another meter run" if processes == 1 else f"another meter run as process {process_id}"
            raise MeterError(f"recovery directory {d.resolve()} is in use by {who} "
                             f"({holder or 'holder not recorded'}): two runs on one directory resume from each "
                             "other's snapshots; stop that run first, or give this one its own --recovery "
                             "directory") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        place = f", process {process_id} of a cluster of {processes}" if processes > 1 else ""
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}{place}\n".encode())
        self._fd: Optional[int] = fd

    def release(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


def open_recovery(directory: str, shards: Optional[int] = None, *, processes: int = 1, process_id: int = 0,
                  workers: int = 1) -> Tuple[Any, RecoveryLock]:
    """Lock ``directory`` for this process (its process id's lock in a cluster of ``processes``), then prepare
    it (``prepare_recovery``: one partition per process on first use, the cluster's shape checked); the lock
    is released again if preparing fails. Returns (RecoveryConfig, the lock to release when the run ends)."""
    lock = RecoveryLock(directory, process_id, processes)
    try:
        return prepare_recovery(directory, partitions=processes, shards=shards, processes=processes,
                                workers=workers), lock
    except BaseException:
        lock.release()
        raise


class _Progress(threading.Thread):
    """Prints one progress line every ``every`` seconds to ``out`` while the flow runs."""

    def __init__(self, out: TextIO, every: float) -> None:
        super().__init__(daemon=True, name="meterflow-progress")
        self._out, self._every = out, every
        self._stop = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        last_read, last_t = 0, self._t0
        while not self._stop.wait(self._every):
            c = STATS.snapshot()
            now = time.monotonic()
            rate = (c["read"] - last_read) / (now - last_t) if now > last_t else 0.0
            last_read, last_t = c["read"], now
            print(f"progress: read={c['read']} accepted={c['accepted']} duplicates={c['duplicates']} "
                  f"excluded={c['excluded']} dead_lettered={c['dead_lettered']} "
                  f"missing_property={c['missing_property']} alerts={c['alerts']} "
                  f"rate={rate:,.0f} ev/s "
                  f"elapsed={now - self._t0:.1f}s", file=self._out, flush=True)

    def stop(self) -> None:
        self._stop.set()


def cluster_addresses(addresses: Optional[str], process_id: Optional[int]) -> List[str]:
    """``meter run --addresses "host:port;host:port" --process-id N`` checked: the cluster's addresses (one per
    process, the same list in every process), or [] for a run on its own."""
    if addresses is None and process_id is None:
        return []
    if addresses is None or process_id is None:
        raise MeterError("a cluster needs both --addresses \"host:port;host:port\" (every process's address, "
                         "the same list for each) and --process-id N (this process's index in that list)")
    out = [a.strip() for a in addresses.split(";") if a.strip()]
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MeterError(f"--addresses: {a!r} is not host:port (e.g. 127.0.0.1:2101); separate the "
                             "processes' addresses with ';'")
    if not out:
        raise MeterError("--addresses is empty: give every process's host:port, separated by ';'")
    if not 0 <= process_id < len(out):
        raise MeterError(f"--process-id {process_id} is not an index of the {len(out)} addresses in --addresses "
                         f"(use 0 to {len(out) - 1})")
    return out


def read_layout(d: Path) -> Optional[Dict[str, Any]]:
    """The layout a recovery directory records (``RECOVERY_MARKER``: shards, and a cluster's shape); None when it
    records none. A marker that is not a JSON object stops with one line naming the file."""
    import json

    marker = d / RECOVERY_MARKER
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MeterError(f"cannot read {marker}: {exc.strerror or exc}; check the recovery directory's "
                         "permissions") from exc
    try:
        layout = json.loads(text)
    except ValueError:
        layout = None
    if not isinstance(layout, dict):
        raise MeterError(f"{marker} is not the layout meterflow writes (a JSON object such as {{\"shards\": 64}}): "
                         "restore it (its shards value is the pipeline.shards the snapshots were taken with), or "
                         "start with a new recovery directory")
    return layout


def recorded_shards(directory: str) -> Optional[int]:
    """The ``pipeline.shards`` a recovery directory's snapshots were taken with (None: none recorded, or a marker
    :func:`prepare_recovery` refuses in its own words)."""
    try:
        layout = read_layout(Path(directory))
    except MeterError:
        return None
    shards = layout.get("shards") if layout else None
    return shards if type(shards) is int and shards >= 1 else None


def adopt_recorded_shards(cfg: Config, directory: str, out: Optional[TextIO] = None) -> Config:
    """``cfg`` with the shard count recorded in recovery directory ``directory`` when the configuration leaves
    ``pipeline.shards`` unset (a directory written with the old default of 256 resumes after an upgrade; one line
    on ``out`` says so). A count the configuration gives is kept: :func:`prepare_recovery` refuses a mismatch."""
    import msgspec

    recorded = recorded_shards(directory)
    if recorded is None or recorded == cfg.pipeline.shards or cfg.pipeline.shards_given:
        return cfg
    print(f"meter: {directory} holds snapshots taken with pipeline.shards = {recorded}; resuming with {recorded} "
          f"shards (pipeline.shards is unset; its default is {cfg.pipeline.shards} for new recovery directories)",
          file=out if out is not None else sys.stderr, flush=True)
    return msgspec.structs.replace(cfg, pipeline=msgspec.structs.replace(cfg.pipeline, shards=recorded))


def run_flow(cfg: Config, inputs: Sequence[str] = (), *, workers: int = 1, recovery_dir: Optional[str] = None,
             stop_at_end: bool = False, progress_out: Optional[TextIO] = None, progress_every: float = 5.0,
             entitlements: Sequence[str] = (), addresses: Sequence[str] = (), process_id: int = 0) -> RunResult:
    """Build the flow from the configuration and run it to completion (or until interrupted).

    ``addresses`` (from :func:`cluster_addresses`): this process is ``process_id`` of a Bytewax cluster of
    ``len(addresses)`` processes with ``workers`` workers each; process 0 writes the single-writer outputs
    (embedded chDB, the JSONL alert file: :mod:`meterflow.sinks.single_writer`)."""
    from bytewax.run import cli_main

    from meterflow.dataflows.metering import flow_from_config

    if workers < 1:
        raise MeterError(f"--workers must be at least 1, got {workers}")
    processes = len(addresses) or 1
    if recovery_dir:
        cfg = adopt_recorded_shards(cfg, recovery_dir, progress_out)
    flow = flow_from_config(cfg, inputs, stop_at_end=stop_at_end, recoverable=recovery_dir is not None,
                            entitlements=entitlements, processes=processes, process_id=process_id)
    recovery, lock = (open_recovery(recovery_dir, cfg.pipeline.shards, processes=processes, process_id=process_id,
                                    workers=workers) if recovery_dir else (None, None))
    tune_gc()
    epoch = timedelta(milliseconds=parse_duration_ms(cfg.pipeline.epoch_interval))
    STATS.reset()
    STOP.clear()
    progress = _Progress(progress_out, progress_every) if progress_out is not None else None
    t0 = time.monotonic()
    if progress:
        progress.start()
    previous = _install_stop_handlers(progress_out)
    try:
        if addresses:
            cli_main(flow, workers_per_process=workers, process_id=process_id, addresses=list(addresses),
                     epoch_interval=epoch, recovery_config=recovery)
        else:
            cli_main(flow, workers_per_process=workers, epoch_interval=epoch, recovery_config=recovery)
    finally:
        if progress:
            progress.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if lock:
            lock.release()
    return RunResult(STATS.snapshot(), time.monotonic() - t0, interrupted=STOP.is_set())


def _install_stop_handlers(out: Optional[TextIO]) -> Dict[int, Any]:
    """First SIGINT/SIGTERM: stop reading and drain cleanly (sinks flush, snapshot kept); second: interrupt."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, frame: Any) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        print("meter: stopping: finishing the batches in flight and flushing every output "
              "(signal again to abort)", file=out or sys.stderr, flush=True)

    previous: Dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    return previous
