"""``meter run --metrics-port`` scraped while it runs, then the console of ``meter serve`` on what it wrote, in
Debian's headless chromium (Playwright): alerts listed and filtered, a customer's usage chart, dead letters."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meterflow.base.timeutil import ms_to_iso
from tests.e2e.support import REPO, env, meter_argv
from tests.service_support import ADMIN_TOKEN, free_port, running_service

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ARTIFACTS = REPO / "var" / "test-artifacts"


def _config(tenant: str, chdb: Path, kafka_bootstrap: str = "") -> str:
    text = f"""[pipeline]
max_clock_skew = "1h"
epoch_interval = "200ms"
flush_interval = "100ms"

[[tenants]]
id = "{tenant}"
excluded_customers = ["internal"]
api_keys = ["a-key-for-the-console-test"]

[[metrics]]
code = "api_calls"
event_type = "api_call"

[[plans]]
code = "pro"
[plans.entitlements.api_calls]
included = 10
thresholds = [50, 100]
enforcement = "hard"
overage_rate = 50.0

[[subscriptions]]
tenant_id = "{tenant}"
customer_id = "c1"
plan = "pro"
period = "month"
anchor = "2020-01-01T00:00:00Z"

[clickhouse]
dsn = "chdb://{chdb}"

[server]
admin_token = "{ADMIN_TOKEN}"
"""
    if kafka_bootstrap:
        text += (f'\n[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\nevents_topic = "console-{tenant}"\n'
                 f'review_decisions_topic = "console-decisions-{tenant}"\n')
    return text


def _scrape(port: int) -> dict:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A ``meter run --input - --metrics-port P`` fed on stdin: scraped before its input ends, then finished."""
    d = tmp_path_factory.mktemp("console")
    tenant = f"tc{uuid.uuid4().hex[:8]}"
    chdb = d / "chdb"
    run_cfg = d / "run.toml"
    run_cfg.write_text(_config(tenant, chdb))
    now = int(time.time() * 1000)
    start = now - 1000  # every event at one instant: one billing period whatever the date
    lines = [json.dumps({"event_id": f"e{i}", "tenant_id": tenant, "customer_id": "c1", "event_type": "api_call",
                         "timestamp": ms_to_iso(start)}) for i in range(12)]
    lines += [lines[0],  # duplicate
              "{broken", "[1]",  # invalid_json, invalid_event
              json.dumps({"event_id": "u", "tenant_id": "nobody", "customer_id": "c", "event_type": "api_call",
                          "timestamp": ms_to_iso(now)}),  # unknown_tenant
              json.dumps({"event_id": "x", "tenant_id": tenant, "customer_id": "internal", "event_type": "api_call",
                          "timestamp": ms_to_iso(now)})]  # excluded
    # The stdin source reads batches of 2048 lines: fill the first one (excluded events), so the flow meters it
    # while its input stays open and the scrape sees a running flow.
    lines += [json.dumps({"event_id": f"x{i}", "tenant_id": tenant, "customer_id": "internal",
                          "event_type": "api_call", "timestamp": ms_to_iso(now)}) for i in range(2048 - len(lines))]
    port = free_port()
    proc = subprocess.Popen(meter_argv("run", "--config", str(run_cfg), "--input", "-", "--metrics-port", str(port),
                                       "--json", "--progress-every", "0"), cwd=REPO, env=env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(("\n".join(lines) + "\n").encode())
    proc.stdin.flush()
    deadline, live = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        try:
            live = _scrape(port)
            if live.get(("meterflow_events_read_total", ())) == len(lines) and \
                    live.get(("meterflow_alerts_total", (("type", "blocked"),))) == 1:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        time.sleep(0.2)
    proc.stdin.close()
    proc.stdin = None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary = json.loads(out.decode().splitlines()[-1])
    return {"dir": d, "tenant": tenant, "chdb": chdb, "live": live, "summary": summary, "events": len(lines)}


def test_flow_metrics_match_the_runs_counters(flow_run):
    live, counters = flow_run["live"], flow_run["summary"]["counters"]
    assert live[("meterflow_events_read_total", ())] == counters["read"] == flow_run["events"]
    for outcome, key in (("accepted", "accepted"), ("duplicate", "duplicates"), ("excluded", "excluded"),
                         ("dead_lettered", "dead_lettered")):
        assert live[("meterflow_events_total", (("outcome", outcome),))] == counters[key], outcome
    assert (counters["accepted"], counters["duplicates"], counters["excluded"], counters["dead_lettered"]) == \
        (12, 1, 2048 - 16, 3)
    for reason in ("invalid_json", "invalid_event", "unknown_tenant"):
        assert live[("meterflow_dead_letters_total", (("reason", reason),))] == 1, reason
    assert live[("meterflow_alerts_total", (("type", "threshold_crossed"),))] == 2
    assert live[("meterflow_alerts_total", (("type", "blocked"),))] == 1
    assert live[("meterflow_ingest_to_detection_seconds_count", ())] == 3
    assert live[("meterflow_sink_batch_seconds_count", (("sink", "clickhouse"),))] >= 1
    assert live[("meterflow_sink_errors_total", (("sink", "clickhouse"),))] == 0
    assert live[("meterflow_batch_seconds_count", ())] >= 1  # the meter step's own batches
    assert live[("meterflow_redis_down", ())] == 0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (./dev setup installs Debian's chromium with apt-get where it can)")


def test_console_in_a_headless_browser(flow_run, kafka):
    from playwright.sync_api import sync_playwright

    browser_path = _chromium()
    tenant = flow_run["tenant"]
    serve_cfg = flow_run["dir"] / "serve.toml"
    serve_cfg.write_text(_config(tenant, flow_run["chdb"], kafka.bootstrap))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_service(serve_cfg) as client, sync_playwright() as pw:
        base = str(client.base_url).rstrip("/")
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(base + "/")
        assert "/login" in page.url  # the console needs the admin token
        page.fill("input[name=token]", "wrong-token")
        page.click("button[type=submit]")
        assert "wrong admin token" in page.content()
        page.fill("input[name=token]", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("table.alerts")
        rows = page.locator("table.alerts tbody tr")
        assert rows.count() == 3
        assert sorted(rows.nth(i).locator("td").nth(1).inner_text() for i in range(3)) == \
            ["blocked", "threshold_crossed", "threshold_crossed"]
        page.select_option("select[name=type]", "blocked")
        page.click("text=Filter")
        page.wait_for_url("**type=blocked**")
        assert page.locator("table.alerts tbody tr").count() == 1
        page.screenshot(path=str(ARTIFACTS / "console-alerts.png"), full_page=True)
        # the customer's link, matched exactly: the random tenant id ("tc…") may itself contain "c1"
        page.click('table.alerts tbody tr a >> text="c1"')
        try:
            page.wait_for_selector("svg.usage-chart", timeout=90_000)
        except Exception as exc:  # say what the page shows instead of a bare timeout
            page.screenshot(path=str(ARTIFACTS / "console-customer-failed.png"), full_page=True)
            raise AssertionError(f"no usage chart at {page.url}: {page.inner_text('body')[:2000]}") from exc
        heading = page.locator("section.metric h2").inner_text()
        assert heading.startswith("api_calls: 12 of 10") and "120.0 % of included" in heading
        points = page.locator("svg.usage-chart polyline.usage").get_attribute("points") or ""
        assert len(points.split()) >= 3 and page.locator("svg.usage-chart line.included").count() == 1
        page.screenshot(path=str(ARTIFACTS / "console-customer.png"), full_page=True)
        page.click("text=Dead letters")
        page.wait_for_selector("table.by-reason")
        text = page.locator("table.by-reason").inner_text()
        for reason in ("invalid_json", "invalid_event", "unknown_tenant"):
            assert reason in text
        # The review queue: 2 units over at 50.0 = 100.0, the "approve" route; approve it end to end.
        page.click("text=Review queue")
        page.wait_for_selector("table.reviews")
        row = page.locator("table.reviews tbody tr")
        assert row.count() == 1 and row.locator("span.status").inner_text() == "pending"
        assert "approve" in row.inner_text() and "100" in row.inner_text()
        review_id = row.locator("td").first.inner_text()
        row.locator("button[value=approve]").click()
        page.wait_for_selector("table.reviews")
        row = page.locator("table.reviews tbody tr")
        assert row.locator("span.status").inner_text() == "approved"
        assert "console" in row.inner_text() and row.locator("button").count() == 0  # decided_by; no buttons
        page.screenshot(path=str(ARTIFACTS / "console-reviews.png"), full_page=True)
        browser.close()
        # A second decision on the same amount is refused with the review queue's own reason.
        again = client.post(f"/v1/reviews/{review_id}/reject", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert again.status_code == 409 and "already approved" in again.json()["detail"]
        # The console's HTTP side: without the token a page redirects to the login, a decision is refused.
        assert client.get("/", follow_redirects=False).status_code == 303
        assert client.post("/reviews/r1/approve").status_code == 401
    assert (ARTIFACTS / "console-customer.png").stat().st_size > 1000
    assert ADMIN_TOKEN not in client.log_text  # type: ignore[attr-defined]


def test_console_says_when_embedded_clickhouse_is_held(tmp_path, kafka):
    """While another process holds the chDB path, pages say so instead of failing (and the API rates itself)."""
    tenant = f"th{uuid.uuid4().hex[:8]}"
    chdb = tmp_path / "chdb"
    holder_cfg = tmp_path / "holder.toml"
    holder_cfg.write_text(_config(tenant, chdb))
    # A process that opens the path and keeps it: python -c connect(...) then sleep.
    holder = subprocess.Popen(
        [str(Path(meter_argv("x")[0]).parent / "python"), "-c",
         "import sys, time; from meterflow.schemas.config import load_config; "
         "from meterflow.sinks.clickhouse import connect; connect(load_config(sys.argv[1]).clickhouse); "
         "print('open', flush=True); time.sleep(120)", str(holder_cfg)],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        serve_cfg = tmp_path / "serve.toml"
        serve_cfg.write_text(_config(tenant, chdb, kafka.bootstrap))
        with running_service(serve_cfg) as client:
            h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            for path in ("/", "/dead-letters", "/reviews", f"/customers/{tenant}/c1"):
                r = client.get(path, headers=h)
                assert r.status_code == 200 and "is held by another process" in r.text, path
            usage = client.get(f"/v1/usage/{tenant}/c1", headers=h).json()
            assert "is held by another process" in usage["clickhouse"]
    finally:
        holder.kill()
        holder.wait()
