"""The contenders of ``python -m benchmarks``, one module per contender.

Every module runs as its own process (``python -m benchmarks.peers.<name> ...``) so that its memory and
CPU are measured apart from the harness, and writes one result JSON (see :mod:`benchmarks.peers.common`).
Nothing here is imported by the test suite except through ``tests/test_bench_smoke.py``.
"""
