"""Redis: live gateway state (``meter:{tenant}:{customer}:{metric}``) and prepaid wallet balances
(``meter-wallet:{tenant}:{customer}``) for API gateways (README: Outputs; read by
:class:`meterflow.gate.QuotaGate`).

What is written. Per batch the partition coalesces every :class:`~meterflow.schemas.gateway.GatewayState` and
:class:`~meterflow.schemas.gateway.WalletState` to the LAST one per Redis key (later items win), then sends them all
in ONE pipelined round trip (no MULTI): ``HSET key <state_fields>`` per gateway state, ``DEL key`` for a
``deleted`` one (a cancelled subscription), and ``HSET key <wallet_fields>`` per wallet, and per ``anomaly`` alert the
hash's ``anomaly`` marker (and per republished ``Emission.markers`` entry), set by a small script only if its day is
later than the one there (the keys and
fields are :mod:`meterflow.schemas.gateway`). Wallet holds live in their own hash
(``meter-wallet-holds:{tenant}:{customer}``), owned by the gate; this sink never touches it, so the flow
and the gateways never race on the same key.

Delivery guarantee: at-least-once, latest-state-wins. Every write is an absolute value (HSET of the
whole state, or DEL), so a replay after a resume, a duplicate batch or a retry converges to the same
hash. While Redis is up, gateway state lags the stream by at most one batch's processing plus one Redis
round trip (``write_batch`` returns after Redis acknowledged the pipeline).

Outages. A Redis error (refused or reset connection, timeout after ``RedisConfig.timeout``, LOADING,
OOM, READONLY, ...) never stops the flow: the unsent states stay in a pending dict keyed by Redis key
(latest wins, so memory is bounded by the number of distinct keys, not by the outage's length), ONE
warning is logged when the outage starts and one when Redis has caught up. Pending states are retried
with exponential backoff (``retry_initial`` doubling up to ``retry_max`` seconds) on later
``write_batch`` calls and once more at ``close``; between retries a batch only updates the pending dict
and returns at once, so an outage costs the flow at most one timed-out attempt per backoff interval.
Once Redis answers again every key converges to its latest state.

A background thread also retries on the same schedule, so a worker with no new output catches up
after an outage without waiting for its next batch (``write_batch`` and the thread share a lock).

At exit (``close``) pending states get one last attempt; what Redis still did not take is named in ONE
warning that says how it will arrive. The gateway state is derived from the meter state, so a flow
resumed from the same recovery directory republishes every customer's state on start (see
``meterflow.dataflows.metering._ShardLogic``), and ``meter gateway sync --recovery DIR`` writes it without a run.

Limits, stated honestly: pending states live in memory, so without a recovery directory a crash or an
exit *during* an outage loses them until those keys change again (a gateway then sees the pre-outage
state, bounded by the period's ``period_end``); a Redis restart without persistence empties it, and
keys not changed since come back at the next resume, at ``meter gateway sync``, or when the flow emits
them again (a missing key reads as untracked, which gateways allow). Billing never depends on Redis:
the exact figures are in ClickHouse and the aggregated topic.

Counters in :data:`meterflow.base.stats.STATS`: ``redis_writes`` (keys written), ``redis_pending`` (keys
waiting, kept as a gauge through deltas), ``redis_errors`` (failed round trips), ``redis_outages``.
"""

from __future__ import annotations

import logging
import threading
import time
from itertools import chain
from typing import Any, Callable, Dict, List, Mapping, Optional, Union, cast

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from meterflow.base.stats import STATS, FlowStats
from meterflow.base.timeutil import parse_rfc3339_ms
from meterflow.schemas.config import RedisConfig, mask_url
from meterflow.schemas.gateway import (
    ANOMALY_SCRIPT,
    AnomalyMarker,
    GatewayState,
    WalletState,
    state_fields,
    wallet_fields,
)
from meterflow.schemas.records import Emission

log = logging.getLogger("meterflow.sinks.redis")

State = Union[GatewayState, WalletState, AnomalyMarker]
_MARKER = "\x00anomaly"  # pending key suffix of an anomaly marker (its own entry beside the hash's state)


def queue_write(pipe: "redis.client.Pipeline", s: State) -> None:
    """Queue the one absolute write of a state on ``pipe``: HSET of its fields, or DEL of a removed
    gateway state (a cancelled subscription)."""
    if isinstance(s, WalletState):
        pipe.hset(s.redis_key, mapping=cast(Mapping[Any, Any], wallet_fields(s)))
    elif isinstance(s, AnomalyMarker):  # only ever moves to a later day
        pipe.eval(ANOMALY_SCRIPT, 1, s.redis_key, s.value)
    elif s.deleted:
        pipe.delete(s.redis_key)
    else:  # (HSET with the fields as arguments: what pipe.hset(mapping=...) sends, without its checks per call)
        pipe.execute_command("HSET", s.redis_key, *chain.from_iterable(state_fields(s).items()))


def make_client(url: str, timeout: float) -> "redis.Redis":
    """A client whose calls give up after ``timeout`` seconds and retry once at once (a pooled socket that
    the server closed reconnects transparently), instead of redis-py's default of many backed-off retries."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 1))


def _add_marker(pending: Dict[str, State], a: Any) -> None:
    """The ``anomaly`` marker of an anomaly alert, pending beside the hash's state (the latest day wins)."""
    _pend_marker(pending, AnomalyMarker(tenant_id=a.tenant_id, customer_id=a.customer_id, metric=a.metric,
                                        day_start=parse_rfc3339_ms(a.period_start)))


def _pend_marker(pending: Dict[str, State], m: AnomalyMarker) -> None:
    k = m.redis_key + _MARKER
    old = pending.get(k)
    if not isinstance(old, AnomalyMarker) or old.day_start < m.day_start:
        pending[k] = m


class _GatewayStatePartition(StatelessSinkPartition[Emission]):
    def __init__(self, client: "redis.Redis", url: str, retry_initial: float, retry_max: float,
                 clock: Callable[[], float], stats: FlowStats, recoverable: bool = False) -> None:
        self._client = client
        self._recoverable = recoverable
        self._url = mask_url(url)  # for logs: the password replaced by ``***``
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._stats = stats
        self._pending: Dict[str, State] = {}
        self._reported_pending = 0
        self._outage_since: Optional[float] = None
        self._backoff = retry_initial
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._retrier = threading.Thread(target=self._retry_loop, daemon=True, name="meterflow-redis-retry")
        self._retrier.start()

    def _retry_loop(self) -> None:
        # Between batches, retry pending states when the backoff allows (checked about once a second).
        while not self._closed.wait(min(1.0, self._retry_initial)):
            with self._lock:
                if self._pending and self._outage_since is not None and self._clock() >= self._next_try:
                    self._flush()
                    self._report_pending()

    @property
    def pending(self) -> Dict[str, State]:
        """States not yet acknowledged by Redis, by key (read-only view for tests and diagnostics)."""
        return dict(self._pending)

    def write_batch(self, items: List[Emission]) -> None:
        with self._lock:
            pending = self._pending
            for e in items:
                for g in e.gateway:
                    pending[g.redis_key] = g
                for w in e.wallets:
                    pending[w.redis_key] = w
                for a in e.alerts:
                    if a.type == "anomaly":
                        _add_marker(pending, a)
                for m in e.markers:
                    _pend_marker(pending, m)
            if pending and (self._outage_since is None or self._clock() >= self._next_try):
                self._flush()
            self._report_pending()

    def close(self) -> None:
        self._closed.set()
        self._retrier.join(5)
        if self._pending:
            self._flush()
            self._report_pending()
        if self._pending:
            how = ("the next meter run resumed from the same --recovery directory rewrites every customer's "
                   "gateway state on start, or run meter gateway sync --config FILE --recovery DIR once Redis is "
                   "back" if self._recoverable else
                   "this run has no --recovery directory, so they are written only when those customers' usage "
                   "next changes (a missing hash reads as untracked: gateways allow)")
            log.warning("Redis %s: closing with %d gateway state keys unsent (Redis still unavailable); %s",
                        self._url, len(self._pending), how)
        self._client.close()

    def _flush(self) -> None:
        """One pipelined round trip with every pending state; keeps what Redis did not acknowledge."""
        keys = list(self._pending)
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            queue_write(pipe, self._pending[key])
        try:
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            self._failed(exc)
            return
        first_error: Optional[Exception] = None
        written = 0
        for key, res in zip(keys, results):
            if isinstance(res, Exception):  # OOM, READONLY, WRONGTYPE...: keep this key, retry later
                first_error = first_error or res
            else:
                del self._pending[key]
                written += 1
        if written:
            self._stats.add({"redis_writes": written})
        if first_error is not None:
            self._failed(first_error)
        else:
            self._recovered()

    def _failed(self, exc: Exception) -> None:
        now = self._clock()
        self._stats.add({"redis_errors": 1})
        if self._outage_since is None:
            self._outage_since = now
            self._backoff = self._retry_initial
            self._stats.add({"redis_outages": 1, "redis_down": 1})
            log.warning("Redis %s unavailable (%s: %s): gateway state is kept in memory (latest per key, "
                        "%d keys now) and retried with backoff up to %g s; the flow continues",
                        self._url, type(exc).__name__, exc, len(self._pending), self._retry_max)
        else:
            self._backoff = min(self._backoff * 2, self._retry_max)
        self._next_try = now + self._backoff

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.warning("Redis %s is back after %.1f s: gateway state caught up", self._url,
                        self._clock() - self._outage_since)
            self._outage_since = None
            self._stats.add({"redis_down": -1})
            self._backoff = self._retry_initial

    def _report_pending(self) -> None:
        n = len(self._pending)
        if n != self._reported_pending:
            self._stats.add({"redis_pending": n - self._reported_pending})
            self._reported_pending = n


class GatewayStateSink(DynamicSink[Emission]):
    """Latest gateway and wallet state per key into Redis hashes, one pipelined round trip per batch.

    ``retry_initial``/``retry_max``: backoff in seconds between attempts while Redis is unreachable.
    ``recoverable``: the flow keeps a recovery directory (it then republishes every state on resume;
    the warning at exit says so). ``clock`` (monotonic seconds) and ``stats`` are injectable for tests.
    """

    def __init__(self, config: RedisConfig, *, retry_initial: float = 0.5, retry_max: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, stats: FlowStats = STATS,
                 recoverable: bool = False) -> None:
        if not 0 < retry_initial <= retry_max:
            raise ValueError(f"redis sink: need 0 < retry_initial <= retry_max, got {retry_initial}, {retry_max}")
        self._config = config
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._stats = stats
        self._recoverable = recoverable

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GatewayStatePartition:
        client = make_client(self._config.url, self._config.timeout)
        return _GatewayStatePartition(client, self._config.url, self._retry_initial, self._retry_max,
                                      self._clock, self._stats, self._recoverable)
