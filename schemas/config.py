"""The configuration file (README: Configuration): one frozen object, validated at start.

``load_config(path)`` reads TOML, applies ``METER_<SECTION>_<KEY>`` environment
overrides (for example ``METER_KAFKA_BOOTSTRAP_SERVERS`` or
``METER_PIPELINE_LATE_GRACE``), checks types with msgspec and cross-checks
references (plans, metrics, tenants, durations). Any problem raises one
:class:`ConfigError` whose message names the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Type, Union

import msgspec

from meterflow.base.errors import ConfigError
from meterflow.base.periods import PERIOD_KINDS
from meterflow.base.timeutil import parse_duration_ms

Aggregation = Literal["count", "sum", "max", "min", "unique_count", "latest", "p95", "p99"]
Enforcement = Literal["soft", "hard", "auto_overage"]
Scalar = Union[str, int, float, bool]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Code = Annotated[str, msgspec.Meta(min_length=1)]


class _Frozen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# pipeline.shards when unset (256 before issue 16: every shard with events costs fixed work per batch;
# `python -m benchmarks.native_core --shards 256,64,16` printed 1.25x the in-process events/s at 64).
DEFAULT_SHARDS = 64


class PipelineConfig(_Frozen, frozen=True):
    rollup_window: str = "1h"
    late_grace: str = "6h"
    dedupe_window: str = "24h"
    max_event_bytes: Annotated[int, msgspec.Meta(gt=0)] = 1_048_576
    # An event dated further ahead of the wall clock (when it is read) than this is invalid_event.
    max_clock_skew: str = "1h"
    epoch_interval: str = "2s"
    # How often a busy customer's changed rollup rows are written (alerts never wait for this).
    flush_interval: str = "1s"
    # Keyed state is routed in this many shards (stable hash of tenant|customer), one Bytewax key each.
    # Part of the recovery state: a flow resumes only with the shard count its snapshots were taken with (left
    # unset, a recovery directory's recorded count is used: meterflow.runner.run_flow).
    shards: Annotated[int, msgspec.Meta(ge=1, le=65536)] = DEFAULT_SHARDS
    # Set by parse_config, not a setting: whether the document or METER_PIPELINE_SHARDS gave ``shards``.
    shards_given: bool = False
    # Every accepted event (duplicates included) archived in ClickHouse raw_events, for `meter reconcile`.
    archive_raw: bool = True
    # Which core meters (README: Native core): "python", or "native" (the Rust core of native/, when built).
    core: Literal["python", "native"] = "python"

    @property
    def rollup_window_ms(self) -> int:
        return parse_duration_ms(self.rollup_window)

    @property
    def late_grace_ms(self) -> int:
        return parse_duration_ms(self.late_grace)

    @property
    def dedupe_window_ms(self) -> int:
        return parse_duration_ms(self.dedupe_window)

    @property
    def max_clock_skew_ms(self) -> int:
        return parse_duration_ms(self.max_clock_skew)


class TenantConfig(_Frozen, frozen=True):
    id: Code
    exclude_when: Dict[str, Scalar] = {}
    excluded_customers: List[str] = []
    # HTTP service (README: HTTP service): keys that admit this tenant, as given or as "sha256:<64 hex>".
    api_keys: List[str] = []

    def __repr__(self) -> str:  # never print the keys
        return (f"TenantConfig(id={self.id!r}, exclude_when={self.exclude_when!r}, "
                f"excluded_customers={self.excluded_customers!r}, api_keys=<{len(self.api_keys)} redacted>)")

    def __rich_repr__(self):
        yield "id", self.id
        yield "api_keys", f"<{len(self.api_keys)} redacted>"


class MetricConfig(_Frozen, frozen=True):
    code: Code
    event_type: Code
    aggregation: Aggregation = "count"
    property: Optional[str] = None
    group_by: List[str] = []
    where: Dict[str, Scalar] = {}


PRICE_MODELS = ("per_unit", "tiered", "volume", "staircase", "package")


class Tier(_Frozen, frozen=True):
    """One tier of a price card: ``up_to`` inclusive, the last tier without it (unbounded)."""

    up_to: Optional[NonNegative] = None
    unit_amount: Optional[NonNegative] = None  # tiered, volume
    flat_amount: Optional[NonNegative] = None  # staircase


class PriceConfig(_Frozen, frozen=True):
    """A metric's price (README: Rating (prices)); which keys a model takes is checked by :func:`price_problem`."""

    model: str  # one of PRICE_MODELS
    unit_amount: Optional[NonNegative] = None  # per_unit
    tiers: List[Tier] = []  # tiered, volume, staircase
    package_size: Optional[Positive] = None  # package
    package_amount: Optional[NonNegative] = None  # package
    round_up: bool = True  # package: bill started packages (false: completed ones)
    minimum: NonNegative = 0.0  # committed spend for the metric and period


class EntitlementConfig(_Frozen, frozen=True):
    included: Optional[NonNegative] = None
    thresholds: List[Positive] = msgspec.field(default_factory=lambda: [75.0, 90.0, 100.0])
    enforcement: Enforcement = "soft"
    overage_rate: NonNegative = 0.0
    next_plan: Optional[str] = None
    price: Optional[PriceConfig] = None
    spend_thresholds: List[Positive] = []  # currency amounts of the metric's period charge


class EntitlementOverride(_Frozen, frozen=True):
    """A custom contract: every field given replaces the plan's."""

    included: Optional[NonNegative] = None
    thresholds: Optional[List[Positive]] = None
    enforcement: Optional[Enforcement] = None
    overage_rate: Optional[NonNegative] = None
    next_plan: Optional[str] = None
    price: Optional[PriceConfig] = None  # replaces the plan's price as a whole
    spend_thresholds: Optional[List[Positive]] = None


class PlanConfig(_Frozen, frozen=True):
    code: Code
    currency: str = "USD"  # ISO 4217 code of every amount of the plan
    entitlements: Dict[str, EntitlementConfig] = {}


class WalletConfig(_Frozen, frozen=True):
    balance: NonNegative
    credit_rates: Dict[str, NonNegative] = {}
    on_exhausted: Literal["block", "alert", "postpaid"] = "alert"
    low_balance_pct: Positive = 20.0


class SubscriptionConfig(_Frozen, frozen=True):
    tenant_id: Code
    customer_id: Code
    plan: Code
    period: str = "month"
    anchor: Annotated[datetime, msgspec.Meta(tz=True)] = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
    account_name: str = ""
    arr: NonNegative = 0.0
    overrides: Dict[str, EntitlementOverride] = {}
    wallet: Optional[WalletConfig] = None


class KafkaConfig(_Frozen, frozen=True):
    bootstrap_servers: str = "localhost:9092"
    events_topic: str = "usage.events"
    entitlements_topic: str = "usage.entitlements"
    aggregated_topic: str = "usage.aggregated"
    rated_topic: str = "usage.rated"
    alerts_topic: str = "usage.alerts"
    reviews_topic: str = "usage.reviews"  # review items (README: Overage review queue)
    review_decisions_topic: str = "usage.review-decisions"  # decisions of meter review approve|reject
    dead_letter_topic: str = "usage.dead-letter"
    batch_size: Annotated[int, msgspec.Meta(gt=0)] = 5000
    # Extra librdkafka settings for every client (security.protocol, sasl.*, ...).
    client_config: Dict[str, str] = {}
    # How long the flow waits for unreachable brokers (reading or delivering) before it stops with an error.
    outage_timeout: str = "60s"

    @property
    def outage_timeout_seconds(self) -> float:
        return parse_duration_ms(self.outage_timeout) / 1000


class ClickHouseConfig(_Frozen, frozen=True):
    dsn: str = "chdb://./var/clickhouse"
    database: Optional[str] = None


class RedisConfig(_Frozen, frozen=True):
    url: str = "redis://localhost:6379/0"
    # Seconds before an unanswered Redis call counts as an outage (the flow then buffers and retries).
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 2.0


class WebhookConfig(_Frozen, frozen=True):
    """Alerts POSTed as JSON, signed ``X-Meter-Signature: sha256=<hex HMAC of the body>`` when a secret is set."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    secret: str = ""
    timeout: str = "5s"
    max_backoff: str = "60s"
    # Durable outbox: alerts wait here until the receiver acknowledges them (never lost).
    spool_dir: str = "var/webhook-outbox"
    # At the end of a run (input exhausted, or a clean stop), keep retrying the outbox for at most this
    # long before exiting; what is left stays in the outbox for the next start. "0s": do not wait.
    drain_timeout: str = "10s"


class ServerConfig(_Frozen, frozen=True):
    """``meter serve`` (README: HTTP service); ``--host`` / ``--port`` override ``host`` / ``port``."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Guards the console and review decisions (also admits every tenant's API); "" = console disabled.
    admin_token: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 4_194_304  # a larger request body is 413
    max_batch: Annotated[int, msgspec.Meta(gt=0)] = 1000  # more events in one request is 413
    # When Redis cannot answer: accept events and allow calls (true) or reject them (false).
    fail_open: bool = True
    # How long an ingest request waits for the broker's acknowledgement before it answers 503.
    produce_timeout: str = "30s"

    def __repr__(self) -> str:  # never print the admin token
        return (f"ServerConfig(host={self.host!r}, port={self.port}, admin_token="
                f"{'<redacted>' if self.admin_token else repr('')}, max_body_bytes={self.max_body_bytes}, "
                f"max_batch={self.max_batch}, fail_open={self.fail_open}, produce_timeout={self.produce_timeout!r})")

    def __rich_repr__(self):
        yield "host", self.host
        yield "port", self.port
        yield "admin_token", "<redacted>" if self.admin_token else ""

    @property
    def produce_timeout_seconds(self) -> float:
        return parse_duration_ms(self.produce_timeout) / 1000


class AlertsConfig(_Frozen, frozen=True):
    """Where alerts go besides ClickHouse's ``alerts_log`` (and ``kafka.alerts_topic`` in Kafka mode)."""

    jsonl: Optional[str] = None
    stdout: bool = False
    webhook: Optional[WebhookConfig] = None


RECONCILE_CLASSES = ("metering_gap", "match", "timing", "credit", "plan_change", "under_bill", "over_bill")
DEFAULT_OWNERS = {"under_bill": "revops", "over_bill": "csm", "timing": "watchlist", "credit": "finance",
                  "plan_change": "billing", "metering_gap": "engineering", "match": ""}


class ReconcileConfig(_Frozen, frozen=True):
    """``meter reconcile`` (README: Reconciliation): metered units per invoiced unit, the currency tolerance
    of equal amounts, and who each class of finding goes to."""

    units: Dict[str, Positive] = {}  # metric -> metered units in one invoiced unit (default 1)
    tolerance: NonNegative = 0.01  # currency: amounts this close are equal
    owners: Dict[str, str] = {}  # class -> owner, over DEFAULT_OWNERS

    def owner(self, cls: str) -> str:
        return self.owners.get(cls, DEFAULT_OWNERS.get(cls, ""))


class ReviewConfig(_Frozen, frozen=True):
    """The overage review queue (README: Overage review queue): ``bands`` are exclusive upper bounds of the
    overage amount in the plan's currency, ascending; ``routes`` has one more entry than ``bands``. Checked by
    :func:`review_problem`."""

    bands: List[float] = msgspec.field(default_factory=lambda: [50.0, 500.0, 2000.0])
    routes: List[str] = msgspec.field(default_factory=lambda: ["auto_apply", "approve", "review", "sales"])


REVIEW_ROUTES = ("auto_apply", "approve", "review", "sales")


def review_problem(review: ReviewConfig) -> Optional[Tuple[str, str]]:
    """Why a ``[review]`` section cannot route, as ``(key, reason)``, or None.

    >>> review_problem(ReviewConfig(bands=[50.0, 20.0], routes=["auto_apply", "approve", "sales"]))
    ('review.bands[1]', 'bands must be ascending: 20 follows 50')
    >>> review_problem(ReviewConfig())
    """
    prev: Optional[float] = None
    for i, b in enumerate(review.bands):
        if not b > 0 or b != b or b == float("inf"):
            return f"review.bands[{i}]", f"a band is a finite amount > 0, got {_num(b)}"
        if prev is not None and b <= prev:
            return f"review.bands[{i}]", f"bands must be ascending: {_num(b)} follows {_num(prev)}"
        prev = b
    if len(review.routes) != len(review.bands) + 1:
        return "review.routes", (f"expected one more route than bands ({len(review.bands) + 1} for "
                                 f"{len(review.bands)} bands), got {len(review.routes)}")
    for i, r in enumerate(review.routes):
        if r not in REVIEW_ROUTES:
            return f"review.routes[{i}]", f"unknown route {r!r}: expected one of {', '.join(REVIEW_ROUTES)}"
        if r in review.routes[:i]:
            return f"review.routes[{i}]", f"route {r!r} is listed twice"
        if r == "auto_apply" and i:
            return f"review.routes[{i}]", "auto_apply can only be the first route (the smallest amounts)"
    return None
class AnomalyConfig(_Frozen, frozen=True):
    """Anomaly alerts (README: Anomaly alerts): usage of a UTC day above ``factor`` x the trailing daily average."""

    factor: float = 3.0  # > 1
    baseline_days: int = 30  # >= 1: days averaged (fewer while the history is shorter)
    min_history_days: int = 7  # >= 1: days of history before a day is judged
    metrics: Optional[List[str]] = None  # count or sum metrics; None: every count and sum metric


class Config(_Frozen, frozen=True):
    pipeline: PipelineConfig = PipelineConfig()
    tenants: List[TenantConfig] = []
    metrics: List[MetricConfig] = []
    plans: List[PlanConfig] = []
    subscriptions: List[SubscriptionConfig] = []
    kafka: Optional[KafkaConfig] = None
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    redis: Optional[RedisConfig] = None
    alerts: AlertsConfig = AlertsConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    server: ServerConfig = ServerConfig()
    review: Optional[ReviewConfig] = None  # absent: the default bands and routes, and no review notifications
    anomaly: Optional[AnomalyConfig] = None  # absent: no anomaly alerts
    source_path: str = "<memory>"

    def redacted(self) -> "Config":
        """A copy safe to print: passwords in URLs and secret client settings masked."""
        kafka = self.kafka
        if kafka is not None:
            masked = {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in kafka.client_config.items()}
            kafka = msgspec.structs.replace(kafka, client_config=masked)
        redis = self.redis
        if redis is not None:
            redis = msgspec.structs.replace(redis, url=mask_url(redis.url))
        ch = msgspec.structs.replace(self.clickhouse, dsn=mask_url(self.clickhouse.dsn))
        alerts = self.alerts
        if alerts.webhook is not None:
            hook = msgspec.structs.replace(alerts.webhook, url=mask_url(alerts.webhook.url),
                                           secret="***" if alerts.webhook.secret else "")
            alerts = msgspec.structs.replace(alerts, webhook=hook)
        server = msgspec.structs.replace(self.server, admin_token="***" if self.server.admin_token else "")
        tenants = [msgspec.structs.replace(t, api_keys=["***"] * len(t.api_keys)) for t in self.tenants]
        return msgspec.structs.replace(self, kafka=kafka, redis=redis, clickhouse=ch, alerts=alerts, server=server,
                                       tenants=tenants)


_SECRET_KEY = re.compile(r"password|secret|token|key", re.I)
_URL_PASSWORD = re.compile(r"(//[^:/@]*:)([^@/]+)(@)")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs); with or without a user name.

    >>> mask_url("redis://:s3cret@cache:6379/0"), mask_url("http://meter:pw@ch:8123/meter")
    ('redis://:***@cache:6379/0', 'http://meter:***@ch:8123/meter')
    >>> mask_url("redis://localhost:6379/0")
    'redis://localhost:6379/0'
    """
    return _URL_PASSWORD.sub(r"\1***\3", url)



_ENV_SECTIONS: Dict[str, Type[msgspec.Struct]] = {
    "pipeline": PipelineConfig, "kafka": KafkaConfig, "clickhouse": ClickHouseConfig, "redis": RedisConfig,
    "alerts": AlertsConfig, "server": ServerConfig, "anomaly": AnomalyConfig}
_ENV_LISTS = {("anomaly", "metrics")}  # comma-separated in the environment: METER_ANOMALY_METRICS=api_calls,tokens


_NOT_SETTINGS = ("webhook", "shards_given")  # (fields with no METER_* variable)


def _apply_env(raw: dict, environ: Dict[str, str]) -> List[str]:
    """Apply METER_<SECTION>_<FIELD> overrides to scalar keys; returns the variables used."""
    used = []
    for section, struct in _ENV_SECTIONS.items():
        for field in msgspec.structs.fields(struct):
            var = f"METER_{section.upper()}_{field.name.upper()}"
            if var in environ and not field.name.endswith("config") and field.name not in _NOT_SETTINGS:
                raw[section] = dict(raw.get(section) or {})  # copy: never change the caller's document
                value: Any = environ[var]
                if (section, field.name) in _ENV_LISTS:
                    value = [v.strip() for v in value.split(",") if v.strip()]
                raw[section][field.name] = value
                used.append(var)
    # The webhook is a table inside [alerts]: METER_ALERTS_WEBHOOK_URL, METER_ALERTS_WEBHOOK_SECRET, ...
    for field in msgspec.structs.fields(WebhookConfig):
        var = f"METER_ALERTS_WEBHOOK_{field.name.upper()}"
        if var in environ:
            alerts = dict(raw.get("alerts") or {})
            alerts["webhook"] = dict(alerts.get("webhook") or {})
            alerts["webhook"][field.name] = environ[var]
            raw["alerts"] = alerts
            used.append(var)
    return used


def parse_config(raw: dict, source: str = "<memory>", environ: Optional[Dict[str, str]] = None) -> Config:
    """Validate an already-parsed TOML document (see :func:`load_config`)."""
    raw = dict(raw)
    _apply_env(raw, dict(os.environ) if environ is None else environ)
    raw["source_path"] = source
    pipeline = raw.get("pipeline")
    if pipeline is None or isinstance(pipeline, dict):  # (anything else: msgspec's error below)
        raw["pipeline"] = {**(pipeline or {}), "shards_given": "shards" in (pipeline or {})}
    _check_keyed_tables(raw, source)
    _check_reconcile_units(raw, source)
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration in {source}: {_humanize(str(exc))}") from exc
    _cross_check(cfg, source)
    return cfg


def _check_keyed_tables(raw: dict, source: str) -> None:
    """Validate tables keyed by metric code one by one, so an error names the metric (msgspec says ``[...]``)."""
    checks = [("plans", "entitlements", EntitlementConfig), ("subscriptions", "overrides", EntitlementOverride)]
    for section, table, struct in checks:
        items = raw.get(section)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            entries = item.get(table) if isinstance(item, dict) else None
            if not isinstance(entries, dict):
                continue
            for code, value in entries.items():
                try:
                    msgspec.convert(value, struct, strict=False)
                except msgspec.ValidationError as exc:
                    msg = _humanize(str(exc))
                    where = f"{section}[{i}].{table}.{code}"
                    if msg.startswith("key '"):
                        msg = msg.replace("key '", f"key '{where}.", 1).replace(".<root>'", "'", 1)
                    else:
                        msg = f"key '{where}': {msg}"
                    raise ConfigError(f"invalid configuration in {source}: {msg}") from exc


def _check_reconcile_units(raw: dict, source: str) -> None:
    """``[reconcile] units`` one metric at a time, so an error names the metric (msgspec says ``[...]``)."""
    rec = raw.get("reconcile")
    units = rec.get("units") if isinstance(rec, dict) else None
    if not isinstance(units, dict):
        return
    for code, value in units.items():
        if type(value) is bool or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"invalid configuration in {source}: key 'reconcile.units.{code}': expected the "
                              f"number of metered units in one invoiced unit (a number > 0), got {value!r}")


def load_config(path: Union[str, Path], environ: Optional[Dict[str, str]] = None) -> Config:
    """Read, override from the environment, and validate the TOML configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {p} does not exist (pass --config FILE or set METER_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {p}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from exc
    return parse_config(raw, str(p), environ)


def _humanize(msg: str) -> str:
    # msgspec says "... - at `$.plans[0].entitlements.api_calls.included`"; lead with the key.
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", msg)
    if m:
        return f"key '{m.group(2) or '<root>'}': {m.group(1)}"
    return msg


def _cross_check(cfg: Config, source: str) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"invalid configuration in {source}: key '{key}': {why}")

    for name in ("rollup_window", "late_grace", "dedupe_window", "epoch_interval", "flush_interval", "max_clock_skew"):
        try:
            ms = parse_duration_ms(getattr(cfg.pipeline, name))
        except ValueError as exc:
            fail(f"pipeline.{name}", str(exc))
        if ms <= 0 and name in ("rollup_window", "dedupe_window", "epoch_interval"):
            fail(f"pipeline.{name}", "must be greater than zero")
    hook = cfg.alerts.webhook
    if hook is not None:
        for name in ("timeout", "max_backoff", "drain_timeout"):
            try:
                if parse_duration_ms(getattr(hook, name)) <= 0 and name != "drain_timeout":
                    fail(f"alerts.webhook.{name}", "must be greater than zero")
            except ValueError as exc:
                fail(f"alerts.webhook.{name}", str(exc))
    try:
        if parse_duration_ms(cfg.server.produce_timeout) <= 0:
            fail("server.produce_timeout", "must be greater than zero")
    except ValueError as exc:
        fail("server.produce_timeout", str(exc))
    if cfg.kafka is not None:
        try:
            if parse_duration_ms(cfg.kafka.outage_timeout) <= 0:
                fail("kafka.outage_timeout", "must be greater than zero")
        except ValueError as exc:
            fail("kafka.outage_timeout", str(exc))
    if cfg.review is not None:
        problem = review_problem(cfg.review)
        if problem is not None:
            fail(*problem)
    scheme = cfg.clickhouse.dsn.split("://", 1)[0] if "://" in cfg.clickhouse.dsn else ""
    if scheme not in ("chdb", "http", "https", "clickhouse", "clickhouses"):
        fail("clickhouse.dsn",
             f"expected chdb:///path (embedded) or http(s)://host:8123/db, got {cfg.clickhouse.dsn!r}")
    tenant_ids = set()
    for i, t in enumerate(cfg.tenants):
        if "|" in t.id:
            fail(f"tenants[{i}].id",
                 f"tenant id {t.id!r} must not contain '|' (it separates tenant and customer in keys)")
        if t.id in tenant_ids:
            fail(f"tenants[{i}].id", f"tenant {t.id!r} is listed twice")
        tenant_ids.add(t.id)
        for j, api_key in enumerate(t.api_keys):
            if api_key.startswith("sha256:") and not _SHA256_HEX.match(api_key[7:]):
                fail(f"tenants[{i}].api_keys[{j}]", "a hashed key is 'sha256:' and 64 hex digits")
            if len(api_key) < 16 and not api_key.startswith("sha256:"):
                fail(f"tenants[{i}].api_keys[{j}]", "an API key needs at least 16 characters")
    metric_codes = set()
    for i, m in enumerate(cfg.metrics):
        if m.code in metric_codes:
            fail(f"metrics[{i}].code", f"metric {m.code!r} is defined twice")
        metric_codes.add(m.code)
        if m.aggregation != "count" and not m.property:
            fail(f"metrics[{i}].property", f"aggregation {m.aggregation!r} needs the property to aggregate")
    for code in cfg.reconcile.units:
        if code not in metric_codes:
            fail(f"reconcile.units.{code}", f"no metric with code {code!r} is defined in [[metrics]]")
    for cls in cfg.reconcile.owners:
        if cls not in RECONCILE_CLASSES:
            fail(f"reconcile.owners.{cls}", f"unknown class {cls!r}: expected one of {', '.join(RECONCILE_CLASSES)}")
    if cfg.anomaly is not None:
        problem = anomaly_problem(cfg, cfg.anomaly)
        if problem is not None:
            fail(f"anomaly.{problem[0]}", problem[1])
    plan_codes = {p.code for p in cfg.plans}
    for i, p in enumerate(cfg.plans):
        if not _CURRENCY.match(p.currency):
            fail(f"plans[{i}].currency", f"expected a three-letter ISO 4217 code such as 'USD', got {p.currency!r}")
        for code, ent in p.entitlements.items():
            if code not in metric_codes:
                fail(f"plans[{i}].entitlements.{code}", f"no metric with code {code!r} is defined in [[metrics]]")
            if ent.next_plan is not None and ent.next_plan not in plan_codes:
                fail(f"plans[{i}].entitlements.{code}.next_plan", f"no plan with code {ent.next_plan!r}")
            if ent.price is not None:
                problem = price_problem(ent.price)
                if problem is not None:
                    fail(f"plans[{i}].entitlements.{code}.price{problem[0]}", problem[1])
    seen_subs = set()
    for i, s in enumerate(cfg.subscriptions):
        problem = subscription_problem(cfg, s)
        if problem is not None:
            fail(f"subscriptions[{i}]{problem[0]}", problem[1])
        key = (s.tenant_id, s.customer_id)
        if key in seen_subs:
            fail(f"subscriptions[{i}]", f"customer {s.customer_id!r} of tenant {s.tenant_id!r} has two subscriptions")
        seen_subs.add(key)


def anomaly_problem(cfg: Config, a: AnomalyConfig) -> Optional[Tuple[str, str]]:
    """Why an ``[anomaly]`` section cannot be evaluated, as ``(key, reason)``, or None."""
    if not a.factor > 1 or a.factor == float("inf"):
        return "factor", f"must be a number greater than 1 (the multiple of the baseline), got {_num(a.factor)}"
    if a.baseline_days < 1:
        return "baseline_days", f"must be at least 1, got {a.baseline_days}"
    if a.min_history_days < 1:
        return "min_history_days", f"must be at least 1, got {a.min_history_days}"
    if a.metrics is not None:
        aggs = {m.code: m.aggregation for m in cfg.metrics}
        for i, code in enumerate(a.metrics):
            if code not in aggs:
                return f"metrics[{i}]", f"no metric with code {code!r} is defined in [[metrics]]"
            if aggs[code] not in ("count", "sum"):
                return (f"metrics[{i}]", f"metric {code!r} aggregates {aggs[code]!r}: anomaly alerts take count or "
                        "sum metrics")
    return None


def subscription_problem(cfg: Config, s: SubscriptionConfig) -> Optional[tuple]:
    """Why a subscription does not fit the configuration, as ``(key suffix, reason)``, or None.

    Used for the config file and for every record of the entitlements changelog.
    """
    if s.tenant_id not in {t.id for t in cfg.tenants}:
        return ".tenant_id", f"tenant {s.tenant_id!r} is not in [[tenants]]"
    plan_codes = {p.code for p in cfg.plans}
    if s.plan not in plan_codes:
        return ".plan", f"no plan with code {s.plan!r}"
    if s.period not in PERIOD_KINDS:
        return ".period", f"expected one of {', '.join(PERIOD_KINDS)}, got {s.period!r}"
    metric_codes = {m.code for m in cfg.metrics}
    for code, o in s.overrides.items():
        if code not in metric_codes:
            return f".overrides.{code}", f"no metric with code {code!r}"
        if o.next_plan is not None and o.next_plan not in plan_codes:
            return f".overrides.{code}.next_plan", f"no plan with code {o.next_plan!r}"
        if o.price is not None:
            problem = price_problem(o.price)
            if problem is not None:
                return f".overrides.{code}.price{problem[0]}", problem[1]
    if s.wallet is not None:
        for code in s.wallet.credit_rates:
            if code not in metric_codes:
                return f".wallet.credit_rates.{code}", f"no metric with code {code!r}"
    return None


_CURRENCY = re.compile(r"^[A-Z]{3}$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_TIER_MODELS = ("tiered", "volume", "staircase")


def price_problem(price: PriceConfig) -> Optional[Tuple[str, str]]:
    """Why a price card cannot be rated, as ``(key suffix below price, reason)``, or None.

    >>> price_problem(PriceConfig(model="package", package_amount=5.0))
    ('.package_size', "model 'package' needs package_size (a number > 0)")
    >>> price_problem(PriceConfig(model="tiered", tiers=[Tier(up_to=10, unit_amount=1.0), Tier(unit_amount=0.5)]))
    """
    model = price.model
    if model not in PRICE_MODELS:
        return ".model", f"unknown price model {model!r}: expected one of {', '.join(PRICE_MODELS)}"
    used = {"per_unit": ("unit_amount",), "package": ("package_size", "package_amount")}.get(model, ("tiers",))
    for key in ("unit_amount", "package_size", "package_amount"):
        if getattr(price, key) is None and key in used:
            what = " (a number > 0)" if key == "package_size" else ""
            return f".{key}", f"model {model!r} needs {key}{what}"
        if getattr(price, key) is not None and key not in used:
            return f".{key}", f"model {model!r} does not use {key}"
    if price.tiers and model not in _TIER_MODELS:
        return ".tiers", f"model {model!r} does not use tiers"
    if model not in _TIER_MODELS:
        return None
    if not price.tiers:
        return ".tiers", f"model {model!r} needs tiers (ascending by up_to, the last without up_to)"
    amount, other = ("flat_amount", "unit_amount") if model == "staircase" else ("unit_amount", "flat_amount")
    last = len(price.tiers) - 1
    prev: Optional[float] = None
    for i, tier in enumerate(price.tiers):
        if getattr(tier, amount) is None:
            return f".tiers[{i}].{amount}", f"a {model} tier needs {amount}"
        if getattr(tier, other) is not None:
            return f".tiers[{i}].{other}", f"a {model} tier takes {amount}, not {other}"
        if i < last and tier.up_to is None:
            return f".tiers[{i}].up_to", "only the last tier may omit up_to"
        if i == last and tier.up_to is not None:
            return f".tiers[{i}].up_to", "the last tier must omit up_to (it covers all usage above the tier before)"
        if tier.up_to is not None and prev is not None and tier.up_to <= prev:
            return f".tiers[{i}].up_to", f"tiers must be ascending by up_to: {_num(tier.up_to)} follows {_num(prev)}"
        prev = tier.up_to
    return None


def _num(x: float) -> str:
    """A configured number as written (TOML integers arrive as floats here): 5000, 0.5."""
    return str(int(x)) if float(x).is_integer() else repr(x)
