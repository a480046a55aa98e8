"""Unit tests of meter serve's pieces that need no server: keys, body splitting, CloudEvents, [server] config."""

from __future__ import annotations

import base64
import hashlib
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterflow.base.errors import ConfigError
from meterflow.schemas.config import parse_config
from meterflow.service import ADMIN, Auth, cloudevent_to_event, split_body

KEY = "plain-key-of-acme-000000"
OTHER = "the-key-of-beta-11111111"


def _cfg(**server):
    hashed = "sha256:" + hashlib.sha256(OTHER.encode()).hexdigest()
    return parse_config({"tenants": [{"id": "acme", "api_keys": [KEY]}, {"id": "beta", "api_keys": [hashed]}],
                         "server": {"admin_token": "admin-token-0123456789", **server}}, environ={})


def test_a_key_admits_its_own_tenant_a_hash_works_like_the_key_and_the_admin_every_tenant():
    auth = Auth(_cfg())
    assert auth.principal(KEY) == "acme" and auth.principal(OTHER) == "beta"
    assert auth.principal("admin-token-0123456789") == ADMIN and auth.is_admin("admin-token-0123456789")
    assert auth.principal(None) is None and auth.principal("") is None and auth.principal(KEY + "x") is None
    assert not auth.is_admin(KEY)
    assert KEY not in repr(auth) and OTHER not in repr(auth)


def test_keys_and_the_admin_token_never_show_in_repr_or_redacted():
    cfg = _cfg()
    for text in (repr(cfg), str(cfg), repr(cfg.redacted()), repr(msgspec.to_builtins(cfg.redacted()))):
        assert KEY not in text and "admin-token-0123456789" not in text
    assert cfg.redacted().tenants[0].api_keys == ["***"] and cfg.redacted().server.admin_token == "***"


@pytest.mark.parametrize("server, key", [({"max_batch": 0}, "server.max_batch"),
                                         ({"port": 70000}, "server.port"),
                                         ({"produce_timeout": "soon"}, "server.produce_timeout"),
                                         ({"fail_open": "maybe"}, "server.fail_open")])
def test_bad_server_settings_are_one_line_errors_naming_the_key(server, key):
    with pytest.raises(ConfigError) as err:
        _cfg(**server)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_api_keys_are_named_without_their_value():
    for bad in ("short", "sha256:nothex"):
        with pytest.raises(ConfigError) as err:
            parse_config({"tenants": [{"id": "acme", "api_keys": [bad]}]}, environ={})
        assert "tenants[0].api_keys[0]" in str(err.value) and bad not in str(err.value).split("': ", 1)[1]


def test_admin_token_comes_from_the_environment():
    cfg = parse_config({"tenants": [{"id": "acme"}]}, environ={"METER_SERVER_ADMIN_TOKEN": "from-env-0123456789"})
    assert cfg.server.admin_token == "from-env-0123456789"


def test_split_body_keeps_each_array_elements_bytes_exactly():
    body = b'[{"a": 1},  {"b" : [2, 3]}, 7]'
    assert split_body(body, "application/json").raws == [b'{"a": 1}', b'{"b" : [2, 3]}', b"7"]
    assert split_body(b' {"x":1}', "application/json; charset=utf-8").single
    for bad in (b"", b"  ", b"[1,", b"[\xff]"):
        with pytest.raises(ValueError):
            split_body(bad, "application/json")
    assert split_body(b"\xff", "application/json").raws == [b"\xff"]  # one event: mediation judges its bytes
    with pytest.raises(ValueError, match="nested deeper"):
        split_body(b"[" * 100_000 + b"]" * 100_000, "application/json")


def test_cloudevent_attributes_fill_only_what_data_lacks():
    ce = {"id": "ce1", "time": "2026-11-03T14:30:00Z", "type": "api_call", "data": {"tenant_id": "acme",
          "customer_id": "c", "event_id": "own", "properties": {"n": 1}}}
    assert json.loads(cloudevent_to_event(ce)) == {"tenant_id": "acme", "customer_id": "c", "event_id": "own",
                                                   "properties": {"n": 1}, "timestamp": "2026-11-03T14:30:00Z",
                                                   "event_type": "api_call"}
    for bad in ([], {"id": "x"}, {"data": "text"}, {"data_base64": "WzFd"}):  # WzFd: [1], not an object
        with pytest.raises(ValueError):
            cloudevent_to_event(bad)
    batch = split_body(json.dumps([ce, {"id": "nodata"}]).encode(), "application/cloudevents-batch+json")
    assert batch.raws[1] is None and 1 in batch.problems and not batch.single


def test_cloudevent_data_base64_is_the_base64_of_the_json_data():
    data = {"tenant_id": "acme", "customer_id": "c", "properties": {"n": 1, "s": "\u00e9"}}
    ce = {"id": "ce1", "time": "2026-11-03T14:30:00Z", "type": "api_call",
          "data_base64": base64.b64encode(json.dumps(data).encode()).decode()}
    want = {**data, "event_id": "ce1", "timestamp": "2026-11-03T14:30:00Z", "event_type": "api_call"}
    assert json.loads(cloudevent_to_event(ce)) == want
    assert json.loads(cloudevent_to_event({**ce, "datacontenttype": "application/json; charset=utf-8"})) == want
    assert json.loads(cloudevent_to_event({**ce, "datacontenttype": "application/cloudevents+json"})) == want
    for bad, why in (({**ce, "data": data}, "not both"), ({**ce, "data_base64": "not base64!"}, "not valid base64"),
                     ({**ce, "data_base64": base64.b64encode(b"{nope").decode()}, "does not decode to JSON"),
                     ({**ce, "data_base64": base64.b64encode(b"[1]").decode()}, "must be a JSON object"),
                     ({**ce, "data_base64": 12}, "must be a base64 string"),
                     ({**ce, "datacontenttype": "text/plain"}, "must hold JSON")):
        with pytest.raises(ValueError, match=why):
            cloudevent_to_event(bad)


@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.none()),
                                max_size=4), max_size=8))
def test_a_json_array_splits_into_its_elements(items):
    body = json.dumps(items).encode()
    assert [json.loads(r) for r in split_body(body, "application/json").raws] == items


def test_a_busy_metrics_port_is_a_meter_error_saying_what_to_do():
    import socket

    from meterflow.base.errors import MeterError
    from meterflow.sinks.metrics import enabled, start_metrics_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(MeterError, match="choose a free port"):
            start_metrics_server(s.getsockname()[1], addr="127.0.0.1")
    assert not enabled()  # a failed start instruments nothing
