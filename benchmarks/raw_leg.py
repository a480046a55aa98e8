"""The reconciler's raw leg (meterflow/raw_leg.py) over a large archive, timed: README's Reconciliation figure.

Archives ``--events`` sample events (meterflow.sample: the sample configuration's five metrics, duplicates,
corrections, test traffic) into ``raw_events`` of a fresh embedded chDB, then times ``raw_units`` twice (the
first run also warms chDB's caches) and prints the keys it found.

    python -m benchmarks.raw_leg --events 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import Mediator, raw_columns
from meterflow.raw_leg import raw_units
from meterflow.sample import customer_ids, generate_events, sample_config_toml, tenant_ids
from meterflow.schemas.config import parse_config
from meterflow.schemas.records import Emission
from meterflow.sinks.clickhouse import connect
from meterflow.sinks.clickhouse_schema import RAW_COLUMNS, raw_event_columns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--customers", type=int, default=500)
    args = ap.parse_args()
    tenants = tenant_ids(3)
    with tempfile.TemporaryDirectory() as tmp:
        toml = sample_config_toml(tenants, {t: customer_ids(args.customers // 2) for t in tenants},
                                  "2026-11-01T00:00:00Z")
        toml += f'\n[clickhouse]\ndsn = "chdb://{Path(tmp) / "ch"}"\n'
        cfg = parse_config(tomllib.loads(toml), "raw_leg", environ={})
        client, db = connect(cfg.clickhouse)
        # The flow's own mediation decides what is archived (what passes validation, duplicates included) and
        # builds the columns, as `meter run` does.
        mediator = Mediator(cfg, stats=FlowStats(), clock=lambda: 1 << 62)
        t0 = time.perf_counter()
        n = 0
        lines = generate_events(args.events, tenants=3, customers=args.customers, start_ms=1_793_491_200_000,
                                span_ms=20 * 86_400_000)
        batch: list = []
        for i, line in enumerate(lines):
            batch.append((("bench", i + 1), line))
            if len(batch) == 50_000:
                n += _insert(client, db, mediator, batch)
                batch = []
        n += _insert(client, db, mediator, batch)
        print(f"archived {n:,} events in {time.perf_counter() - t0:.1f}s")
        for label in ("first run", "warm run"):
            t = time.perf_counter()
            keys = raw_units(client, db, cfg)
            print(f"raw leg ({label}): {len(keys):,} keys in {time.perf_counter() - t:.2f}s")


def _insert(client, db: str, mediator, batch: list) -> int:
    groups, _dead = mediator(batch)
    cols = raw_columns(groups)
    if cols is None:
        return 0
    client.insert(f"{db}.raw_event_rows", raw_event_columns([Emission(raw_events=cols)]), column_names=RAW_COLUMNS,
                  column_oriented=True)
    return len(cols.event_id)


if __name__ == "__main__":
    main()
