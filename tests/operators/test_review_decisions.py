"""The flow's reading of kafka.review_decisions_topic (operators/review_decisions.py): every valid decision passes
unchanged, in log order; anything else is an ``invalid_decision`` dead letter with the reason and the original
bytes, never an exception."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from meterflow.operators.review_decisions import REASON, decision_emissions, mediate_decisions
from meterflow.schemas.reviews import REVIEW_ENCODER, ReviewDecision, decision_id, review_id

RID = review_id("acme", "c1", "calls", 1_793_491_200_000)


def decision(**over) -> ReviewDecision:
    amount = over.pop("overage_amount", Decimal("62.5"))
    rid = over.pop("review_id", RID)
    fields = dict(decision_id=decision_id(rid, amount), review_id=rid, status="approved", decided_by="ann",
                  decided_at=1_796_000_000_000, note="ok", overage_amount=amount)
    return ReviewDecision(**{**fields, **over})


def raw(d: ReviewDecision) -> bytes:
    return REVIEW_ENCODER.encode(d)


amounts = st.decimals(min_value=Decimal("0.000000001"), max_value=Decimal("1e15"), places=9)


@given(st.lists(st.tuples(amounts, st.sampled_from(["approved", "rejected"]), st.text(min_size=1).filter(str.strip),
                          st.text()), max_size=8))
def test_valid_decisions_pass_unchanged_in_order(specs):
    ds = [decision(overage_amount=a, status=s, decided_by=by, note=note, decided_at=1 + i)
          for i, (a, s, by, note) in enumerate(specs)]
    out, dead = mediate_decisions([(("usage.review-decisions", 0, i), raw(d)) for i, d in enumerate(ds)])
    assert out == ds and dead == []


BAD = [
    (b"not json", "not a review decision record"),
    (b'{"review_id": "x"}', "not a review decision record"),
    (raw(decision(review_id="nope", decision_id=decision_id("nope", Decimal("62.5")))),
     "review_id 'nope' is not a review id"),
    (raw(decision(status="maybe")), "status 'maybe' is not one of approved, rejected"),
    (raw(decision(decided_by=" ")), "decided_by is empty"),
    (raw(decision(decided_at=0)), "decided_at 0 is not a time"),
    (raw(decision(overage_amount=Decimal(0))), "overage_amount 0 is not above 0"),
    (raw(decision(overage_amount=Decimal("1.0000000001"))), "more than 9 decimal places"),
    (raw(decision(decision_id="0" * 32)), "decision_id does not match review_id and overage_amount"),
]


def test_bad_records_are_dead_letters_with_the_reason_and_the_bytes():
    batch = [(("usage.review-decisions", 2, i), payload) for i, (payload, _why) in enumerate(BAD)]
    good = raw(decision())
    out, dead = mediate_decisions(batch + [(("usage.review-decisions", 2, 99), good)])
    assert out == [decision()]
    assert [(d.reason, d.source, d.payload) for d in dead] == \
        [(REASON, f"usage.review-decisions/2/{i}", p) for i, (p, _w) in enumerate(BAD)]
    for d, (_p, why) in zip(dead, BAD):
        assert why in d.detail, (why, d.detail)
    [em] = decision_emissions(batch + [(("t", 0, 99), good)])
    assert em.decisions == [decision()] and len(em.dead_letters) == len(BAD)
    assert decision_emissions([]) == []


@given(st.binary(max_size=300))
def test_any_bytes_never_raise(payload):
    out, dead = mediate_decisions([(("t", 0, 1), payload)])
    assert len(out) + len(dead) == 1
    if out:
        assert msgspec.json.decode(payload)["review_id"] == out[0].review_id
