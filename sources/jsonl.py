"""JSONL input for embedded mode: one usage event per line, from files or standard input.

Each file is one partition; the resume state is the byte offset and line number
after the last line emitted, so with ``--recovery`` a restarted flow continues
exactly where the last snapshot left off. Standard input cannot be rewound: a
flow reading ``-`` refuses to resume from a snapshot rather than skip or
double-count lines. A UTF-8 byte-order mark at the start of a file (or of standard
input) is not part of its first event and is dropped.
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, List, Optional, Sequence, Tuple

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from meterflow.base.errors import MeterError
from meterflow.sources.stop import STOP

STDIN = "-"
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, stripped from the start of a file


class _LinePartition(StatefulSourcePartition[Tuple[Any, bytes], Tuple[int, int]]):
    def __init__(self, path: str, resume: Optional[Tuple[int, int]], batch_lines: int) -> None:
        self._path = path
        self._batch = batch_lines
        if path == STDIN:
            if resume is not None:
                raise MeterError("cannot resume a flow that reads standard input: rerun without --recovery, "
                                 "or read from a file")
            self._f: BinaryIO = sys.stdin.buffer
            self._offset, self._line = 0, 0
        else:
            self._f = open(path, "rb")
            self._offset, self._line = resume if resume is not None else (0, 0)
            self._f.seek(self._offset)
        self._label = path

    def next_batch(self) -> List[Tuple[Any, bytes]]:
        if STOP.is_set():
            raise StopIteration()
        lines = list(islice(self._f, self._batch))  # the file's own line iterator: no Python call per line
        if not lines:
            raise StopIteration()
        label, first = self._label, self._line + 1
        self._offset += sum(map(len, lines))  # of the bytes as read: a resume seeks back to exactly here
        if first == 1 and lines[0].startswith(BOM):  # exported by common tools; not part of the first event
            lines[0] = lines[0][len(BOM):]
        out = [((label, first + i), raw.rstrip(b"\r\n")) for i, raw in enumerate(lines)
               if raw.strip()]  # blank lines are layout, not events
        self._line += len(lines)
        return out

    def snapshot(self) -> Tuple[int, int]:
        return (self._offset, self._line)

    def close(self) -> None:
        if self._f is not sys.stdin.buffer:
            self._f.close()


class JsonlSource(FixedPartitionedSource[Tuple[Any, bytes], Tuple[int, int]]):
    """Read usage events from JSONL files (or ``-`` for standard input). Stops at end of input."""

    def __init__(self, paths: Sequence[str], batch_lines: int = 2048) -> None:
        for p in paths:
            if p != STDIN and not Path(p).is_file():
                raise MeterError(f"input file {p} does not exist")
        self._paths = [p if p == STDIN else str(Path(p)) for p in paths]
        self._batch = batch_lines

    def list_parts(self) -> List[str]:
        return list(self._paths)

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[Tuple[int, int]]) -> _LinePartition:
        return _LinePartition(for_part, resume_state, self._batch)
