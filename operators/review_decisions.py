"""Mediation of the review decisions topic (``kafka.review_decisions_topic``, README: Overage review queue).

``meter review approve|reject`` publishes each decision there; the flow reads the topic alongside the events
and writes every valid decision to ClickHouse's ``review_decision_rows`` (``Emission.decisions``), so a decision
made while ``meter run`` holds an embedded chDB path lands durably. Decisions need no keyed state: each record
is decoded and checked on its own (:func:`meterflow.schemas.reviews.decision_problem`); a record that is not a
decision, or fails a check, is a dead letter with reason ``invalid_decision``. A decision on a review id the
queue has not (yet) shown is kept: the flow cannot know every item (a rebuilt flow reads the decisions before
its replay re-creates the items), and the ``overage_reviews`` view only counts a decision for an item whose
current amount it was made on. Writes are idempotent (one row per item and amount, the first).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import msgspec

from meterflow.operators.mediate import dead_letter
from meterflow.schemas.records import DeadLetter, Emission
from meterflow.schemas.reviews import DECISION_DECODER, ReviewDecision, decision_problem

REASON = "invalid_decision"


def mediate_decisions(batch: List[Tuple[Any, Optional[bytes]]]) -> Tuple[List[ReviewDecision], List[DeadLetter]]:
    """A batch of ``(src, raw)`` decision records: the valid decisions in log order, and the dead letters."""
    out: List[ReviewDecision] = []
    dead: List[DeadLetter] = []
    for src, raw in batch:
        try:
            d = DECISION_DECODER.decode(raw or b"")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            dead.append(dead_letter(REASON, f"not a review decision record: {exc}", src, raw))
            continue
        why = decision_problem(d)
        if why is not None:
            dead.append(dead_letter(REASON, f"review decision: {why}", src, raw))
            continue
        out.append(d)
    return out, dead


def decision_emissions(batch: List[Tuple[Any, Optional[bytes]]]) -> List[Emission]:
    """One ``Emission(decisions=..., dead_letters=...)`` per batch that had any (for ``flat_map_batch``)."""
    decisions, dead = mediate_decisions(batch)
    return [Emission(decisions=decisions, dead_letters=dead)] if decisions or dead else []
