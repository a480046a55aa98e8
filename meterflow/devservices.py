"""Real backing services for tests, benchmarks and local development.

Nothing here is a mock:

* :class:`KafkaBroker` runs a genuine Apache Kafka broker (single node, KRaft,
  broker and controller combined) from the jars that ``./dev setup`` fetches
  from Maven Central into ``${METERFLOW_CACHE:-~/.cache/meterflow}``.
* :class:`RedisServer` runs Debian's ``redis-server`` binary.

Both bind to 127.0.0.1 on free ports (unless told otherwise), keep their data
in a temporary directory, and are killed when :meth:`stop` is called, when the
owning ``with`` block exits, or when the Python process exits.

:meth:`KafkaBroker.halt` stops the broker JVM but keeps its ports and data, and
:meth:`KafkaBroker.start` then brings the same broker back (outage tests).

``python -m meterflow.devservices`` (used by ``./dev services``) starts a
broker on 127.0.0.1:9092 and Redis on 6379 in the foreground.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import IO, Any, Dict, Mapping

__all__ = [
    "KAFKA_VERSION",
    "SCALA_VERSION",
    "DevServiceError",
    "KafkaBroker",
    "RedisServer",
    "cache_dir",
    "free_port",
    "java_executable",
    "kafka_libs_dir",
    "redis_server_executable",
]

#: Apache Kafka release fetched by ``./dev setup`` (keep in sync with ``dev``).
KAFKA_VERSION = os.environ.get("METERFLOW_KAFKA_VERSION", "4.1.1")
SCALA_VERSION = "2.13"

_SETUP_HINT = "run ./dev setup (it installs redis-server and fetches the Kafka jars)"


class DevServiceError(RuntimeError):
    """A development service could not be located, started or stopped."""


# --------------------------------------------------------------------------
# locating things
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$METERFLOW_CACHE`` or ``~/.cache/meterflow`` (same rule as ``./dev``)."""
    env = os.environ.get("METERFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "meterflow"


def kafka_libs_dir(version: str | None = None) -> Path:
    """Directory holding the Kafka broker jars for ``version``.

    Raises :class:`DevServiceError` telling the user to run ``./dev setup`` if
    the jars have not been fetched yet.
    """
    version = version or KAFKA_VERSION
    libs = cache_dir() / f"kafka-{version}" / "libs"
    core_jar = libs / f"kafka_{SCALA_VERSION}-{version}.jar"
    if not core_jar.is_file():
        raise DevServiceError(
            f"Apache Kafka {version} jars not found in {libs} "
            f"(missing {core_jar.name}); {_SETUP_HINT}"
        )
    return libs


def java_executable() -> str:
    """``$JAVA_HOME/bin/java`` if set, else ``java`` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if not found:
        raise DevServiceError(f"no `java` on PATH (Kafka needs Java 17+); {_SETUP_HINT}")
    return found


def redis_server_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise DevServiceError(f"`redis-server` not found on PATH; {_SETUP_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    return _free_ports(1, host)[0]


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    # Hold all sockets open together so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# child process plumbing
# --------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[_Service]" = weakref.WeakSet()


def _kill_all_at_exit() -> None:
    for svc in list(_LIVE):
        try:
            svc.kill()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


atexit.register(_kill_all_at_exit)


def _pdeathsig_preexec():
    """preexec_fn making the child get SIGKILL if its parent dies (Linux).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    it is only used when starting from the main thread; other threads rely on
    atexit/stop().
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover
        return None
    prctl = libc.prctl  # resolve before fork: the child only makes the call
    parent = os.getpid()

    def _preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent already gone
            os._exit(1)

    return _preexec


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _Service:
    """Shared process handling for the services below."""

    name = "service"

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._log_fh: IO[bytes] | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None

    # -- process helpers --------------------------------------------------
    def _spawn(self, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        assert self.workdir is not None and self.log_path is not None
        self._log_fh = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the child
            preexec_fn=_pdeathsig_preexec(),
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def _exit_code(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _fail(self, message: str) -> DevServiceError:
        log = _tail(self.log_path) if self.log_path else "(no log)"
        return DevServiceError(f"{self.name}: {message}\n--- last lines of {self.log_path} ---\n{log}")

    def kill(self) -> None:
        """SIGKILL the process at once (no graceful shutdown)."""
        self._signal_and_wait(signal.SIGKILL, timeout=10)
        self._close_log()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # subclasses implement
    def start(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------


def _random_cluster_id() -> str:
    # Same format as kafka-storage random-uuid: url-safe base64 of 16 random
    # bytes, no padding, never starting with '-' (it would parse as an option).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_LOG4J2_PROPERTIES = """\
status = warn
name = meterflow-devservices
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaBroker(_Service):
    """A single-node Apache Kafka (KRaft, broker+controller) on 127.0.0.1.

    Usage (the test fixtures in tests/conftest.py start one per session)::

        with KafkaBroker() as kafka:
            kafka.create_topic("events", partitions=3)
            producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap})
    """

    name = "kafka"

    #: Settings that make a one-node cluster behave; ``config`` overrides them.
    DEFAULT_CONFIG: dict[str, str] = {
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.retention.hours": "24",
    }

    def __init__(
        self,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        host: str = "127.0.0.1",
        libs_dir: str | os.PathLike | None = None,
        heap: str = "512m",
        config: Mapping[str, object] | None = None,
        startup_timeout: float = 60.0,
        keep_workdir: bool = False,
    ) -> None:
        super().__init__()
        self.host = host
        self._req_port = port
        self._req_controller_port = controller_port
        self.port: int | None = None
        self.controller_port: int | None = None
        self._libs_dir = Path(libs_dir) if libs_dir else None
        self.heap = heap
        self.extra_config = {k: str(v) for k, v in (config or {}).items()}
        self.startup_timeout = startup_timeout
        self.keep_workdir = keep_workdir
        self.cluster_id: str | None = None
        self.startup_seconds: float | None = None
        self._broker_argv: list[str] = []

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise DevServiceError("kafka: broker not started")
        return f"{self.host}:{self.port}"

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "KafkaBroker":
        """Start the broker; after :meth:`halt`, start the same broker again (same ports, data and cluster id)."""
        if self.is_running():
            return self
        if self.workdir is not None and (self.workdir / "server.properties").is_file():
            return self._relaunch()
        t0 = time.monotonic()
        libs = self._libs_dir or kafka_libs_dir()
        java = java_executable()

        if self._req_port is not None and self._req_controller_port is not None:
            self.port, self.controller_port = self._req_port, self._req_controller_port
        else:
            a, b = _free_ports(2, self.host)
            self.port = self._req_port if self._req_port is not None else a
            if self._req_controller_port is not None:
                self.controller_port = self._req_controller_port
            else:
                self.controller_port = b if b != self.port else a
        for p in (self.port, self.controller_port):
            if _port_open(self.host, p, timeout=0.2):
                raise DevServiceError(f"kafka: port {self.host}:{p} is already in use")

        self.workdir = Path(tempfile.mkdtemp(prefix="meterflow-kafka-"))
        self.log_path = self.workdir / "kafka.log"
        data_dir = self.workdir / "data"
        props_path = self.workdir / "server.properties"
        log4j_path = self.workdir / "log4j2.properties"

        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data_dir),
            **self.DEFAULT_CONFIG,
            **self.extra_config,
        }
        props_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j_path.write_text(_LOG4J2_PROPERTIES)

        classpath = f"{libs}{os.sep}*"
        jvm_common = [
            java,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j_path}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            classpath,
        ]

        # 1. format the storage directory (KRaft needs a cluster id up front)
        self.cluster_id = _random_cluster_id()
        fmt = subprocess.run(
            [
                *jvm_common[:1],
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                *jvm_common[1:],
                "kafka.tools.StorageTool",
                "format",
                "--config",
                str(props_path),
                "--cluster-id",
                self.cluster_id,
            ],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        with open(self.log_path, "a") as fh:
            fh.write(f"$ kafka-storage format (exit {fmt.returncode})\n{fmt.stdout}{fmt.stderr}\n")
        if fmt.returncode != 0:
            raise self._fail(f"storage format failed with exit code {fmt.returncode}")

        # 2. launch the broker, 3. wait until it serves metadata with itself as a live broker
        self._broker_argv = [
            *jvm_common[:1],
            f"-Xmx{self.heap}",
            f"-Xms{min(256, _mb(self.heap))}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            *jvm_common[1:],
            "kafka.Kafka",
            str(props_path),
        ]
        self._launch(t0)
        return self

    def _launch(self, t0: float) -> None:
        self._spawn(self._broker_argv)
        try:
            self._wait_ready(t0 + self.startup_timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _relaunch(self) -> "KafkaBroker":
        t0 = time.monotonic()
        for p in (self.port, self.controller_port):
            if p is None:
                continue
            deadline = t0 + 10  # the old process's sockets may linger a moment after it exited
            while _port_open(self.host, p, timeout=0.2):
                if time.monotonic() > deadline:
                    raise DevServiceError(f"kafka: port {self.host}:{p} is in use; cannot start the broker again")
                time.sleep(0.1)
        self._launch(t0)
        return self

    def halt(self, *, graceful: bool = True, timeout: float = 20.0) -> None:
        """Stop the broker process but keep its ports, cluster id and data directory, so that :meth:`start`
        brings the same broker back with its topics, messages and committed offsets (a real outage: the JVM
        exits, connections are refused). ``graceful`` sends SIGTERM (controlled shutdown, SIGKILL after
        ``timeout``); otherwise SIGKILL at once (a crash: the broker recovers its logs on start)."""
        if graceful:
            self._signal_and_wait(signal.SIGTERM, timeout=timeout)
        else:
            self._signal_and_wait(signal.SIGKILL, timeout=10)
        self._close_log()

    def _admin(self, timeout_ms: int = 5000):
        from confluent_kafka.admin import AdminClient

        conf: Dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "socket.timeout.ms": timeout_ms,
            "log_level": 0,  # keep librdkafka quiet while the broker boots
            "logger": _NullLogger(),
        }
        return AdminClient(conf)

    def _wait_ready(self, deadline: float) -> None:
        admin = None
        last_error: object = None
        while True:
            if not self.is_running():
                raise self._fail(f"broker process exited with code {self._exit_code} during startup")
            if time.monotonic() > deadline:
                raise self._fail(
                    f"broker did not become ready within {self.startup_timeout:.0f}s "
                    f"(last error: {last_error})"
                )
            if self.port is None or not _port_open(self.host, self.port, timeout=0.2):
                time.sleep(0.1)
                continue
            try:
                if admin is None:
                    admin = self._admin()
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
                last_error = "metadata lists no brokers yet"
            except Exception as exc:  # KafkaException while booting
                last_error = exc
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the broker down (SIGTERM, SIGKILL after ``timeout``) and clean up."""
        self._signal_and_wait(signal.SIGTERM, timeout=timeout)
        self._close_log()
        _LIVE.discard(self)
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- convenience -------------------------------------------------------
    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: Mapping[str, object] | None = None,
        *,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> str:
        """Create ``name`` and wait until every partition has a leader."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        admin = self._admin()
        topic = NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=1,
            config={k: str(v) for k, v in (config or {}).items()},
        )
        future = admin.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)[name]
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (exist_ok and getattr(err, "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
        deadline = time.monotonic() + timeout
        while True:
            md = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if (
                md is not None
                and md.error is None
                and len(md.partitions) >= partitions
                and all(p.leader >= 0 for p in md.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise DevServiceError(f"kafka: topic {name!r} has no leader after {timeout}s")
            time.sleep(0.05)

    def delete_topic(self, name: str, timeout: float = 30.0) -> None:
        admin = self._admin()
        admin.delete_topics([name], operation_timeout=timeout)[name].result(timeout=timeout)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<KafkaBroker {self.host}:{self.port} {state}>"


class _NullLogger:
    """A logging.Logger stand-in for librdkafka's ``logger`` option."""

    def log(self, *args, **kwargs) -> None:
        pass


def _mb(size: str) -> int:
    s = size.strip().lower()
    mult = {"k": 1 / 1024, "m": 1, "g": 1024}.get(s[-1:], None)
    return int(float(s[:-1]) * mult) if mult else int(int(s) / (1024 * 1024))


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


class RedisServer(_Service):
    """Debian's ``redis-server`` on 127.0.0.1, no persistence.

    :meth:`kill` and :meth:`restart` let tests simulate a Redis outage; the
    restarted server listens on the same port (and is empty).
    """

    name = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str | None = None,
        startup_timeout: float = 15.0,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevServiceError("redis: server not started")
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "RedisServer":
        if self.is_running():
            return self
        exe = self.executable or redis_server_executable()
        if self.port is None:
            self.port = free_port(self.host)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="meterflow-redis-"))
            self.log_path = self.workdir / "redis.log"
        self._spawn(
            [
                exe,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", str(self.workdir),
                "--logfile", "",
                *self.extra_args,
            ]
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ping():
            if not self.is_running():
                err = self._fail(f"redis-server exited with code {self._exit_code} during startup")
                self._close_log()
                raise err
            if time.monotonic() > deadline:
                err = self._fail(f"no PONG on {self.host}:{self.port} within {self.startup_timeout:.0f}s")
                self.kill()
                raise err
            time.sleep(0.02)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the server answers PING (raw RESP, no client library)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        self._signal_and_wait(signal.SIGTERM, timeout=timeout)
        self._close_log()
        _LIVE.discard(self)

    def restart(self) -> "RedisServer":
        """Stop (if running) and start again on the same port."""
        if self.is_running():
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def client(self, **kwargs):
        """A ``redis.Redis`` client for this server."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.host}:{self.port} {state}>"


# --------------------------------------------------------------------------
# ./dev services
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m meterflow.devservices",
        description="Run a real Kafka broker and redis-server in the foreground (Ctrl-C stops both).",
    )
    ap.add_argument("--kafka-port", type=int, default=9092)
    ap.add_argument("--kafka-controller-port", type=int, default=None)
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--kafka-heap", default="1g")
    ap.add_argument("--topic", action="append", default=[], metavar="NAME[:PARTITIONS]",
                    help="create a topic once the broker is up (repeatable)")
    args = ap.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    kafka = KafkaBroker(port=args.kafka_port, controller_port=args.kafka_controller_port, heap=args.kafka_heap)
    redis_srv = RedisServer(port=args.redis_port)
    try:
        print(f"starting redis-server on 127.0.0.1:{args.redis_port} ...", flush=True)
        redis_srv.start()
        print(f"starting Apache Kafka {KAFKA_VERSION} (KRaft) on 127.0.0.1:{args.kafka_port} ...", flush=True)
        kafka.start()
        for spec in args.topic:
            name, _, parts = spec.partition(":")
            kafka.create_topic(name, int(parts or 1), exist_ok=True)
        print()
        print(f"  kafka  bootstrap_servers = \"{kafka.bootstrap}\"   "
              f"(started in {kafka.startup_seconds:.1f}s, log: {kafka.log_path})")
        print(f"  redis  url               = \"{redis_srv.url}\"   (log: {redis_srv.log_path})")
        print()
        print("Ctrl-C stops both.", flush=True)
        while not stop.is_set():
            if not kafka.is_running():
                print(f"kafka exited unexpectedly; see {kafka.log_path}", file=sys.stderr)
                return 1
            if not redis_srv.is_running():
                print(f"redis-server exited unexpectedly; see {redis_srv.log_path}", file=sys.stderr)
                return 1
            stop.wait(0.5)
        print("\nstopping ...", flush=True)
        return 0
    except DevServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        kafka.stop()
        redis_srv.cleanup()


if __name__ == "__main__":
    sys.exit(main())
