"""The usage event (README: What it does) and its one shared decoder.

Decoding is the hot path of the whole system, so there is exactly one
module-level :data:`EVENT_DECODER`, reused everywhere; msgspec validates types,
lengths and the timestamp's zone in C while it parses.
"""

from __future__ import annotations

from typing import Annotated, Dict, Optional, Union

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# RFC 3339 text is parsed (and its zone required) by base.timeutil.parse_rfc3339_ms at mediation,
# which truncates sub-millisecond digits instead of rounding them into the next second.
RFC3339Text = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
EpochMillis = Annotated[int, msgspec.Meta(ge=0)]
PropertyValue = Union[str, int, float, bool, None]


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One usage event as producers send it.

    Unknown top-level fields are ignored (msgspec skips them while parsing).
    """

    event_id: EventId
    tenant_id: NonEmpty
    customer_id: NonEmpty
    event_type: NonEmpty
    timestamp: Union[RFC3339Text, EpochMillis]
    properties: Dict[str, PropertyValue] = {}
    correction: bool = False
    corrects: Optional[str] = None


EVENT_DECODER = msgspec.json.Decoder(UsageEvent)
