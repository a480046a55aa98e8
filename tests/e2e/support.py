"""Shared plumbing for the end-to-end tests: configs, `meter` subprocesses, Kafka produce/consume.

Everything here talks to real things: the `meter` console script of .venv in a subprocess,
embedded ClickHouse (chDB) read back by ``chread.py`` in another subprocess (chDB allows one
data path per process), and the real Apache Kafka broker of the ``kafka`` session fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
METER = str(BIN / "meter") if (BIN / "meter").exists() else None
CHREAD = str(Path(__file__).with_name("chread.py"))


def meter_argv(*args: str) -> List[str]:
    if METER is not None:
        return [METER, *args]
    return [sys.executable, "-m", "meterflow.cli", *args]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def write_config(path: Path, base_toml: str, chdb_dir: Path, kafka: Optional[Dict[str, str]] = None,
                 pipeline_extra: str = "") -> Path:
    """``base_toml`` (from sample_config_toml) plus a [clickhouse] section on ``chdb_dir`` and optional [kafka]."""
    text = base_toml
    if pipeline_extra:
        text = text.replace("[pipeline]\n", "[pipeline]\n" + pipeline_extra.rstrip("\n") + "\n", 1)
    text += f'\n[clickhouse]\ndsn = "chdb://{chdb_dir.resolve()}"\n'
    if kafka:
        text += "\n[kafka]\n" + "".join(f'{k} = "{v}"\n' for k, v in kafka.items())
    path.write_text(text)
    return path


def env(named_core: bool = False) -> Dict[str, str]:
    """The environment of a meter subprocess; ``named_core``: its configuration names ``pipeline.core``, which
    pytest --core native then leaves as it is (the environment would override it)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    e["PYTHONUNBUFFERED"] = "1"
    if os.environ.get("METERFLOW_TEST_CORE") and not named_core:  # pytest --core native (tests/conftest.py)
        e["METER_PIPELINE_CORE"] = os.environ["METERFLOW_TEST_CORE"]
    return e


def run_meter(*args: str, timeout: float = 180, check: bool = True,
              extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(meter_argv(*args), cwd=REPO, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"meter {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def run_summary(proc: subprocess.CompletedProcess) -> dict:
    """The --json summary line of a `meter run` (last stdout line)."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_views(config: Path, timeout: float = 120) -> dict:
    """The contract's views of the config's chDB path, read in a separate process."""
    proc = subprocess.run([sys.executable, CHREAD, str(config)], cwd=REPO, env=env(), capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"chread failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-4000:]}")
    return json.loads(proc.stdout)


def usage_json(config: Path, by: str) -> List[dict]:
    """`meter usage --config CFG --json --by period|window` as a list of dicts (the CLI's contract output)."""
    proc = run_meter("usage", "--config", str(config), "--json", "--by", by)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


# -- Kafka ---------------------------------------------------------------------------------

def produce(bootstrap: str, topic: str, values: Sequence[bytes], partitions: int,
            keys: Optional[Sequence[Optional[bytes]]] = None) -> List[Tuple[int, int]]:
    """Produce ``values[i]`` to partition ``i % partitions`` (round robin: a customer's events and their
    duplicates are spread over partitions). Returns (partition, offset) per value."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 20,
                  "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                  "compression.type": "lz4"})
    where: List[Optional[Tuple[int, int]]] = [None] * len(values)
    errors: List[str] = []

    def cb_for(i: int):
        def cb(err, msg):
            if err is not None:
                errors.append(str(err))
            else:
                where[i] = (msg.partition(), msg.offset())
        return cb

    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, value=v, key=keys[i] if keys else None, partition=i % partitions,
                          on_delivery=cb_for(i))
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    assert p.flush(60) == 0, "events not delivered within 60 s"
    assert not errors, errors[:5]
    assert all(w is not None for w in where)
    return where  # type: ignore[return-value]


def consume_all(bootstrap: str, topic: str, timeout: float = 120) -> List[Tuple[Optional[bytes], bytes, list]]:
    """Every message of ``topic`` from the beginning to the end offsets at call time: (key, value, headers)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("e2e-reader"), "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "enable.partition.eof": False})
    try:
        md = c.list_topics(topic, timeout=15).topics[topic]
        assert md.error is None, md.error
        parts = sorted(md.partitions)
        ends = {}
        for p in parts:
            _lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            ends[p] = hi
        todo = {p for p in parts if ends[p] > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        out = []
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, f"timed out reading {topic}: partitions {todo} not at end"
            for msg in c.consume(10000, 0.5):
                if msg.error() is not None:
                    raise AssertionError(f"consume error on {topic}: {msg.error()}")
                p = msg.partition()
                if msg.offset() < ends[p]:
                    out.append((msg.key(), msg.value(), msg.headers() or []))
                if msg.offset() >= ends[p] - 1:
                    todo.discard(p)
        return out
    finally:
        c.close()


def aggregated_records(bootstrap: str, topic: str) -> List[dict]:
    recs = []
    for key, value, _headers in consume_all(bootstrap, topic):
        r = json.loads(value)
        assert key == f"{r['tenant_id']}|{r['customer_id']}|{r['metric']}".encode(), (key, r)
        recs.append(r)
    return recs


def kafka_section(bootstrap: str, events: str, prefix: str) -> Dict[str, str]:
    return {"bootstrap_servers": bootstrap, "events_topic": events,
            "aggregated_topic": f"{prefix}-aggregated", "dead_letter_topic": f"{prefix}-dead-letter",
            "rated_topic": f"{prefix}-rated",
            "alerts_topic": f"{prefix}-alerts", "entitlements_topic": f"{prefix}-entitlements"}


# -- a `meter run` we can kill ---------------------------------------------------------------

class LiveRun:
    """A `meter run` subprocess whose stderr progress lines are collected while it runs."""

    def __init__(self, argv: Sequence[str], stdout_path: Path, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.stdout_path = stdout_path
        self._out = stdout_path.open("w")
        self.proc = subprocess.Popen(meter_argv(*argv), cwd=REPO, env={**env(), **(extra_env or {})}, stdout=self._out,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stderr: List[str] = []
        self.reads: List[int] = []
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.stderr.append(line)
                if line.startswith("progress: read="):
                    self.reads.append(int(line.split()[1].split("=")[1]))

    def last_read(self) -> int:
        with self._lock:
            return self.reads[-1] if self.reads else 0

    def wait_until_read(self, low: int, timeout: float) -> int:
        """Block until a progress line shows read >= low (returns that count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.last_read()
            if r >= low:
                return r
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"meter run did not reach read>={low} (last {self.last_read()}, exit "
                             f"{self.proc.poll()}):\n{''.join(self.stderr)[-3000:]}")

    def kill(self) -> int:
        """SIGKILL the process (by its pid) and reap it."""
        import signal

        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(30)
        self._t.join(10)
        self._out.close()
        return rc

    def wait(self, timeout: float) -> Tuple[int, str, str]:
        """Wait for exit: (return code, stdout, stderr)."""
        rc = self.proc.wait(timeout)
        self._t.join(10)
        self._out.close()
        return rc, self.stdout_path.read_text(), "".join(self.stderr)


def write_jsonl(path: Path, lines: Iterable[bytes]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line + b"\n")
    return path
