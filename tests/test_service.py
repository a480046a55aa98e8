"""``meter serve`` end to end: the real server process, the real broker and redis-server (README: HTTP service)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meterflow.base.timeutil import ms_to_iso
from meterflow.schemas.gateway import GatewayState, gateway_key, state_fields
from tests.e2e.support import consume_all
from tests.service_support import ADMIN_TOKEN, running_service, service_config

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

KEY_A = "key-of-tenant-a-" + "a" * 16
KEY_B = "key-of-tenant-b-" + "b" * 16


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def svc(kafka, redis_server, tmp_path_factory):
    """One server for the module: tenants A and B (unique ids), its own events topic."""
    d = tmp_path_factory.mktemp("serve")
    ta, tb = f"ta{uuid.uuid4().hex[:8]}", f"tb{uuid.uuid4().hex[:8]}"
    topic = f"serve-events-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=2)
    cfg = service_config(d / "meterflow.toml", bootstrap=kafka.bootstrap, topic=topic, redis_url=redis_server.url,
                         tenants={ta: KEY_A, tb: KEY_B}, chdb_dir=d / "chdb",
                         subscriptions=f'[[subscriptions]]\ntenant_id = "{ta}"\ncustomer_id = "c_over"\n'
                         'plan = "pro"\nperiod = "month"\n')
    with running_service(cfg) as client:
        yield {"client": client, "a": ta, "b": tb, "topic": topic, "bootstrap": kafka.bootstrap,
               "redis": redis_server, "dir": d}


def _ev(tenant: str, customer: str = "c1", event_id: str = "", **extra) -> dict:
    return {"event_id": event_id or f"e-{uuid.uuid4().hex[:12]}", "tenant_id": tenant, "customer_id": customer,
            "event_type": "api_call", "timestamp": ms_to_iso(_now_ms() - 60_000), **extra}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _topic_events(svc) -> dict:
    return {json.loads(v)["event_id"]: (k, json.loads(v)) for k, v, _h in consume_all(svc["bootstrap"], svc["topic"])}


def _block(client, tenant: str, customer: str, metric: str = "api_calls", period_end_ms: int = 0) -> int:
    now = _now_ms()
    end = period_end_ms or now + 3_600_000
    g = GatewayState(tenant_id=tenant, customer_id=customer, metric=metric, included=1000, used=1000, remaining=0,
                     pct=100.0, state="blocked", period_start=now - 86_400_000, period_end=end, updated_at=now,
                     plan="pro", blocked_by="quota")
    client.hset(gateway_key(tenant, customer, metric), mapping=state_fields(g))
    return end


def test_single_array_and_cloudevents_are_in_the_topic_when_202_answers(svc):
    c, a = svc["client"], svc["a"]
    one = _ev(a)
    r = c.post("/v1/events", json=one, headers=_auth(KEY_A))
    assert r.status_code == 202 and r.json() == {"accepted": 1, "rejected": []}
    batch = [_ev(a, "c2") for _ in range(3)]
    r = c.post("/v1/events", json=batch, headers=_auth(KEY_A))
    assert r.status_code == 202 and r.json()["accepted"] == 3
    ce_id = f"ce-{uuid.uuid4().hex[:8]}"
    when = ms_to_iso(_now_ms() - 5_000)
    structured = {"specversion": "1.0", "id": ce_id, "source": "/svc", "type": "api_call", "time": when,
                  "data": {"tenant_id": a, "customer_id": "c3", "properties": {"model": "m"}}}
    r = c.post("/v1/events", content=json.dumps(structured), headers={**_auth(KEY_A),
               "Content-Type": "application/cloudevents+json"})
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
    ce_batch = [{"specversion": "1.0", "id": f"{ce_id}-{i}", "source": "/svc", "type": "api_call", "time": when,
                 "data": {"tenant_id": a, "customer_id": "c4"}} for i in range(2)]
    ce_batch.append({"specversion": "1.0", "id": "no-data", "source": "/svc", "type": "api_call"})
    ce_batch.append({"specversion": "1.0", "id": f"{ce_id}-b64", "source": "/svc", "type": "api_call", "time": when,
                     "datacontenttype": "application/json",
                     "data_base64": base64.b64encode(json.dumps({"tenant_id": a, "customer_id": "c5"}).encode())
                     .decode()})
    r = c.post("/v1/events", content=json.dumps(ce_batch), headers={**_auth(KEY_A),
               "Content-Type": "application/cloudevents-batch+json; charset=utf-8"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 3 and [(x["index"], x["reason"]) for x in body["rejected"]] == [(2, "invalid_event")]
    # Consumed right after the answers: every acknowledged event is in the topic, keyed tenant|customer.
    seen = _topic_events(svc)
    for ev in [one, *batch]:
        key, value = seen[ev["event_id"]]
        assert key == f"{a}|{ev['customer_id']}".encode() and value == ev
    key, value = seen[ce_id]
    assert value == {"tenant_id": a, "customer_id": "c3", "properties": {"model": "m"}, "event_id": ce_id,
                     "timestamp": when, "event_type": "api_call"}
    assert {f"{ce_id}-0", f"{ce_id}-1"} <= set(seen) and "no-data" not in seen
    assert seen[f"{ce_id}-b64"] == (f"{a}|c5".encode(), {"tenant_id": a, "customer_id": "c5",
                                                        "event_id": f"{ce_id}-b64", "timestamp": when,
                                                        "event_type": "api_call"})


def test_blocked_customer_gets_429_with_retry_after_and_nothing_is_produced(svc):
    c, a, redis = svc["client"], svc["a"], svc["redis"].client()
    end = _block(redis, a, "c_blocked")
    ev = _ev(a, "c_blocked")
    r = c.post("/v1/events", json=[ev, _ev(a, "c_blocked")], headers=_auth(KEY_A))
    assert r.status_code == 429, r.text
    retry = int(r.headers["Retry-After"])
    assert end / 1000 - time.time() - 5 <= retry <= end / 1000 - time.time() + 5
    assert [x["reason"] for x in r.json()["rejected"]] == ["blocked", "blocked"]
    assert r.json()["rejected"][0]["event_id"] == ev["event_id"]
    # A mixed request: the blocked customer's event refused, the other accepted (202); excluded and
    # correction events of a blocked customer pass (nothing billable to refuse).
    ok, blocked = _ev(a, "c_fine"), _ev(a, "c_blocked")
    correction = _ev(a, "c_blocked", correction=True, corrects=ev["event_id"])
    other_metric = {**_ev(a, "c_blocked"), "event_type": "completion", "properties": {"n": 3}}
    r = c.post("/v1/events", json=[blocked, ok, correction, other_metric], headers=_auth(KEY_A))
    assert r.status_code == 202 and r.json()["accepted"] == 3
    assert [(x["index"], x["reason"]) for x in r.json()["rejected"]] == [(0, "blocked")]
    seen = _topic_events(svc)
    assert ok["event_id"] in seen and correction["event_id"] in seen and other_metric["event_id"] in seen
    assert ev["event_id"] not in seen and blocked["event_id"] not in seen
    # The entitlement endpoint says the same; a period that ended releases the block.
    d = c.get(f"/v1/entitlements/{a}/c_blocked/api_calls", headers=_auth(KEY_A)).json()
    assert d["allowed"] is False and d["state"] == "blocked" and d["known"] is True and d["used"] == 1000
    assert d["period_end"] == ms_to_iso(end)
    _block(redis, a, "c_blocked", period_end_ms=_now_ms() - 1000)
    r = c.post("/v1/events", json=_ev(a, "c_blocked"), headers=_auth(KEY_A))
    assert r.status_code == 202
    redis.close()


def test_bad_bodies_get_400_and_413_with_json_reasons(svc):
    c, a = svc["client"], svc["a"]
    h = _auth(KEY_A)
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[]", 400, "empty"),
        (b"[" * 200 + b"]" * 200, 400, "no_valid_event"),
        (json.dumps({**_ev(a), "timestamp": "2026-11-03T14:30:00"}).encode(), 400, "invalid_event"),
        (json.dumps({**_ev(a), "event_id": ""}).encode(), 400, "invalid_event"),
        (json.dumps({**_ev(a), "timestamp": ms_to_iso(_now_ms() + 3 * 3_600_000)}).encode(), 400, "invalid_event"),
        (json.dumps([_ev(a) for _ in range(21)]).encode(), 413, "batch_too_large"),
        (json.dumps([_ev(a, properties={"pad": "x" * 21_000})]).encode(), 413, "body_too_large"),
    ]
    for body, status, reason in cases:
        r = c.post("/v1/events", content=body, headers={**h, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["reason"]) == (status, reason), (body[:80], r.text)
        assert r.json()["detail"]
    # Unknown tenant in an event the admin token sends: rejected by mediation's rule, others accepted.
    good = _ev(a)
    r = c.post("/v1/events", json=[good, _ev("nobody")], headers=_auth(ADMIN_TOKEN))
    assert r.status_code == 202 and r.json()["accepted"] == 1
    assert [(x["index"], x["reason"]) for x in r.json()["rejected"]] == [(1, "unknown_tenant")]


def test_a_key_of_tenant_a_can_neither_write_nor_read_tenant_b(svc):
    c, a, b = svc["client"], svc["a"], svc["b"]
    assert c.post("/v1/events", json=_ev(a)).status_code == 401
    assert c.post("/v1/events", json=_ev(a), headers=_auth("not-a-key-" + "z" * 20)).status_code == 401
    intruder = _ev(b)
    r = c.post("/v1/events", json=[_ev(a), intruder], headers=_auth(KEY_A))
    assert r.status_code == 403 and r.json()["reason"] == "forbidden"
    for path in (f"/v1/usage/{b}/c1", f"/v1/entitlements/{b}/c1/api_calls"):
        assert c.get(path, headers=_auth(KEY_A)).status_code == 403
        assert c.get(path).status_code == 401
        assert c.get(path, headers=_auth(KEY_B)).status_code == 200
    assert c.get(f"/v1/usage/{a}/c1", headers={"X-Api-Key": KEY_A}).status_code == 200
    assert intruder["event_id"] not in _topic_events(svc)


def test_usage_reports_live_usage_and_the_charge_rated_from_the_price(svc):
    c, a, redis = svc["client"], svc["a"], svc["redis"].client()
    now = _now_ms()
    g = GatewayState(tenant_id=a, customer_id="c_over", metric="api_calls", included=1000, used=1200, remaining=0,
                     pct=120.0, state="over", period_start=now - 86_400_000, period_end=now + 86_400_000,
                     updated_at=now, plan="pro")
    redis.hset(g.redis_key, mapping=state_fields(g))
    body = c.get(f"/v1/usage/{a}/c_over", headers=_auth(KEY_A)).json()
    (row,) = [m for m in body["metrics"] if m["metric"] == "api_calls"]
    # overage_rate 0.5 above 1000 included: 200 x 0.5 = 100 (ClickHouse holds no rated row: computed here).
    assert row == {"metric": "api_calls", "usage": 1200.0, "included": 1000.0, "pct": 120.0, "state": "over",
                   "period_end": ms_to_iso(now + 86_400_000), "charge": 100.0, "amount": 100.0,
                   "currency": "USD", "money_source": "computed"}
    assert body["plan"] == "pro"
    redis.close()


def test_metrics_parse_and_count_this_servers_requests(svc):
    c, a = svc["client"], svc["a"]

    def samples() -> dict:
        text = c.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = samples()
    r = c.post("/v1/events", json=[_ev(a) for _ in range(4)] + [{"bad": 1}], headers=_auth(KEY_A))
    assert r.status_code == 202
    after = samples()
    acc = ("meterflow_ingest_events_total", (("outcome", "accepted"), ("reason", "")))
    rej = ("meterflow_ingest_events_total", (("outcome", "rejected"), ("reason", "invalid_event")))
    req = ("meterflow_http_requests_total", (("route", "/v1/events"), ("status", "202")))
    assert after[acc] - before.get(acc, 0) == 4
    assert after[rej] - before.get(rej, 0) == 1
    assert after[req] - before.get(req, 0) == 1
    hist = ("meterflow_http_request_duration_seconds_count", (("route", "/v1/events"),))
    assert after[hist] >= after[req]


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_down_follows_server_fail_open(kafka, tmp_path, fail_open):
    from tests.service_support import free_port

    topic = f"serve-down-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    t = f"td{uuid.uuid4().hex[:8]}"
    cfg = service_config(tmp_path / "m.toml", bootstrap=kafka.bootstrap, topic=topic,
                         redis_url=f"redis://127.0.0.1:{free_port()}/0", tenants={t: KEY_A}, chdb_dir=tmp_path / "ch",
                         extra_server=f"fail_open = {'true' if fail_open else 'false'}\n")
    with running_service(cfg) as c:
        r = c.post("/v1/events", json=_ev(t), headers=_auth(KEY_A))
        d = c.get(f"/v1/entitlements/{t}/c1/api_calls", headers=_auth(KEY_A)).json()
        metrics = c.get("/metrics").text
    assert d["reason"] == "redis_unavailable" and d["allowed"] is fail_open and d["known"] is False
    assert "meterflow_redis_down 1.0" in metrics
    if fail_open:
        assert r.status_code == 202
    else:
        assert r.status_code == 503 and r.json()["rejected"][0]["reason"] == "redis_unavailable"
        assert r.headers["Retry-After"] == "1"


def test_broker_down_answers_503_not_202(redis_server, tmp_path):
    from tests.service_support import free_port

    t = f"tk{uuid.uuid4().hex[:8]}"
    cfg = service_config(tmp_path / "m.toml", bootstrap=f"127.0.0.1:{free_port()}", topic="nowhere",
                         redis_url=redis_server.url, tenants={t: KEY_A}, chdb_dir=tmp_path / "ch",
                         produce_timeout="2s")
    with running_service(cfg) as c:
        r = c.post("/v1/events", json=_ev(t), headers=_auth(KEY_A))
    assert r.status_code == 503 and r.json()["reason"] == "kafka_unavailable", r.text
    assert KEY_A not in c.log_text and ADMIN_TOKEN not in c.log_text  # type: ignore[attr-defined]


def test_serve_without_kafka_is_one_line_error(tmp_path: Path):
    from tests.e2e.support import run_meter

    cfg = tmp_path / "m.toml"
    cfg.write_text('[[tenants]]\nid = "acme"\napi_keys = ["short"]\n')
    p = run_meter("serve", "--config", str(cfg), check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "tenants[0].api_keys[0]" in p.stderr and "short" not in p.stderr
    cfg.write_text('[[tenants]]\nid = "acme"\napi_keys = ["a-long-enough-secret-key"]\n')
    p = run_meter("serve", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "meter serve needs [kafka]" in p.stderr and "a-long-enough" not in p.stderr
