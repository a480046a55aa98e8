"""The Grafana dashboard in deploy/ queries only metrics that meter run and meter serve export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from meterflow.service import ServiceMetrics
from meterflow.sinks.metrics import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"


def _exported() -> set:
    from prometheus_client import generate_latest

    svc = ServiceMetrics()
    svc.requests.labels("/v1/events", "202").inc()
    svc.ingest.labels("accepted", "").inc()
    svc.latency.labels("/v1/events").observe(0.001)
    names = set()
    for reg in (REGISTRY, svc.registry):
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            names.update(s.name for s in fam.samples)
            names.add(fam.name)
    return names


def test_every_dashboard_query_names_an_exported_metric():
    exported = _exported()
    from meterflow.sinks.metrics import ALERTS, BATCH, DEAD_LETTERS, DETECTION, SINK_ERRORS

    # labelled families show samples once a label set exists: name them from the objects
    for m in (ALERTS, DEAD_LETTERS, SINK_ERRORS):
        exported.add(m._name + "_total")
    for h in (BATCH, DETECTION):
        exported.update(h._name + s for s in ("_bucket", "_count", "_sum"))
    dash = json.loads(DASHBOARD.read_text())
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"meterflow_\w+", t["expr"])}
    exported.add("meterflow_consumer_lag")  # one sample per partition read (none in this process)
    assert len(used) >= 13
    assert used <= exported, sorted(used - exported)
    for want in ("meterflow_events_total", "meterflow_dead_letters_total", "meterflow_alerts_total",
                 "meterflow_ingest_to_detection_seconds_bucket", "meterflow_webhook_outbox_depth",
                 "meterflow_redis_down", "meterflow_consumer_lag", "meterflow_batch_seconds_bucket",
                 "meterflow_snapshot_seconds_bucket"):
        assert want in used
