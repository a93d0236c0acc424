"""Plain-text report of a benchmark run: the header, each benchmark's figures and goals, the total."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

_WIDTH = 52


def fmt(value: Any) -> str:
    """A number readable at a glance (thousands separated, 3 decimals when small)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value) if isinstance(value, dict | list) else str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) or "unknown"


def header(machine: dict[str, Any], mode: str, selected: Sequence[str]) -> str:
    """Machine, load, versions, mode and the benchmarks that will run."""
    versions = ", ".join(f"{k} {machine[k]}" for k in ("python", "ray", "vllm", "torch", "inferpool"))
    return "\n".join(
        [
            f"== inferpool bench ({mode}): {', '.join(selected)} ==",
            f"machine: {machine['cpu_count']} CPUs, {machine['processor']}, {machine['platform']}",
            f"load average (1/5/15 min) at start: {_load(machine.get('load_average', []))}",
            f"versions: {versions}",
        ]
    )


def goal_line(g: dict[str, Any]) -> str:
    """``goal  name  value  [goal op target]  met|NOT MET``."""
    unit = f" {g['unit']}" if g.get("unit") else ""
    status = "met" if g["met"] else "NOT MET"
    target = f"[goal {g['op']} {fmt(g['target'])}{unit}]"
    return f"  goal  {g['name']:<{_WIDTH}} {fmt(g['value'])}{unit}  {target}  {status}"


def benchmark(res: dict[str, Any]) -> str:
    """One benchmark's section: params, figures, goals, notes (or its error)."""
    load = res.get("load_average_end") or []
    cpu = res.get("cpu_s") or {}
    cpu_text = f"; CPU s: ours {fmt(cpu['ours'])}, others {fmt(cpu['others'])}" if cpu else ""
    lines = [f"-- {res['name']} ({res.get('seconds', 0.0):.1f} s{cpu_text}; 1-min load at end {_load(load[:1])}) --"]
    if "error" in res:
        lines.append(f"  ERROR {res['error']}")
        return "\n".join(lines)
    params = " ".join(f"{k}={fmt(v)}" for k, v in res.get("params", {}).items())
    lines.append(f"  params: {params}")
    for name, value in res.get("figures", {}).items():
        lines.append(f"  {name:<{_WIDTH + 6}} {fmt(value)}")
    lines.extend(goal_line(g) for g in res.get("goals", []))
    lines.extend(f"  note  {n}" for n in res.get("notes", []))
    return "\n".join(lines)


def footer(results: Sequence[dict[str, Any]], total_s: float, load_end: Sequence[float] = (), cpus: int = 1) -> str:
    """Total duration, goals met, the load at the end, the CPU seconds this run and other processes
    used, and a warning when other processes took more than a tenth of the CPUs (without CPU
    figures: when the 1-minute load after any benchmark exceeded the CPU count)."""
    goals = [g for r in results for g in r.get("goals", [])]
    met = sum(1 for g in goals if g["met"])
    errors = [r["name"] for r in results if "error" in r]
    tail = f"; errors in {', '.join(errors)}" if errors else ""
    lines = [f"== total {total_s:.1f} s; goals met {met}/{len(goals)}{tail}; load average at end: {_load(load_end)} =="]
    cpu = [r["cpu_s"] for r in results if r.get("cpu_s")]
    ours = sum(c["ours"] for c in cpu)
    others = sum(c["others"] for c in cpu)
    if cpu and math.isfinite(ours) and math.isfinite(others):
        lines.append(f"CPU seconds ({cpus} CPUs, {total_s:.1f} s): this run {ours:.1f}, other processes {others:.1f}")
        if others > 0.1 * total_s * cpus:
            lines.append(
                f"WARNING: other processes used {others / (total_s * cpus):.0%} of the {cpus} CPUs during the run, "
                "so these timings and ratios are noisy"
            )
        return "\n".join(lines)
    loads = [r["load_average_end"][0] for r in results if r.get("load_average_end")]
    if max(loads, default=0.0) > cpus:
        lines.append(
            f"WARNING: the 1-min load average reached {max(loads):.1f} on {cpus} CPUs: other processes "
            "shared the cores, so these timings and ratios are noisy"
        )
    return "\n".join(lines)
