"""Process-wide garbage-collector settings for a long-running flow (``meter run``, ``python -m bytewax.run``,
the benchmarks)."""

from __future__ import annotations


def tune_gc() -> None:
    """Garbage-collector settings for a long-running flow.

    The keyed state is millions of long-lived objects and the hot path allocates short-lived ones per
    event; CPython's default (a young collection every 700 allocations) then spends a fifth of the
    time re-scanning survivors. Objects alive at start-up (modules, configuration, rules) are frozen
    out of every collection, and young collections run every 100,000 allocations. Reference counting
    still frees almost everything at once; only cycles wait for a collection.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 20, 100)
