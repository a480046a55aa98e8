"""Is the Kafka cluster reachable? One answer per bootstrap list, shared by every client of the process.

librdkafka retries an unreachable broker for ever and logs every failed connect (tens of lines a second
across a flow's consumers and producers). Instead, every Kafka client of the flow reports to the one
:class:`BrokerWatch` of its ``bootstrap.servers``: librdkafka's own log lines go to the
``meterflow.kafka.librdkafka`` logger at DEBUG, the flow warns once when all brokers become unreachable
and once when they answer again, and a client that finds the cluster unreachable for longer than
``kafka.outage_timeout`` stops the flow with one error that names the brokers and what to do. Offsets and
state come back from the last recovery snapshot, so stopping loses nothing: the rerun re-reads and
re-sends what no snapshot covers.

librdkafka's ``_ALL_BROKERS_DOWN`` (every broker connection is down) starts an outage; evidence that the cluster
answers *since then* ends it: a metadata reply to a probe sent during the outage, or the acknowledgement of
deliveries produced after the outage was known. An answer that may predate the outage ends nothing: a message
the consumer had prefetched, or a flush whose messages were all acknowledged before the broker went away. Taken
as an answer, one of those ended the outage before it was announced, and the flow then waited for a broker that
was still down without ever reaching ``kafka.outage_timeout`` (librdkafka reports "all brokers down" once per
client, so no second report came to start it again).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from confluent_kafka import KafkaError, KafkaException

from meterflow.base.errors import MeterError

log = logging.getLogger("meterflow.kafka")
_rdkafka_log = logging.getLogger("meterflow.kafka.librdkafka")

#: librdkafka errors that mean "no broker of the bootstrap list answers".
UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE})


class _QuietLogger:
    """librdkafka's ``logger``: its lines go to ``meterflow.kafka.librdkafka`` at DEBUG (off by default)."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        _rdkafka_log.debug(fmt, *args)


QUIET_LOGGER = _QuietLogger()


class BrokerWatch:
    """Outage state of one bootstrap list. Thread-safe: every worker's clients share it."""

    #: An outage is announced once it has lasted this long (librdkafka reports brief "all brokers down" blips
    #: while it reconnects; they end before anyone needs to hear of them).
    ANNOUNCE_AFTER = 2.0
    #: Seconds between metadata probes while the cluster is unreachable (:meth:`probe`).
    PROBE_EVERY = 1.0

    def __init__(self, bootstrap: str, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._announced = False
        self._why = ""
        self._fatal: Optional[str] = None
        self._probed = float("-inf")  # when the last probe was sent

    def client_config(self) -> Dict[str, Any]:
        """The librdkafka settings that route a client's errors here and its log lines to DEBUG."""
        return {"error_cb": self.on_error, "logger": QUIET_LOGGER}

    def on_error(self, err: Any) -> None:
        """librdkafka ``error_cb`` (runs inside poll/consume/flush of the client that saw it)."""
        if err.fatal():
            with self._lock:
                self._fatal = self._fatal or str(err)
            return
        if err.code() not in UNREACHABLE or err.str().startswith("0/"):
            return  # librdkafka also says "0/1 brokers are down" when it retires a bootstrap connection
        with self._lock:
            if self._down_since is not None:
                self._why = err.str()
                return
            since = self._down_since = self._clock()
            self._why = err.str()
        timer = threading.Timer(self.ANNOUNCE_AFTER, self._announce, args=(since,))
        timer.daemon = True
        timer.start()

    def _announce(self, since: float) -> None:
        with self._lock:
            if self._down_since != since or self._announced:
                return
            self._announced = True
        log.warning("Kafka at %s is unreachable (%s): the flow waits for it, at most kafka.outage_timeout = %gs",
                    self.bootstrap, self._why, self.timeout)

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def now(self) -> float:
        """The watch's clock (monotonic seconds): what :meth:`ok`'s ``asked_at`` is measured on."""
        return self._clock()

    def probe(self, client: Any, topic: str, force: bool = False) -> None:
        """While the cluster is down, ask it for ``topic``'s metadata through ``client`` (a consumer or producer
        of this watch), at most once per :attr:`PROBE_EVERY` seconds for all of them unless ``force``: an answer
        ends the outage. Blocks up to half a second while no broker answers."""
        if self._down_since is None:
            return
        asked_at = self._clock()
        with self._lock:
            if not force and asked_at - self._probed < self.PROBE_EVERY:
                return
            self._probed = asked_at
        try:
            client.list_topics(topic, timeout=0.5)
        except KafkaException:
            return
        self.ok(asked_at)

    def ok(self, asked_at: Optional[float] = None) -> None:
        """The cluster answered: the outage, if any, is over. ``asked_at`` (:meth:`now`): when the request
        answered was made (a probe sent, the first message of a flushed batch produced); an answer to a request
        made before the outage began may have come before it too, so it ends nothing. None: the answer is
        known to postdate any outage (tests)."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None or (asked_at is not None and asked_at < self._down_since):
                return
            since, self._down_since = self._down_since, None
            announced, self._announced = self._announced, False
        if since is not None and announced:
            log.warning("Kafka at %s answers again after %.1f s", self.bootstrap, self._clock() - since)

    def down_for(self) -> float:
        since = self._down_since
        return 0.0 if since is None else self._clock() - since

    def check(self, what: str) -> None:
        """Raise the flow-stopping error if ``what`` (a client's role) cannot go on."""
        if self._fatal is not None:
            raise MeterError(f"Kafka at {self.bootstrap} (kafka.bootstrap_servers): {what}: fatal client error "
                             f"({self._fatal}); fix the broker or kafka.client_config, then rerun the same "
                             "command (with --recovery it resumes from the last snapshot)")
        if self._down_since is not None and self.down_for() > self.timeout:
            raise self.outage_error(what)

    def outage_error(self, what: str, detail: str = "") -> MeterError:
        return MeterError(f"Kafka at {self.bootstrap} (kafka.bootstrap_servers) unreachable for more than "
                          f"kafka.outage_timeout = {self.timeout:g}s ({detail or self._why or 'no broker answers'}; "
                          f"{what}): start the broker or fix kafka.bootstrap_servers, then rerun the same command "
                          "(with --recovery it resumes from the last snapshot; nothing unacknowledged is lost)")


_WATCHES: Dict[Tuple[str, float], BrokerWatch] = {}
_WATCHES_LOCK = threading.Lock()


def watch_for(bootstrap: str, timeout: float) -> BrokerWatch:
    """The process's one watch of ``bootstrap`` (per outage timeout)."""
    with _WATCHES_LOCK:
        w = _WATCHES.get((bootstrap, timeout))
        if w is None:
            w = _WATCHES[(bootstrap, timeout)] = BrokerWatch(bootstrap, timeout)
        return w
