"""The real ``meter serve`` process for tests: a config on the session's broker and redis-server, a free port."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import httpx

from tests.e2e.support import REPO, env, meter_argv

ADMIN_TOKEN = "admin-token-" + "x" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_config(path: Path, *, bootstrap: str, topic: str, redis_url: Optional[str], tenants: dict,
                   chdb_dir: Path, extra_server: str = "", included: float = 1000, overage_rate: float = 0.5,
                   subscriptions: str = "", produce_timeout: str = "10s") -> Path:
    """``tenants``: {tenant id: api key}. One metric ``api_calls`` (count of ``api_call``), plan ``pro`` (hard)."""
    text = ['[pipeline]\nmax_clock_skew = "1h"\n']
    for t, key in tenants.items():
        text.append(f'[[tenants]]\nid = "{t}"\napi_keys = ["{key}"]\nexcluded_customers = ["internal"]\n')
    text.append('[[metrics]]\ncode = "api_calls"\nevent_type = "api_call"\naggregation = "count"\n')
    text.append('[[metrics]]\ncode = "tokens"\nevent_type = "completion"\naggregation = "sum"\nproperty = "n"\n')
    text.append(f'[[plans]]\ncode = "pro"\n[plans.entitlements.api_calls]\nincluded = {included}\n'
                f'enforcement = "hard"\noverage_rate = {overage_rate}\n')
    text.append(subscriptions)
    text.append(f'[kafka]\nbootstrap_servers = "{bootstrap}"\nevents_topic = "{topic}"\noutage_timeout = "5s"\n')
    if redis_url:
        text.append(f'[redis]\nurl = "{redis_url}"\ntimeout = 0.3\n')
    text.append(f'[clickhouse]\ndsn = "chdb://{chdb_dir.resolve()}"\n')
    text.append(f'[server]\nadmin_token = "{ADMIN_TOKEN}"\nmax_batch = 20\nmax_body_bytes = 20000\n'
                f'produce_timeout = "{produce_timeout}"\n{extra_server}')
    path.write_text("\n".join(text))
    return path


@contextmanager
def running_service(config: Path, timeout: float = 60) -> Iterator[httpx.Client]:
    """Start ``meter serve --config FILE --port P``; yield a client of it; stop it (SIGTERM) afterwards."""
    port = free_port()
    log = config.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(meter_argv("serve", "--config", str(config), "--port", str(port)), cwd=REPO,
                                env=env(), stdout=out, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"meter serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"meter serve did not answer in {timeout} s:\n{log.read_text()}"
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        client.log_text = log.read_text()  # type: ignore[attr-defined]
