"""Read the contract's ClickHouse views of one embedded chDB path and print them as JSON.

Run as a subprocess (``python tests/e2e/chread.py CONFIG``): chDB allows one data path per
process, so the pytest process never opens a flow's chDB itself. Only plain SQL on the
contract's views is used (what a downstream billing reader would do); timestamps come back
as epoch milliseconds and payloads as hex plus sha256 so binary and 2 MB payloads survive.
"""

from __future__ import annotations

import json
import sys


def main(config_path: str) -> None:
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect

    cfg = load_config(config_path)
    client, db = connect(cfg.clickhouse)
    out = {}
    q = client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start) AS ps, "
        f"toUnixTimestamp64Milli(period_end) AS pe, value, included, overage_units, events, excluded_events "
        f"FROM {db}.usage_by_period")
    out["periods"] = [list(r) for r in q.result_rows]
    q = client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(window_start) AS ws, "
        f"toUnixTimestamp64Milli(window_end) AS we, dimensions, value, events FROM {db}.usage_by_window")
    out["windows"] = [[*r[:5], dict(r[5]), *r[6:]] for r in q.result_rows]
    q = client.query(
        f"SELECT reason, detail, source, length(payload) AS n, lower(hex(SHA256(payload))) AS sha, "
        f"if(length(payload) <= 65536, lower(hex(payload)), '') AS hex, tenant_id, metric, "
        f"toUnixTimestamp64Milli(received_at) AS ra FROM {db}.dead_letters")
    out["dead_letters"] = [list(r) for r in q.result_rows]
    q = client.query(
        f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start) AS ps, "
        f"toUnixTimestamp64Milli(period_end) AS pe, plan, currency, price_model, usage, included, overage_units, "
        f"toString(charge), toString(overage_amount), toString(minimum), toString(amount), custom_rate, final "
        f"FROM {db}.usage_rated")
    out["rated"] = [list(r) for r in q.result_rows]
    q = client.query(f"SELECT tenant_id, customer_id, metric, toUnixTimestamp64Milli(period_start) AS ps, final "
                     f"FROM {db}.usage_by_period")
    out["period_final"] = [list(r) for r in q.result_rows]
    q = client.query(f"SELECT alert_id, customer_id, metric, threshold_amount, amount, event_id FROM {db}.alerts_log "
                     f"WHERE type = 'spend_crossed' ORDER BY alert_id")
    out["spend"] = [list(r) for r in q.result_rows]
    # every alert as ClickHouse serialises it, without the wall-clock columns (when it was read and detected)
    raw = client.raw_query(f"SELECT * EXCEPT (detected_at, ingested_at) FROM {db}.alerts_log FORMAT JSONEachRow")
    out["alerts"] = sorted(raw.decode().splitlines())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
