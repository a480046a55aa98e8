"""The single writer of a cluster (meterflow.sinks.single_writer): who writes what, and that it really routes.

The two-process end-to-end test (real broker, real chDB) is tests/e2e/test_cluster.py; here: the sinks each
process builds from a configuration, a real in-process Bytewax run of 2 workers whose items all reach ONE
built partition, and the one-line errors of ``meter run --addresses/--process-id``.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, List, Tuple

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, cluster_main

from meterflow.base.errors import MeterError
from meterflow.dataflows.metering import flow_from_config, sinks_from_config
from meterflow.runner import cluster_addresses
from meterflow.sample import sample_config_toml
from meterflow.schemas.config import parse_config
from meterflow.sinks.clickhouse import ClickHouseSink
from meterflow.sinks.single_writer import PARTITION, SingleWriterSink, writer_item


def _config(tmp_path, dsn: str):
    import tomllib

    text = sample_config_toml(["t1"], {"t1": ["c1"]}, "2026-01-01T00:00:00Z")
    text += (f'\n[clickhouse]\ndsn = "{dsn}"\n[alerts]\njsonl = "{tmp_path / "alerts.jsonl"}"\n'
             '[kafka]\nbootstrap_servers = "127.0.0.1:9"\nevents_topic = "e"\n')
    return parse_config(tomllib.loads(text), "test.toml", environ={})


def _kinds(sinks) -> List[Tuple[str, str]]:
    return [(name, type(s).__name__ + (f"({type(s.inner).__name__})" if isinstance(s, SingleWriterSink) else ""))
            for name, s in sinks]


def test_one_process_builds_the_sinks_of_before_whatever_the_dsn(tmp_path):
    for dsn in (f"chdb://{tmp_path}/ch", "http://localhost:8123/meter"):
        sinks = sinks_from_config(_config(tmp_path, dsn))
        assert not any(isinstance(s, SingleWriterSink) for _n, s in sinks)
        assert _kinds(sinks) == _kinds(sinks_from_config(_config(tmp_path, dsn), processes=1, process_id=0))
        assert isinstance(dict(sinks)["clickhouse"], ClickHouseSink)


def test_a_cluster_on_embedded_chdb_has_one_writer_of_chdb_and_of_the_alert_file(tmp_path):
    cfg = _config(tmp_path, f"chdb://{tmp_path}/ch")
    one = _kinds(sinks_from_config(cfg))
    for pid in (0, 1):
        sinks = sinks_from_config(cfg, processes=2, process_id=pid)
        kinds = dict(_kinds(sinks))
        assert kinds["clickhouse"] == "SingleWriterSink(ClickHouseSink)"
        assert kinds["alerts_jsonl"] == "SingleWriterSink(JsonlAlertSink)"
        # everything else (Kafka topics, ...) stays per worker, in the same order
        assert [(n, k) for n, k in _kinds(sinks) if n not in ("clickhouse", "alerts_jsonl")] == \
            [(n, k) for n, k in one if n not in ("clickhouse", "alerts_jsonl")]
        parts = {n: s.list_parts() for n, s in sinks if isinstance(s, SingleWriterSink)}
        assert parts == ({"clickhouse": [PARTITION], "alerts_jsonl": [PARTITION]} if pid == 0
                         else {"clickhouse": [], "alerts_jsonl": []})


def test_a_cluster_on_a_clickhouse_server_writes_it_from_every_worker(tmp_path):
    sinks = dict(sinks_from_config(_config(tmp_path, "http://localhost:8123/meter"), processes=2, process_id=1))
    assert isinstance(sinks["clickhouse"], ClickHouseSink)
    assert isinstance(sinks["alerts_jsonl"], SingleWriterSink)  # a local file still has one writer


def test_only_a_cluster_flow_has_the_routing_step(tmp_path):
    cfg = _config(tmp_path, f"chdb://{tmp_path}/ch")
    (tmp_path / "x.jsonl").write_text("")

    def steps(flow: Dataflow) -> List[str]:
        return [s.step_id for s in flow.substeps]

    one = steps(flow_from_config(cfg, inputs=[str(tmp_path / "x.jsonl")], recoverable=False))
    assert "meterflow.to_single_writer" not in one
    two = steps(flow_from_config(cfg, inputs=[str(tmp_path / "x.jsonl")], recoverable=False, processes=2))
    assert [s for s in two if s != "meterflow.to_single_writer"] == one
    assert "meterflow.to_single_writer" in two


class _Recorder(DynamicSink[Any]):
    """Records which worker built a partition and what each partition wrote."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.builds: List[Tuple[int, int]] = []
        self.written: List[Any] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Any]:
        rec = self
        with rec.lock:
            rec.builds.append((worker_index, worker_count))

        class Part(StatelessSinkPartition[Any]):
            def write_batch(self, items: List[Any]) -> None:
                with rec.lock:
                    rec.written.extend(items)

        return Part()


def test_every_workers_items_reach_the_one_partition_built_once():
    inner, per_worker = _Recorder(), _Recorder()
    flow = Dataflow("single_writer_test")
    # Each worker gets some of the 200 items (TestingSource partitions by worker), then sends them on.
    items = op.input("in", flow, TestingSource(list(range(200)), batch_size=7))
    spread = op.redistribute("spread", items)
    op.output("per_worker", spread, per_worker)
    op.output("single", op.map("key", spread, writer_item), SingleWriterSink(inner, process_id=0))
    cluster_main(flow, [], 0, worker_count_per_proc=2, epoch_interval=timedelta(milliseconds=50))
    assert sorted(per_worker.builds) == [(0, 2), (1, 2)]
    assert inner.builds == [(0, 1)]  # one partition, built once, on one worker
    assert sorted(inner.written) == list(range(200))


@pytest.mark.parametrize("addresses,pid,message", [
    ("127.0.0.1:2101;127.0.0.1:2102", None, "a cluster needs both --addresses"),
    (None, 0, "a cluster needs both --addresses"),
    ("127.0.0.1:2101;127.0.0.1:2102", 2, "--process-id 2 is not an index of the 2 addresses"),
    ("127.0.0.1:2101;localhost", 0, "'localhost' is not host:port"),
    ("127.0.0.1:0", 0, "'127.0.0.1:0' is not host:port"),
    (" ; ", 0, "--addresses is empty"),
])
def test_cluster_arguments_are_checked_with_one_line_errors(addresses, pid, message):
    with pytest.raises(MeterError) as exc:
        cluster_addresses(addresses, pid)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cluster_arguments():
    assert cluster_addresses(None, None) == []
    assert cluster_addresses("127.0.0.1:2101; 127.0.0.1:2102", 1) == ["127.0.0.1:2101", "127.0.0.1:2102"]
