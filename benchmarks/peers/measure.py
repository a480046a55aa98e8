"""Running a contender's processes and measuring them (used by the harness, not a contender).

A sampler thread reads, ten times a second, every process of the contender's trees (psutil:
the started processes and all their children) plus any extra process doing the contender's work (the
Redis server for ``redis-counters``): the summed RSS (its maximum is the peak RSS) and the summed CPU
time (user + system). CPU over a measured window is interpolated between samples, so start-up
(imports, JIT-free Python start, consumer group joins) can be left out of CPU seconds per event.
"""

from __future__ import annotations

import bisect
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import psutil


class TreeSampler(threading.Thread):
    def __init__(self, pids: Sequence[int], extra_pids: Sequence[int] = (), every: float = 0.1) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.roots = list(pids)
        self.every = every
        self._procs: Dict[int, psutil.Process] = {}
        self._cpu: Dict[int, float] = {}
        self._extra: Dict[int, Tuple[psutil.Process, float]] = {}
        for pid in extra_pids:
            try:
                p = psutil.Process(pid)
                ct = p.cpu_times()
                self._extra[pid] = (p, ct.user + ct.system)
            except psutil.Error:
                pass
        self.times: List[float] = []
        self.cpu: List[float] = []
        self.busy: List[float] = []  # the whole machine's busy CPU seconds (all cores), to see noise
        self.peak_rss = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        rss = 0
        procs: List[psutil.Process] = []
        for pid in self.roots:
            try:
                p = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                procs.append(p)
                procs.extend(p.children(recursive=True))
            except psutil.Error:
                continue
        for p in procs:
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    mem = p.memory_info().rss
            except psutil.Error:
                continue
            self._cpu[p.pid] = ct.user + ct.system
            rss += mem
        extra_cpu = 0.0
        for p, base in self._extra.values():
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    rss += p.memory_info().rss
                extra_cpu += ct.user + ct.system - base
            except psutil.Error:
                continue
        m = psutil.cpu_times()
        self.times.append(time.time())
        self.cpu.append(sum(self._cpu.values()) + extra_cpu)
        self.busy.append(m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0))
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def cpu_at(self, t: float) -> float:
        """Tree CPU seconds consumed up to wall time ``t`` (linear between samples)."""
        return self._at(self.cpu, t)

    def busy_between(self, t0: float, t1: float) -> float:
        """The whole machine's busy CPU seconds (all cores) between two wall times (linear between samples)."""
        return self._at(self.busy, t1) - self._at(self.busy, t0)

    def _at(self, series: List[float], t: float) -> float:
        if not self.times:
            return 0.0
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return series[0]
        if i >= len(self.times):
            return series[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = series[i - 1], series[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)

    @property
    def cpu_total(self) -> float:
        return self.cpu[-1] if self.cpu else 0.0


@dataclass
class ProcRun:
    returncodes: List[Optional[int]]
    wall: float
    t_spawn: float
    sampler: TreeSampler
    stdout: List[Tuple[float, str]] = field(default_factory=list)  # (arrival time, line)
    logs: List[Path] = field(default_factory=list)
    timed_out: bool = False

    def tail(self, lines: int = 12) -> str:
        out = []
        for log in self.logs:
            try:
                text = log.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            out += text[-lines:]
        return "\n".join(out[-lines:])


class Procs:
    """Started processes (each in its own session) with stdout lines captured and stderr logged."""

    def __init__(self, cmds: Sequence[Tuple[List[str], Dict[str, str]]], log_dir: Path, name: str, cwd: str,
                 extra_pids: Sequence[int] = ()) -> None:
        self.logs: List[Path] = []
        self.popens: List[subprocess.Popen] = []
        self.stdout: List[Tuple[float, str]] = []
        self._readers: List[threading.Thread] = []
        self.t_spawn = time.time()
        for i, (argv, env) in enumerate(cmds):
            log = log_dir / f"{name}-{i}.log"
            self.logs.append(log)
            fh = open(log, "wb")
            p = subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE, stderr=fh,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            fh.close()
            self.popens.append(p)
            th = threading.Thread(target=self._read, args=(p,), daemon=True)
            th.start()
            self._readers.append(th)
        self.sampler = TreeSampler([p.pid for p in self.popens], extra_pids)
        self.sampler.start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stdout:  # type: ignore[union-attr]
            self.stdout.append((time.time(), line.decode(errors="replace").rstrip("\n")))

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.popens)

    def send(self, sig: int) -> None:
        for p in self.popens:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> ProcRun:
        deadline = time.time() + timeout
        timed_out = False
        while self.alive():
            if time.time() > deadline:
                timed_out = True
                self.send(signal.SIGKILL)
            time.sleep(0.05)
        wall = time.time() - self.t_spawn
        self.sampler.stop()
        for th in self._readers:
            th.join(2)
        return ProcRun([p.returncode for p in self.popens], wall, self.t_spawn, self.sampler, self.stdout,
                       self.logs, timed_out)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30.0) -> ProcRun:
        self.send(sig)
        return self.wait(grace)
