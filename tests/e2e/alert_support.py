"""Plumbing for the alert end-to-end tests (tests/e2e/test_alerts_e2e.py).

Everything talks to real things: `meter run` subprocesses (``tests.e2e.support.LiveRun``/``run_meter``),
the real Kafka broker, the real redis-server and embedded ClickHouse (chDB), whose ``alerts_log`` view is
read in a separate process (chDB allows one data path per process, and not while the flow has it open).

The workload is a count metric (``api_calls``) with thresholds, hard and soft enforcement, for ~20
customers of two tenants. Expected alerts and gateway states come from two independent computations that
must agree: the reference model of ``tests/operators/alert_model.py`` and :func:`hand_alerts` (for a count
metric with fixed thresholds, threshold ``t`` of a customer with ``included`` N is crossed by its
``ceil(t * N / 100)``-th distinct event of the period).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from meterflow.schemas.alerts import alert_id
from meterflow.schemas.config import Config, parse_config
from tests.e2e.support import REPO, LiveRun, consume_all, env
from tests.operators import alert_model as am

UTC = timezone.utc
METRIC = "api_calls"
ANCHOR = "2026-11-01T00:00:00Z"
PERIOD_START = am.ms("2026-11-01T00:00:00Z")
PERIOD_END = am.ms("2026-12-01T00:00:00Z")
# Event times fall inside the period; gateways are asked "now" = a moment inside it (QuotaGate allows a
# blocked quota once period_end has passed, so the wall clock must not decide the test).
EVENTS_FROM = am.ms("2026-11-02T00:00:00Z")
EVENTS_TO = am.ms("2026-11-20T00:00:00Z")
GATE_NOW = am.ms("2026-11-21T12:00:00Z")

# plan code -> (included, thresholds, enforcement)
PLANS: Dict[str, Tuple[float, Sequence[float], str]] = {
    "hard20": (20, (75, 90, 100), "hard"),
    "soft30": (30, (75, 90, 100), "soft"),
    "hard8": (8, (75, 90, 100), "hard"),
    "scale": (40, (75, 90, 100), "hard"),
}


def iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# -- configuration -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sub:
    """A subscription of the test config: plan plus optional overrides of the api_calls entitlement."""

    tenant: str
    customer: str
    plan: str
    overrides: Dict[str, Any] = field(default_factory=dict, hash=False)

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"tenant_id": self.tenant, "customer_id": self.customer, "plan": self.plan,
                             "period": "month", "anchor": ANCHOR, "account_name": f"{self.customer} Inc."}
        if self.overrides:
            d["overrides"] = {METRIC: dict(self.overrides)}
        return d

    def entitlement(self) -> Tuple[float, Tuple[float, ...], str]:
        inc, ths, enf = PLANS[self.plan]
        inc = self.overrides.get("included", inc)
        ths = self.overrides.get("thresholds", ths)
        enf = self.overrides.get("enforcement", enf)
        return float(inc), tuple(sorted(set(float(t) for t in ths))), enf


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def config_toml(tenants: Sequence[str], subs: Sequence[Sub], *, chdb_dir: Path, kafka: Optional[Dict[str, str]],
                redis_url: Optional[str] = None, redis_timeout: float = 0.5, alerts_jsonl: Optional[Path] = None,
                webhook: Optional[Dict[str, str]] = None, pipeline_extra: str = "") -> str:
    out = ['[pipeline]\nrollup_window = "1h"\nlate_grace = "6h"\ndedupe_window = "24h"\n' + pipeline_extra]
    for t in tenants:
        out.append(f'[[tenants]]\nid = "{t}"\n')
    out.append(f'[[metrics]]\ncode = "{METRIC}"\nevent_type = "api_call"\naggregation = "count"\n')
    for code, (inc, ths, enf) in PLANS.items():
        out.append(f'[[plans]]\ncode = "{code}"\n[plans.entitlements.{METRIC}]\nincluded = {inc}\n'
                   f'thresholds = {_toml_value(list(ths))}\nenforcement = "{enf}"\noverage_rate = 0.001\n')
    for s in subs:
        d = s.as_dict()
        over = d.pop("overrides", None)
        out.append("[[subscriptions]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items()))
        if over:
            out.append(f"[subscriptions.overrides.{METRIC}]\n" +
                       "".join(f"{k} = {_toml_value(v)}\n" for k, v in over[METRIC].items()))
    out.append(f'[clickhouse]\ndsn = "chdb://{chdb_dir.resolve()}"\n')
    if kafka:
        out.append("[kafka]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kafka.items()))
    if redis_url:
        out.append(f'[redis]\nurl = "{redis_url}"\ntimeout = {redis_timeout}\n')
    if alerts_jsonl is not None or webhook is not None:
        out.append("[alerts]\n" + (f'jsonl = "{alerts_jsonl.resolve()}"\n' if alerts_jsonl is not None else ""))
        if webhook is not None:
            out.append("[alerts.webhook]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in webhook.items()))
    return "\n".join(out)


def parse(text: str) -> Config:
    return parse_config(tomllib.loads(text), "<alerts-e2e>", environ={})


# -- workload ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    tenants: List[str]
    subs: List[Sub]
    unsubscribed: List[Tuple[str, str]]
    messages: List[Tuple[bytes, bytes]]  # (key, value) in produce order: events, duplicates, bad events
    items: List[am.Ev]  # every well-formed event (duplicates included) in produce order, for the model
    bad: int
    duplicates: int


def event_bytes(ev: am.Ev, style: int) -> bytes:
    """The event as JSON, its timestamp as RFC 3339 Z, RFC 3339 with an offset or epoch ms."""
    if style == 0:
        ts: Any = iso(ev.ts)
    elif style == 1:
        dt = datetime.fromtimestamp(ev.ts / 1000, tz=UTC).astimezone(timezone(timedelta(hours=2)))
        ts = dt.isoformat(timespec="milliseconds")
    else:
        ts = ev.ts
    return json.dumps({"event_id": ev.event_id, "tenant_id": ev.tenant, "customer_id": ev.customer,
                       "event_type": ev.event_type, "timestamp": ts, "properties": ev.props}).encode()


def key(tenant: str, customer: str) -> bytes:
    return f"{tenant}|{customer}".encode()


def customer_events(rng: random.Random, tenant: str, customer: str, n: int, prefix: str,
                    lo: int = EVENTS_FROM, hi: int = EVENTS_TO) -> List[am.Ev]:
    """``n`` distinct events at random times in [lo, hi): arrival order is not time order."""
    return [am.Ev(tenant, customer, f"{prefix}-{customer}-{i}", "api_call", rng.randrange(lo, hi),
                  {"endpoint": rng.choice(["/v1/a", "/v1/b"]), "region": rng.choice(["eu", "us"])})
            for i in range(n)]


def bad_messages(tenant: str, customer: str, tag: str) -> List[bytes]:
    """One of each kind of bad input (they become dead letters and never alert)."""
    good = {"event_id": f"{tag}-bad", "tenant_id": tenant, "customer_id": customer, "event_type": "api_call",
            "timestamp": "2026-11-05T10:00:00Z"}
    return [
        b'{"event_id": "' + tag.encode() + b'-torn", "tenant_id": ',  # invalid_json
        json.dumps({**good, "event_id": f"{tag}-naive", "timestamp": "2026-11-05T10:00:00"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "event_id"}).encode(),  # no event_id
        json.dumps({**good, "event_id": f"{tag}-unknown", "tenant_id": f"{tenant}-nope"}).encode(),
        json.dumps({**good, "event_id": f"{tag}-nocust", "customer_id": ""}).encode(),
        b"[1, 2, 3]",
    ]


def make_workload(seed: int, tag: str, customers_per_tenant: int = 10) -> Workload:
    """~20 customers of two tenants on hard and soft plans (some with custom overrides), two unsubscribed
    customers, several hundred events at random times of one billing period, ~6 % retried duplicates
    (the same bytes later in the customer's partition) and a few bad events, interleaved at random."""
    rng = random.Random(seed)
    tenants = [f"acme{tag}", f"globex{tag}"]
    subs: List[Sub] = []
    unsub: List[Tuple[str, str]] = []
    per_customer: Dict[Tuple[str, str], List[bytes]] = {}
    per_customer_items: Dict[Tuple[str, str], List[am.Ev]] = {}
    choices = [("hard20", {}), ("soft30", {}), ("hard8", {}), ("hard20", {"included": 12}),
               ("soft30", {"included": 25, "thresholds": [50, 80, 100, 150]}),
               ("hard20", {"thresholds": [60, 100]}), ("soft30", {"enforcement": "hard"})]
    # usage at the end, as a share of included: below, between thresholds, exactly 100 %, over
    shares = [0.5, 0.8, 0.92, 1.0, 1.3, 2.2]
    duplicates = 0
    for ti, t in enumerate(tenants):
        for ci in range(customers_per_tenant):
            c = f"cust_{ti}{ci:02d}"
            if ci == customers_per_tenant - 1:
                unsub.append((t, c))
                n = 14
            else:
                plan, over = choices[(ci + 3 * ti) % len(choices)]
                sub = Sub(t, c, plan, over)
                subs.append(sub)
                inc = sub.entitlement()[0]
                n = max(1, round(inc * shares[(ci * 5 + ti) % len(shares)]))
            evs = customer_events(rng, t, c, n, f"e{tag}")
            seq: List[am.Ev] = list(evs)
            # retried duplicates: a copy of an earlier event a few positions later
            for i in range(len(evs)):
                if rng.random() < 0.06:
                    j = min(len(seq), seq.index(evs[i]) + 1 + rng.randrange(4))
                    seq.insert(j, evs[i])
                    duplicates += 1
            styles = {e.event_id: rng.randrange(3) for e in evs}
            per_customer[(t, c)] = [event_bytes(e, styles[e.event_id]) for e in seq]
            per_customer_items[(t, c)] = seq
    # interleave the customers at random, keeping each customer's order
    cursors = {k: 0 for k in per_customer}
    messages: List[Tuple[bytes, bytes]] = []
    items: List[am.Ev] = []
    while cursors:
        k = rng.choice(sorted(cursors))
        i = cursors[k]
        messages.append((key(*k), per_customer[k][i]))
        items.append(per_customer_items[k][i])
        cursors[k] = i + 1
        if cursors[k] == len(per_customer[k]):
            del cursors[k]
    bad = bad_messages(tenants[0], "cust_000", f"b{tag}")
    for b in bad:
        messages.insert(rng.randrange(len(messages)), (key(tenants[0], "cust_000"), b))
    return Workload(tenants, subs, unsub, messages, items, len(bad), duplicates)


# -- expected results --------------------------------------------------------------------------------------

AlertTuple = Tuple[str, str, str, int, Optional[float], str, str]  # alert_model.alert_tuple


def model_alerts(cfg: Config, deliveries: Sequence[Any]) -> Dict[Tuple[str, str], List[AlertTuple]]:
    """The reference model's alerts per customer, in order."""
    model = am.run_model(cfg, deliveries)
    out: Dict[Tuple[str, str], List[AlertTuple]] = defaultdict(list)
    for k, a in model.alerts:
        out[k].append(a)
    return dict(out)


def hand_alerts(subs: Sequence[Sub], items: Sequence[am.Ev]) -> Dict[Tuple[str, str], List[AlertTuple]]:
    """Independent of the model: for a count metric, threshold t fires on the ceil(t * N / 100)-th distinct
    event (N = included) of the period; under hard enforcement the N-th also fires ``blocked`` (seq 1)."""
    distinct: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    seen = set()
    for ev in items:
        if (ev.tenant, ev.event_id) not in seen:
            seen.add((ev.tenant, ev.event_id))
            distinct[(ev.tenant, ev.customer)].append(ev.event_id)
    out: Dict[Tuple[str, str], List[AlertTuple]] = {}
    for s in subs:
        inc, ths, enf = s.entitlement()
        ids = distinct.get((s.tenant, s.customer), [])
        got: List[AlertTuple] = []
        for t in ths:
            k = math.ceil(t * inc / 100)
            if k <= len(ids):
                action = "notify" if t < 100 or enf == "soft" else "block"
                got.append((alert_id("threshold_crossed", s.tenant, s.customer, METRIC, PERIOD_START, t),
                            "threshold_crossed", METRIC, PERIOD_START, t, ids[k - 1], action))
        if enf == "hard" and int(inc) <= len(ids):
            blocked = (alert_id("blocked", s.tenant, s.customer, METRIC, PERIOD_START, 100.0, 1), "blocked", METRIC,
                       PERIOD_START, 100.0, ids[int(inc) - 1], "block")
            # the N-th event fires its thresholds (those <= 100 %), then blocked; higher ones come later
            pos = max((i + 1 for i, a in enumerate(got) if a[4] is not None and a[4] <= 100), default=0)
            got.insert(pos, blocked)
        if got:
            out[(s.tenant, s.customer)] = got
    return out


def hand_gateway(subs: Sequence[Sub], items: Sequence[am.Ev]) -> Dict[Tuple[str, str, str], Tuple[float, float, str]]:
    used: Dict[Tuple[str, str], set] = defaultdict(set)
    for ev in items:
        used[(ev.tenant, ev.customer)].add(ev.event_id)
    out = {}
    for s in subs:
        n = len(used.get((s.tenant, s.customer), ()))
        if not n:
            continue
        inc, ths, enf = s.entitlement()
        if enf == "hard" and n >= inc:
            st = "blocked"
        elif n > inc:
            st = "over"
        elif n * 100 >= ths[0] * inc:
            st = "approaching"
        else:
            st = "ok"
        out[(s.tenant, s.customer, METRIC)] = (float(n), inc, st)
    return out


# -- reading the outputs -----------------------------------------------------------------------------------

def tuple_of(a: Dict[str, Any]) -> AlertTuple:
    """An alert record (JSON of the file, topic or webhook) as the model's tuple."""
    return (a["alert_id"], a["type"], a["metric"], am.ms(a["period_start"]), a["threshold_pct"], a["event_id"],
            a["action"])


def by_customer(alerts: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str], List[AlertTuple]]:
    out: Dict[Tuple[str, str], List[AlertTuple]] = defaultdict(list)
    for a in alerts:
        out[(a["tenant_id"], a["customer_id"])].append(tuple_of(a))
    return dict(out)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written right now
                break
    return out


def _dump_alerts_log(config_path: str) -> None:
    """(subprocess side) print the alerts_log view and its raw row count as JSON."""
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect

    client, db = connect(load_config(config_path).clickhouse)
    q = client.query(f"SELECT alert_id, type, tenant_id, customer_id, metric, "
                     f"toUnixTimestamp64Milli(period_start), threshold_pct, event_id, action, usage, included, "
                     f"enforcement FROM {db}.alerts_log")
    rows = [list(r) for r in q.result_rows]
    json.dump({"rows": rows}, sys.stdout)


def read_alerts_log(config: Path, timeout: float = 120) -> List[Dict[str, Any]]:
    """The ``alerts_log`` view of the config's chDB path, read in a separate process."""
    code = "import sys; from tests.e2e.alert_support import _dump_alerts_log; _dump_alerts_log(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(config)], cwd=REPO, env=env(), capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"reading alerts_log failed ({proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace')[-4000:]}")
    cols = ["alert_id", "type", "tenant_id", "customer_id", "metric", "period_start_ms", "threshold_pct",
            "event_id", "action", "usage", "included", "enforcement"]
    return [dict(zip(cols, r)) for r in json.loads(proc.stdout)["rows"]]


def log_tuples(rows: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str], set]:
    out: Dict[Tuple[str, str], set] = defaultdict(set)
    for r in rows:
        out[(r["tenant_id"], r["customer_id"])].add(
            (r["alert_id"], r["type"], r["metric"], r["period_start_ms"], r["threshold_pct"], r["event_id"],
             r["action"]))
    return dict(out)


def alerts_topic_view(bootstrap: str, topic: str) -> Tuple[List[Dict[str, Any]], int]:
    """A consumer's view of the alerts topic: the first record of each key, in topic order (the topic has one
    partition), and the number of messages. Every key is its value's alert_id, and a re-sent record names the
    same alert (type, customer, threshold, event)."""
    msgs = consume_all(bootstrap, topic)
    first: Dict[bytes, Dict[str, Any]] = {}
    for k, v, headers in msgs:
        a = json.loads(v)
        assert k == a["alert_id"].encode(), f"alerts topic key {k!r} is not the alert_id of {a}"
        h = {hk: hv.decode() for hk, hv in headers}
        assert h.get("type") == a["type"] and h.get("tenant_id") == a["tenant_id"], (h, a)
        if k in first:
            assert tuple_of(first[k]) == tuple_of(a), f"alert {k!r} re-sent with other content: {first[k]} / {a}"
        else:
            first[k] = a
    return list(first.values()), len(msgs)


def redis_hashes(client: Any, keys: Sequence[Tuple[str, str, str]]) -> Dict[Tuple[str, str, str], Dict[str, str]]:
    pipe = client.pipeline(transaction=False)
    for t, c, m in keys:
        pipe.hgetall(f"meter:{t}:{c}:{m}")
    return {k: {a.decode(): b.decode() for a, b in raw.items()} for k, raw in zip(keys, pipe.execute())}


def gateway_view(hashes: Dict[Tuple[str, str, str], Dict[str, str]]
                 ) -> Dict[Tuple[str, str, str], Tuple[float, float, str]]:
    return {k: (float(h["used"]), float(h["included"]), h["state"]) for k, h in hashes.items() if h}


# -- Kafka -------------------------------------------------------------------------------------------------

class KeyedProducer:
    """Produces ``(key, value)`` pairs with the default (key-hash) partitioner: a customer's events and their
    retried duplicates stay in one partition, in order."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self._p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                            "linger.ms": 5})
        self._errors: List[str] = []

    def _cb(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, messages: Sequence[Tuple[bytes, bytes]], flush: bool = True) -> None:
        for k, v in messages:
            self._p.produce(self.topic, value=v, key=k, on_delivery=self._cb)
        if flush:
            assert self._p.flush(30) == 0, f"messages to {self.topic} not delivered within 30 s"
            assert not self._errors, self._errors[:3]


# -- processes and polling ---------------------------------------------------------------------------------

def wait_for(what: str, probe: Callable[[], Any], timeout: float, live: Optional[LiveRun] = None,
             interval: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (and the run's stderr)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        if live is not None and live.proc.poll() is not None:
            raise AssertionError(f"meter run exited ({live.proc.returncode}) while waiting for {what}:\n"
                                 f"{''.join(live.stderr)[-3000:]}")
        time.sleep(interval)
    tail = "" if live is None else f"\nmeter run stderr:\n{''.join(live.stderr)[-3000:]}"
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")


def stop_run(live: LiveRun, timeout: float = 20) -> int:
    """Interrupt a streaming `meter run` (SIGINT, like Ctrl-C); SIGKILL it if it does not stop in time."""
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGINT)
        try:
            live.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            live.proc.send_signal(signal.SIGKILL)
            live.proc.wait(30)
    live._t.join(10)
    live._out.close()
    return live.proc.returncode


# -- a webhook receiver -----------------------------------------------------------------------------------

class WebhookReceiver:
    """A local HTTP receiver that fails on purpose: HTTP ``fail_status`` (500; with ``Retry-After:
    retry_after`` seconds when given) for the first ``fail_first`` requests, then one request answered only
    after ``slow_seconds`` (longer than the sender's timeout: the sender gives up and retries, though the
    receiver processed it), then 200. Every processed request is kept."""

    def __init__(self, secret: str, fail_first: int = 3, slow_seconds: float = 2.5, fail_status: int = 500,
                 retry_after: Optional[int] = None) -> None:
        self.secret = secret.encode()
        self.fail_first = fail_first
        self.slow_seconds = slow_seconds
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.requests = 0
        self.statuses: List[int] = []
        self.received: List[Tuple[Dict[str, str], bytes]] = []  # processed (2xx, or answered too late)
        self.bad_signatures: List[str] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()}
                want = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                with receiver.lock:
                    receiver.requests += 1
                    n = receiver.requests
                    if not hmac.compare_digest(headers.get("X-Meter-Signature", ""), want):
                        receiver.bad_signatures.append(headers.get("X-Meter-Signature", ""))
                if n <= receiver.fail_first:
                    status = receiver.fail_status
                else:
                    if n == receiver.fail_first + 1:
                        time.sleep(receiver.slow_seconds)
                    status = 200
                    with receiver.lock:
                        receiver.received.append((headers, body))
                with receiver.lock:
                    receiver.statuses.append(status)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    if status != 200 and receiver.retry_after is not None:
                        self.send_header("Retry-After", str(receiver.retry_after))
                    self.end_headers()
                    self.wfile.write(b"ok" if status == 200 else b"try again")
                except OSError:  # the sender gave up (timeout) and closed the connection
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/meter"

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def deduped(self) -> Dict[str, List[bytes]]:
        """Bodies received per Idempotency-Key."""
        out: Dict[str, List[bytes]] = defaultdict(list)
        with self.lock:
            for h, body in self.received:
                out[h.get("Idempotency-Key", "")].append(body)
        return dict(out)
