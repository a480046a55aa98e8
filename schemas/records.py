"""Output records: rollups, period totals and dead letters.

These are the shapes billing systems read from the ``usage.aggregated`` topic
and from ClickHouse. Every record carries a ``version`` that only grows as more
events are folded into the same row, so any consumer can keep "the row with the
highest version" and see exact values even when a resumed dataflow re-emits.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Dict, List, Optional, Union

import msgspec

from meterflow.schemas.alerts import Alert
from meterflow.schemas.gateway import AnomalyMarker, GatewayState, WalletState
from meterflow.schemas.reviews import ReviewDecision, ReviewItem


class WindowAggregate(msgspec.Struct, frozen=True, kw_only=True, tag="window"):
    """Usage of one tenant/customer/metric (and group_by dimensions) in one tumbling window.

    ``window_start``/``window_end`` are epoch milliseconds, aligned to UTC epoch
    boundaries. ``version`` = number of events folded in so far (it grows
    monotonically; the row with the highest version is the current one).
    """

    tenant_id: str
    customer_id: str
    metric: str
    window_start: int
    window_end: int
    dimensions: Dict[str, str]
    value: float
    events: int
    version: int


class PeriodAggregate(msgspec.Struct, frozen=True, kw_only=True, tag="period"):
    """Running billing-period total of one tenant/customer/metric.

    ``included`` is None for a customer without a subscription (calendar
    months in UTC). ``excluded_events`` counts events that matched the tenant's
    exclusions (test or internal traffic): recorded, not billed.
    """

    tenant_id: str
    customer_id: str
    metric: str
    period_start: int
    period_end: int
    value: float
    included: Optional[float]
    overage_units: float
    events: int
    excluded_events: int
    version: int
    final: bool = False  # period_end + late_grace is before the watermark: no event can change the row any more


class RatedRow(msgspec.Struct, frozen=True, kw_only=True, tag="rated"):
    """One billing-period row in money (README: Rating): the period value rated under the customer's current
    entitlement and price, for a metric the subscription gives an entitlement (``included``) or a price.

    Amounts are exact decimals (``meterflow.operators.rating``), written to ClickHouse as Decimal(38, 9) and to
    the ``usage.rated`` topic as JSON numbers with their exact digits. ``version`` grows with every change of
    the row (events folded, a subscription change that re-rates it, finality), so the row with the highest
    version is the current one.
    """

    tenant_id: str
    customer_id: str
    metric: str
    period_start: int
    period_end: int
    plan: str
    currency: str
    price_model: str  # per_unit | tiered | volume | staircase | package | overage
    usage: float
    included: Optional[float]
    overage_units: float
    charge: Decimal
    overage_amount: Decimal
    minimum: Decimal
    amount: Decimal
    custom_rate: bool
    final: bool
    version: int
    account_name: str = ""  # the subscription's, for the review queue and reports
    arr: float = 0.0
    # A subscription change took the metric's price and entitlement away: the row leaves usage_rated (a
    # tombstone on the topic, money 0).
    deleted: bool = False


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An input that could not be metered, with why and where it came from.

    ``reason`` is one of the contract's codes: invalid_json, invalid_event,
    unknown_tenant, missing_property, too_late; or internal_error (a bug met while
    processing this one event, named in ``detail``). ``source`` locates the original
    (``topic/partition/offset`` or ``file:line``); ``payload`` is the original
    bytes, untouched. ``dl_id`` is deterministic, so a replay rewrites the same
    row instead of adding one.
    """

    dl_id: str
    reason: str
    detail: str
    source: str
    tenant_id: str
    metric: str
    payload: bytes
    received_at: int


class RawEvents(msgspec.Struct, frozen=True, kw_only=True):
    """One batch of accepted events for the raw archive (``raw_events``, README: Reconciliation), as columns:
    the i-th entry of every list is the i-th event. Built once per batch, never as one object per event.

    ``timestamp`` and ``ingested_at`` are epoch ms; ``properties`` the event's properties as JSON text;
    ``source`` its location (``file:line`` or ``topic/partition/offset``), ``position`` the line or offset
    alone (arrival order within the source, for "first arrival wins" and "latest: ties to the later arrival").
    """

    tenant_id: List[str]
    customer_id: List[str]
    event_id: List[str]
    event_type: List[str]
    timestamp: List[int]
    properties: List[str]
    correction: List[bool]
    ingested_at: List[int]
    source: List[str]
    position: List[int]


class RawRows(msgspec.Struct, frozen=True, kw_only=True):
    """One batch of accepted events for the raw archive already encoded for ClickHouse (native mediation,
    ``pipeline.core = "native"``): ``rows`` rows of ``raw_event_rows`` in ClickHouse's ``RowBinary`` format, the
    fields of :class:`RawEvents` in order (strings as LEB128 length and UTF-8 bytes, ``timestamp``,
    ``ingested_at`` and ``position`` as little-endian Int64, ``correction`` one byte). The sink inserts the bytes
    as they are; :meth:`columns` reads them back as :class:`RawEvents`."""

    rows: int
    data: bytes

    def columns(self) -> RawEvents:
        """The rows as :class:`RawEvents` (the columns the Python Mediator would have made)."""
        cols: List[list] = [[] for _ in RawEvents.__struct_fields__]
        data, pos = self.data, 0

        def text() -> str:
            nonlocal pos
            n = shift = 0
            while True:
                b = data[pos]
                pos += 1
                n |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            pos += n
            return data[pos - n:pos].decode()

        def int64() -> int:
            nonlocal pos
            pos += 8
            return int.from_bytes(data[pos - 8:pos], "little", signed=True)

        for _ in range(self.rows):
            for i in range(4):
                cols[i].append(text())
            cols[4].append(int64())
            cols[5].append(text())
            cols[6].append(data[pos] != 0)
            pos += 1
            cols[7].append(int64())
            cols[8].append(text())
            cols[9].append(int64())
        if pos != len(data):
            raise ValueError(f"RawRows: {len(data) - pos} bytes after {self.rows} rows")
        return RawEvents(**dict(zip(RawEvents.__struct_fields__, cols)))


class ReconciliationRow(msgspec.Struct, frozen=True, kw_only=True):
    """One key of one ``meter reconcile`` run (README: Reconciliation), kept as audit evidence.

    ``inputs`` is the run's fingerprints of its inputs (JSON: invoice file and config sha256, counts and
    hashes of raw_events, usage_by_period and usage_rated); ``evidence`` the key's evidence (JSON). Units
    are metered units; ``diff_units`` / ``diff_amount`` are invoiced minus metered (negative: under-billed).
    """

    run_id: str
    ran_at: int
    inputs: str
    tenant_id: str
    customer_id: str
    metric: str
    period_start: int
    currency: str
    raw_units: float
    metered_units: float
    metered_amount: Decimal
    invoiced_units: float
    invoiced_amount: Decimal
    diff_units: float
    diff_amount: Decimal
    cls: str
    owner: str
    evidence: str


Aggregate = Union[WindowAggregate, PeriodAggregate]


class Emission(msgspec.Struct, kw_only=True):
    """Everything one step produced for one key in one batch, routed to every sink at once.

    Grouping outputs per key and batch keeps Python calls per batch, not per event.
    """

    windows: List[WindowAggregate] = []
    periods: List[PeriodAggregate] = []
    dead_letters: List[DeadLetter] = []
    alerts: List[Alert] = []
    gateway: List[GatewayState] = []
    wallets: List[WalletState] = []
    rated: List[RatedRow] = []
    # the batch's accepted events for the raw archive (mediation only; native mediation: RowBinary rows)
    raw_events: Optional[Union[RawEvents, RawRows]] = None
    reviews: List[ReviewItem] = []  # review items of the rated rows (README: Overage review queue)
    decisions: List[ReviewDecision] = []  # review decisions read from kafka.review_decisions_topic
    markers: List[AnomalyMarker] = []  # anomaly markers republished after a resume (a fired alert sets its own)


AGGREGATE_ENCODER = msgspec.json.Encoder()
AGGREGATE_DECODER = msgspec.json.Decoder(Aggregate)
# Money as JSON numbers with the decimal's exact digits (102.000, not "102.000" nor 101.99999999999999).
RATED_ENCODER = msgspec.json.Encoder(decimal_format="number")
RATED_DECODER = msgspec.json.Decoder(RatedRow)
