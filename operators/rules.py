"""The configuration compiled into lookup tables for the hot path.

Rules are read-only and shared by every worker thread; nothing here is part of
recoverable state, so a restart picks up a changed configuration.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Optional, Tuple

import msgspec

from meterflow.base.keys import customer_key
from meterflow.base.periods import CALENDAR_ANCHOR_MS
from meterflow.base.timeutil import dt_to_ms, parse_duration_ms
from meterflow.operators.aggregate import ADDITIVE, NEEDS_NUMBER
from meterflow.operators.anomaly import AnomalySettings, anomaly_settings
from meterflow.operators.rating import Price, price_of, sets_custom_rate
from meterflow.operators.review import ReviewPolicy
from meterflow.schemas.config import Config, EntitlementConfig, EntitlementOverride, SubscriptionConfig, WalletConfig


class MetricRule(msgspec.Struct, frozen=True):
    code: str
    event_type: str
    aggregation: str
    prop: Optional[str]
    group_by: Tuple[str, ...]
    where: Tuple[Tuple[str, Any], ...]
    needs_number: bool
    per_event: bool = True  # entitlements evaluated per event (p95/p99: once per batch)


class SubscriptionRule(msgspec.Struct, frozen=True):
    """A customer's billing period and resolved entitlements (plan merged with overrides)."""

    plan: str
    period: str
    anchor_ms: int
    entitlements: Dict[str, EntitlementConfig]
    account_name: str = ""
    arr: float = 0.0
    custom_contract: bool = False
    wallet: Optional[WalletConfig] = None
    # Metrics whose custom contract sets price, overage_rate or included (custom_rate of rated rows).
    custom_rates: FrozenSet[str] = frozenset()
    currency: str = "USD"  # the plan's

    def included(self, metric: str) -> Optional[float]:
        ent = self.entitlements.get(metric)
        return None if ent is None else ent.included

    def price(self, metric: str) -> Optional[Price]:
        """The metric's price in effect (an override's price replaces the plan's whole), None without an
        entitlement. Compiled on each call: cache it per customer where it is used per event."""
        ent = self.entitlements.get(metric)
        return None if ent is None else price_of(ent)

    def custom_rate(self, metric: str) -> bool:
        return metric in self.custom_rates


CALENDAR_MONTH = SubscriptionRule(plan="", period="month", anchor_ms=CALENDAR_ANCHOR_MS, entitlements={})


def merge_entitlement(base: Optional[EntitlementConfig], override: Optional[EntitlementOverride]) -> EntitlementConfig:
    """The plan's entitlement with every field the custom contract sets replaced."""
    ent = base if base is not None else EntitlementConfig()
    if override is None:
        return ent
    changes = {f: getattr(override, f) for f in override.__struct_fields__ if getattr(override, f) is not None}
    return msgspec.structs.replace(ent, **changes)


def subscription_rule(cfg: Config, sub: SubscriptionConfig, plan_code: Optional[str] = None) -> SubscriptionRule:
    plans = {p.code: p for p in cfg.plans}
    plan = plans[plan_code or sub.plan]
    codes = set(plan.entitlements) | set(sub.overrides)
    ents = {c: merge_entitlement(plan.entitlements.get(c), sub.overrides.get(c)) for c in codes}
    return SubscriptionRule(plan=plan.code, period=sub.period, anchor_ms=dt_to_ms(sub.anchor), entitlements=ents,
                            account_name=sub.account_name, arr=sub.arr, custom_contract=bool(sub.overrides),
                            wallet=sub.wallet, currency=plan.currency,
                            custom_rates=frozenset(c for c, o in sub.overrides.items() if sets_custom_rate(o)))


class Rules:
    """Everything the metering state needs from the configuration, as dicts keyed for O(1) lookups."""

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.window_ms = cfg.pipeline.rollup_window_ms
        self.grace_ms = cfg.pipeline.late_grace_ms
        self.dedupe_ms = cfg.pipeline.dedupe_window_ms
        self.flush_ms = parse_duration_ms(cfg.pipeline.flush_interval)
        # Build live gateway state (Emission.gateway / wallets) for a consumer; the dataflow turns it off
        # when no sink reads it (no [redis] section).
        self.gateway_states = True
        # Compiled prices per entitlement object (operators.entitlements.prices_of): not state.
        self.price_cache: Dict[int, Tuple[Any, Any]] = {}
        # What operators.entitlements.derived_of builds per set of entitlement objects (customers of one plan
        # share it): not state.
        self.derived_cache: Dict[Any, Tuple[Any, Any]] = {}
        # The first rated row of each subscription object and metric (operators.meter.rated_row): not state.
        self.row_templates: Dict[Tuple[int, str], Tuple[Any, Any, Any]] = {}
        self.review = ReviewPolicy.of(cfg)  # the overage review queue's bands and routes
        self.metrics: Dict[str, MetricRule] = {}
        self.by_event_type: Dict[str, Tuple[MetricRule, ...]] = {}
        for m in cfg.metrics:
            rule = MetricRule(code=m.code, event_type=m.event_type, aggregation=m.aggregation,
                              prop=m.property if m.aggregation != "count" else None,
                              group_by=tuple(m.group_by), where=tuple(m.where.items()),
                              needs_number=m.aggregation in NEEDS_NUMBER,
                              per_event=m.aggregation not in ("p95", "p99"))
            self.metrics[m.code] = rule
            self.by_event_type[m.event_type] = self.by_event_type.get(m.event_type, ()) + (rule,)
        # The hot path's view of by_event_type: one flat tuple per metric, unpacked in one step.
        self.fold_by_event_type: Dict[str, Tuple[Tuple[Any, ...], ...]] = {
            t: tuple((r, r.code, r.where, r.prop, r.needs_number, r.aggregation in ADDITIVE, r.group_by, r.per_event,
                      r.aggregation) for r in rs)
            for t, rs in self.by_event_type.items()}
        self.plan_codes = frozenset(p.code for p in cfg.plans)
        self.anomaly: Optional[AnomalySettings] = anomaly_settings(cfg)  # None: no [anomaly] section
        self.subscription_configs: Dict[str, SubscriptionConfig] = {
            customer_key(s.tenant_id, s.customer_id): s for s in cfg.subscriptions
        }
        self.subscriptions: Dict[str, SubscriptionRule] = {
            k: subscription_rule(cfg, s) for k, s in self.subscription_configs.items()
        }

    def resolve(self, sub: SubscriptionConfig, plan: Optional[str] = None) -> SubscriptionRule:
        """A subscription (from the config or the changelog), optionally moved to another plan."""
        return subscription_rule(self.config, sub, plan)

    def subscription(self, key: str) -> SubscriptionRule:
        """The customer's subscription, or calendar months with nothing included."""
        return self.subscriptions.get(key, CALENDAR_MONTH)
