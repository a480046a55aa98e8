"""The meter step's own metrics (``meter run --metrics-port``): each shard batch's processing time in
``meterflow_batch_seconds`` and each recovery snapshot's build time in ``meterflow_snapshot_seconds``, observed
by the real Bytewax flow; without ``--metrics-port`` the step runs the plain logic and observes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from meterflow.dataflows.metering import _ShardLogic, build_flow
from meterflow.sinks import metrics
from tests.dataflows.test_shards import event, make_config, with_shards


def _counts():
    return {name: metrics.REGISTRY.get_sample_value(name + "_count")
            for name in ("meterflow_batch_seconds", "meterflow_snapshot_seconds")}


def _run(tmp_path, recovery):
    out = []
    events = [event(i, f"c{i % 3}") for i in range(1, 13)]
    flow = build_flow(with_shards(make_config(), 1), TestingSource(events, batch_size=3), [("out", TestingSink(out))],
                      recoverable=recovery)
    rc = None
    if recovery:
        init_db_dir(tmp_path, 1)
        rc = RecoveryConfig(tmp_path)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=rc)
    assert out, "the flow emitted its rows"


@pytest.fixture
def metrics_on():
    metrics.enable()
    try:
        yield
    finally:
        metrics._state["enabled"] = False


def test_the_flow_times_the_meter_steps_batches_and_snapshots(tmp_path, metrics_on):
    before = _counts()
    _run(tmp_path, recovery=True)
    after = _counts()
    # 12 events in batches of 3, every customer in the one shard: one on_batch per input batch.
    assert after["meterflow_batch_seconds"] - before["meterflow_batch_seconds"] == 4
    assert after["meterflow_snapshot_seconds"] - before["meterflow_snapshot_seconds"] >= 1
    assert metrics.REGISTRY.get_sample_value("meterflow_batch_seconds_sum") > 0


def test_without_recovery_no_snapshot_is_timed(tmp_path, metrics_on):
    before = _counts()
    _run(tmp_path, recovery=False)
    after = _counts()
    assert after["meterflow_batch_seconds"] - before["meterflow_batch_seconds"] == 4
    assert after["meterflow_snapshot_seconds"] == before["meterflow_snapshot_seconds"]


def test_without_metrics_port_the_plain_logic_runs_and_nothing_is_observed(tmp_path):
    assert not metrics.enabled()
    assert metrics.timed_logic(_ShardLogic) is _ShardLogic
    before = _counts()
    _run(tmp_path, recovery=True)
    assert _counts() == before
    metrics.enable()
    try:
        timed = metrics.timed_logic(_ShardLogic)
        assert timed is not _ShardLogic and issubclass(timed, _ShardLogic)
        assert metrics.timed_logic(_ShardLogic) is timed  # built once
    finally:
        metrics._state["enabled"] = False
