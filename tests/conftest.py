"""Session fixtures backed by real services (no mocks, no silent skips).

* ``kafka``: a real Apache Kafka broker (single-node KRaft, broker+controller
  combined) run from the jars that ``./dev setup`` fetches from Maven Central.
* ``redis_server``: Debian's ``redis-server`` on a free port.
* ``chdb_path`` / ``ch_database``: embedded ClickHouse (chDB). chDB allows only
  ONE data path per process, so every in-process test shares ``chdb_path`` and
  isolates itself with its own database name from ``ch_database``.

If Kafka or Redis cannot start, the fixture FAILS (it never skips): run
``./dev setup`` to install what is missing.
"""

from __future__ import annotations

import uuid

import pytest

from meterflow.devservices import DevServiceError, KafkaBroker, RedisServer

# ``client`` (redis-py on the session's redis-server) and ``tenant`` (a unique tenant id) for Redis tests.
pytest_plugins = ["tests.redis_support"]


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
