"""The web console of ``meter serve`` (README: HTTP service): server-rendered HTML, no build step, no script.

Pages (admin token: ``Authorization: Bearer`` or the cookie the login form sets): alerts filtered by type and
customer (``/``), a customer's usage against included over its current period as an inline SVG chart
(``/customers/{tenant}/{customer}``), dead letters by reason (``/dead-letters``) and the overage review queue
with approve/reject (``/reviews``).

ClickHouse is read through :class:`ClickHouseReader`. Embedded chDB opens a data path in one process at a time:
while ``meter run`` writes the path, the console cannot read it and says so on each page (and the usage API
rates from the configured price instead); a ClickHouse server DSN has no such limit.
"""

from __future__ import annotations

import asyncio
import html
import importlib
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from meterflow.base.errors import MeterError
from meterflow.base.timeutil import ms_to_iso
from meterflow.http_auth import presented_key
from meterflow.schemas.alerts import ALERT_TYPES
from meterflow.schemas.config import Config

COOKIE = "meterflow_admin"


class ClickHouseReader:
    """Opens ClickHouse on first use; with embedded chDB only when no other process holds the path."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._client: Any = None
        self.db = ""
        self._lock = threading.Lock()

    def client(self) -> Tuple[Any, str]:
        """(client, database), or raises MeterError with the reason the console shows."""
        from meterflow.sinks.clickhouse import connect, embedded_holder, resolve

        with self._lock:
            if self._client is None:
                dsn, _db, embedded = resolve(self.cfg.clickhouse)
                if embedded:
                    path = Path(dsn[len("chdb://"):])
                    holder = embedded_holder(path)
                    if holder is not None:
                        raise MeterError(f"embedded ClickHouse at {path} is held by another process ({holder}): "
                                         "chDB opens a data path in one process at a time, so this page cannot "
                                         "read it while that process runs; set clickhouse.dsn to a ClickHouse "
                                         "server for a console beside a running flow")
                    if not path.exists():
                        raise MeterError(f"embedded ClickHouse at {path} does not exist yet (nothing was written)")
                self._client, self.db = connect(self.cfg.clickhouse)
            return self._client, self.db

    def current_rated(self, tenant: str, customer: str) -> Tuple[Dict[str, Dict[str, Any]], str]:
        """The latest ``usage_rated`` row per metric of a customer, and "" or why ClickHouse was not read."""
        try:
            client, db = self.client()
            q = client.query(
                f"SELECT metric, argMax(charge, period_start) AS charge, argMax(amount, period_start) AS amount, "
                f"argMax(currency, period_start) AS currency, argMax(usage, period_start) AS usage, "
                f"toUnixTimestamp64Milli(max(period_end)) AS pe FROM {db}.usage_rated "
                "WHERE tenant_id = {t:String} AND customer_id = {c:String} GROUP BY metric",
                parameters={"t": tenant, "c": customer})
            return {r["metric"]: {**r, "period_end": ms_to_iso(r["pe"])} for r in q.named_results()}, ""
        except MeterError as exc:
            return {}, str(exc)
        except Exception as exc:  # a server that cannot answer: rate from the price instead
            return {}, f"ClickHouse query failed: {type(exc).__name__}: {str(exc)[:200]}"

    def has_view(self, name: str) -> bool:
        client, db = self.client()
        q = client.query("SELECT count() FROM system.tables WHERE database = {d:String} AND name = {n:String}",
                         parameters={"d": db, "n": name})
        return bool(q.result_rows[0][0])


# -- HTML ------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{background:#1f2937;color:#fff;padding:.6em 1em}
header a{color:#cbd5e1;margin-right:1.2em;text-decoration:none}header b{margin-right:2em}main{padding:1em}
table{border-collapse:collapse;font-size:.9em}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}
.note{background:#fef3c7;padding:.6em;border-left:4px solid #d97706}.ok{color:#047857}.bad{color:#b91c1c}
form.inline{display:inline}"""


def e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    nav = ('<header><b>meterflow</b><a href="/">Alerts</a><a href="/reviews">Review queue</a>'
           '<a href="/dead-letters">Dead letters</a><a href="/logout">Log out</a></header>')
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)} - meterflow</title>"
                        f"<style>{_CSS}</style></head><body>{nav}<main><h1>{e(title)}</h1>{body}</main></body></html>",
                        status_code=status)


def note(text: str) -> str:
    return f'<p class="note" role="status">{e(text)}</p>'


def table(headers: List[str], rows: List[List[str]], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def usage_chart(points: List[Tuple[int, float]], start: int, end: int, included: Optional[float],
                width: int = 640, height: int = 240) -> str:
    """An inline SVG: cumulative usage over the period (a step line) against ``included`` (dashed)."""
    top = max([v for _, v in points] + [included or 0.0, 1.0]) * 1.1
    span = max(1, end - start)

    def xy(t: int, v: float) -> str:
        x = 40 + (min(max(t, start), end) - start) / span * (width - 50)
        return f"{x:.1f},{height - 20 - v / top * (height - 30):.1f}"

    path, last = [xy(start, 0.0)], 0.0
    for t, v in points:
        path += [xy(t, last), xy(t, v)]
        last = v
    if points:
        path.append(xy(min(end, points[-1][0]), last))
    parts = [f'<svg class="usage-chart" role="img" aria-label="usage against included" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="40" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" stroke="#999"/>',
             f'<polyline class="usage" fill="none" stroke="#2563eb" stroke-width="2" points="{" ".join(path)}"/>']
    if included:
        y = height - 20 - included / top * (height - 30)
        parts.append(f'<line class="included" x1="40" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#dc2626" '
                     f'stroke-dasharray="6 4"/><text x="44" y="{y - 4:.1f}" font-size="11" fill="#dc2626">'
                     f'included {e(_n(included))}</text>')
    parts.append(f'<text x="40" y="{height - 4}" font-size="11">{e(ms_to_iso(start))}</text>'
                 f'<text x="{width - 10}" y="{height - 4}" font-size="11" text-anchor="end">{e(ms_to_iso(end))}</text>'
                 f'<text x="{width - 10}" y="14" font-size="11" text-anchor="end">usage {e(_n(last))}</text></svg>')
    return "".join(parts)


def _n(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return f"{int(x):,}"
    return f"{x:,}" if isinstance(x, (int, float)) else str(x)


# -- routes ----------------------------------------------------------------------------------------------

def console_routes(svc: Any) -> List[Route]:
    """The console's routes on a :class:`meterflow.service.Service` (its auth, gate, ClickHouse reader)."""
    ch = svc.clickhouse

    def admin(request: Request) -> Optional[Response]:
        if not svc.cfg.server.admin_token:
            return page("Console disabled", note("set [server] admin_token (or METER_SERVER_ADMIN_TOKEN) to enable "
                                                 "the console"), 403)
        if svc.auth.is_admin(presented_key(request) or request.cookies.get(COOKIE)):
            return None
        if request.method == "GET":
            return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
        return JSONResponse({"reason": "unauthorized", "detail": "the admin token is needed"}, 401)

    async def login(request: Request) -> Response:
        nxt = request.query_params.get("next", "/")
        nxt = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        if request.method == "POST":
            form = await _form(request)
            token = form.get("token", "")
            if svc.cfg.server.admin_token and svc.auth.is_admin(token):
                resp = RedirectResponse(nxt, 303)
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
                return resp
            return page("Log in", note("wrong admin token") + _login_form(nxt), 401)
        return page("Log in", _login_form(nxt))

    async def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(COOKIE)
        return resp

    async def alerts(request: Request) -> Response:
        denied = admin(request)
        if denied is not None:
            return denied
        typ = request.query_params.get("type") or None
        customer = request.query_params.get("customer") or None
        opts = "".join(f'<option value="{t}"{" selected" if t == typ else ""}>{t}</option>' for t in ALERT_TYPES)
        form = (f'<form method="get"><label>type <select name="type"><option value="">any</option>{opts}</select>'
                f'</label> <label>customer <input name="customer" value="{e(customer)}"></label> '
                '<button type="submit">Filter</button></form>')
        try:
            from meterflow.sinks.clickhouse_schema import query_alerts

            client, db = await asyncio.to_thread(ch.client)
            rows = await asyncio.to_thread(query_alerts, client, db, customer=customer,
                                           type_=typ if typ in ALERT_TYPES else None, limit=500)
        except MeterError as exc:
            return page("Alerts", form + note(str(exc)))
        out = [[e(r["detected_at"]), e(r["type"]), e(r["tenant_id"]),
                f'<a href="/customers/{quote(r["tenant_id"])}/{quote(r["customer_id"])}">{e(r["customer_id"])}</a>',
                e(r["metric"]), e(r["threshold_pct"]), e(_n(r["usage"])), e(r["included"]), e(r["action"])]
               for r in reversed(rows)]
        body = form + (table(["detected", "type", "tenant", "customer", "metric", "threshold %", "usage",
                              "included", "action"], out, "alerts") if out else note("no alerts match"))
        return page("Alerts", body)

    async def customer(request: Request) -> Response:
        denied = admin(request)
        if denied is not None:
            return denied
        tenant, cust = request.path_params["tenant"], request.path_params["customer"]
        title = f"Customer {tenant}/{cust}"
        # (Redis and ClickHouse reads off the event loop: a slow store must not stall every other page)
        live = await asyncio.to_thread(svc.usage_of, tenant, cust) if svc.gate is not None else None
        try:
            charts = await asyncio.to_thread(_customer_charts, ch, tenant, cust)
        except MeterError as exc:
            charts = note(str(exc))
        body = charts
        if live is not None and live["metrics"]:
            body += "<h2>Live standing (gateway state)</h2>" + table(
                ["metric", "usage", "included", "pct", "state", "charge", "amount"],
                [[e(m["metric"]), e(m["usage"]), e(m["included"]), e(m["pct"]), e(m["state"]), e(m["charge"]),
                  e(m["amount"])] for m in live["metrics"]])
        return page(title, body)

    async def dead_letters(request: Request) -> Response:
        denied = admin(request)
        if denied is not None:
            return denied
        try:
            client, db = await asyncio.to_thread(ch.client)
            by_reason = (await asyncio.to_thread(client.query, f"SELECT reason, count() AS n FROM {db}.dead_letters "
                                                 "GROUP BY reason ORDER BY n DESC, reason")).result_rows
            latest = (await asyncio.to_thread(client.query, "SELECT toString(received_at), reason, source, detail "
                                              f"FROM {db}.dead_letters ORDER BY received_at DESC LIMIT 50")).result_rows
        except MeterError as exc:
            return page("Dead letters", note(str(exc)))
        body = "<h2>By reason</h2>" + (table(["reason", "dead letters"], [[e(r), e(n)] for r, n in by_reason],
                                             "by-reason") if by_reason else note("no dead letters"))
        if latest:
            body += "<h2>Latest 50</h2>" + table(["received", "reason", "source", "detail"],
                                                 [[e(c) for c in r] for r in latest])
        return page("Dead letters", body)

    async def reviews(request: Request) -> Response:
        denied = admin(request)
        if denied is not None:
            return denied
        try:
            if not await asyncio.to_thread(ch.has_view, "overage_reviews"):
                return page("Review queue", note("the review queue is empty (this build has no overage_reviews view)"))
            client, db = await asyncio.to_thread(ch.client)
            q = await asyncio.to_thread(client.query, f"SELECT * FROM {db}.overage_reviews ORDER BY "
                                        "status = 'pending' DESC, updated_at DESC LIMIT 500")
            rows = list(q.named_results())
        except MeterError as exc:
            return page("Review queue", note(str(exc)))
        if not rows:
            return page("Review queue", note("the review queue is empty"))
        out = []
        for r in rows:
            rid = e(r.get("review_id"))
            buttons = "" if r.get("status") != "pending" else "".join(
                f'<form class="inline" method="post" action="/reviews/{quote(str(r.get("review_id")))}/{a}">'
                f'<input type="hidden" name="by" value="console"><button type="submit" name="action" '
                f'value="{a}">{a}</button></form>' for a in ("approve", "reject"))
            out.append([rid, e(r.get("tenant_id")), e(r.get("customer_id")), e(r.get("account_name")),
                        e(r.get("metric")), e(r.get("overage_amount")), e(r.get("currency")), e(r.get("route")),
                        f'<span class="status">{e(r.get("status"))}</span>', e(r.get("decided_by")), buttons])
        return page("Review queue", table(["review", "tenant", "customer", "account", "metric", "overage amount",
                                           "currency", "route", "status", "decided by", ""], out, "reviews"))

    async def decide(request: Request) -> Response:
        denied = admin(request)
        if denied is not None:
            return denied
        action = request.path_params["action"]
        if action not in ("approve", "reject"):
            return JSONResponse({"reason": "not_found", "detail": "approve or reject"}, 404)
        form = await _form(request)
        by = form.get("by") or request.query_params.get("by") or "console"
        note_text = form.get("note") or request.query_params.get("note") or ""
        try:
            result = await asyncio.to_thread(record_decision, svc.cfg, request.path_params["review_id"], action, by,
                                             note_text)
        except MeterError as exc:
            return JSONResponse({"reason": "decision_failed", "detail": str(exc)}, 409)
        if result is None:
            return JSONResponse({"reason": "not_implemented", "detail": "this build records no review decisions "
                                 "(the review queue module is not installed)"}, 501)
        if request.url.path.startswith("/v1/"):
            return JSONResponse({"review_id": request.path_params["review_id"], "status": result})
        return RedirectResponse("/reviews", 303)

    return [
        Route("/", alerts, methods=["GET"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["GET"]),
        Route("/customers/{tenant}/{customer}", customer, methods=["GET"]),
        Route("/dead-letters", dead_letters, methods=["GET"]),
        Route("/reviews", reviews, methods=["GET"]),
        Route("/reviews/{review_id}/{action}", decide, methods=["POST"]),
        Route("/v1/reviews/{review_id}/{action}", decide, methods=["POST"]),
    ]


def record_decision(cfg: Config, review_id: str, action: str, by: str, note_text: str) -> Optional[str]:
    """Record an approve/reject through the review queue's own code (``meter review approve|reject``:
    ``meterflow.review_cmd.decide``), returning the new status; None when this build has no review queue.
    Raises MeterError (the item does not exist, is auto-applied, or already has a decision on its amount)."""
    try:
        mod = importlib.import_module("meterflow.review_cmd")
    except ImportError:
        return None
    fn = getattr(mod, "decide", None)
    if fn is None:
        return None
    return str(fn(cfg, review_id, action, by, note_text).status)


async def _form(request: Request) -> Dict[str, str]:
    """A urlencoded form body (the console's forms), read without python-multipart; {} for other bodies."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = await request.body()
    if len(body) > 65536:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}


def _login_form(nxt: str) -> str:
    return (f'<form method="post" action="/login?{urlencode({"next": nxt})}"><label>admin token '
            '<input type="password" name="token" autocomplete="current-password"></label> '
            '<button type="submit">Log in</button></form>')


def _customer_charts(ch: ClickHouseReader, tenant: str, customer: str) -> str:
    client, db = ch.client()
    periods = client.query(
        "SELECT metric, toUnixTimestamp64Milli(argMax(period_start, period_start)) AS ps, "
        "toUnixTimestamp64Milli(argMax(period_end, period_start)) AS pe, argMax(value, period_start) AS value, "
        f"argMax(included, period_start) AS included FROM {db}.usage_by_period "
        "WHERE tenant_id = {t:String} AND customer_id = {c:String} GROUP BY metric ORDER BY metric",
        parameters={"t": tenant, "c": customer}).named_results()
    aggregation = {m.code: m.aggregation for m in ch.cfg.metrics}
    out = []
    for p in periods:
        windows = client.query(
            f"SELECT toUnixTimestamp64Milli(window_end) AS we, sum(value) AS v FROM {db}.usage_by_window "
            "WHERE tenant_id = {t:String} AND customer_id = {c:String} AND metric = {m:String} "
            "AND window_start >= fromUnixTimestamp64Milli({ps:Int64}, 'UTC') "
            "AND window_start < fromUnixTimestamp64Milli({pe:Int64}, 'UTC') GROUP BY we ORDER BY we",
            parameters={"t": tenant, "c": customer, "m": p["metric"], "ps": p["ps"], "pe": p["pe"]}).result_rows
        points, total = [], 0.0
        additive = aggregation.get(p["metric"]) in ("count", "sum")
        for we, v in windows:
            total = total + v if additive else v
            points.append((we, total))
        if points and additive:
            points[-1] = (points[-1][0], p["value"])  # the period value is exact; windows of other periods excluded
        pct = "" if not p["included"] else f" ({p['value'] / p['included'] * 100:.1f} % of included)"
        out.append(f'<section class="metric" data-metric="{e(p["metric"])}"><h2>{e(p["metric"])}: '
                   f'{e(_n(p["value"]))} of {e(_n(p["included"]) if p["included"] is not None else "-")}{e(pct)}</h2>'
                   f'{usage_chart(points, p["ps"], p["pe"], p["included"])}</section>')
    return "".join(out) or note("no usage recorded for this customer")
