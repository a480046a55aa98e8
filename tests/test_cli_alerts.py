"""`meter alerts` (alerts_log in embedded ClickHouse, read in this process through the session's chDB path)
and `meter entitlements publish` (the real Kafka broker)."""

from __future__ import annotations

import json
import uuid
from typing import List

import msgspec
import pytest

from meterflow.base.timeutil import parse_rfc3339_ms
from meterflow.cli import main
from meterflow.schemas.alerts import ENTITLEMENT_DECODER, Alert, alert_id
from meterflow.schemas.config import ClickHouseConfig, load_config
from meterflow.schemas.records import Emission
from meterflow.sinks.clickhouse import ClickHouseSink
from tests.sinks.test_alert_sinks import make_alert, make_alerts

BASE_TOML = """
[[tenants]]
id = "acme"

[[tenants]]
id = "globex"

[[metrics]]
code = "api_calls"
event_type = "api_call"

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
included = 1000
thresholds = [75, 90, 100]

[[plans]]
code = "scale"

[[subscriptions]]
tenant_id = "acme"
customer_id = "cust_1"
plan = "pro"
anchor = "2026-11-01T00:00:00Z"
account_name = "Acme One"
[subscriptions.overrides.api_calls]
included = 5000

[[subscriptions]]
tenant_id = "globex"
customer_id = "g/7"
plan = "scale"
period = "week"
[subscriptions.wallet]
balance = 50.0
credit_rates = { api_calls = 0.01 }
"""


def run(capsys, *argv: str):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- meter alerts ---------------------------------------------------------------------------------

@pytest.fixture
def alerts_config(tmp_path, chdb_path, ch_database):
    """A config on the session's chDB path with alerts written through the ClickHouse sink."""
    alerts = make_alerts(6) + make_alerts(3, prefix="g", tenant="globex")
    blocked = make_alert("cust1", 100.0, type_="blocked", enforcement="hard", event_ms=1793800003000,
                         latency_ms=40)
    wallet = Alert(alert_id=alert_id("wallet_exhausted", "acme", "cw", "", 0, None, 0), type="wallet_exhausted",
                   tenant_id="acme", customer_id="cw", metric="", period_start="", period_end="",
                   threshold_pct=None, included=None, usage=50.0, usage_pct=None, enforcement="", action="block",
                   event_id="", event_time="", ingested_at="", detected_at="2026-11-05T10:00:00.500Z",
                   wallet_balance=50.0, wallet_remaining=0.0, detail="wallet empty")
    everything = alerts + [blocked, wallet]
    part = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database)).build("ch", 0, 1)
    part.write_batch([Emission(alerts=everything[i:i + 3]) for i in range(0, len(everything), 3)])
    part.write_batch([Emission(alerts=alerts[:2])])  # a replay adds nothing
    part.close()
    path = tmp_path / "meterflow.toml"
    path.write_text(BASE_TOML + f'\n[clickhouse]\ndsn = "chdb://{chdb_path}"\ndatabase = "{ch_database}"\n')
    # detected_at, then event_time (none last), then alert_id (ties: both tenants' alerts share their times)
    ordered = sorted(everything, key=lambda a: (parse_rfc3339_ms(a.detected_at),
                                                parse_rfc3339_ms(a.event_time) if a.event_time else 2 ** 62,
                                                a.alert_id))
    return path, ordered


def as_json(a: Alert) -> dict:
    d = msgspec.to_builtins(a)
    d["latency_ms"] = parse_rfc3339_ms(a.detected_at) - parse_rfc3339_ms(a.event_time) if a.event_time else None
    return d


def json_lines(out: str) -> List[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_alerts_json_has_every_field_in_detection_order(capsys, alerts_config):
    path, ordered = alerts_config
    rc, out, err = run(capsys, "alerts", "--config", str(path), "--json")
    assert rc == 0, err
    rows = json_lines(out)
    assert rows == [as_json(a) for a in ordered]
    assert list(rows[0]) == list(as_json(ordered[0])), "keys in the alert record's order"
    assert rows[0]["latency_ms"] == 100 and rows[-1]["latency_ms"] is None  # the wallet alert has no event


def test_alerts_filters_and_limit(capsys, alerts_config):
    path, ordered = alerts_config
    cfg = str(path)

    def ids(*argv: str) -> List[str]:
        rc, out, err = run(capsys, "alerts", "--config", cfg, "--json", *argv)
        assert rc == 0, err
        return [r["alert_id"] for r in json_lines(out)]

    assert ids("--tenant", "globex") == [a.alert_id for a in ordered if a.tenant_id == "globex"]
    assert ids("--customer", "cust1") == [a.alert_id for a in ordered if a.customer_id == "cust1"]
    assert ids("--type", "blocked") == [a.alert_id for a in ordered if a.type == "blocked"]
    assert ids("--metric", "api_calls", "--tenant", "acme") == \
        [a.alert_id for a in ordered if a.metric == "api_calls" and a.tenant_id == "acme"]
    since = ordered[4].detected_at
    assert ids("--since", since) == [a.alert_id for a in ordered[4:]]
    assert ids("--limit", "2") == [a.alert_id for a in ordered[-2:]], "the latest N, oldest first"
    assert ids("--customer", "nobody") == []


def test_alerts_table(capsys, alerts_config):
    path, ordered = alerts_config
    rc, out, err = run(capsys, "alerts", "--config", str(path))
    assert rc == 0, err
    for header in ("detected (UTC)", "type", "tenant", "customer", "metric", "threshold", "usage / included", "pct",
                   "action", "event_id", "latency"):
        assert header in out
    first = ordered[0]
    row = next(line for line in out.splitlines() if first.event_id in line)
    assert first.detected_at.replace("T", " ").rstrip("Z") in row
    for cell in ("threshold_crossed", "acme", "cust0", "api_calls", "75%", "751 / 1,000", "75.1", "notify", "100"):
        assert cell in row, (cell, row)
    assert "wallet_exhausted" in out and "blocked" in out

    rc, out, _ = run(capsys, "alerts", "--config", str(path), "--limit", "3")
    assert rc == 0 and "earlier alerts not shown" in out
    assert ordered[-1].detected_at.replace("T", " ").rstrip("Z") in out
    assert ordered[0].event_id not in out


def test_alerts_bad_arguments_fail_with_one_line(capsys, alerts_config):
    path, _ = alerts_config
    rc, out, err = run(capsys, "alerts", "--config", str(path), "--since", "yesterday")
    assert rc == 2 and err.startswith("meter: error: --since:") and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "alerts", "--config", str(path), "--limit", "0")
    assert rc == 2 and "--limit" in err
    rc, out, err = run(capsys, "alerts", "--config", str(path.with_name("missing.toml")))
    assert rc == 2 and "does not exist" in err


# -- meter entitlements publish -------------------------------------------------------------------

@pytest.fixture
def kafka_config(tmp_path, kafka):
    topic = kafka.create_topic(f"entitlements-{uuid.uuid4().hex[:8]}", partitions=2,
                               config={"cleanup.policy": "compact"})
    path = tmp_path / "kafka.toml"
    path.write_text(BASE_TOML + f'\n[kafka]\nbootstrap_servers = "{kafka.bootstrap}"\n'
                    f'entitlements_topic = "{topic}"\n')
    return path, topic


def read_topic(kafka, topic: str):
    from tests.e2e.support import consume_all

    return [(key.decode(), ENTITLEMENT_DECODER.decode(value)) for key, value, _ in
            consume_all(kafka.bootstrap, topic, timeout=60)]


@pytest.mark.kafka
def test_publish_every_subscription_then_chosen_then_cancel(capsys, kafka, kafka_config):
    path, topic = kafka_config
    cfg = load_config(path)
    rc, out, err = run(capsys, "entitlements", "publish", "--config", str(path))
    assert rc == 0, err
    assert "published 2 entitlement records" in out and "cust_1" in out and "g/7" in out
    msgs = read_topic(kafka, topic)
    assert sorted(k for k, _ in msgs) == ["acme|cust_1", "globex|g/7"]
    for key, m in msgs:
        sub = next(s for s in cfg.subscriptions if f"{s.tenant_id}|{s.customer_id}" == key)
        assert (m.tenant_id, m.customer_id, m.cancelled) == (sub.tenant_id, sub.customer_id, False)
        assert m.subscription == sub, "the whole subscription round-trips (overrides, wallet, anchor)"
        assert abs(parse_rfc3339_ms(m.published_at) - parse_rfc3339_ms(msgs[0][1].published_at)) == 0

    rc, out, err = run(capsys, "entitlements", "publish", "--config", str(path), "--customer", "globex/g/7")
    assert rc == 0, err
    msgs = read_topic(kafka, topic)
    assert len(msgs) == 3 and [k for k, _ in msgs].count("globex|g/7") == 2

    rc, out, err = run(capsys, "entitlements", "publish", "--config", str(path), "--cancel", "acme/cust_1")
    assert rc == 0, err
    assert "cancelled" in out
    msgs = read_topic(kafka, topic)
    assert len(msgs) == 4
    cancels = [(k, m) for k, m in msgs if m.cancelled]
    assert len(cancels) == 1
    key, m = cancels[0]
    assert key == "acme|cust_1" and m.subscription is None and (m.tenant_id, m.customer_id) == ("acme", "cust_1")

    rc, out, err = run(capsys, "entitlements", "publish", "--config", str(path), "--dry-run")
    assert rc == 0, err
    assert "would publish 2 entitlement records" in out
    assert len(read_topic(kafka, topic)) == 4, "a dry run sends nothing"


@pytest.mark.kafka
def test_publish_rejects_unknown_customers(capsys, kafka_config):
    path, _ = kafka_config
    rc, _, err = run(capsys, "entitlements", "publish", "--config", str(path), "--customer", "acme/nobody")
    assert rc == 2 and "acme/nobody" in err and "[[subscriptions]]" in err
    rc, _, err = run(capsys, "entitlements", "publish", "--config", str(path), "--customer", "acme")
    assert rc == 2 and "TENANT/CUSTOMER" in err
    rc, _, err = run(capsys, "entitlements", "publish", "--config", str(path), "--cancel", "initech/c1")
    assert rc == 2 and "initech" in err


def test_publish_without_kafka_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "nokafka.toml"
    path.write_text(BASE_TOML)
    rc, out, err = run(capsys, "entitlements", "publish", "--config", str(path))
    assert rc == 2
    assert err.strip().splitlines() == [f"meter: error: entitlements publish needs a [kafka] section in {path} "
                                        "(bootstrap_servers, entitlements_topic)"]
