"""Session fixtures backed by real services (no mocks, no silent skips).

* ``kafka``: a real Apache Kafka broker (single-node KRaft, broker+controller
  combined) run from the jars that ``./dev setup`` fetches from Maven Central.
* ``redis_server``: Debian's ``redis-server`` on a free port.
* ``chdb_path`` / ``ch_database``: embedded ClickHouse (chDB). chDB allows only
  ONE data path per process, so every in-process test shares ``chdb_path`` and
  isolates itself with its own database name from ``ch_database``.

If Kafka or Redis cannot start, the fixture FAILS (it never skips): run
``./dev setup`` to install what is missing.

``--clock-ahead 730d`` runs the session with the wall clock (``time.time``, ``datetime.now``, ...) that
far ahead of today, ticking (time-machine): ``./dev test`` runs the tests that need no broker this way once
more, so a test whose outcome depends on today's date fails today rather than on a later day.
Monotonic clocks (timeouts, benchmarks) are left alone.

``--core native`` runs the session on the native core (``pipeline.core = "native"``): every configuration
that does not name its core gets it, in process (``parse_config``, even with an explicit ``environ``) and
in the ``meter`` subprocesses (``METER_PIPELINE_CORE``). ``./dev test`` runs a fast subset this way.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from meterflow.devservices import DevServiceError, KafkaBroker, RedisServer

# ``client`` (redis-py on the session's redis-server) and ``tenant`` (a unique tenant id) for Redis tests.
pytest_plugins = ["tests.redis_support"]


def pytest_addoption(parser) -> None:
    parser.addoption("--clock-ahead", default=None, metavar="DURATION",
                     help="run with the wall clock this far ahead of now (e.g. 730d): the time-bomb guard")
    parser.addoption("--core", default="python", choices=("python", "native"),
                     help="the pipeline.core of every configuration that does not name one (native: the Rust core)")
    parser.addoption("--hypothesis-scale", default=1.0, type=float, metavar="F",
                     help="run F times each property test's max_examples (at least 10): the clock guard's reruns")


_TRAVEL = []
_TALLY_FILE: list = []  # --core native: the file the meter subprocesses append their native fold tally to


def pytest_configure(config) -> None:
    if config.getoption("--core") == "native":
        _default_core_native()
    ahead = config.getoption("--clock-ahead")
    if not ahead:
        return
    import time_machine

    from meterflow.base.timeutil import parse_duration_ms

    try:
        shift = timedelta(milliseconds=parse_duration_ms(ahead))
    except ValueError as exc:
        raise pytest.UsageError(f"--clock-ahead: {exc}") from None
    traveller = time_machine.travel(datetime.now(timezone.utc) + shift, tick=True)
    traveller.start()
    _TRAVEL.append(traveller)
    _skip_in_process_dataflows()


_SCALED: list = []  # --hypothesis-scale: the property tests whose example counts were scaled

# The longest test files, longest first (--durations of a CI run; seconds of the whole file on 2 cores). Under
# pytest-xdist (./dev test runs the suite on METERFLOW_TEST_WORKERS=2 processes, --dist load) the workers take the
# tests in collection order from one queue, so these go first: a long test that starts last would leave the other
# worker idle until it ends. A serial run keeps the collection order.
SLOW_FIRST = (
    "tests/e2e/test_crash_resume.py",  # 251 s
    "tests/e2e/test_cluster.py",  # 117 s
    "tests/e2e/test_broker_outage.py",  # 93 s
    "tests/e2e/test_alerts_e2e.py",  # 81 s
    "tests/operators/test_entitlement_properties.py",  # 47 s
    "tests/operators/test_meter_properties.py",  # 32 s
    "tests/reconcile/test_reconcile_e2e.py",  # 26 s
    "tests/operators/test_native_dedupe.py",  # 26 s
    "tests/e2e/test_review_e2e.py",  # 24 s
    "tests/e2e/test_kafka_pipeline.py",  # 23 s
    "tests/operators/test_batch_partition.py",  # 20 s
    "tests/e2e/test_operator_errors.py",  # 19 s
    "tests/e2e/test_review_kafka_e2e.py",  # 18 s
    "tests/dataflows/test_native_dedupe_flow.py",  # 17 s
    "tests/operators/test_native_mediate.py",  # 17 s
    "tests/e2e/test_bad_input.py",  # 17 s
    "tests/e2e/test_state_upgrade.py",  # 16 s
    "tests/e2e/test_exit_state_e2e.py",  # 16 s
    "tests/dataflows/test_native_anomaly_flow.py",  # 14 s
    "tests/test_devservices.py",  # 14 s
)


def _slow_first(items) -> None:
    """Stable: the files of SLOW_FIRST in its order, then every other test in collection order."""
    rank = {path: n for n, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_collection_modifyitems(config, items) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _slow_first(items)  # every worker collects, and sorts the same way (xdist checks they agree)
    _scale_hypothesis(config, items)


def _scale_hypothesis(config, items) -> None:
    """``--hypothesis-scale F``: each property test runs F times its ``max_examples`` (at least 10). The clock
    guard reruns the tests with the wall clock two years ahead to catch a dependence on today's date, not to
    search the input space again: it runs them at a fifth (``./dev test-clock``)."""
    scale = config.getoption("--hypothesis-scale")
    if scale == 1.0:
        return
    if not scale > 0:
        raise pytest.UsageError("--hypothesis-scale: expected a number above 0")
    from hypothesis import settings

    done = set()
    for item in items:
        test = getattr(item, "obj", None)
        if not getattr(test, "is_hypothesis_test", False) or id(test) in done:
            continue
        done.add(id(test))
        # (the settings @settings and @given leave on the test, which @given's wrapper reads when it runs)
        current = getattr(test, "_hypothesis_internal_use_settings", None) or settings.default
        n = max(10, round(current.max_examples * scale))
        test._hypothesis_internal_use_settings = settings(current, max_examples=n)
        _SCALED.append((item.nodeid, current.max_examples, n))


def _default_core_native() -> None:
    """``--core native``: configurations that do not name their core get ``pipeline.core = "native"``."""
    import os

    from meterflow.operators import native
    from meterflow.schemas import config as config_module

    if not native.AVAILABLE:
        raise pytest.UsageError("--core native: meterflow_native is not built (./dev setup with cargo)")
    os.environ["METER_PIPELINE_CORE"] = "native"  # configurations read with os.environ
    os.environ["METERFLOW_TEST_CORE"] = "native"  # meter subprocesses of tests/e2e (their env drops METER_*)
    # the customers each meter subprocess folded natively (operators/native.py FOLD_TALLY), for the summary
    tally = tempfile.NamedTemporaryFile(prefix="meterflow-native-tally-", suffix=".jsonl", delete=False)
    tally.close()
    os.environ["METERFLOW_NATIVE_TALLY"] = tally.name
    _TALLY_FILE.append(tally.name)
    parse = config_module.parse_config

    def parse_native(raw, source="<memory>", environ=None):
        pipeline = raw.get("pipeline") if isinstance(raw, dict) else None
        if isinstance(raw, dict) and not (isinstance(pipeline, dict) and "core" in pipeline):
            raw = dict(raw, pipeline=dict(pipeline or {}, core="native"))
        return parse(raw, source, environ)

    config_module.parse_config = parse_native


def _skip_in_process_dataflows() -> None:
    """Under the guard, a test that runs a Bytewax dataflow in this process is skipped when it starts one.

    time-machine moves Python's clock only: Bytewax's scheduler keeps the real one, so a flush tick the
    flow asks for two years ahead would never come. Those tests run on the real clock in the main pass.
    """
    import bytewax.run
    import bytewax.testing

    def refuse(*args, **kwargs):
        pytest.skip("runs a Bytewax dataflow in-process: its Rust scheduler is not on the moved clock")

    bytewax.testing.run_main = refuse
    bytewax.testing.cluster_main = refuse
    bytewax.run.cli_main = refuse


def pytest_report_header(config) -> str | None:
    if config.getoption("--core") == "native":
        return "core: native (pipeline.core = \"native\" for every configuration that does not name one)"
    lines = []
    if _TRAVEL:
        lines.append(f"clock guard: wall clock moved {config.getoption('--clock-ahead')} ahead, now "
                     f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    if config.getoption("--hypothesis-scale") != 1.0:
        lines.append(f"hypothesis: each property test runs {config.getoption('--hypothesis-scale'):g} x its "
                     "max_examples (at least 10)")
    return lines or None


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """``--core native``: how many customers really ran on the native fold, in this process and in the meter
    subprocesses of tests/e2e (operators/native.py FOLD_TALLY); ``--hypothesis-scale``: the examples run."""
    if _SCALED:
        before, after = sum(n for _id, n, _m in _SCALED), sum(m for _id, _n, m in _SCALED)
        terminalreporter.write_line(f"hypothesis scale: {len(_SCALED)} property tests, {after:,} examples at most "
                                    f"instead of {before:,}")
    if config.getoption("--core") != "native" or not _TALLY_FILE:
        return
    import json
    import os

    from meterflow.operators import native

    here = native.FOLD_TALLY.snapshot()
    sub = {"native": 0, "python": 0, "released": 0, "processes": 0}
    with open(_TALLY_FILE[0], encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d.pop("pid") != os.getpid():
                sub["processes"] += 1
                for k, v in d.items():
                    sub[k] += v
    os.unlink(_TALLY_FILE[0])
    terminalreporter.write_line(
        f"native fold: in process {here.get('native', 0)} customers native, {here.get('python', 0)} on Python, "
        f"{here.get('released', 0)} released; meter subprocesses ({sub['processes']}): {sub['native']} native, "
        f"{sub['python']} on Python, {sub['released']} released")


def pytest_unconfigure(config) -> None:
    while _TRAVEL:
        _TRAVEL.pop().stop()


def _start(service) -> str | None:
    """Start ``service``; return an error message instead of raising."""
    try:
        service.start()
    except (DevServiceError, OSError) as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def kafka():
    """A started :class:`meterflow.devservices.KafkaBroker` (``.bootstrap``, ``.create_topic``)."""
    broker = KafkaBroker()
    error = _start(broker)
    if error:
        pytest.fail(f"could not start the Kafka broker: {error}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_server():
    """A started :class:`meterflow.devservices.RedisServer` (``.url``, ``.kill()``, ``.restart()``)."""
    server = RedisServer()
    error = _start(server)
    if error:
        pytest.fail(f"could not start redis-server: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory) -> str:
    """The one chDB data path for this test process (share it; use ``ch_database``)."""
    return str(tmp_path_factory.mktemp("chdb"))


@pytest.fixture
def ch_database() -> str:
    """A fresh, unique ClickHouse database name, e.g. ``meter_t_3f9c0a1b2d4e``."""
    return f"meter_t_{uuid.uuid4().hex[:12]}"
