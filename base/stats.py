"""Process-wide counters for progress lines, the run summary and Prometheus.

Counters are bumped once per batch with a batch's totals, never per event.
They are observability only: the billing numbers live in the recoverable state.

Every event read ends in exactly one of four counters, so at the end of a run (see :func:`identity`)

    read = accepted + duplicates + excluded + dead_lettered

``accepted``: unique, in time and billable (``unmetered`` events, of a type no metric counts, are a part
of it); ``excluded``: unique and in time but excluded from billing; ``dead_lettered``: events dead-lettered
as a whole (invalid_json, invalid_event, unknown_tenant, too_late, internal_error). ``missing_property``
counts dead letters of single metrics apart: such an event is still accepted and its other metrics count
it, so it is not in the sum. Dead-letter records written = dead_lettered + missing_property (+
``entitlement_rejected`` bad subscription changes and ``entitlement_errors``, which are not events read).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Dict, Tuple


class FlowStats:
    """Thread-safe named counters (Bytewax workers of one process are threads)."""

    KEYS = ("read", "accepted", "duplicates", "excluded", "dead_lettered", "missing_property", "unmetered",
            "corrections_ignored", "unevaluated", "alerts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, counts: Dict[str, int]) -> None:
        with self._lock:
            self._c.update(counts)

    def add_metered(self, accepted: int, duplicates: int, excluded: int, unmetered: int, ignored: int,
                    dead: int, missing: int = 0) -> None:
        """The metering step's per-batch counts (positional: this runs once per key and batch). ``dead`` counts
        events (too_late and the like), ``missing`` the per-metric missing_property dead letters."""
        with self._lock:
            c = self._c
            c["accepted"] += accepted
            c["duplicates"] += duplicates
            c["excluded"] += excluded
            c["unmetered"] += unmetered
            c["corrections_ignored"] += ignored
            c["dead_lettered"] += dead
            c["missing_property"] += missing

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            out = {k: 0 for k in self.KEYS}
            out.update(self._c)
            return out

    def reset(self) -> None:
        with self._lock:
            self._c.clear()


STATS = FlowStats()


def identity(c: Dict[str, int]) -> Tuple[bool, str]:
    """Whether the counters of a finished run add up, and the sum written out.

    >>> identity({"read": 10, "accepted": 6, "duplicates": 1, "excluded": 1, "dead_lettered": 2})
    (True, 'read 10 = accepted 6 + duplicates 1 + excluded 1 + dead-lettered 2')
    >>> identity({"read": 10, "accepted": 6, "dead_lettered": 2, "missing_property": 3})[1]
    'read 10 != accepted 6 + duplicates 0 + excluded 0 + dead-lettered 2 (+ 3 missing_property for single metrics)'
    """
    parts = [c.get(k, 0) for k in ("accepted", "duplicates", "excluded", "dead_lettered")]
    ok = c.get("read", 0) == sum(parts)
    text = (f"read {c.get('read', 0):,} {'=' if ok else '!='} accepted {parts[0]:,} + duplicates {parts[1]:,} + "
            f"excluded {parts[2]:,} + dead-lettered {parts[3]:,}")
    if c.get("missing_property"):
        text += f" (+ {c['missing_property']:,} missing_property for single metrics)"
    return ok, text

