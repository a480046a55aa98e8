"""The benchmark's results: one :class:`Row` per contender, the checks of their totals, the targets of
issue 4, and the outputs (rich table cells, Markdown for the README, the PNG chart). Used by the harness.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

TARGETS = {"core_eps": 500_000, "e2e_ratio": 0.5, "p99_ms": 250.0, "vs_quix": 2.0, "dedupe_bytes": 64.0}
# Issue 16 (the native core): the same figures for the best meterflow variant, with the new goals.
TARGETS_16 = {"core_eps": 1_000_000, "vs_decode": 1.0, "e2e_ratio": 0.5, "cpu_s_per_m": 4.0, "p99_ms": 100.0,
              "vs_quix": 10.0, "dedupe_bytes": 16.0}


@dataclass
class Row:
    name: str
    ran: bool = False
    error: str = ""
    events: int = 0
    seconds: Optional[float] = None
    eps: Optional[float] = None
    ratio_to_raw: Optional[float] = None
    totals: str = "n/a"  # ok | WRONG (...) | n/a
    totals_ok: Optional[bool] = None
    alerts: str = "n/a"
    peak_rss_mib: Optional[float] = None
    cpu_s_per_m: Optional[float] = None
    cpu_total_s: Optional[float] = None
    wall_s: Optional[float] = None
    state_bytes_per_id: Optional[float] = None
    state_how: str = ""
    counters: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    latency: Optional[Dict[str, Any]] = None
    # Noise: the contender's tree and the whole machine, as % of all cores, over the measured window.
    tree_cpu_pct: Optional[float] = None
    machine_busy_pct: Optional[float] = None



def pcts(xs: List[float]) -> Dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    s = sorted(xs)
    return {"n": len(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(len(s) * 0.99))], "max": s[-1]}


def compare(got: Optional[Dict[str, float]], want: Dict[str, float]) -> Tuple[bool, str]:
    if got is None:
        return False, "not reported"
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or extra or wrong):
        return True, f"ok ({len(want)} rows)"
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} differ, e.g. {k}: {got[k]:g} != {want[k]:g}")
    if missing:
        parts.append(f"{len(missing)} missing")
    if extra:
        parts.append(f"{len(extra)} extra")
    return False, "WRONG: " + ", ".join(parts)


def compare_alerts(got: Optional[List[str]], want: List[str]) -> str:
    if got is None:
        return "not reported"
    g, w = set(got), set(want)
    if g == w:
        return f"ok ({len(w)})"
    return f"{len(g & w)}/{len(w)} ({len(w - g)} missed, {len(g - w)} extra)"


def agreement(results: Dict[str, Dict[str, float]]) -> List[List[str]]:
    """Contenders grouped by identical totals (one group when they all agree with each other)."""
    groups: List[Tuple[Dict[str, float], List[str]]] = []
    for name, totals in results.items():
        for ref, names in groups:
            if ref == totals:
                names.append(name)
                break
        else:
            groups.append((totals, [name]))
    return [names for _ref, names in groups]


def machine() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def fmt(x: Optional[float], spec: str = ",.0f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def lat_text(lat: Optional[Dict[str, Any]]) -> str:
    if not lat:
        return "—"
    if lat.get("error"):
        return "not measured" if lat["error"].startswith("not measured") else "error"
    if lat.get("p50_ms") is None:
        return f"no alerts ({lat.get('received_alerts', 0)}/{lat.get('expected_alerts', 0)})"
    s = f"{lat['p50_ms']:,.0f} / {lat['p99_ms']:,.0f} / {lat['max_ms']:,.0f} ms"
    if lat.get("received_alerts") != lat.get("expected_alerts"):
        s += f" ({lat['received_alerts']}/{lat['expected_alerts']} alerts)"
    return s + f" @ {lat['rate']:,}/s"


def table_rows(rows: List[Row]) -> List[List[str]]:
    out = []
    for r in rows:
        if not r.ran:
            out.append([r.name, "not run" if not r.error else "FAILED", "—", "—", "—", "—", "—", "—",
                        lat_text(r.latency), "—"])
            continue
        ranked = r.totals_ok is not False
        out.append([r.name, fmt(r.eps) if ranked else f"({fmt(r.eps)})",
                    fmt(r.ratio_to_raw, ".2f") + "x" if r.ratio_to_raw is not None and ranked else "—",
                    r.totals if r.totals_ok is not False else "WRONG TOTALS (not ranked)", r.alerts,
                    fmt(r.peak_rss_mib), fmt(r.cpu_s_per_m, ",.1f"), fmt(r.state_bytes_per_id),
                    lat_text(r.latency), f"{fmt(r.tree_cpu_pct)} / {fmt(r.machine_busy_pct)}"])
    return out


HEADERS = ["contender", "events/s", "x raw", "totals", "alerts", "peak RSS MiB", "CPU s / M ev", "state B / id",
           "alert latency p50 / p99 / max", "CPU % it / machine"]


def targets(rows: Dict[str, Row], core: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []

    def add(name: str, value: Optional[float], goal: float, unit: str, higher: bool, how: str) -> None:
        if value is None:
            out.append({"target": name, "value": None, "goal": goal, "met": None, "gap": "not measured", "how": how})
            return
        met = value >= goal if higher else value <= goal
        short = f"{goal / value:.1f}x short" if higher and value > 0 else f"{value / goal:.1f}x over"
        gap = short if not met else "met"
        out.append({"target": name, "value": value, "goal": goal, "met": met, "unit": unit, "gap": gap, "how": how})

    add("meterflow core events/s per worker", core.get("core_eps") if core else None, TARGETS["core_eps"], "ev/s",
        True, "in-process decode -> validate -> dedupe -> aggregate -> evaluate, one thread")
    mf, raw, quix = rows.get("meterflow-1w"), rows.get("raw"), rows.get("quixstreams")
    ok = lambda r: r is not None and r.ran and r.totals_ok is not False  # noqa: E731
    add("end to end / raw ceiling", mf.eps / raw.eps if ok(mf) and ok(raw) else None, TARGETS["e2e_ratio"], "x", True,
        "meterflow-1w events/s / raw events/s")
    lat = mf.latency if mf else None
    add("breach-to-alert p99 at half saturation", lat.get("p99_ms") if lat and not lat.get("error") else None,
        TARGETS["p99_ms"], "ms", False, "meterflow-1w, event produced -> alert consumed")
    add("throughput vs Quix Streams", mf.eps / quix.eps if ok(mf) and ok(quix) else None, TARGETS["vs_quix"], "x",
        True, "meterflow-1w events/s / quixstreams events/s, both with exact totals")
    add("dedupe bytes per tracked id", core.get("dedupe_bytes_per_id") if core else None, TARGETS["dedupe_bytes"], "B",
        False, "tracemalloc, see core")
    for t in out:
        t["issue"] = 4
    first16 = len(out)
    t16 = TARGETS_16
    # The goal's core includes threshold detection: the native path's figure (native_flow_core_eps), counted only
    # with the workload's exact alerts; the batch core (no entitlement work) is the second line.
    nf = core.get("native_flow_core_eps") if core else None
    wrong = bool(core) and core.get("native_flow_alerts_ok") is False
    add("native core events/s per worker", None if wrong else nf, t16["core_eps"], "ev/s", True,
        "decode -> validate -> dedupe -> aggregate -> threshold detection: NativeMediator.split -> each shard's "
        "NativeMeters.fold_bundle (every customer has thresholds), in process, one thread"
        + (f"; alerts checked against {core['native_flow_alerts_against']}" if nf and not wrong else ""))
    if wrong:
        out[-1]["gap"] = f"WRONG ALERTS ({core.get('native_flow_alerts')} against " \
                         f"{core.get('native_flow_alerts_against')}): not counted"
    nc = core.get("native_core_eps") if core else None
    add("native batch core events/s per worker (no threshold detection)", nc, t16["core_eps"], "ev/s", True,
        "NativeBatchCore: decode -> validate -> dedupe -> aggregate over the workload's batches, one thread")
    add("native core / bare msgspec decode",
        nf / core["decode_eps"] if nf and not wrong and core.get("decode_eps") else None,
        t16["vs_decode"], "x", True, "the native core with threshold detection / decoding the same lines, same run")
    nat = rows.get("meterflow-1w-native")
    add("end to end / raw ceiling (native)", nat.eps / raw.eps if ok(nat) and ok(raw) else None, t16["e2e_ratio"],
        "x", True, "meterflow-1w-native events/s / raw events/s")
    add("CPU s per million events (native)", nat.cpu_s_per_m if ok(nat) else None, t16["cpu_s_per_m"], "s", False,
        "meterflow-1w-native process tree")
    nlat = nat.latency if nat else None
    add("breach-to-alert p99 at half saturation (native)",
        nlat.get("p99_ms") if nlat and not nlat.get("error") else None, t16["p99_ms"], "ms", False,
        "meterflow-1w-native at half of its own events/s, event produced -> alert consumed")
    add("throughput vs Quix Streams (native)", nat.eps / quix.eps if ok(nat) and ok(quix) else None, t16["vs_quix"],
        "x", True, "meterflow-1w-native events/s / quixstreams events/s, both with exact totals")
    add("native dedupe bytes per tracked id", core.get("native_dedupe_bytes_per_id") if core else None,
        t16["dedupe_bytes"], "B", False, "the native tables' own count / ids")
    for t in out[first16:]:
        t["issue"] = 16
    return out


def markdown(rows: List[Row], doc: Dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    core = doc.get("core") or {}
    if core and not core.get("error"):
        lines += ["", f"meterflow in-process core: {core['core_eps']:,.0f} events/s (msgspec decode alone "
                  f"{core['decode_eps']:,.0f}/s); dedupe {core['dedupe_bytes_per_id']:,.0f} B per tracked event id; "
                  f"keyed state {core['state_bytes_per_customer']:,.0f} B per customer "
                  f"({core['state_bytes_per_customer_without_ids']:,.0f} B without the ids; snapshot "
                  f"{core['snapshot_bytes_per_customer']:,.0f} B) — tracemalloc, {core['customers']:,} customers, "
                  f"{core['tracked_ids']:,} ids."]
        if core.get("native_core_eps"):
            per_id = core.get("native_dedupe_bytes_per_id")
            lines += ["", f"native batch core (pipeline.core = \"native\"; decode -> validate -> dedupe -> aggregate): "
                      f"{core['native_core_eps']:,.0f} events/s, {core['native_core_eps'] / core['decode_eps']:.2f}x "
                      f"the bare decode; dedupe "
                      + (f"{per_id:,.1f} B per tracked id" if per_id else "not measured (no byte count in this build)")
                      + f", {core['native_tracked_ids']:,} ids."]
        if core.get("native_flow_core_eps"):
            ok = core.get("native_flow_alerts_ok")
            lines += ["", f"native core with threshold detection (NativeMediator.split -> NativeMeters.fold_bundle per "
                      f"shard, flush every 50 batches, no Bytewax, no sinks): {core['native_flow_core_eps']:,.0f} "
                      f"events/s, {core['native_flow_cpu_s_per_m']:.2f} CPU s per million events; "
                      f"{core['native_flow_alerts']:,} threshold alerts, "
                      + ("the same as " if ok else "NOT the same as " if ok is False else "not checked against ")
                      + f"{core.get('native_flow_alerts_against', 'nothing')}; "
                      f"{core['native_flow_folded_native']:,} customers folded natively, "
                      f"{core['native_flow_folded_python']:,} on Python."]
    split = [r for r in rows if r.latency and r.latency.get("produced_to_detected_ms", {}).get("p50") is not None]
    if split:
        lines += ["", "| latency split (ms, p50 / p99) | produced -> detected | of which produced -> ingested | "
                  "of which ingested -> detected | detected -> alert consumed |", "|---|---|---|---|---|"]
        for r in split:
            a, b = r.latency["produced_to_detected_ms"], r.latency["detected_to_consumed_ms"]
            c, d = r.latency.get("produced_to_ingested_ms"), r.latency.get("ingested_to_detected_ms")
            lines.append(f"| {r.name} @ {r.latency['rate']:,}/s | {a['p50']:,.0f} / {a['p99']:,.0f} | "
                         f"{_p50_p99(c)} | {_p50_p99(d)} | {b['p50']:,.0f} / {b['p99']:,.0f} |")
    lines += ["", "| issue | target | goal | measured | |", "|---|---|---|---|---|"]
    for t in doc.get("targets", []):
        v = t["value"]
        lines.append(f"| {t.get('issue', 4)} | {t['target']} | {t['goal']:,g} {t.get('unit', '')} | "
                     f"{'—' if v is None else format(v, ',.2f')} {t.get('unit', '') if v is not None else ''} | "
                     f"{t['gap']} |")
    return "\n".join(lines) + "\n"


def _p50_p99(p: Optional[Dict[str, Any]]) -> str:
    """``p50 / p99`` of a :func:`pcts` result, ``—`` where the contender gives no such stamp."""
    if not p or p.get("p50") is None:
        return "—"
    return f"{p['p50']:,.0f} / {p['p99']:,.0f}"


def chart(rows: List[Row], path: Path, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]' (or pip install matplotlib) for the PNG chart"
    ran = [r for r in rows if r.ran and r.eps]
    lat = [r for r in rows if r.latency and r.latency.get("p50_ms") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), gridspec_kw={"width_ratios": [3, 3, 2]})
    ax = axes[0]
    names = [r.name for r in ran][::-1]
    vals = [r.eps for r in ran][::-1]
    colors = ["#bbbbbb" if r.name == "raw" else "#d62728" if r.totals_ok is False else
              "#1f77b4" if r.name.startswith("meterflow") else "#ff7f0e" for r in ran][::-1]
    bars = ax.barh(names, vals, color=colors)
    for b, r in zip(bars, ran[::-1]):
        label = f" {b.get_width():,.0f}" + (" (wrong totals)" if r.totals_ok is False else "")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xlabel("events/s end to end (same topic, same work)")
    ax.set_title("Throughput")
    ax.set_xlim(0, max(vals) * 1.3 if vals else 1)
    ax = axes[1]
    if lat:
        import numpy as np

        x = np.arange(len(lat))
        p50 = [r.latency["p50_ms"] for r in lat]
        p99 = [r.latency["p99_ms"] for r in lat]
        ax.bar(x - 0.2, p50, 0.4, label="p50", color="#1f77b4")
        ax.bar(x + 0.2, p99, 0.4, label="p99", color="#9467bd")
        ax.set_xticks(x, [f"{r.name.replace('poll-clickhouse', 'poll')}\n@{r.latency['rate']:,}/s" for r in lat],
                      fontsize=8)
        ax.set_yscale("log")
        ax.axhline(TARGETS["p99_ms"], color="#d62728", ls="--", lw=1, label="p99 target 250 ms")
        ax.legend()
    ax.set_ylabel("breach-to-alert ms (event produced -> alert consumed), log")
    ax.set_title("Breach-to-alert latency")
    ax = axes[2]
    cpu = [r for r in ran if r.cpu_s_per_m is not None][::-1]
    ax.barh([r.name for r in cpu], [r.cpu_s_per_m for r in cpu],
            color=["#bbbbbb" if r.name == "raw" else "#1f77b4" if r.name.startswith("meterflow") else "#ff7f0e"
                   for r in cpu])
    ax.set_xlabel("CPU seconds per million events (process tree)")
    ax.set_title("Cost")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
