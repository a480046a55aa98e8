"""Configuration: the contract's example parses; every error names the key and the file in one line."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timezone

import pytest

from meterflow.base.errors import ConfigError, MeterError
from meterflow.operators.rules import CALENDAR_MONTH, Rules, merge_entitlement
from meterflow.schemas.config import EntitlementConfig, EntitlementOverride, load_config, parse_config

CONTRACT_EXAMPLE = textwrap.dedent('''
    [pipeline]
    rollup_window = "1h"
    late_grace = "6h"
    dedupe_window = "24h"

    [[tenants]]
    id = "acme"
    exclude_when = { environment = "test" }
    excluded_customers = ["cust_internal"]

    [[metrics]]
    code = "api_calls"
    event_type = "api_call"
    aggregation = "count"

    [[metrics]]
    code = "tokens"
    event_type = "api_call"
    aggregation = "sum"
    property = "tokens_input"
    group_by = ["region"]
    where = { model = "m-large" }

    [[plans]]
    code = "pro"
    [plans.entitlements.api_calls]
    included = 500000
    thresholds = [75, 90, 100]
    enforcement = "soft"
    overage_rate = 0.0004
    # price = { model = "tiered", tiers = [{ up_to = 5000, unit_amount = 0.02 }, { up_to = 20000, unit_amount = 0.015 }, { unit_amount = 0.01 }] }

    [[plans]]
    code = "scale"
    [plans.entitlements.api_calls]
    included = 2000000
    enforcement = "auto_overage"
    next_plan = "pro"

    [[subscriptions]]
    tenant_id = "acme"
    customer_id = "cust_456"
    plan = "pro"
    period = "month"
    anchor = "2026-11-01T00:00:00Z"
    account_name = "Acme Corp"
    arr = 180000.0
    [subscriptions.overrides.api_calls]
    included = 1000000
    overage_rate = 0.0003
    [subscriptions.wallet]
    balance = 500.0
    credit_rates = { api_calls = 0.001 }
    on_exhausted = "block"

    [kafka]
    bootstrap_servers = "localhost:9092"
    [clickhouse]
    dsn = "http://localhost:8123/meter"
    [redis]
    url = "redis://localhost:6379/0"
''')  # noqa: E501 - the contract's configuration example, verbatim


def base() -> dict:
    return {
        "tenants": [{"id": "acme"}],
        "metrics": [{"code": "api_calls", "event_type": "api_call"},
                    {"code": "tokens", "event_type": "api_call", "aggregation": "sum", "property": "tokens"}],
        "plans": [{"code": "pro", "entitlements": {"api_calls": {"included": 100}}}],
        "subscriptions": [{"tenant_id": "acme", "customer_id": "c1", "plan": "pro"}],
    }


def parse(raw, environ=None):
    return parse_config(raw, "meter.toml", environ={} if environ is None else environ)


def parse_toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def error_of(raw, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, environ)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert "meter.toml" in msg, msg
    return msg


# -- valid configurations ----------------------------------------------------------------------------

def test_contract_example_loads_from_a_file(tmp_path):
    f = tmp_path / "meter.toml"
    f.write_text(CONTRACT_EXAMPLE)
    cfg = load_config(f, environ={})
    assert cfg.source_path == str(f)
    assert cfg.pipeline.rollup_window_ms == 3_600_000
    assert cfg.pipeline.late_grace_ms == 6 * 3_600_000
    assert cfg.pipeline.dedupe_window_ms == 24 * 3_600_000
    assert cfg.tenants[0].exclude_when == {"environment": "test"}
    assert cfg.metrics[1].group_by == ["region"] and cfg.metrics[1].where == {"model": "m-large"}
    sub = cfg.subscriptions[0]
    assert sub.anchor == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert sub.wallet.balance == 500.0 and sub.wallet.on_exhausted == "block"
    assert cfg.kafka.bootstrap_servers == "localhost:9092"
    assert cfg.clickhouse.dsn == "http://localhost:8123/meter"
    assert cfg.redis.url == "redis://localhost:6379/0"
    assert cfg.plans[0].entitlements["api_calls"].price is None  # commented out, as in the contract


def test_the_contract_example_with_its_price_line_uncommented_prices_api_calls_twice_and_is_rejected():
    """The subscription's wallet draws api_calls at credit_rates while the plan's price card rates them into the
    invoice: two prices for the same usage (README: Rating (prices), wallets and prices)."""
    msg = error_of(parse_toml(CONTRACT_EXAMPLE.replace("# price =", "price =")))
    assert "key 'subscriptions[0].wallet.credit_rates.api_calls': metric 'api_calls' has a price card in plan " \
           "'pro' (entitlements.api_calls.price)" in msg, msg


def test_custom_contract_overrides_the_plan():
    cfg = parse_config(__import__("tomllib").loads(CONTRACT_EXAMPLE), "meter.toml", environ={})
    rules = Rules(cfg)
    sub = rules.subscription("acme|cust_456")
    ent = sub.entitlements["api_calls"]
    assert (ent.included, ent.overage_rate, ent.thresholds, ent.enforcement) == (1000000, 0.0003, [75, 90, 100], "soft")
    assert sub.custom_contract and sub.account_name == "Acme Corp" and sub.arr == 180000.0
    assert sub.included("api_calls") == 1000000 and sub.included("tokens") is None
    assert sub.anchor_ms == 1793491200000  # 2026-11-01T00:00:00Z
    assert rules.subscription("acme|nobody") is CALENDAR_MONTH
    assert CALENDAR_MONTH.period == "month" and CALENDAR_MONTH.anchor_ms == 0 and CALENDAR_MONTH.included("x") is None


def test_merge_entitlement():
    plan = EntitlementConfig(included=10, thresholds=[50.0], enforcement="hard", overage_rate=1.0)
    assert merge_entitlement(plan, None) is plan
    merged = merge_entitlement(plan, EntitlementOverride(included=20))
    assert (merged.included, merged.thresholds, merged.enforcement, merged.overage_rate) == (20, [50.0], "hard", 1.0)
    fresh = merge_entitlement(None, EntitlementOverride(overage_rate=0.5))
    assert fresh.overage_rate == 0.5 and fresh.included is None


def test_defaults():
    cfg = parse({})
    assert cfg.pipeline.rollup_window == "1h" and cfg.pipeline.late_grace == "6h"
    assert cfg.pipeline.max_clock_skew == "1h" and cfg.pipeline.max_clock_skew_ms == 3_600_000
    assert cfg.kafka is None and cfg.redis is None
    assert cfg.source_path == "meter.toml"


def test_anchor_with_offset_and_rfc3339_string():
    raw = base()
    raw["subscriptions"][0]["anchor"] = "2026-11-01T00:00:00+01:00"
    assert Rules(parse(raw)).subscription("acme|c1").anchor_ms == 1793487600000  # 2026-10-31T23:00:00Z


def test_count_metric_may_omit_property_and_other_periods_are_accepted():
    raw = base()
    for p in ("day", "week", "month", "quarter", "year"):
        raw["subscriptions"][0]["period"] = p
        assert parse(raw).subscriptions[0].period == p


# -- environment overrides -----------------------------------------------------------------------------

def test_environment_overrides_pipeline_and_enables_sections():
    cfg = parse(base(), environ={"METER_PIPELINE_LATE_GRACE": "2h", "METER_PIPELINE_MAX_EVENT_BYTES": "2048",
                                 "METER_KAFKA_BOOTSTRAP_SERVERS": "broker:9092", "UNRELATED": "x"})
    assert cfg.pipeline.late_grace_ms == 7_200_000
    assert cfg.pipeline.max_event_bytes == 2048
    assert cfg.kafka is not None and cfg.kafka.bootstrap_servers == "broker:9092"


def test_max_clock_skew_from_the_file_or_the_environment():
    assert parse({"pipeline": {"max_clock_skew": "0s"}}).pipeline.max_clock_skew_ms == 0
    cfg = parse({"pipeline": {"max_clock_skew": "5m"}}, environ={"METER_PIPELINE_MAX_CLOCK_SKEW": "2d"})
    assert cfg.pipeline.max_clock_skew_ms == 2 * 86_400_000


def test_environment_wins_over_the_file(tmp_path):
    f = tmp_path / "meter.toml"
    f.write_text('[pipeline]\nlate_grace = "1h"\n')
    assert load_config(f, environ={"METER_PIPELINE_LATE_GRACE": "3h"}).pipeline.late_grace == "3h"


def test_bad_environment_value_names_the_key():
    msg = error_of({}, environ={"METER_PIPELINE_LATE_GRACE": "soon"})
    assert "pipeline.late_grace" in msg and "soon" in msg
    msg = error_of({}, environ={"METER_PIPELINE_MAX_EVENT_BYTES": "lots"})
    assert "pipeline.max_event_bytes" in msg
    msg = error_of({}, environ={"METER_PIPELINE_MAX_CLOCK_SKEW": "an hour"})
    assert "pipeline.max_clock_skew" in msg and "an hour" in msg and len(msg.splitlines()) == 1


def test_environment_overrides_do_not_mutate_the_callers_document():
    raw = {"pipeline": {"late_grace": "1h"}}
    parse(raw, environ={"METER_PIPELINE_LATE_GRACE": "2h"})
    assert raw == {"pipeline": {"late_grace": "1h"}}


# -- errors name the key and the file ----------------------------------------------------------------

def _with(path, value, raw=None):
    raw = raw or base()
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize("raw, key", [
    ({"pipeline": {"late_grace": "6 hours"}}, "pipeline.late_grace"),
    ({"pipeline": {"rollup_window": "1H"}}, "pipeline.rollup_window"),
    ({"pipeline": {"rollup_window": "0s"}}, "pipeline.rollup_window"),
    ({"pipeline": {"dedupe_window": "0m"}}, "pipeline.dedupe_window"),
    ({"pipeline": {"dedupe_window": "-1h"}}, "pipeline.dedupe_window"),
    ({"pipeline": {"epoch_interval": ""}}, "pipeline.epoch_interval"),
    ({"pipeline": {"late_grace": 6}}, "pipeline.late_grace"),
    ({"pipeline": {"max_event_bytes": 0}}, "pipeline.max_event_bytes"),
    ({"pipeline": {"max_clock_skew": "-1h"}}, "pipeline.max_clock_skew"),
    ({"pipeline": {"max_clock_skew": 3600}}, "pipeline.max_clock_skew"),
    ({"pipeline": {"rollup_windw": "1h"}}, "rollup_windw"),
    ({"kafak": {}}, "kafak"),
    (_with(["metrics", 1, "property"], None), "metrics[1].property"),
    (_with(["metrics", 1, "aggregation"], "median"), "metrics[1].aggregation"),
    (_with(["metrics", 1], {"code": "api_calls", "event_type": "x"}), "metrics[1].code"),
    (_with(["metrics", 0, "code"], ""), "metrics[0].code"),
    (_with(["metrics", 0, "where"], {"model": ["a", "b"]}), "metrics[0].where"),
    (_with(["metrics", 0, "group_by"], "region"), "metrics[0].group_by"),
    (_with(["tenants"], [{"id": "acme"}, {"id": "acme"}]), "tenants[1].id"),
    (_with(["tenants", 0, "id"], "ac|me"), "tenants[0].id"),
    (_with(["subscriptions", 0, "plan"], "enterprise"), "subscriptions[0].plan"),
    (_with(["subscriptions", 0, "tenant_id"], "ghost"), "subscriptions[0].tenant_id"),
    (_with(["subscriptions", 0, "period"], "fortnight"), "subscriptions[0].period"),
    (_with(["subscriptions", 0, "anchor"], datetime(2026, 11, 1)), "subscriptions[0].anchor"),  # TOML local datetime
    (_with(["subscriptions", 0, "anchor"], "next monday"), "subscriptions[0].anchor"),
    (_with(["subscriptions", 0, "arr"], -1), "subscriptions[0].arr"),
    (_with(["subscriptions", 0, "overrides"], {"nope": {"included": 1}}), "subscriptions[0].overrides.nope"),
    (_with(["subscriptions"], [{"tenant_id": "acme", "customer_id": "c1", "plan": "pro"}] * 2), "subscriptions[1]"),
    (_with(["plans", 0, "entitlements"], {"storage": {"included": 1}}), "plans[0].entitlements.storage"),
    (_with(["plans", 0, "entitlements", "api_calls", "next_plan"], "scale"),
     "plans[0].entitlements.api_calls.next_plan"),
    (_with(["plans", 0, "code"], ""), "plans[0].code"),
])
def test_errors_name_the_key_and_the_file(raw, key):
    msg = error_of(raw)
    assert key in msg, msg
    assert "Traceback" not in msg


@pytest.mark.parametrize("field, value", [("included", -1), ("thresholds", [75, 0]), ("enforcement", "strict"),
                                          ("overage_rate", "cheap")])
def test_entitlement_field_errors_name_the_field(field, value):
    raw = base()
    raw["plans"][0]["entitlements"]["api_calls"][field] = value
    msg = error_of(raw)
    assert "plans[0].entitlements" in msg and field in msg, msg


def test_entitlement_errors_name_the_metric():
    raw = base()
    raw["plans"][0]["entitlements"]["tokens"] = {"included": 5}
    raw["plans"][0]["entitlements"]["api_calls"]["included"] = -1
    assert "plans[0].entitlements.api_calls.included" in error_of(raw)


def test_config_error_is_a_meter_error():
    assert issubclass(ConfigError, MeterError)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_invalid_toml_names_the_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[pipeline\nlate_grace = 6h\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert str(f) in str(info.value) and "TOML" in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "meter.toml"
    f.write_text('[pipeline]\nlate_grace = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert str(f) in str(info.value) and "pipeline.late_grace" in str(info.value)


# -- printing --------------------------------------------------------------------------------------------

def test_redacted_masks_secrets():
    raw = base()
    raw["kafka"] = {"client_config": {"sasl.password": "hunter2", "security.protocol": "SASL_SSL"}}
    raw["redis"] = {"url": "redis://user:s3cret@cache:6379/0"}
    raw["clickhouse"] = {"dsn": "http://default:pw@ch:8123/meter"}
    red = parse(raw).redacted()
    text = json.dumps(__import__("msgspec").to_builtins(red))
    assert "hunter2" not in text and "s3cret" not in text and ":pw@" not in text
    assert red.kafka.client_config["security.protocol"] == "SASL_SSL"
    assert red.redis.url == "redis://user:***@cache:6379/0"


def test_webhook_drain_timeout_is_a_validated_duration():
    hook = {"url": "http://127.0.0.1:9/hook"}
    assert parse({**base(), "alerts": {"webhook": hook}}).alerts.webhook.drain_timeout == "10s"
    zero = {"alerts": {"webhook": {**hook, "drain_timeout": "0s"}}}
    assert parse({**base(), **zero}).alerts.webhook.drain_timeout == "0s"
    env = {"METER_ALERTS_WEBHOOK_DRAIN_TIMEOUT": "2m"}
    assert parse({**base(), "alerts": {"webhook": hook}}, env).alerts.webhook.drain_timeout == "2m"
    for bad in ("soon", "-5s", 10):
        msg = error_of({**base(), "alerts": {"webhook": {**hook, "drain_timeout": bad}}})
        assert "alerts.webhook.drain_timeout" in msg, msg


# -- prices (README: Rating (prices)) ---------------------------------------------------------------

CARD = {"model": "tiered", "tiers": [{"up_to": 5000, "unit_amount": 0.02}, {"up_to": 20000, "unit_amount": 0.015},
                                     {"unit_amount": 0.01}], "minimum": 100.0}


def with_price(price, **entitlement) -> dict:
    raw = base()
    raw["plans"][0]["entitlements"]["api_calls"].update(price=price, **entitlement)
    return raw


def test_contract_rating_example_parses():
    raw = with_price(CARD, spend_thresholds=[100.0, 1000.0])
    raw["plans"][0]["currency"] = "EUR"
    raw["subscriptions"][0]["overrides"] = {"api_calls": {"price": {"model": "per_unit", "unit_amount": 0.0003}}}
    cfg = parse(raw)
    ent = cfg.plans[0].entitlements["api_calls"]
    assert cfg.plans[0].currency == "EUR" and ent.spend_thresholds == [100.0, 1000.0]
    assert ent.price.minimum == 100.0 and [t.unit_amount for t in ent.price.tiers] == [0.02, 0.015, 0.01]
    assert cfg.subscriptions[0].overrides["api_calls"].price.unit_amount == 0.0003


def test_currency_defaults_to_usd_and_spend_thresholds_to_empty():
    cfg = parse(base())
    assert cfg.plans[0].currency == "USD" and cfg.plans[0].entitlements["api_calls"].spend_thresholds == []


@pytest.mark.parametrize("price", [
    {"model": "per_unit", "unit_amount": 0.01},
    {"model": "volume", "tiers": CARD["tiers"]},
    {"model": "staircase", "tiers": [{"up_to": 1000, "flat_amount": 100}, {"up_to": 5000, "flat_amount": 200},
                                     {"flat_amount": 300}]},
    {"model": "package", "package_size": 1000, "package_amount": 5, "round_up": False},
    {"model": "tiered", "tiers": [{"unit_amount": 0.01}]},
    {"model": "staircase", "tiers": [{"up_to": 0, "flat_amount": 0}, {"flat_amount": 50}]},
])
def test_every_model_parses(price):
    assert parse(with_price(price)).plans[0].entitlements["api_calls"].price.model == price["model"]


T = CARD["tiers"]


@pytest.mark.parametrize("price, key, why", [
    ({"model": "flat", "unit_amount": 1}, "price.model", "unknown price model 'flat': expected one of per_unit, "
                                                         "tiered, volume, staircase, package"),
    ({"unit_amount": 1}, "price", "missing required field `model`"),
    ({"model": "per_unit"}, "price.unit_amount", "model 'per_unit' needs unit_amount"),
    ({"model": "per_unit", "unit_amount": 1, "tiers": T}, "price.tiers", "model 'per_unit' does not use tiers"),
    ({"model": "tiered", "tiers": T, "unit_amount": 1}, "price.unit_amount", "model 'tiered' does not use"),
    ({"model": "tiered"}, "price.tiers", "model 'tiered' needs tiers"),
    ({"model": "tiered", "tiers": [T[1], T[0], T[2]]}, "price.tiers[1].up_to",
     "tiers must be ascending by up_to: 5000 follows 20000"),
    ({"model": "volume", "tiers": [T[0], T[0], T[2]]}, "price.tiers[1].up_to",
     "tiers must be ascending by up_to: 5000 follows 5000"),
    ({"model": "tiered", "tiers": [T[0], T[2], T[1]]}, "price.tiers[1].up_to", "only the last tier may omit up_to"),
    ({"model": "tiered", "tiers": [T[0], T[1]]}, "price.tiers[1].up_to", "the last tier must omit up_to"),
    ({"model": "volume", "tiers": [T[0], {"up_to": 9000}, T[2]]}, "price.tiers[1].unit_amount",
     "a volume tier needs unit_amount"),
    ({"model": "tiered", "tiers": [{"up_to": 5, "unit_amount": 1, "flat_amount": 2}, T[2]]},
     "price.tiers[0].flat_amount", "a tiered tier takes unit_amount, not flat_amount"),
    ({"model": "staircase", "tiers": [{"up_to": 1000, "flat_amount": 100}, {"unit_amount": 0.01}]},
     "price.tiers[1].flat_amount", "a staircase tier needs flat_amount"),
    ({"model": "package", "package_size": 0, "package_amount": 5}, "price.package_size", "> 0"),
    ({"model": "package", "package_amount": 5}, "price.package_size", "needs package_size (a number > 0)"),
    ({"model": "package", "package_size": 10}, "price.package_amount", "model 'package' needs package_amount"),
    ({"model": "per_unit", "unit_amount": -0.01}, "price.unit_amount", ">= 0"),
    ({"model": "per_unit", "unit_amount": 1, "minimum": -1}, "price.minimum", ">= 0"),
    ({"model": "tiered", "tiers": [{"up_to": 5, "unit_amount": 1, "unit": 2}, T[2]]}, "price.tiers[0]", "unit"),
])
def test_price_errors_name_the_key(price, key, why):
    msg = error_of(with_price(price))
    assert f"key 'plans[0].entitlements.api_calls.{key}'" in msg and why in msg, msg


def test_override_price_errors_name_the_override():
    raw = base()
    raw["subscriptions"][0]["overrides"] = {"api_calls": {"price": {"model": "volume", "tiers": [T[0]]}}}
    msg = error_of(raw)
    assert "key 'subscriptions[0].overrides.api_calls.price.tiers[0].up_to'" in msg, msg


@pytest.mark.parametrize("where, value, key", [
    (["plans", 0, "currency"], "usd", "plans[0].currency"),
    (["plans", 0, "currency"], "DOLLAR", "plans[0].currency"),
    (["plans", 0, "entitlements", "api_calls", "spend_thresholds"], [100.0, 0], "spend_thresholds[1]"),
    (["plans", 0, "entitlements", "api_calls", "spend_thresholds"], [-5.0], "spend_thresholds[0]"),
])
def test_currency_and_spend_threshold_errors(where, value, key):
    msg = error_of(_with(where, value))
    assert key in msg, msg


def test_wallet_credit_rates_and_a_price_card_on_one_metric_are_rejected_naming_the_key():
    raw = with_price({"model": "per_unit", "unit_amount": 0.0003})
    raw["subscriptions"][0]["wallet"] = {"balance": 10.0, "credit_rates": {"tokens": 0.00001, "api_calls": 0.001}}
    msg = error_of(raw)
    assert msg.startswith("invalid configuration in meter.toml: key 'subscriptions[0].wallet.credit_rates.api_calls'"
                          ": metric 'api_calls' has a price card in plan 'pro'"), msg
    assert "not both" in msg, msg
    # a custom contract's price card counts too, and names the override
    raw = base()
    raw["subscriptions"][0]["overrides"] = {"tokens": {"price": {"model": "per_unit", "unit_amount": 0.00001}}}
    raw["subscriptions"][0]["wallet"] = {"balance": 10.0, "credit_rates": {"tokens": 0.00001}}
    msg = error_of(raw)
    assert "key 'subscriptions[0].wallet.credit_rates.tokens': metric 'tokens' has a price card in the " \
           "subscription's overrides.tokens.price" in msg, msg


def test_wallet_credit_rates_beside_overage_rate_or_a_price_on_another_metric_load():
    raw = with_price({"model": "per_unit", "unit_amount": 0.0003})
    raw["plans"][0]["entitlements"]["tokens"] = {"included": 1000, "overage_rate": 0.001}
    raw["subscriptions"][0]["wallet"] = {"balance": 10.0, "credit_rates": {"tokens": 0.00001}}
    assert parse(raw).subscriptions[0].wallet.credit_rates == {"tokens": 0.00001}


def test_a_changelog_subscription_with_credit_rates_on_a_priced_metric_is_a_problem():
    from meterflow.schemas.config import SubscriptionConfig, WalletConfig, subscription_problem

    cfg = parse(with_price({"model": "per_unit", "unit_amount": 0.0003}))
    sub = SubscriptionConfig(tenant_id="acme", customer_id="c2", plan="pro",
                             wallet=WalletConfig(balance=1.0, credit_rates={"api_calls": 0.01}))
    key, why = subscription_problem(cfg, sub)
    assert key == ".wallet.credit_rates.api_calls" and "price card" in why


def test_override_spend_thresholds_are_validated():
    raw = base()
    raw["subscriptions"][0]["overrides"] = {"api_calls": {"spend_thresholds": [0]}}
    assert "subscriptions[0].overrides.api_calls.spend_thresholds[0]" in error_of(raw)
