"""``meter gateway sync``: rewrite every customer's live gateway state in Redis from a recovery directory.

The gateway state (README: Outputs: ``meter:{tenant}:{customer}:{metric}``, and the wallet hashes) is
derived from the meter state, which the recovery directory holds. This reads the snapshots a resume
would read — per ``(step, key)`` the latest snapshot taken before the last execution's frontier, from
every ``part-*.sqlite3`` partition, opened read-only — rebuilds each customer's
:class:`~meterflow.operators.meter.CustomerMeter` and writes the state of every metric's current period, with the
same absolute HSET/DEL the flow's Redis sink uses (:func:`meterflow.sinks.redis.queue_write`), in pipelined chunks,
and each metric's ``anomaly`` marker (the latest fired day the state keeps; set only if later than the hash's).
Running it twice leaves the same hashes (only ``updated_at`` moves). Nothing is written to the recovery
directory.

A resumed ``meter run --recovery DIR`` republishes the same states by itself; this command is for when
no run is about to start (Redis was restarted empty, or the last run ended while Redis was down). Run it
while the flow is stopped: a running flow's newer states could be overwritten by the snapshot's.
"""

from __future__ import annotations

import argparse
import pickle
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from meterflow.base.errors import MeterError
from meterflow.base.stats import FlowStats
from meterflow.base.timeutil import now_ms
from meterflow.schemas.config import Config, mask_url

METER_STEP = "meterflow.meter"  # flow id "meterflow" (meterflow.dataflows.metering.build_flow) + step "meter"
_CHUNK = 2000  # states per pipelined round trip


@dataclass(frozen=True)
class SyncResult:
    customers: int
    states: int  # gateway hashes written
    removed: int  # gateway hashes deleted (cancelled subscriptions not yet removed)
    wallets: int
    markers: int = 0  # anomaly markers (re)set, each only if its day is later than the hash's


def latest_snapshots(directory: Path, step_id: str = METER_STEP) -> Dict[str, bytes]:
    """``{state key: pickled snapshot}`` of ``step_id`` that a resume from ``directory`` would load (read them
    with :func:`meterflow.dataflows.metering.load_shard_state`, which refuses anything but builtins)."""
    parts = sorted(directory.glob("part-*.sqlite3"))
    if not parts:
        raise MeterError(f"recovery directory {directory} holds no snapshots (no part-*.sqlite3): pass the "
                         "--recovery DIR of the meter run whose gateway state to write")
    conns = []
    try:
        for p in parts:
            try:
                conns.append(sqlite3.connect(f"file:{p}?mode=ro", uri=True))
            except sqlite3.Error as exc:
                raise MeterError(f"cannot open recovery partition {p}: {exc}") from exc
        try:
            before = _resume_epoch(conns)
            if before is None:
                return {}
            best: Dict[str, Tuple[int, Optional[bytes]]] = {}
            for conn in conns:
                for key, epoch, data in conn.execute(
                        "SELECT state_key, snap_epoch, ser_change FROM snaps WHERE step_id = ? AND snap_epoch < ?",
                        (step_id, before)):
                    if key not in best or epoch > best[key][0]:
                        best[key] = (epoch, data)
        except sqlite3.Error as exc:
            raise MeterError(f"recovery directory {directory} is not a readable Bytewax recovery store: {exc}") from exc
    finally:
        for conn in conns:
            conn.close()
    return {key: data for key, (_epoch, data) in best.items() if data is not None}  # None: the key was discarded


def _resume_epoch(conns: List[sqlite3.Connection]) -> Optional[int]:
    """The epoch a resume starts from: the least frontier of the last execution's workers (a worker that
    recorded none is still at that execution's resume epoch). None when nothing ever ran."""
    exs: Dict[int, Tuple[int, int]] = {}
    fronts: Dict[Tuple[int, int], int] = {}
    for conn in conns:
        for ex, workers, resume in conn.execute("SELECT ex_num, worker_count, resume_epoch FROM exs"):
            exs[ex] = (workers, resume)
        for ex, worker, frontier in conn.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts"):
            fronts[(ex, worker)] = frontier
    if not exs:
        return None
    last = max(exs)
    workers, resume = exs[last]
    return min(fronts.get((last, w), resume) for w in range(workers))


def current_states(config: Config, directory: Path, at_ms: int) -> Iterator[list]:
    """Per customer of the snapshots: the gateway and wallet states of its current periods, and its anomaly
    markers."""
    from meterflow.dataflows.metering import load_shard_state, shard_snapshots
    from meterflow.operators.meter import CustomerMeter
    from meterflow.operators.rules import Rules

    rules = Rules(config)
    rules.gateway_states = True
    stats = FlowStats()
    for key, data in sorted(latest_snapshots(directory).items()):
        try:
            snaps = shard_snapshots(load_shard_state(data))
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise MeterError(f"recovery directory {directory}: the snapshot of shard {key} cannot be read "
                             f"({type(exc).__name__}: {exc})") from exc
        for ckey in sorted(snaps):
            try:
                meter = CustomerMeter.from_snapshot(rules, snaps[ckey], stats=stats)
            except ValueError as exc:
                raise MeterError(f"recovery directory {directory}: the snapshot of customer {ckey} cannot be read "
                                 f"({exc})") from exc
            gateway, wallets = meter.ent.republish(meter.usage, at_ms)
            yield [*gateway, *wallets, *(meter.anom.markers() if meter.anom is not None else [])]


def sync_gateway(config: Config, directory: Path, at_ms: Optional[int] = None) -> SyncResult:
    """Write every customer's current gateway (and wallet) state of ``directory`` to ``[redis]``."""
    import redis

    from meterflow.schemas.gateway import AnomalyMarker, WalletState
    from meterflow.sinks.redis import make_client, queue_write

    if config.redis is None:
        raise MeterError(f"{config.source_path} has no [redis] section: there is no gateway state to write")
    url = mask_url(config.redis.url)
    client = make_client(config.redis.url, config.redis.timeout)
    customers = states = removed = wallets = markers = 0
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            raise MeterError(f"Redis {url} is unreachable ({type(exc).__name__}: {exc}): start it, or fix "
                             f"redis.url in {config.source_path}, then run meter gateway sync again") from exc
        at = now_ms() if at_ms is None else at_ms
        pending: list = []

        def flush() -> None:
            pipe = client.pipeline(transaction=False)
            for s in pending:
                queue_write(pipe, s)
            try:
                pipe.execute()
            except redis.RedisError as exc:
                done = states + removed + wallets + markers - len(pending)
                raise MeterError(f"Redis {url} failed after {done} of the "
                                 f"states were written ({type(exc).__name__}: {exc}); run meter gateway sync "
                                 "again (every write is absolute, so a rerun converges)") from exc
            pending.clear()

        for items in current_states(config, directory, at):
            customers += 1
            for s in items:
                if isinstance(s, WalletState):
                    wallets += 1
                elif isinstance(s, AnomalyMarker):
                    markers += 1
                elif s.deleted:
                    removed += 1
                else:
                    states += 1
            pending += items
            if len(pending) >= _CHUNK:
                flush()
        if pending:
            flush()
    finally:
        client.close()
    return SyncResult(customers=customers, states=states, removed=removed, wallets=wallets, markers=markers)


def sync_cmd(args: argparse.Namespace) -> int:
    from meterflow.schemas.config import load_config

    cfg = load_config(args.config)
    directory = Path(args.recovery)
    if not directory.is_dir():
        raise MeterError(f"recovery directory {directory} does not exist: pass the --recovery DIR of the meter "
                         "run whose gateway state to write")
    r = sync_gateway(cfg, directory)
    print(f"gateway sync: wrote {r.states} gateway states and {r.wallets} wallets of {r.customers} customers "
          f"from {directory} to Redis {mask_url(cfg.redis.url) if cfg.redis else ''}"
          + (f"; removed {r.removed} hashes of cancelled entitlements" if r.removed else "")
          + (f"; {r.markers} anomaly markers" if r.markers else ""))
    return 0
