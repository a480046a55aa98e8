"""The durable deduplicating alert JSONL file: the alert JSONL sink's file and the webhook's outbox.

:class:`AlertLog` appends alerts as lines of the contract's alert JSON, at most once per ``alert_id``
among the lines the file holds, and returns from :meth:`AlertLog.append` only after ``fsync``. On open,
a torn last line (a crash in the middle of an append whose batch was therefore never acknowledged, so
Bytewax replays it) is truncated and the ids of the complete lines are loaded. An append that fails
leaves no partial line behind.

Memory: one id (32 hex digits) per line in the file. Not thread-safe: its owner serialises the calls
(one lock per file).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Sequence, Set

import msgspec

from meterflow.base.errors import MeterError
from meterflow.schemas.alerts import ALERT_ENCODER, Alert

log = logging.getLogger(__name__)


class _AlertId(msgspec.Struct):
    alert_id: str


_ID_DECODER = msgspec.json.Decoder(_AlertId)


class AlertLog:
    """One append-only alert JSONL file. ``what`` names it in messages (``alert file``, ``webhook outbox``).

    ``size`` is the file's length in bytes (complete lines only); ``ids`` the alert ids it holds.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self.ids: Set[str] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        with open(path, "a+b") as fh:
            fh.seek(0)
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a torn last line from a crash: its batch was never acknowledged
                log.warning("%s %s: dropping a torn last line of %d bytes (its batch is replayed)", what, path,
                            len(data) - end)
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.ids.add(_ID_DECODER.decode(line).alert_id)
            except msgspec.DecodeError:
                log.warning("%s %s: line %d is not an alert record; ignored for deduplication", what, path, n)
        if created:
            _fsync_dir(path.parent)
        self.size = end
        self._fh = open(path, "ab")

    def append(self, alerts: Sequence[Alert]) -> int:
        """Append the alerts whose ids are not in the file yet (the first of each id in ``alerts``); durable on
        return. Returns how many lines were added."""
        new: Dict[str, bytes] = {}
        for a in alerts:
            if a.alert_id not in self.ids and a.alert_id not in new:
                new[a.alert_id] = ALERT_ENCODER.encode(a) + b"\n"
        if not new:
            return 0
        data = b"".join(new.values())
        try:
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            try:  # leave no partial line behind for the retry after the restart
                self._fh.truncate(self.size)
            except OSError:
                pass
            raise MeterError(f"{self.what} {self.path}: cannot append {len(new)} alerts: {exc}") from exc
        self.size += len(data)
        self.ids.update(new)
        return len(new)

    def clear(self) -> None:
        """Empty the file (durably) and forget its ids: for an outbox whose every line is delivered."""
        self._fh.truncate(0)
        os.fsync(self._fh.fileno())
        self.size = 0
        self.ids.clear()

    def close(self) -> None:
        self._fh.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
