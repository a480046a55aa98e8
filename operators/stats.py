"""Process-wide counters for progress lines, the run summary and Prometheus.

Counters are bumped once per batch with a batch's totals, never per event.
They are observability only: the billing numbers live in the recoverable state.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Dict


class FlowStats:
    """Thread-safe named counters (Bytewax workers of one process are threads)."""

    KEYS = ("read", "accepted", "duplicates", "excluded", "dead_lettered", "unmetered", "corrections_ignored",
            "unevaluated", "alerts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, counts: Dict[str, int]) -> None:
        with self._lock:
            self._c.update(counts)

    def add_metered(self, accepted: int, duplicates: int, excluded: int, unmetered: int, ignored: int,
                    dead: int) -> None:
        """The metering step's per-batch counts (positional: this runs once per key and batch)."""
        with self._lock:
            c = self._c
            c["accepted"] += accepted
            c["duplicates"] += duplicates
            c["excluded"] += excluded
            c["unmetered"] += unmetered
            c["corrections_ignored"] += ignored
            c["dead_lettered"] += dead

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            out = {k: 0 for k in self.KEYS}
            out.update(self._c)
            return out

    def reset(self) -> None:
        with self._lock:
            self._c.clear()


STATS = FlowStats()
