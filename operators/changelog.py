"""Mediation of the entitlements changelog (``usage.entitlements``): decode, validate, key.

Each record is a customer's whole subscription (or its cancellation), keyed ``tenant|customer``
(:class:`meterflow.schemas.alerts.EntitlementMessage`). Valid records go to the customer's keyed state as
:class:`meterflow.operators.entitlements.EntitlementUpdate`, versioned by their position in the log (the Kafka
offset, or the line of a JSONL file) so that a replay of an older record never overrides a newer
one; records for unknown tenants, unknown plans or metrics, or that are not JSON become dead letters
with reason ``invalid_entitlement``.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import msgspec

from meterflow.base.keys import customer_key
from meterflow.base.stats import STATS, FlowStats
from meterflow.operators.entitlements import EntitlementUpdate
from meterflow.operators.mediate import dead_letter
from meterflow.schemas.alerts import ENTITLEMENT_DECODER
from meterflow.schemas.config import Config, subscription_problem
from meterflow.schemas.records import DeadLetter

REASON = "invalid_entitlement"


def log_position(src: Any) -> int:
    """The version of a record: its Kafka offset ``(topic, partition, offset)`` or JSONL line ``(path, line)``.

    >>> log_position(("usage.entitlements", 0, 41)), log_position(("changes.jsonl", 7))
    (41, 7)
    """
    if isinstance(src, tuple) and src and isinstance(src[-1], int):
        return src[-1]
    raise ValueError(f"cannot order changelog record from {src!r}")


class Changes(NamedTuple):
    """One batch of the changelog: ``(tenant|customer, EntitlementUpdate)`` in log order, and the dead letters."""

    updates: List[Tuple[str, EntitlementUpdate]]
    dead_letters: List[DeadLetter]


class ChangelogMediator:
    """Call it with a batch of ``(src, raw)``; returns the batch's :class:`Changes`."""

    def __init__(self, cfg: Config, stats: FlowStats = STATS) -> None:
        self._cfg = cfg
        self._stats = stats

    def __call__(self, batch: List[Tuple[Any, Optional[bytes]]]) -> Changes:
        out: List[Tuple[str, EntitlementUpdate]] = []
        dead: List[DeadLetter] = []
        for src, raw in batch:
            try:
                msg = ENTITLEMENT_DECODER.decode(raw or b"")
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                dead.append(dead_letter(REASON, f"not an entitlement record: {exc}", src, raw))
                continue
            why = self._problem(msg)
            if why is not None:
                dead.append(dead_letter(REASON, why, src, raw, tenant_id=msg.tenant_id))
                continue
            out.append((customer_key(msg.tenant_id, msg.customer_id), EntitlementUpdate(msg, log_position(src), src)))
        self._stats.add({"entitlement_changes": len(out), "entitlement_rejected": len(dead)})  # not events read
        return Changes(out, dead)

    def _problem(self, msg: Any) -> Optional[str]:
        if msg.cancelled:
            if msg.tenant_id not in {t.id for t in self._cfg.tenants}:
                return f"tenant {msg.tenant_id!r} is not in the tenant registry"
            return None
        sub = msg.subscription
        if sub is None:
            return "a record needs either a subscription or cancelled = true"
        if (sub.tenant_id, sub.customer_id) != (msg.tenant_id, msg.customer_id):
            return (f"the record is for {msg.tenant_id}/{msg.customer_id} but its subscription names "
                    f"{sub.tenant_id}/{sub.customer_id}")
        problem = subscription_problem(self._cfg, sub)
        if problem is not None:
            return f"key 'subscription{problem[0]}': {problem[1]}"
        return None
