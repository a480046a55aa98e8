"""Mediation: decode, validate, normalise to UTC, tenant registry, exclusions, keys, dead-letter reasons."""

from __future__ import annotations

import json

import pytest

from meterflow.base.keys import customer_key
from meterflow.base.stats import FlowStats
from meterflow.operators.mediate import MAX_DEPTH, Mediated, Mediator, MeteredEvent, dead_letter, format_source
from meterflow.schemas.config import parse_config

CFG = {
    "pipeline": {"max_event_bytes": 600},
    "tenants": [
        {"id": "acme", "exclude_when": {"environment": "test", "synthetic": True},
         "excluded_customers": ["cust_internal"]},
        {"id": "beta"},
    ],
    "metrics": [{"code": "api_calls", "event_type": "api_call"}],
}


def config(**pipeline):
    raw = json.loads(json.dumps(CFG))
    raw["pipeline"].update(pipeline)
    return parse_config(raw, "test.toml", environ={})


def event(**over) -> dict:
    ev = {"event_id": "evt_1", "tenant_id": "acme", "customer_id": "cust_456", "event_type": "api_call",
          "timestamp": "2026-11-03T14:30:00Z", "properties": {"region": "us-east-1", "tokens": 1500}}
    for k, v in over.items():
        if v is DROP:
            ev.pop(k, None)
        else:
            ev[k] = v
    return ev


DROP = object()


def enc(ev) -> bytes:
    return json.dumps(ev).encode()


NOW = 1798761600000  # 2027-01-01T00:00:00Z: the wall clock these tests inject (never today's date)


def clock():
    return NOW


def mediate(*raws, cfg=None, clock=clock):
    m = Mediator(cfg or config(), stats=FlowStats(), clock=clock)
    out = m([(("events.jsonl", i + 1), r) for i, r in enumerate(raws)])
    return m, out


def split(out):
    return list(out.groups.items()), out.dead_letters


def first(out):
    """The first accepted event of a mediated batch."""
    return next(iter(out.groups.values()))[0]


def only_dead(raw, cfg=None):
    _, out = mediate(raw, cfg=cfg)
    keyed, dead = split(out)
    assert keyed == [] and len(dead) == 1
    return dead[0]


# -- the happy path ------------------------------------------------------------------------------------

def test_valid_event_is_keyed_and_normalised():
    raw = enc(event())
    _, out = mediate(raw)
    assert out.dead_letters == [] and len(out.groups) == 1
    ((key, items),) = out.groups.items()
    assert key == "acme|cust_456" == customer_key("acme", "cust_456")
    (me,) = items
    assert isinstance(me, MeteredEvent)
    assert me.ts == 1793716200000 == me.wm
    assert me.raw == raw and me.src == ("events.jsonl", 1) and me.excluded is False
    assert me.event.properties == {"region": "us-east-1", "tokens": 1500}


@pytest.mark.parametrize("ts", ["2026-11-03T14:30:00Z", "2026-11-03T14:30:00+00:00", "2026-11-03T09:30:00-05:00",
                                "2026-11-03T20:00:00+05:30", 1793716200000, "2026-11-03T14:30:00.000Z",
                                "2026-11-03t14:30:00Z", "2026-11-03 14:30:00Z",
                                "2026-11-03T14:30:00.000999Z"])
def test_timestamp_formats_normalise_to_the_same_utc_ms(ts):
    _, out = mediate(enc(event(timestamp=ts)))
    assert first(out).ts == 1793716200000


def test_sub_millisecond_digits_are_truncated_not_rounded_into_the_next_period():
    # (regression) msgspec's datetime rounded .9999999 up to the next second, here into May
    _, out = mediate(enc(event(timestamp="2026-04-30T23:59:59.9999999Z")))
    assert first(out).ts == 1777593599999  # 2026-04-30T23:59:59.999Z


@pytest.mark.parametrize("ts", ["2026-11-03T14:30:00z", "2026-11-03t14:30:00z"])
def test_lower_case_z_is_rfc3339(ts):
    _, out = mediate(enc(event(timestamp=ts)))
    assert first(out).ts == 1793716200000


def test_utc_boundary_est_evening_is_next_day_utc():
    _, out = mediate(enc(event(timestamp="2026-01-31T23:59:00-05:00")))
    assert first(out).ts == 1769921940000  # 2026-02-01T04:59:00Z


def test_optional_fields_and_unknown_top_level_fields():
    ev = event(properties=DROP)
    ev["schema_version"] = 3
    ev["nested_unknown"] = {"a": [1, 2]}
    ev["correction"] = True
    ev["corrects"] = "evt_0"
    _, out = mediate(enc(ev))
    me = first(out)
    assert me.event.properties == {} and me.event.correction is True and me.event.corrects == "evt_0"


def test_property_values_may_be_scalars_or_null():
    props = {"s": "x", "i": 1, "f": 1.5, "b": False, "n": None}
    _, out = mediate(enc(event(properties=props)))
    assert first(out).event.properties == props


def test_event_id_of_256_chars_is_accepted():
    _, out = mediate(enc(event(event_id="e" * 256)))
    assert list(out.groups) == ["acme|cust_456"]


def test_payload_exactly_at_the_size_limit_is_accepted():
    base = enc(event(properties={"pad": ""}))
    raw = enc(event(properties={"pad": "x" * (600 - len(base))}))
    assert len(raw) == 600
    _, out = mediate(raw)
    assert out.groups and not out.dead_letters


# -- dead-letter reasons -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"",
    b"   ",
    b"\n",
    b"{",
    b'{"event_id": "e1", ',
    b"not json",
    b"\xff\xfe\x00\x01binary",
    b"\x89PNG\r\n\x1a\n\x00\x00",
    b"{'event_id': 'single quotes'}",
    b'{"event_id": "e1", "tenant_id": "acme", "customer_id": "c", "event_type": "x", "timestamp": 1} trailing',
    b'{"timestamp": NaN}',
], ids=repr)
def test_invalid_json(raw):
    d = only_dead(raw)
    assert d.reason == "invalid_json"
    assert d.payload == raw and d.source == "events.jsonl:1" and d.detail


@pytest.mark.parametrize("raw", [b'{"event_id": "", "tenant_id": "acme", "cus', b'{"event_id": "e1"} trailing'])
def test_broken_json_is_invalid_json_even_if_a_field_before_the_break_is_invalid(raw):
    assert only_dead(raw).reason == "invalid_json"


def test_none_payload_is_invalid_json():
    d = only_dead(None)
    assert d.reason == "invalid_json" and d.payload == b""


@pytest.mark.parametrize("ev", [
    [1, 2],
    "a string",
    None,
    42,
    event(event_id=DROP),
    event(tenant_id=DROP),
    event(customer_id=DROP),
    event(event_type=DROP),
    event(timestamp=DROP),
    event(event_id=""),
    event(tenant_id=""),
    event(customer_id=""),
    event(event_type=""),
    event(event_id=123),
    event(customer_id=7),
    event(event_type=None),
    event(event_id="e" * 257),
    event(timestamp="2026-11-03T14:30:00"),            # naive: no zone
    event(timestamp="2026-11-03"),
    event(timestamp="yesterday"),
    event(timestamp=1793716200000.0),                  # float epoch
    event(timestamp=-1),
    event(timestamp=True),
    event(timestamp="1793716200000"),
    event(properties={"nested": {"a": 1}}),
    event(properties={"list": [1, 2]}),
    event(properties=[1, 2]),
    event(properties=None),
    event(correction="yes"),
    event(corrects=5),
], ids=lambda ev: json.dumps(ev)[:70])
def test_invalid_event(ev):
    raw = enc(ev)
    d = only_dead(raw)
    assert d.reason == "invalid_event", d.detail
    assert d.payload == raw and d.detail


def test_out_of_range_number_is_invalid_event():
    raw = enc(event(properties={"tokens": 1})).replace(b'"tokens": 1', b'"tokens": 1e400')
    assert only_dead(raw).reason == "invalid_event"


def test_oversized_payload_is_invalid_event_and_names_the_limit():
    base = enc(event(properties={"pad": ""}))
    raw = enc(event(properties={"pad": "x" * (601 - len(base))}))
    assert len(raw) == 601
    d = only_dead(raw)
    assert d.reason == "invalid_event" and "max_event_bytes" in d.detail and d.payload == raw


def test_unknown_tenant():
    raw = enc(event(tenant_id="ghost"))
    d = only_dead(raw)
    assert d.reason == "unknown_tenant" and d.tenant_id == "ghost" and "ghost" in d.detail


def test_tenant_ids_are_case_sensitive():
    assert only_dead(enc(event(tenant_id="ACME"))).reason == "unknown_tenant"


def test_invalid_utf8_inside_a_string_is_a_dead_letter():
    raw = enc(event()).replace(b"us-east-1", b"us-\xff-1")
    good = enc(event(event_id="evt_2"))
    m = Mediator(config(), stats=FlowStats(), clock=clock)
    out = m([(("f", 1), raw), (("f", 2), good)])
    keyed, dead = split(out)
    assert [d.reason for d in dead] == ["invalid_json"]
    assert [me.event.event_id for _, items in keyed for me in items] == ["evt_2"]


def test_bad_events_do_not_stop_good_ones_in_the_same_batch():
    raws = [b"", enc(event(event_id="a")), b"{", enc(event(event_id="b", tenant_id="ghost")),
            enc(event(event_id="c", customer_id="other")), enc(event(event_id="d", timestamp="2026-11-03T14:30:00")),
            enc(event(event_id="e"))]
    _, out = mediate(*raws)
    keyed, dead = split(out)
    assert type(out) is Mediated and type(out.groups) is dict and type(out.dead_letters) is list  # once per batch
    assert [(k, [me.event.event_id for me in items]) for k, items in keyed] == [
        ("acme|cust_456", ["a", "e"]), ("acme|other", ["c"])]
    assert [(d.reason, d.source) for d in dead] == [
        ("invalid_json", "events.jsonl:1"), ("invalid_json", "events.jsonl:3"),
        ("unknown_tenant", "events.jsonl:4"), ("invalid_event", "events.jsonl:6")]


def test_no_dead_letter_emission_when_all_good():
    _, out = mediate(enc(event(event_id="a")), enc(event(event_id="b")))
    assert out.dead_letters == [] and [me.event.event_id for me in out.groups["acme|cust_456"]] == ["a", "b"]


# -- exclusions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ev, excluded", [
    (event(properties={"environment": "test", "synthetic": True}), True),
    (event(properties={"environment": "test", "synthetic": True, "other": 1}), True),
    (event(properties={"environment": "test"}), False),            # every exclude_when key must match
    (event(properties={"environment": "prod", "synthetic": True}), False),
    (event(properties={"environment": "test", "synthetic": False}), False),
    (event(properties={}), False),
    (event(customer_id="cust_internal"), True),
    (event(customer_id="cust_internal", properties={}), True),
    (event(tenant_id="beta", customer_id="cust_internal"), False),  # exclusions are per tenant
    (event(tenant_id="beta", properties={"environment": "test", "synthetic": True}), False),
])
def test_exclusions(ev, excluded):
    _, out = mediate(enc(ev))
    (key, (me,)), = out.groups.items()
    assert me.excluded is excluded


def test_exclusion_match_is_exact_on_json_type():
    _, out = mediate(enc(event(properties={"environment": "test", "synthetic": 1})))
    assert first(out).excluded is False


# -- the watermark -------------------------------------------------------------------------------------

def test_watermark_is_greatest_event_time_and_stamped_per_event():
    t0 = 1793716200000
    raws = [enc(event(event_id="a", timestamp=t0)),
            enc(event(event_id="b", timestamp=t0 + 5000, customer_id="other")),
            enc(event(event_id="c", timestamp=t0 - 9000)),
            enc(event(event_id="x", tenant_id="ghost", timestamp=t0 + 10 ** 9)),   # unknown tenant: ignored
            enc(event(event_id="y", timestamp="2099-01-01T00:00:00", customer_id="c2")),  # invalid: ignored
            enc(event(event_id="d", timestamp=t0 + 7000))]
    m, out = mediate(*raws)
    keyed, dead = split(out)
    stamps = {me.event.event_id: (me.ts, me.wm) for _, items in keyed for me in items}
    assert stamps == {"a": (t0, t0), "b": (t0 + 5000, t0 + 5000), "c": (t0 - 9000, t0 + 5000),
                      "d": (t0 + 7000, t0 + 7000)}
    assert m.watermark == t0 + 7000
    # it carries over to the next batch and never decreases
    out2 = m([(("f", 9), enc(event(event_id="e", timestamp=t0)))])
    assert out2.groups["acme|cust_456"][0].wm == t0 + 7000
    assert m.watermark == t0 + 7000


# -- dead-letter records ---------------------------------------------------------------------------

def test_dead_letter_ids_are_deterministic():
    a = dead_letter("invalid_json", "x", ("usage.events", 0, 42), b"{")
    b = dead_letter("invalid_json", "other detail", ("usage.events", 0, 42), b"{")
    c = dead_letter("invalid_json", "x", ("usage.events", 0, 43), b"{")
    d = dead_letter("too_late", "x", ("usage.events", 0, 42), b"{")
    e = dead_letter("missing_property", "x", ("usage.events", 0, 42), b"{", metric="m1")
    f = dead_letter("missing_property", "x", ("usage.events", 0, 42), b"{", metric="m2")
    assert a.dl_id == b.dl_id
    assert len({a.dl_id, c.dl_id, d.dl_id, e.dl_id, f.dl_id}) == 5
    assert a.source == "usage.events/0/42"


def test_dead_letters_of_a_replayed_batch_have_the_same_ids():
    raws = [b"{", enc(event(tenant_id="ghost"))]
    _, o1 = mediate(*raws)
    _, o2 = mediate(*raws)
    assert [d.dl_id for d in split(o1)[1]] == [d.dl_id for d in split(o2)[1]]


def test_dead_letter_detail_is_bounded():
    assert len(dead_letter("invalid_event", "x" * 5000, "s", b"").detail) == 1000


@pytest.mark.parametrize("src, text", [(("usage.events", 3, 7), "usage.events/3/7"), (("a.jsonl", 12), "a.jsonl:12"),
                                       ("plain", "plain")])
def test_format_source(src, text):
    assert format_source(src) == text


def test_stats_count_reads_and_dead_letters():
    stats = FlowStats()
    m = Mediator(config(), stats=stats, clock=clock)
    m([(1, b""), (2, enc(event())), (3, b"{")])
    s = stats.snapshot()
    assert s["read"] == 3 and s["dead_lettered"] == 2


# -- poison lines (issue 9): each is one dead letter, never an exception ----------------------------------

FIELDS = '"event_id": "p1", "tenant_id": "acme", "customer_id": "cust_456", "event_type": "api_call"'


def with_unknown(value: bytes, ts: str = '"2026-11-03T14:30:00Z"') -> bytes:
    return b'{' + FIELDS.encode() + b', "timestamp": ' + ts.encode() + b', "x": ' + value + b'}'


def nested(depth: int, kind: str = "[") -> bytes:
    close = "]" if kind == "[" else "}"
    if kind == "[":
        return (kind * depth + close * depth).encode()
    return ('{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)).encode()


@pytest.mark.parametrize("raw", [
    with_unknown(nested(10_000)),                                   # RecursionError in msgspec's skip
    with_unknown(nested(10_000, "{")),
    nested(10_000),                                                 # top level: the untyped second decode
    b"[" * 10_000,                                                  # deep and broken
    with_unknown(nested(MAX_DEPTH)),                                # the document is one level deeper
    b'{"properties": ' + nested(MAX_DEPTH) + b"}",
], ids=["unknown-field-10000", "unknown-object-10000", "top-level-10000", "unclosed-10000", "unknown-field-65",
        "properties-65"])
def test_nesting_deeper_than_64_levels_anywhere_is_invalid_event(raw):
    d = only_dead(raw, cfg=config(max_event_bytes=1 << 20))
    assert d.reason == "invalid_event" and "nested deeper than 64" in d.detail and d.payload == raw


def test_nesting_of_exactly_64_levels_in_an_unknown_field_is_accepted():
    raw = with_unknown(nested(MAX_DEPTH - 1))  # 63 inside the event object: 64 in all
    _, out = mediate(raw)
    assert first(out).event.event_id == "p1"


def test_brackets_inside_strings_do_not_count_as_nesting():
    raw = enc(event(properties={"q": "[" * 500 + "{" * 500, "r": '\\"[[[' * 100}, note="]" * 70))
    _, out = mediate(raw, cfg=config(max_event_bytes=1 << 20))
    assert out.groups and not out.dead_letters


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
                                "1969-12-31T23:59:59.999Z", "2999-01-01T00:00:00Z", 10 ** 15, 2 ** 63 - 1,
                                2 ** 63 + 5, 2 ** 64 + 5])
def test_timestamps_before_1970_or_far_ahead_are_invalid_event_with_the_reason(ts):
    d = only_dead(enc(event(timestamp=ts)))
    assert d.reason == "invalid_event" and "$.timestamp" in d.detail, d.detail
    assert ("before 1970" in d.detail) if str(ts)[:4] in ("0001", "1969") else ("max_clock_skew" in d.detail)


def test_clock_skew_boundary_is_inclusive_and_follows_the_config():
    at, over = enc(event(event_id="a", timestamp=NOW + 3_600_000)), enc(event(event_id="b", timestamp=NOW + 3_600_001))
    keyed, dead = split(mediate(at, over)[1])
    assert [me.event.event_id for _, items in keyed for me in items] == ["a"]
    assert [(d.reason, d.source) for d in dead] == [("invalid_event", "events.jsonl:2")]
    assert "'1h' ahead of the wall clock 2027-01-01T00:00:00Z" in dead[0].detail
    keyed, dead = split(mediate(at, cfg=config(max_clock_skew="0s"))[1])
    assert keyed == [] and dead[0].reason == "invalid_event"
    keyed, dead = split(mediate(enc(event(timestamp=NOW)), cfg=config(max_clock_skew="0s"))[1])
    assert len(keyed) == 1 and dead == []


def test_the_clock_is_read_when_a_batch_is_read():
    now = [NOW]
    m = Mediator(config(), stats=FlowStats(), clock=lambda: now[0])
    late_clock_event = enc(event(timestamp=NOW + 2 * 3_600_000))
    assert split(m([(("f", 1), late_clock_event)]))[1][0].reason == "invalid_event"
    now[0] += 3_600_000  # an hour later the same event is within max_clock_skew
    assert len(split(m([(("f", 2), late_clock_event)]))[0]) == 1


def test_a_future_dated_event_does_not_move_the_watermark():
    m, out = mediate(enc(event(event_id="a")), enc(event(event_id="f", timestamp="2999-01-01T00:00:00Z")),
                     enc(event(event_id="b", timestamp="2026-11-03T14:00:00Z")))
    keyed, dead = split(out)
    assert [(me.event.event_id, me.wm) for _, items in keyed for me in items] == [
        ("a", 1793716200000), ("b", 1793716200000)]
    assert m.watermark == 1793716200000 and [d.reason for d in dead] == ["invalid_event"]


def test_a_failure_inside_mediation_is_an_internal_error_dead_letter_and_the_batch_goes_on():
    m = Mediator(config(), stats=FlowStats(), clock=clock)

    def broken(text):
        if "14:30" in text:
            raise RuntimeError("boom")
        return 1793716200000

    m._parse_ts = broken  # a bug in one step of the per-event work
    out = m([(("f", 1), enc(event(event_id="a"))),
             (("f", 2), enc(event(event_id="b", timestamp="2026-11-03T14:00:00Z")))])
    keyed, dead = split(out)
    assert [me.event.event_id for _, items in keyed for me in items] == ["b"]
    assert [(d.reason, d.source) for d in dead] == [("internal_error", "f:1")]
    assert "mediation raised RuntimeError: boom" in dead[0].detail
    assert m._stats.snapshot()["dead_lettered"] == 1 and m._stats.snapshot()["read"] == 2
