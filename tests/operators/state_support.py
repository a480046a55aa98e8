"""Comparing meter state records (meterflow.schemas.state) whatever order their sets were listed in."""

from __future__ import annotations

from array import array
from datetime import datetime
from typing import Any

import msgspec


def canonical(record: Any) -> Any:
    """``record`` as builtins in which every list is sorted (the records list sets and dicts of the live
    state, whose iteration order is not part of the state); a percentile's values stay paired with their
    counts, and the dedupe table becomes its sorted (fingerprint, expiry) pairs."""
    return _canon(msgspec.to_builtins(record, builtin_types=(bytes, datetime)))


def _pairs(fps: bytes, exps: bytes) -> list:
    a, b = array("Q"), array("Q")
    a.frombytes(fps)
    b.frombytes(exps)
    return sorted(zip(a, b))


def _canon(x: Any) -> Any:
    if isinstance(x, dict):
        if "fingerprints" in x or "expiries" in x:  # slot order of the table: not state
            return {"ids": _pairs(x.get("fingerprints", b""), x.get("expiries", b""))}
        if x.get("kind") in ("p95", "p99"):
            x = {**x, "values": sorted(zip(x.get("values", []), x.get("counts", [])), key=repr), "counts": None}
        return {k: _canon(v) for k, v in x.items()}
    if isinstance(x, list):
        return sorted((_canon(v) for v in x), key=repr)
    return x
