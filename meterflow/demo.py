"""``meter demo``: a realistic sample through the real pipeline on the embedded defaults."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from rich.progress import Progress

from meterflow.sample import customer_ids, generate_events, sample_config_toml, tenant_ids
from operators.periods import period_bounds
from operators.timeutil import ms_to_iso, now_ms


def run_demo(n_events: int, workdir: str, seed: int) -> int:
    from meterflow.reports import make_console, print_run_summary, query_usage, usage_table
    from meterflow.runner import run_flow
    from schemas.config import load_config
    from sinks.clickhouse import connect

    console = make_console()
    wd = Path(workdir)
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    now = now_ms()
    pstart, _ = period_bounds(now, "month", 0)
    tenants = tenant_ids(3)
    subscribed = {t: customer_ids(20) for t in tenants}
    cfg_path = wd / "meterflow.toml"
    cfg_path.write_text(sample_config_toml(tenants, subscribed, ms_to_iso(pstart), included=400)
                        + f'\n[clickhouse]\ndsn = "chdb://{(wd / "clickhouse").resolve()}"\n')
    events_path = wd / "events.jsonl"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating sample events", total=n_events)
        with events_path.open("wb") as f:
            for i, line in enumerate(generate_events(n_events, tenants=3, customers=60, start_ms=pstart,
                                                     span_ms=max(1, now - pstart), seed=seed)):
                f.write(line + b"\n")
                if i % 5000 == 0:
                    progress.update(task, completed=i)
    console.print(f"[bold]meterflow demo[/]: {n_events:,} events for {len(tenants)} tenants -> {events_path}")
    cfg = load_config(cfg_path)
    t0 = time.monotonic()
    result = run_flow(cfg, [str(events_path)], progress_out=sys.stderr, progress_every=5.0)
    print_run_summary(result, console)
    client, db = connect(cfg.clickhouse)
    rows = [r for r in query_usage(client, db, "period", metric="api_calls") if r["included"] is not None]
    rows.sort(key=lambda r: -r["value"] / r["included"])
    console.print(usage_table(rows, "period", 10, "top customers by share of included api_calls this period"))
    dl = client.query(f"SELECT reason, count() AS n FROM {db}.dead_letters GROUP BY reason ORDER BY n DESC")
    if dl.result_rows:
        console.print("dead letters by reason: " + ", ".join(f"{r}={n}" for r, n in dl.result_rows))
    console.print(f"done in {time.monotonic() - t0:.1f}s. Explore: meter usage --config {cfg_path} --by window "
                  f"--customer cust_00000")
    return 0
