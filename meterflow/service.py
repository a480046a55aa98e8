"""``meter serve``: the HTTP service (README: HTTP service) on Starlette and uvicorn.

- ``POST /v1/events``: JSON, JSON arrays and CloudEvents (structured and batch) in; each event goes through
  mediation's own :class:`~meterflow.operators.mediate.Mediator` (the same rules and code as the flow), then
  the live gateway state decides ``blocked`` (:class:`~meterflow.gate.QuotaGate`), then the accepted events are
  produced to ``kafka.events_topic`` with the idempotent ``acks=all`` producer of the flow's sinks; the answer
  (202) is sent only once the broker acknowledged every accepted event.
- ``GET /v1/entitlements/{tenant}/{customer}/{metric}``, ``GET /v1/usage/{tenant}/{customer}``.
- ``GET /healthz``, ``GET /metrics`` (Prometheus text), the console (:mod:`meterflow.console`).

Auth: ``Authorization: Bearer <key>`` (or ``X-Api-Key``) with a key of ``[[tenants]] api_keys`` admits that
tenant only; ``[server] admin_token`` admits every tenant and the console. Keys are compared in constant time
(``hmac.compare_digest`` over SHA-256 digests, so neither a key's content nor its length leaks through timing)
and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meterflow.base.errors import MeterError
from meterflow.base.keys import customer_key
from meterflow.base.stats import FlowStats
from meterflow.base.timeutil import ms_to_iso, now_ms
from meterflow.gate import Decision, QuotaGate
from meterflow.http_auth import ADMIN, Auth, presented_key
from meterflow.operators.mediate import MAX_DEPTH, Mediator, matches
from meterflow.operators.rules import Rules
from meterflow.schemas.config import Config

log = logging.getLogger("meterflow.service")

CE_STRUCTURED = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
# Reasons of rejected events besides mediation's dead-letter codes (invalid_json, invalid_event, unknown_tenant).
BLOCKED, UNAVAILABLE = "blocked", "redis_unavailable"


class Producer:
    """The events-topic producer: one confluent-kafka producer (idempotent, acks=all), polled by a thread;
    :meth:`send` resolves when the broker acknowledged every message (or raises on the first failure)."""

    def __init__(self, cfg: Config) -> None:
        from confluent_kafka import Producer as KafkaProducer

        from meterflow.sinks.kafka import producer_config

        assert cfg.kafka is not None
        self.topic = cfg.kafka.events_topic
        self._p = KafkaProducer({**producer_config(cfg.kafka.bootstrap_servers, cfg.kafka.client_config,
                                                   cfg.kafka.outage_timeout_seconds), "linger.ms": 1})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="meterflow-serve-producer")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._p.poll(0.05)

    async def send(self, messages: Sequence[Tuple[bytes, bytes]], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        futures: List[asyncio.Future] = []

        def on_delivery(fut: asyncio.Future) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                loop.call_soon_threadsafe(_settle, fut, None if err is None else str(err))
            return cb

        for key, value in messages:
            fut = loop.create_future()
            futures.append(fut)
            while True:
                try:
                    self._p.produce(self.topic, value, key, on_delivery=on_delivery(fut))
                    break
                except BufferError:  # local queue full: let the poll thread drain deliveries
                    await asyncio.sleep(0.01)
        self._p.poll(0)
        done, pending = await asyncio.wait(futures, timeout=timeout) if futures else (set(), set())
        if pending:
            raise MeterError(f"{len(pending)} of {len(futures)} events not acknowledged by the broker within "
                             f"{timeout:g} s")
        errors = [f.result() for f in done if f.result() is not None]
        if errors:
            raise MeterError(f"{len(errors)} of {len(futures)} events not delivered ({errors[0]})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._p.flush(5)


def _settle(fut: asyncio.Future, err: Optional[str]) -> None:
    if not fut.done():
        fut.set_result(err)


class ServiceMetrics:
    """The service's own Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("meterflow_http_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("meterflow_http_request_duration_seconds", "HTTP request handling time",
                                 ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.ingest = Counter("meterflow_ingest_events", "Events received over HTTP by outcome",
                              ["outcome", "reason"], registry=self.registry)
        self.redis_down = Gauge("meterflow_redis_down", "1 while the quota gate cannot reach Redis",
                                registry=self.registry)


_ENCODER = msgspec.json.Encoder(decimal_format="number")  # money as JSON numbers with the decimal's exact digits


def _json(body: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(_ENCODER.encode(body), status_code=status, headers=headers, media_type="application/json")


def _error(status: int, reason: str, detail: str, headers: Optional[Dict[str, str]] = None, **extra: Any) -> Response:
    return _json({"reason": reason, "detail": detail, **extra}, status, headers)


def _decision_json(d: Decision) -> Dict[str, Any]:
    return {"allowed": d.allowed, "state": d.state, "known": d.known, "reason": d.reason, "blocked_by": d.blocked_by,
            "included": d.included, "used": d.used, "remaining": d.remaining, "pct": d.pct,
            "period_end": None if d.period_end is None else ms_to_iso(d.period_end)}


class _Rejected(msgspec.Struct):
    index: int
    event_id: Optional[str]
    reason: str
    detail: str = ""


def _event_id_of(raw: Optional[bytes]) -> Optional[str]:
    """The event_id of a rejected event when its bytes say it (a best effort for the client's benefit)."""
    try:
        obj = msgspec.json.decode(raw or b"")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, msgspec.ValidationError):
        return None
    ev = obj.get("event_id") if isinstance(obj, dict) else None
    return ev if isinstance(ev, str) else None


def _base64_json(encoded: Any, content_type: Any) -> Any:
    """The JSON document a CloudEvent's ``data_base64`` holds (standard base64 of its UTF-8 JSON bytes)."""
    if content_type is not None:
        ctype = content_type.split(";", 1)[0].strip().lower() if isinstance(content_type, str) else ""
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise ValueError(f"data_base64 must hold JSON: datacontenttype {content_type!r} is not application/json")
    if not isinstance(encoded, str):
        raise ValueError("the CloudEvent's `data_base64` must be a base64 string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the CloudEvent's `data_base64` is not valid base64 ({exc})") from None
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the CloudEvent's `data_base64` does not decode to JSON ({exc})") from None


def cloudevent_to_event(ce: Any) -> bytes:
    """A CloudEvent (structured JSON) as a section-1 usage event: ``data`` (or ``data_base64``, the base64 of
    its JSON) holds the event fields; ``id``,
    ``time`` and ``type`` fill event_id, timestamp and event_type when ``data`` lacks them. Raises ValueError."""
    if not isinstance(ce, dict):
        raise ValueError("a CloudEvent must be a JSON object")
    data = ce.get("data")
    if "data_base64" in ce:
        if data is not None:
            raise ValueError("a CloudEvent has `data` or `data_base64`, not both")
        data = _base64_json(ce["data_base64"], ce.get("datacontenttype"))
    if not isinstance(data, dict):
        raise ValueError("the CloudEvent's `data` must be a JSON object with the usage event's fields")
    ev = dict(data)
    for field, attr in (("event_id", "id"), ("timestamp", "time"), ("event_type", "type")):
        if field not in ev and attr in ce:
            ev[field] = ce[attr]
    return msgspec.json.encode(ev)


class Body(msgspec.Struct):
    """A request body split into events: ``raws[i]`` the i-th event's JSON bytes, or None with ``problems[i]``."""

    raws: List[Optional[bytes]]
    problems: Dict[int, str]
    single: bool


def split_body(body: bytes, content_type: str) -> Body:
    """Split a request body into its events (raises ValueError with the reason for a body that is no events)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if not body.strip():
        raise ValueError("empty body: send one event, a JSON array of events or CloudEvents")
    try:
        if ctype in (CE_STRUCTURED, CE_BATCH):
            doc = msgspec.json.decode(body)
            if ctype == CE_BATCH and not isinstance(doc, list):
                raise ValueError(f"{CE_BATCH} needs a JSON array of CloudEvents")
            items = doc if ctype == CE_BATCH else [doc]
            raws: List[Optional[bytes]] = []
            problems: Dict[int, str] = {}
            for i, ce in enumerate(items):
                try:
                    raws.append(cloudevent_to_event(ce))
                except ValueError as exc:
                    raws.append(None)
                    problems[i] = str(exc)
            return Body(raws, problems, ctype == CE_STRUCTURED)
        if body.lstrip()[:1] == b"[":
            return Body([bytes(r) for r in msgspec.json.decode(body, type=List[msgspec.Raw])], {}, False)
        return Body([body], {}, True)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


class Service:
    """Everything the routes share; built by :func:`create_app`."""

    def __init__(self, cfg: Config, *, gate: Optional[QuotaGate] = None, producer: Optional[Producer] = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.cfg = cfg
        self.auth = Auth(cfg)
        self.rules = Rules(cfg)
        self.clock = clock
        self.mediator = Mediator(cfg, stats=FlowStats(), clock=clock)
        self.gate = gate if gate is not None else (
            QuotaGate(cfg.redis.url, fail_open=cfg.server.fail_open, now_getter=clock) if cfg.redis else None)
        self.producer = producer
        self.metrics = ServiceMetrics()
        from meterflow.console import ClickHouseReader

        self.clickhouse = ClickHouseReader(cfg)

    # -- auth -------------------------------------------------------------------------------------------

    def admit(self, request: Request, tenant: Optional[str]) -> Optional[Response]:
        """None when the request's key admits ``tenant`` (None: any tenant the key has), else the 401/403."""
        who = self.auth.principal(presented_key(request))
        if who is None:
            return _error(401, "unauthorized", "send Authorization: Bearer <api key of the tenant>",)
        if tenant is not None and who != ADMIN and who != tenant:
            return _error(403, "forbidden", "this API key does not admit that tenant")
        request.state.principal = who
        return None

    # -- ingest -----------------------------------------------------------------------------------------

    async def ingest(self, request: Request) -> Response:
        denied = self.admit(request, None)
        if denied is not None:
            return denied
        principal: str = request.state.principal
        limit = self.cfg.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, "body_too_large", f"request body of {declared} bytes exceeds "
                          f"server.max_body_bytes = {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, "body_too_large", f"request body exceeds server.max_body_bytes = {limit}")
            chunks.append(chunk)
        try:
            body = split_body(b"".join(chunks), request.headers.get("content-type", "application/json"))
        except ValueError as exc:
            return _error(400, "invalid_json", str(exc))
        n = len(body.raws)
        if n == 0:
            return _error(400, "empty", "the array holds no events")
        if n > self.cfg.server.max_batch:
            return _error(413, "batch_too_large", f"{n} events in one request exceed server.max_batch = "
                          f"{self.cfg.server.max_batch}")
        rejected: List[_Rejected] = [_Rejected(i, None, "invalid_event", why) for i, why in body.problems.items()]
        mediated = self.mediator([(("http", i), raw) for i, raw in enumerate(body.raws) if raw is not None])
        for dl in mediated.dead_letters:
            i = int(dl.source.rsplit(":", 1)[1])
            if dl.tenant_id and principal != ADMIN and dl.tenant_id != principal:
                return _error(403, "forbidden", f"event {i} names tenant {dl.tenant_id!r}, which this key does "
                              "not admit", index=i)
            rejected.append(_Rejected(i, _event_id_of(body.raws[i]), dl.reason, dl.detail))
        events = [m for group in mediated.groups.values() for m in group]
        for m in events:
            if principal != ADMIN and m.event.tenant_id != principal:
                i = m.src[1]
                return _error(403, "forbidden", f"event {i} names tenant {m.event.tenant_id!r}, which this key "
                              "does not admit", index=i)
        accepted, retry_after = await self._gate(events, rejected)
        if accepted and self.producer is None:
            return _error(503, "ingest_disabled", "no [kafka] in the configuration: meter serve cannot produce")
        if accepted:
            try:
                await self.producer.send(  # type: ignore[union-attr]
                    [(customer_key(m.event.tenant_id, m.event.customer_id).encode(), m.raw) for m in accepted],
                    self.cfg.server.produce_timeout_seconds)
            except MeterError as exc:
                self.metrics.ingest.labels("failed", "kafka_unavailable").inc(len(accepted))
                return _error(503, "kafka_unavailable", f"{exc}; nothing of this request is known to be stored: "
                              "send it again (events are deduplicated by event_id)", {"Retry-After": "1"})
        rejected.sort(key=lambda r: r.index)
        self.metrics.ingest.labels("accepted", "").inc(len(accepted))
        for r in rejected:
            self.metrics.ingest.labels("rejected", r.reason).inc()
        out = {"accepted": len(accepted), "rejected": rejected}
        if accepted:
            return _json(out, 202)
        reasons = {r.reason for r in rejected}
        if reasons == {BLOCKED}:
            return _json(out, 429, {"Retry-After": str(retry_after)})
        if reasons <= {BLOCKED, UNAVAILABLE}:
            return _json(out, 503, {"Retry-After": "1"})
        first = rejected[0]
        return _json({**out, "reason": first.reason if body.single else "no_valid_event",
                      "detail": first.detail}, 400)

    async def _gate(self, events: list, rejected: List[_Rejected]) -> Tuple[list, int]:
        """The events the gateway state lets through (the others appended to ``rejected``) and the Retry-After
        seconds of the blocked ones (until the earliest period end among them, at least 1)."""
        if self.gate is None or not events:
            return events, 1
        by_type = self.rules.by_event_type
        feeds: List[List[Tuple[str, str, str]]] = []
        wanted: Dict[Tuple[str, str, str], int] = {}
        for m in events:
            ev = m.event
            keys = []
            if not m.excluded and not ev.correction:  # nothing billable to refuse (a correction lowers usage)
                for rule in by_type.get(ev.event_type, ()):
                    if not rule.where or matches(ev.properties, rule.where):
                        k = (ev.tenant_id, ev.customer_id, rule.code)
                        keys.append(k)
                        wanted.setdefault(k, len(wanted))
            feeds.append(keys)
        if not wanted:
            return events, 1
        decisions = await asyncio.to_thread(self.gate.check_many, list(wanted))
        self.metrics.redis_down.set(1 if any(d.reason == UNAVAILABLE for d in decisions) else 0)
        now = self.clock()
        accepted, retry = [], None
        for m, keys in zip(events, feeds):
            refusal = None
            for k in keys:
                d = decisions[wanted[k]]
                if not d.allowed:
                    refusal = (BLOCKED if d.known else UNAVAILABLE, k[2], d)
                    break
            if refusal is None:
                accepted.append(m)
                continue
            reason, metric, d = refusal
            if reason == BLOCKED:
                wait = 60 if d.blocked_by == "wallet" or d.period_end is None else \
                    max(1, math.ceil((d.period_end - now) / 1000))
                retry = wait if retry is None else min(retry, wait)
                detail = (f"metric {metric!r} is blocked until {ms_to_iso(d.period_end)}" if d.period_end and
                          d.blocked_by != "wallet" else f"metric {metric!r} is blocked ({d.blocked_by or 'quota'})")
            else:
                detail = "Redis cannot answer and server.fail_open = false"
            rejected.append(_Rejected(m.src[1], m.event.event_id, reason, detail))
        return accepted, retry or 1

    # -- reads ------------------------------------------------------------------------------------------

    async def entitlement(self, request: Request) -> Response:
        p = request.path_params
        denied = self.admit(request, p["tenant"])
        if denied is not None:
            return denied
        if self.gate is None:
            return _error(503, "no_redis", "no [redis] in the configuration: there is no live gateway state")
        d = self.gate.check(p["tenant"], p["customer"], p["metric"])
        self.metrics.redis_down.set(1 if d.reason == UNAVAILABLE else 0)
        return _json({"tenant_id": p["tenant"], "customer_id": p["customer"], "metric": p["metric"],
                      **_decision_json(d)})

    async def usage(self, request: Request) -> Response:
        p = request.path_params
        tenant, customer = p["tenant"], p["customer"]
        denied = self.admit(request, tenant)
        if denied is not None:
            return denied
        return _json(await asyncio.to_thread(self.usage_of, tenant, customer))

    def usage_of(self, tenant: str, customer: str) -> Dict[str, Any]:
        """The customer's current period per metric: live usage from the gateway state, money from
        ClickHouse ``usage_rated`` when readable, else rated here from the configured price."""
        sub = self.rules.subscription(customer_key(tenant, customer))
        codes = [m.code for m in self.cfg.metrics]
        decisions = self.gate.check_many([(tenant, customer, c) for c in codes]) if self.gate else \
            [None] * len(codes)
        rated, ch_note = self.clickhouse.current_rated(tenant, customer)
        metrics = []
        for code, d in zip(codes, decisions):
            ent = sub.entitlements.get(code)
            if (d is None or not d.known) and ent is None and code not in rated:
                continue
            row: Dict[str, Any] = {"metric": code, "usage": None, "included": ent.included if ent else None,
                                   "pct": None, "state": "", "period_end": None, "charge": None, "amount": None,
                                   "currency": sub.currency, "money_source": None}
            if d is not None and d.known:
                row.update(usage=d.used, included=d.included, pct=d.pct, state=d.state,
                           period_end=None if d.period_end is None else ms_to_iso(d.period_end))
            r = rated.get(code)
            if r is not None and (row["period_end"] is None or r["period_end"] == row["period_end"]):
                row.update(charge=r["charge"], amount=r["amount"], currency=r["currency"],
                           money_source="clickhouse")
                if row["usage"] is None:
                    row.update(usage=r["usage"], period_end=r["period_end"])
            elif row["usage"] is not None:
                price = sub.price(code)
                if price is not None:
                    row.update(charge=price.charge(row["usage"]), amount=price.amount(row["usage"]),
                               money_source="computed")
            metrics.append(row)
        return {"tenant_id": tenant, "customer_id": customer, "plan": sub.plan, "metrics": metrics,
                "clickhouse": ch_note or "ok"}

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok", "kafka": self.producer is not None, "redis": self.gate is not None})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.gate is not None:
            self.gate.close()


def create_app(cfg: Config, *, gate: Optional[QuotaGate] = None, producer: Optional[Producer] = None,
               clock: Callable[[], int] = now_ms) -> Starlette:
    """The ASGI app. Without ``producer`` one is made from ``[kafka]`` (none without it: ingest answers 503)."""
    from meterflow.console import console_routes

    if producer is None and cfg.kafka is not None:
        producer = Producer(cfg)
    svc = Service(cfg, gate=gate, producer=producer, clock=clock)

    def timed(route: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            t0 = time.perf_counter()
            resp = await handler(request)
            svc.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            svc.metrics.requests.labels(route, str(resp.status_code)).inc()
            return resp
        return wrapped

    routes = [
        Route("/v1/events", timed("/v1/events", svc.ingest), methods=["POST"]),
        Route("/v1/entitlements/{tenant}/{customer}/{metric}", timed("/v1/entitlements", svc.entitlement),
              methods=["GET"]),
        Route("/v1/usage/{tenant}/{customer}", timed("/v1/usage", svc.usage), methods=["GET"]),
        Route("/healthz", svc.healthz, methods=["GET"]),
        Route("/metrics", svc.prometheus, methods=["GET"]),
        *console_routes(svc),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        svc.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = svc
    return app


def serve(cfg: Config, host: Optional[str] = None, port: Optional[int] = None) -> int:
    """Run the service until stopped (SIGINT/SIGTERM: uvicorn finishes the requests in flight)."""
    import uvicorn

    if cfg.kafka is None:
        raise MeterError(f"meter serve needs [kafka] in {cfg.source_path} (POST /v1/events produces to "
                         "kafka.events_topic): add a [kafka] section with bootstrap_servers")
    app = create_app(cfg)
    h, p = host or cfg.server.host, cfg.server.port if port is None else port
    print(f"meter serve: listening on http://{h}:{p} (events to {cfg.kafka.events_topic} at "
          f"{cfg.kafka.bootstrap_servers})", flush=True)
    uvicorn.run(app, host=h, port=p, log_level="warning", access_log=False)
    return 0
