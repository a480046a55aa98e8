"""Keep Rust panic reports off the operator's terminal (``meter`` without ``--debug``).

Bytewax runs the flow in Rust. When a Python step fails, the worker panics and Rust's panic hook
writes a report straight to file descriptor 2 (3 lines, or a 30-60 line backtrace with
``RUST_BACKTRACE=1``) before Python sees the exception; no Python setting reaches that hook. So, while
a command runs, fd 2 is a pipe read by a thread that copies every line to the real stderr as it
arrives, until a line opens a panic report (``thread '…' panicked at …``). A panic ends the dataflow,
so from that line on everything written to fd 2 is held back instead: the command then fails and
prints one ``meter: error:`` line. Held text is written out after all if the command does not fail.
"""

from __future__ import annotations

import os
import re
import select
import sys
import threading
from typing import Optional

PANIC_HEADER = re.compile(rb"^thread '[^']*' panicked at ")


class PanicFilter:
    """fd 2 through a line filter that holds back everything from the first Rust panic report on."""

    def __init__(self) -> None:
        _flush_stderr()
        self._real = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        self._stop = threading.Event()
        self.held = bytearray()  # everything from the panic header on
        self.panicked = False
        self._thread = threading.Thread(target=self._pump, name="meterflow-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        partial = b""
        while True:
            ready, _, _ = select.select([self._r], [], [], 0.1)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            try:
                chunk = os.read(self._r, 65536)
            except OSError:
                break
            if not chunk:
                break
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                self._line(line + b"\n")
        if partial:
            self._line(partial)

    def _line(self, line: bytes) -> None:
        if not self.panicked and PANIC_HEADER.match(line):
            self.panicked = True
        if self.panicked:
            self.held += line
        else:
            _write_all(self._real, line)

    def stop(self, failed: bool) -> None:
        """Restore fd 2 and drain the pipe; the held text is dropped when the command ``failed``."""
        _flush_stderr()
        os.dup2(self._real, 2)  # the pipe's last write end closes: the pump sees EOF (or times out below)
        self._stop.set()
        self._thread.join(5.0)
        os.close(self._r)
        if self.held and not failed:
            _write_all(self._real, bytes(self.held))
        os.close(self._real)


def start() -> Optional[PanicFilter]:
    """A PanicFilter on this process's fd 2, or None when there is no fd 2 to filter."""
    try:
        os.fstat(2)
    except OSError:
        return None
    return PanicFilter()


def _flush_stderr() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return
        view = view[n:]
