"""The JSONL source: lines, line numbers, resume offsets, and a UTF-8 byte-order mark at the start of a file."""

from __future__ import annotations

from meterflow.sources.jsonl import BOM, JsonlSource

EV = b'{"event_id": "e%d", "tenant_id": "acme", "customer_id": "c", "event_type": "api_call", "timestamp": 1}'


def read_all(path, resume=None, batch=2):
    part = JsonlSource([str(path)], batch_lines=batch).build_part("in", str(path), resume)
    out, states = [], []
    try:
        while True:
            out += part.next_batch()
            states.append(part.snapshot())
    except StopIteration:
        pass
    finally:
        part.close()
    return out, states


def test_a_byte_order_mark_at_the_start_of_a_file_is_not_part_of_the_first_event(tmp_path):
    path = tmp_path / "bom.jsonl"
    body = b"".join(EV % i + b"\r\n" for i in range(1, 4))
    path.write_bytes(BOM + body)
    out, states = read_all(path)
    assert [src for src, _ in out] == [(str(path), 1), (str(path), 2), (str(path), 3)]
    assert [raw for _, raw in out] == [EV % 1, EV % 2, EV % 3]
    # offsets count the bytes as they are in the file, BOM included: a resume continues exactly
    assert states[-1] == (len(BOM) + len(body), 3)
    rest, _ = read_all(path, resume=states[0])
    assert [raw for _, raw in rest] == [EV % 3]


def test_only_a_leading_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "mid.jsonl"
    path.write_bytes(EV % 1 + b"\n" + BOM + EV % 2 + b"\n")
    out, _ = read_all(path, batch=1)
    assert [raw for _, raw in out] == [EV % 1, BOM + EV % 2]  # mid-file it is bad input: a dead letter downstream
