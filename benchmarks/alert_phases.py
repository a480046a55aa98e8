"""Breach-to-alert latency by where in the flush interval the crossing event was produced.

``python -m benchmarks --only meterflow-1w-native --keep`` leaves each alert's (produced, detected, consumed) epoch
ms in its work directory (``lat-<contender>-alerts.json``); this prints, per tenth of the flush interval in which
the event was produced, the alerts' count and latency p50 / p95, so a pass of the flow that every event waits for
(all shards' ticks at one instant, say) shows as the tenths right after it:

    python -m benchmarks.alert_phases /tmp/meterflow-bench-*/lat-meterflow-1w-native-alerts.json [--interval-ms 1000]
"""

from __future__ import annotations

import argparse
import json
from typing import List


def pct(xs: List[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("alerts", help="a lat-<contender>-alerts.json the latency run kept")
    ap.add_argument("--interval-ms", type=int, default=1000, help="pipeline.flush_interval (default 1000)")
    args = ap.parse_args()
    rows = json.load(open(args.alerts))
    lat = [(consumed - produced, produced) for produced, _detected, consumed, *_ingested in rows]
    tenth = args.interval_ms / 10
    print(f"{len(lat)} alerts: p50 {pct([x for x, _ in lat], 0.5):.0f} ms, p99 {pct([x for x, _ in lat], 0.99):.0f} ms")
    print("produced at (ms into the interval)  alerts  p50 ms  p95 ms")
    for b in range(10):
        xs = [x for x, at in lat if int(at % args.interval_ms // tenth) == b]
        if xs:
            print(f"{b * tenth:>8.0f} - {(b + 1) * tenth:<8.0f}              {len(xs):>6}  {pct(xs, 0.5):>6.0f}  "
                  f"{pct(xs, 0.95):>6.0f}")


if __name__ == "__main__":
    main()
