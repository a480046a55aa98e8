"""The gateway hash's ``anomaly`` marker: written from anomaly alerts, only ever moved to a later day, kept by the
state's HSET, read by the gate (also from a hash of a metric without an entitlement)."""

from __future__ import annotations

import pytest

from meterflow.base.stats import FlowStats
from meterflow.gate import QuotaGate
from meterflow.schemas.alerts import Alert
from meterflow.schemas.records import Emission
from tests.sinks.test_redis_sink import build, decoded, gstate

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def anomaly(tenant: str, customer: str, metric: str, day: str, usage: float = 40.0) -> Alert:
    return Alert(alert_id=f"a-{day}", type="anomaly", tenant_id=tenant, customer_id=customer, metric=metric,
                 period_start=f"{day}T00:00:00Z", period_end=f"{day}T23:59:59Z", threshold_pct=300.0, included=None,
                 usage=usage, usage_pct=usage * 10, enforcement="", action="notify", event_id="e",
                 event_time=f"{day}T12:00:00Z", ingested_at=f"{day}T12:00:00Z", detected_at=f"{day}T12:00:00Z",
                 baseline=10.0, factor=3.0)


def test_anomaly_marker_moves_only_forward_and_survives_state_writes(redis_server, client, tenant):
    part = build(redis_server, FlowStats())
    key = f"meter:{tenant}:c1:calls"
    part.write_batch([Emission(gateway=[gstate(tenant, "c1", "calls", 10)],
                               alerts=[anomaly(tenant, "c1", "calls", "2026-11-08")])])
    h = decoded(client, key)
    assert h["anomaly"] == "2026-11-08T00:00:00Z" and h["used"] == "10"
    # A later day wins within a batch and across batches; an earlier day's (late) alert or a replay never moves
    # it back; the next HSET of the state keeps it.
    part.write_batch([Emission(alerts=[anomaly(tenant, "c1", "calls", "2026-11-10"),
                                       anomaly(tenant, "c1", "calls", "2026-11-09")])])
    part.write_batch([Emission(alerts=[anomaly(tenant, "c1", "calls", "2026-11-08")],
                               gateway=[gstate(tenant, "c1", "calls", 12)])])
    h = decoded(client, key)
    assert h["anomaly"] == "2026-11-10T00:00:00Z" and h["used"] == "12"
    # A metric without an entitlement: a hash with the marker alone, which the gate reads as untracked.
    part.write_batch([Emission(alerts=[anomaly(tenant, "c2", "tokens", "2026-11-09")])])
    assert decoded(client, f"meter:{tenant}:c2:tokens") == {"anomaly": "2026-11-09T00:00:00Z"}
    part.close()
    gate = QuotaGate(client)
    d = gate.check(tenant, "c2", "tokens")
    assert (d.allowed, d.known, d.reason, d.anomaly) == (True, False, "no_entitlement", "2026-11-09T00:00:00Z")
    d = gate.check(tenant, "c1", "calls")
    assert (d.allowed, d.known, d.state, d.used, d.anomaly) == (True, True, "ok", 12.0, "2026-11-10T00:00:00Z")
    assert gate.check(tenant, "c3", "calls").anomaly == ""
