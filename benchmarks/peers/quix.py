"""Quix Streams (a Python Kafka stream-processing library with RocksDB state) doing the same work.

A ``StreamingDataFrame`` over the events topic (values as bytes, decoded with the project's msgspec
decoder like every contender), one stateful ``apply`` per message keyed by ``tenant|customer``: the
RocksDB state holds the event ids seen (dedupe), the month's ``[api_calls, tokens]`` and the thresholds
fired; crossings go to the alerts topic with ``to_topic``. Quix's defaults otherwise: at-least-once,
changelog topics on (its state recovery), commit every 5 s. The app stops itself once it has processed
every message of the topic (``Application.stop()`` from the processing function) in throughput runs, and
on SIGTERM in latency runs. Rollups stay in its state (not written out): less output work than meterflow.

Runs in its own virtual environment (``quixstreams`` pins its own confluent-kafka); :func:`ensure_venv`
creates it with the machine's ``python3 -m venv`` under ``${METERFLOW_CACHE:-~/.cache/meterflow}``. This
module imports nothing beyond the standard library at import time, so the harness can call
:func:`ensure_venv` from the project's venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

QUIX_REQUIREMENT = "quixstreams>=3,<4"


def venv_dir() -> Path:
    base = os.environ.get("METERFLOW_CACHE") or str(Path.home() / ".cache" / "meterflow")
    return Path(base) / "bench-venvs" / "quix"


def ensure_venv(log: Callable[[str], None] = print) -> Path:
    """The Quix venv's python, creating the venv on first use (``python3 -m venv`` + pip install)."""
    d = venv_dir()
    py = d / "bin" / "python"
    stamp = d / ".bench-ok"
    if py.exists() and stamp.exists():
        return py
    base = shutil.which("python3")
    if base is None:
        raise RuntimeError("no python3 on PATH to create the Quix Streams venv")
    log(f"creating the Quix Streams venv in {d} ({QUIX_REQUIREMENT}, msgspec; about a minute)")
    if d.exists():
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(d)], check=True, capture_output=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", QUIX_REQUIREMENT,
                        "msgspec"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install {QUIX_REQUIREMENT} msgspec failed: {r.stderr.strip()[-800:]}")
    stamp.write_text(QUIX_REQUIREMENT)
    return py


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _namespace_from_checkout() -> None:
    """In Quix's own venv meterflow is not installed: the checkout is on PYTHONPATH, where ``meterflow/`` is only
    the CLI package and the other layers are top-level folders (``base/``, ``schemas/``, ... installed as
    ``meterflow.base``, ``meterflow.schemas``). Adding the checkout to the package's path resolves them the
    same way."""
    import meterflow

    root = str(Path(__file__).resolve().parents[2])
    if not any(Path(p).resolve() == Path(root) for p in meterflow.__path__):
        meterflow.__path__.append(root)


def main() -> int:
    import tempfile

    _namespace_from_checkout()
    from benchmarks.peers.common import (
        FETCH_CONFIG,
        Rules,
        TopicReader,
        alert_key,
        base_args,
        crossed,
        parse_usage,
        total_key,
        touch,
        write_result,
    )

    ap = base_args(__doc__)
    ap.add_argument("--changelog", choices=["on", "off"], default="on", help="Quix changelog topics (default on)")
    args = ap.parse_args()
    from quixstreams import Application

    rules = Rules.load(args.rules)
    total = 0
    if not args.tail:
        probe = TopicReader(args.bootstrap, args.topic, to_end=True)
        total = probe.total
        probe.close()
    state_dir = Path(tempfile.mkdtemp(prefix="bench-quix-state-"))
    app = Application(broker_address=args.bootstrap, consumer_group=f"bench-quix-{time.time_ns()}",
                      auto_offset_reset="earliest", state_dir=str(state_dir), loglevel="WARNING",
                      use_changelog_topics=args.changelog == "on", producer_extra_config={"linger.ms": 1},
                      consumer_extra_config=dict(FETCH_CONFIG))
    events = app.topic(args.topic, value_deserializer="bytes", key_deserializer="str")
    alerts_topic = app.topic(args.alerts_topic or f"{args.topic}.quix-alerts", value_serializer="json")
    thresholds = rules.thresholds
    seen = {"n": 0, "ids": 0, "t_first": None}
    totals: dict = {}  # a mirror of the values written to the state, for the result file only
    fired_keys: list = []

    def process(value: bytes, state) -> list:
        seen["n"] += 1
        if seen["t_first"] is None:
            seen["t_first"] = time.time()
        if total and seen["n"] >= total:
            app.stop()
        u = parse_usage(value, rules)
        if u is None:
            return []
        if state.get(u.event_id) is not None:
            return []
        state.set(u.event_id, 1)
        seen["ids"] += 1
        tkey = f"t:{u.period_ms}"
        cur = state.get(tkey) or [0, 0.0]
        cur = [cur[0] + u.api, cur[1] + (u.tokens or 0.0)]
        state.set(tkey, cur)
        out = []
        fkey = f"f:{u.period_ms}"
        fired = None
        for metric, used, changed in (("api_calls", cur[0], True), ("tokens", cur[1], u.tokens is not None)):
            if not changed:
                continue
            totals[total_key(u.key, metric, u.period_ms)] = used
            for t in crossed(used, rules.included(u.key, metric), thresholds):
                if fired is None:
                    fired = state.get(fkey) or []
                name = f"{metric}|{t:g}"
                if name not in fired:
                    fired.append(name)
                    ak = alert_key(u.key, metric, u.period_ms, t)
                    fired_keys.append(ak)
                    out.append({"k": ak, "at": int(time.time() * 1000)})
        if fired is not None and out:
            state.set(fkey, fired)
        return out

    sdf = app.dataframe(events)
    sdf = sdf.apply(process, stateful=True)
    sdf = sdf.filter(lambda alerts: len(alerts) > 0)
    sdf = sdf.apply(lambda alerts: alerts, expand=True)
    sdf.to_topic(alerts_topic)
    touch(args.ready_file)
    app.run()
    t_end = time.time()
    write_result(args.out, "quixstreams", events=seen["n"], t_first=seen["t_first"], t_end=t_end,
                 totals=totals, alerts=fired_keys, counters={"changelog": args.changelog},
                 state_bytes=float(_dir_bytes(state_dir)), tracked_ids=seen["ids"],
                 state_how="RocksDB state directory bytes on disk after the run / event ids stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
