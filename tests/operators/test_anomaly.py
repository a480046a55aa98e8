"""Anomaly alerts (contract section 7): usage of a UTC day above factor x the trailing daily average, fired on the
crossing event, once per customer, metric and day; config validation; snapshot/restore."""

from __future__ import annotations

import json

import pytest

from meterflow.base.errors import ConfigError
from meterflow.operators.anomaly import DAY_MS
from meterflow.operators.meter import CustomerMeter
from meterflow.schemas import state as S
from meterflow.schemas.alerts import alert_id
from meterflow.schemas.config import parse_config
from tests.operators.test_meter import BASE_CFG, Run, ev, ms

DAY0 = ms("2026-11-01T00:00:00Z")


def make_config(anomaly=None, **pipeline):
    raw = json.loads(json.dumps(BASE_CFG))
    raw["pipeline"].update(pipeline)
    if anomaly is not None:
        raw["anomaly"] = anomaly
    return parse_config(raw, "test.toml", environ={})


def e(eid, ts, cust="c1", **kw):
    return ev(eid, ts, cust=cust, **kw)


def at(day, hour=12, minute=0):
    return DAY0 + day * DAY_MS + hour * 3_600_000 + minute * 60_000


def anomalies(run):
    return [a for em in run.emissions for a in em.alerts if a.type == "anomaly"]


def history(run, days, per_day=10, cust="c1", tokens=None):
    """``per_day`` api calls on each of ``days`` (day numbers from DAY0), at spread hours."""
    n = 0
    for d in days:
        for i in range(per_day):
            n += 1
            props = {} if tokens is None else {"tokens": tokens}
            run.feed(e(f"h{d}_{i}", at(d, i % 24), cust=cust, **props))


def test_fires_on_the_event_that_first_goes_above_factor_times_baseline_once_per_day():
    run = Run(make_config({"factor": 3.0, "baseline_days": 7, "min_history_days": 3, "metrics": ["api_calls"]}))
    history(run, range(7))  # 10 a day: baseline 10, level 30
    for i in range(30):
        run.feed(e(f"s{i}", at(7, 1, i)))
    assert anomalies(run) == []  # exactly 3x is not above
    run.feed(e("s30", at(7, 2)))
    run.feed(e("s31", at(7, 3)))
    (a,) = anomalies(run)
    assert (a.event_id, a.metric, a.usage, a.baseline, a.factor) == ("s30", "api_calls", 31.0, 10.0, 3.0)
    assert (a.threshold_pct, a.usage_pct, a.action, a.included) == (300.0, 310.0, "notify", None)
    assert (a.period_start, a.period_end) == ("2026-11-08T00:00:00Z", "2026-11-09T00:00:00Z")
    assert a.alert_id == alert_id("anomaly", "acme", "c1", "api_calls", DAY0 + 7 * DAY_MS)
    assert a.event_time == "2026-11-08T02:00:00Z"


def test_too_little_history_and_zero_baseline_are_not_judged():
    run = Run(make_config({"factor": 2.0, "baseline_days": 30, "min_history_days": 3, "metrics": ["api_calls"]}))
    history(run, [0], per_day=1)
    history(run, [2], per_day=50)  # H = 2 < 3: not judged however high
    assert anomalies(run) == []
    history(run, [3], per_day=200)  # H = 3, N = 3, baseline (1 + 0 + 50) / 3 = 17: fires at 35
    (a,) = anomalies(run)
    assert (a.usage, a.baseline) == (35.0, 17.0)
    # A customer whose history is only zero-valued sums: baseline 0, never judged.
    run2 = Run(make_config({"factor": 2.0, "baseline_days": 5, "min_history_days": 1, "metrics": ["tokens"]}))
    history(run2, range(4), per_day=2, tokens=0)
    history(run2, [4], per_day=3, tokens=500)
    assert anomalies(run2) == []


def test_days_without_usage_count_as_zero_and_the_average_is_over_n_days():
    run = Run(make_config({"factor": 2.0, "baseline_days": 4, "min_history_days": 1, "metrics": ["api_calls"]}))
    history(run, [0], per_day=12)
    # day 5: H = 5, N = 4, days 1..4 have nothing: baseline 0, not judged
    history(run, [5], per_day=1)
    assert anomalies(run) == []
    # day 6: N = 4, days 2..5 = 0, 0, 0, 1: baseline 0.25, level 0.5: the first event fires
    history(run, [6], per_day=1)
    (a,) = anomalies(run)
    assert (a.usage, a.baseline, a.usage_pct) == (1.0, 0.25, 400.0)


def test_corrections_exclusions_and_duplicates_apply():
    run = Run(make_config({"factor": 2.0, "baseline_days": 3, "min_history_days": 1, "metrics": ["api_calls"]}))
    history(run, range(3), per_day=5)  # baseline 5, level 10
    for i in range(10):
        run.feed(e(f"x{i}", at(3, 1, i), cust="c1"))
    run.feed(e("x9", at(3, 2), cust="c1"))  # a duplicate does not count
    run.feed(e("t1", at(3, 3), cust="c1", environment="test"))  # excluded
    run.feed(e("cust_internal_1", at(3, 3), cust="cust_internal"))  # excluded customer
    run.feed(e("corr", at(3, 4), cust="c1", correction=True))  # 9
    run.feed(e("y1", at(3, 5), cust="c1"))  # 10
    assert anomalies(run) == []
    run.feed(e("y2", at(3, 6), cust="c1"))  # 11 > 10
    assert [a.event_id for a in anomalies(run)] == ["y2"]


def test_late_event_updates_its_own_day_and_can_fire_it():
    run = Run(make_config({"factor": 2.0, "baseline_days": 3, "min_history_days": 1, "metrics": ["api_calls"]},
                          late_grace="1d"))
    history(run, range(3), per_day=4)  # day 3's baseline 4, level 8
    history(run, [3], per_day=8)
    run.feed(e("d4", at(4, 0, 5)))  # day 4 starts
    run.feed(e("late", at(3, 23)))  # day 3 reaches 9 > 8: fires for day 3
    (a,) = anomalies(run)
    assert (a.event_id, a.period_start, a.usage) == ("late", "2026-11-04T00:00:00Z", 9.0)
    # day 4's baseline now includes day 3's late event: (4 + 4 + 9) / 3, level 11.33: 12 events fire
    for i in range(10):
        run.feed(e(f"e4_{i}", at(4, 2, i)))
    assert len(anomalies(run)) == 1
    run.feed(e("e4_10", at(4, 3)))  # 12
    assert [a.event_id for a in anomalies(run)] == ["late", "e4_10"]


def test_day_beyond_the_judging_horizon_is_not_judged_but_still_counts():
    cfg = make_config({"factor": 2.0, "baseline_days": 2, "min_history_days": 1, "metrics": ["api_calls"]},
                      late_grace="6h")  # late_days 1
    run = Run(cfg)
    history(run, range(4), per_day=2)
    run.feed(e("d6", at(6, 1)))  # latest day 6: days >= 5 judged, days >= 3 kept
    history(run, [4], per_day=10)  # day 4 is beyond the horizon: no alert, but counted
    assert anomalies(run) == []
    # day 6: N = 2, days 4, 5 = 10, 0: baseline 5, level 10
    for i in range(9):
        run.feed(e(f"e6_{i}", at(6, 2, i)))  # 10 on day 6 (with d6): not above
    assert anomalies(run) == []
    run.feed(e("e6_9", at(6, 3)))
    assert [a.event_id for a in anomalies(run)] == ["e6_9"]
    m = run.meters["acme|c1"]
    (row,) = m.anom.to_state()
    assert (row.start, len(row.usage)) == (DAY0 // DAY_MS + 3, 4)  # baseline_days + late_days + 1 numbers


def test_no_anomaly_section_means_no_state_and_no_alerts():
    run = Run(make_config())
    history(run, range(8), per_day=1)
    history(run, [8], per_day=100)
    assert anomalies(run) == []
    m = run.meters["acme|c1"]
    assert m.anom is None and S.decode_meter_state(m.snapshot()).anomaly == []


def test_default_metrics_are_every_count_and_sum_metric():
    run = Run(make_config({"factor": 2.0, "baseline_days": 2, "min_history_days": 2}))
    history(run, range(2), per_day=1, tokens=10)
    history(run, [2], per_day=3, tokens=10)
    assert sorted(a.metric for a in anomalies(run)) == ["api_calls", "tokens", "tokens_by_region"]


def test_snapshot_restore_keeps_history_and_fired_days():
    cfg = make_config({"factor": 2.0, "baseline_days": 3, "min_history_days": 1, "metrics": ["api_calls"]})
    run = Run(cfg)
    history(run, range(3), per_day=3)
    run.feed(e("a1", at(3, 1)), e("a2", at(3, 1, 1)), e("a3", at(3, 1, 2)))
    run.restore_all()
    run.feed(e("a4", at(3, 2)), e("a5", at(3, 2, 1)), e("a6", at(3, 2, 2)))
    run.feed(e("a7", at(3, 3)))
    assert [a.event_id for a in anomalies(run)] == ["a7"]
    run.restore_all()
    run.feed(e("a8", at(3, 4)))
    assert [a.event_id for a in anomalies(run)] == ["a7"]
    m = run.meters["acme|c1"]
    again = CustomerMeter.from_snapshot(m.rules, m.snapshot())
    assert again.snapshot() == m.snapshot()
    assert not again.is_empty()


def test_older_snapshot_without_anomaly_field_loads():
    old = S.MeterState(key="acme|c1", version=S.STATE_VERSION)
    data = S.encode_meter_state(old)
    assert b"anomaly" not in data
    run = Run(make_config({"factor": 2.0, "baseline_days": 3, "min_history_days": 1}))
    m = CustomerMeter(run.rules, "acme|c1", data)
    assert m.anom is not None and not m.anom


@pytest.mark.parametrize("anomaly, key", [
    ({"factor": 1.0}, "anomaly.factor"),
    ({"factor": 0.5}, "anomaly.factor"),
    ({"baseline_days": 0}, "anomaly.baseline_days"),
    ({"min_history_days": 0}, "anomaly.min_history_days"),
    ({"metrics": ["nope"]}, "anomaly.metrics[0]"),
    ({"metrics": ["api_calls", "peak"]}, "anomaly.metrics[1]"),
    ({"factor": "x"}, "anomaly.factor"),
    ({"window": 3}, "anomaly"),
])
def test_config_errors_are_one_line_naming_the_key(anomaly, key):
    with pytest.raises(ConfigError) as exc:
        make_config(anomaly)
    msg = str(exc.value)
    assert "\n" not in msg and f"'{key}'" in msg, msg


def test_the_anomaly_section_takes_environment_overrides_like_the_others():
    raw = json.loads(json.dumps(BASE_CFG))
    raw["anomaly"] = {"factor": 3.0, "metrics": ["api_calls"]}
    cfg = parse_config(raw, "test.toml", environ={"METER_ANOMALY_FACTOR": "4.5", "METER_ANOMALY_BASELINE_DAYS": "14",
                                                  "METER_ANOMALY_METRICS": "api_calls, tokens"})
    assert cfg.anomaly is not None
    assert (cfg.anomaly.factor, cfg.anomaly.baseline_days, cfg.anomaly.min_history_days, cfg.anomaly.metrics) == \
        (4.5, 14, 7, ["api_calls", "tokens"])
    assert raw["anomaly"] == {"factor": 3.0, "metrics": ["api_calls"]}  # the caller's document is untouched
    # Like METER_REDIS_URL, a variable of an absent section turns it on (with the defaults for the rest).
    cfg = parse_config(json.loads(json.dumps(BASE_CFG)), "test.toml", environ={"METER_ANOMALY_MIN_HISTORY_DAYS": "3"})
    assert cfg.anomaly is not None and (cfg.anomaly.factor, cfg.anomaly.min_history_days) == (3.0, 3)
    for env, key in (({"METER_ANOMALY_FACTOR": "1"}, "anomaly.factor"),
                     ({"METER_ANOMALY_BASELINE_DAYS": "a month"}, "anomaly.baseline_days"),
                     ({"METER_ANOMALY_METRICS": "api_calls,peak"}, "anomaly.metrics[1]")):
        with pytest.raises(ConfigError) as exc:
            parse_config(json.loads(json.dumps(BASE_CFG)), "test.toml", environ=env)
        assert "\n" not in str(exc.value) and f"'{key}'" in str(exc.value), str(exc.value)


def test_the_deploy_configs_commented_anomaly_example_is_valid_once_uncommented(tmp_path):
    import re
    from pathlib import Path

    from meterflow.schemas.config import load_config

    text = (Path(__file__).resolve().parents[2] / "deploy" / "meterflow.toml").read_text()
    assert load_config(_write(tmp_path / "as-shipped.toml", text), environ={}).anomaly is None
    on = re.sub(r"^# (\[anomaly\]|factor|baseline_days|min_history_days|metrics)", r"\1", text, flags=re.M)
    a = load_config(_write(tmp_path / "on.toml", on), environ={}).anomaly
    assert a is not None and (a.factor, a.baseline_days, a.min_history_days, a.metrics) == \
        (3.0, 30, 7, ["api_calls", "tokens"])


def _write(path, text):
    path.write_text(text)
    return path
