"""``meter demo``: a realistic sample through the real pipeline on the embedded defaults."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from rich.progress import Progress

from meterflow.base.periods import period_bounds
from meterflow.base.timeutil import ms_to_iso, now_ms
from meterflow.sample import customer_ids, generate_events, generate_spike, sample_config_toml, tenant_ids

# The demo's spiking customer: ten ordinary days before the sample's first day, then ten times its daily average.
SPIKE_CUSTOMER = "cust_spike"
ANOMALY_TOML = ('\n[anomaly]\nfactor = 3.0\nbaseline_days = 30\nmin_history_days = 7\n'
                'metrics = ["api_calls", "tokens"]\n')


def run_demo(n_events: int, workdir: str, seed: int) -> int:
    from meterflow.reports import make_console, print_run_summary, usage_table
    from meterflow.runner import run_flow
    from meterflow.schemas.config import load_config
    from meterflow.sinks.clickhouse import connect
    from meterflow.sinks.clickhouse_schema import query_usage

    console = make_console()
    wd = Path(workdir)
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    now = now_ms()
    pstart, _ = period_bounds(now, "month", 0)
    tenants = tenant_ids(3)
    # cust_00001 of each tenant has a custom contract (in _demo_plans); the rest of 0-19 take 'pro' as it is
    subscribed = {t: [c for c in customer_ids(20) if c not in CUSTOM_CONTRACT] for t in tenants}
    subscribed[tenants[0]] = subscribed[tenants[0]] + [SPIKE_CUSTOMER]  # its usage spikes: an anomaly
    cfg_path = wd / "meterflow.toml"
    toml = sample_config_toml(tenants, subscribed, ms_to_iso(pstart), included=400, prices="every",
                              extra=_demo_plans(tenants, ms_to_iso(pstart)))
    # account managers hear when a customer's token bill passes these amounts (spend_crossed, per event)
    tokens = "[plans.entitlements.tokens]\n"
    toml = toml.replace(tokens, tokens + "spend_thresholds = [10.0, 25.0]\n", 1)
    cfg_path.write_text(toml + f'\n[clickhouse]\ndsn = "chdb://{(wd / "clickhouse").resolve()}"\n'
                        + f'\n[alerts]\njsonl = "{(wd / "alerts.jsonl").resolve()}"\n'
                        # the sample's overages are tens of dollars: bands at demo scale put items on every route
                        + '\n[review]\nbands = [5.0, 15.0, 40.0]\n' + ANOMALY_TOML)
    events_path = wd / "events.jsonl"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating sample events", total=n_events)
        with events_path.open("wb") as f:
            # The spiking customer's history (the days before the period) first, then its spike on the period's first
            # day (within the sample's span: never ahead of the wall clock), then the sample.
            spike = 0
            for line in generate_spike(tenants[0], SPIKE_CUSTOMER, pstart, seed=seed,
                                       spike_span_ms=min(2 * 3_600_000, max(1, now - pstart))):
                f.write(line + b"\n")
                spike += 1
            for i, line in enumerate(generate_events(n_events, tenants=3, customers=60, start_ms=pstart,
                                                     span_ms=max(1, now - pstart), seed=seed)):
                f.write(line + b"\n")
                if i % 5000 == 0:
                    progress.update(task, completed=i)
    console.print(f"[bold]meterflow demo[/]: {n_events:,} events for {len(tenants)} tenants and {spike:,} of "
                  f"{SPIKE_CUSTOMER}, whose usage spikes today -> {events_path}")
    cfg = load_config(cfg_path)
    t0 = time.monotonic()
    result = run_flow(cfg, [str(events_path)], progress_out=sys.stderr, progress_every=5.0)
    print_run_summary(result, console)
    client, db = connect(cfg.clickhouse)
    rows = [r for r in query_usage(client, db, "period", metric="api_calls") if r["included"] is not None]
    rows.sort(key=lambda r: -r["value"] / r["included"])
    console.print(usage_table(rows, "period", 10, "top customers by share of included api_calls this period"))
    _print_money(console, client, db)
    dl = client.query(f"SELECT reason, count() AS n FROM {db}.dead_letters GROUP BY reason ORDER BY n DESC")
    if dl.result_rows:
        console.print("dead letters by reason: " + ", ".join(f"{r}={n}" for r, n in dl.result_rows))
    _print_alerts(console, client, db)
    _print_review_queue(console, client, db, cfg_path)
    console.print(f"done in {time.monotonic() - t0:.1f}s. Explore: meter usage --config {cfg_path} --by window "
                  f"--customer cust_00000   |   meter charges --config {cfg_path} --customer cust_00001   |   "
                  f"meter alerts --config {cfg_path} --type spend_crossed   |   "
                  f"meter alerts --config {cfg_path} --type anomaly")
    console.print(f"alerts as JSON lines (what webhooks and the usage.alerts topic carry): {wd / 'alerts.jsonl'}")
    return 0


CUSTOM_CONTRACT = ("cust_00001",)


def _demo_plans(tenants: list, anchor: str) -> str:
    """Besides the soft 'pro' plan (a price card on every metric: ``meterflow.sample.PRICE_CARDS``): a hard-enforced
    'team' plan billed in EUR by the package, a prepaid wallet (drawn at credit_rates; no price card on the same
    metric), and a custom contract on 'pro' (its own api_calls price with a committed minimum), so every kind of
    alert and price shows up; customers 35+ have no subscription (metered, not evaluated)."""
    out = ['[[plans]]\ncode = "team"\ncurrency = "EUR"\n[plans.entitlements.api_calls]\nincluded = 60\n'
           'thresholds = [50, 75, 90, 100]\nenforcement = "hard"\n'
           'price = { model = "package", package_size = 50, package_amount = 2.5 }\n',
           '[[plans]]\ncode = "prepaid"\n[plans.entitlements.api_calls]\nincluded = 1000\n'
           'enforcement = "auto_overage"\noverage_rate = 0.003\n']
    for t in tenants:
        for c in CUSTOM_CONTRACT:
            out.append(f'[[subscriptions]]\ntenant_id = "{t}"\ncustomer_id = "{c}"\nplan = "pro"\n'
                       f'anchor = "{anchor}"\naccount_name = "{t.title()} / {c} (custom contract)"\narr = 250000.0\n'
                       '[subscriptions.overrides.api_calls]\nincluded = 1000\n'
                       'price = { model = "per_unit", unit_amount = 0.0025, minimum = 5.0 }\n')
        for c in customer_ids(35)[20:30]:
            out.append(f'[[subscriptions]]\ntenant_id = "{t}"\ncustomer_id = "{c}"\nplan = "team"\n'
                       f'anchor = "{anchor}"\naccount_name = "{t.title()} / {c}"\narr = 24000.0\n')
        for c in customer_ids(35)[30:35]:
            out.append(f'[[subscriptions]]\ntenant_id = "{t}"\ncustomer_id = "{c}"\nplan = "prepaid"\n'
                       f'anchor = "{anchor}"\naccount_name = "{t.title()} / {c}"\n'
                       f'[subscriptions.wallet]\nbalance = 0.3\ncredit_rates = {{ api_calls = 0.01 }}\n'
                       f'on_exhausted = "block"\n')
    return "\n".join(out)


def _print_money(console, client, db: str) -> None:
    """The customers whose overage costs the most (rated rows, exact amounts) and the totals per currency."""
    from rich.table import Table

    from meterflow.reports import _money, _num, charges_tables
    from meterflow.sinks.clickhouse_schema import query_rated

    rows = query_rated(client, db)
    if not rows:
        return
    top = sorted(rows, key=lambda r: (-r["overage_amount"], -r["amount"], r["tenant_id"], r["customer_id"]))
    t = Table(title="top customers by overage amount this period (exact; meter charges lists every rated row)",
              title_justify="left")
    right = ("usage", "included", "overage units", "overage amount", "amount")
    for c in ("tenant", "customer", "plan", "metric", "model", *right, "currency"):
        t.add_column(c, justify="right" if c in right else "left")
    for r in top[:10]:
        t.add_row(r["tenant_id"], r["customer_id"], r["plan"] + (" (custom)" if r["custom_rate"] else ""),
                  r["metric"], r["price_model"], _num(r["usage"]),
                  "-" if r["included"] is None else _num(r["included"]), _num(r["overage_units"]),
                  _money(r["overage_amount"]), _money(r["amount"]), r["currency"])
    console.print(t)
    console.print(charges_tables(rows, 0)[1])


def _print_alerts(console, client, db: str) -> None:
    from meterflow.base.timeutil import parse_rfc3339_ms
    from meterflow.reports import alerts_table, anomaly_table
    from meterflow.sinks.clickhouse_schema import query_alerts

    rows = query_alerts(client, db)
    if not rows:
        console.print("no alerts fired")
        return
    by_type: dict = {}
    for r in rows:
        by_type[r["type"]] = by_type.get(r["type"], 0) + 1
    console.print("alerts by type: " + ", ".join(f"{k}={v}" for k, v in sorted(by_type.items())))
    lat = sorted(parse_rfc3339_ms(r["detected_at"]) - parse_rfc3339_ms(r["ingested_at"])
                 for r in rows if r.get("ingested_at"))
    if lat:
        console.print(f"ingest -> alert detected: p50 {lat[len(lat) // 2]} ms, p99 {lat[int(len(lat) * 0.99)]} ms, "
                      f"max {lat[-1]} ms over {len(lat)} alerts (sample events carry historical times, so this is "
                      "the pipeline's own latency)")
    for r in [r for r in rows if r["type"] == "spend_crossed"][:3]:
        console.print(f"spend_crossed: {r['tenant_id']}/{r['customer_id']} {r['metric']} passed "
                      f"{r['threshold_amount']:,.2f} (charge now {r['amount']:,.4f}) on event {r['event_id']}",
                      highlight=False)
    shown = [r for r in rows if r["type"] not in ("threshold_crossed", "spend_crossed", "anomaly")][-6:] + \
        [r for r in rows if r["type"] == "threshold_crossed"][-6:]
    console.print(alerts_table(shown, "a few of the alerts (meter alerts lists them all)"))
    spikes = [r for r in rows if r["type"] == "anomaly"]
    if spikes:
        console.print(anomaly_table(spikes[-6:], "anomalies: a day's usage above 3x its trailing daily average "
                                    "(meter alerts --type anomaly)"))


def _print_review_queue(console, client, db: str, cfg_path: Path) -> None:
    """A short look at the overage review queue (README: Overage review queue): items per route and status, and
    the largest overages with what a reviewer needs."""
    from rich.table import Table

    from meterflow.sinks.clickhouse_reviews import query_reviews

    rows = query_reviews(client, db)
    if not rows:
        console.print("review queue: no overage this period")
        return
    routes: dict = {}
    for r in rows:
        routes.setdefault(r["route"], []).append(r)
    console.print("review queue by route: " + ", ".join(
        f"{route}={len(rs)} ({sum(x['status'] == 'pending' for x in rs)} pending)" for route, rs in routes.items()))
    rows.sort(key=lambda r: r["status"] != "pending")  # stable: the largest pending ones first, then the rest
    t = Table(title="the largest overages in the review queue (pending first)", title_justify="left")
    for c in ("review_id", "account", "metric", "usage / included", "overage", "contract", "route", "status"):
        t.add_column(c, justify="right" if c in ("usage / included", "overage") else "left")
    for r in rows[:6]:
        inc = "-" if r["included"] is None else f"{r['included']:,.0f}"
        t.add_row(r["review_id"], r["account_name"] or f"{r['tenant_id']}/{r['customer_id']}", r["metric"],
                  f"{r['usage']:,.0f} / {inc}", f"{format(r['overage_amount'].normalize(), 'f')} {r['currency']}",
                  r["contract"], r["route"], r["status"])
    console.print(t)
    console.print(f"decide: meter review approve|reject REVIEW_ID --config {cfg_path} --by NAME [--note TEXT]   |   "
                  f"meter review list --config {cfg_path} --status pending")
