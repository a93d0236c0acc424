"""Run the benchmarks: all or some, quick or full, printed and optionally written as JSON.

``python -m inferpool.bench [--quick] [--only NAME[,NAME]] [--json PATH] [--list]``

Registry: :data:`BENCHMARKS` maps a name to the module that implements it; a module
has ``run(quick: bool) -> dict`` (see :mod:`inferpool.bench.common` for the dict) and is imported
only when selected, so a benchmark that needs vLLM costs nothing when it is not run.
Add one with an entry in :data:`BENCHMARKS` or :func:`register`.

The exit status is 0 when every selected benchmark ran (goals not met included: they
are reported, never asserted), 1 when one raised, 2 for bad arguments.

``inferpool bench`` runs :func:`main`: the benchmarks are installed with the package as
``inferpool.bench`` (the ``bench/`` folder of the checkout), so the command works from any
directory, and Ray workers import benchmark modules (and the actor classes defined in them)
like any other part of the package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCHMARKS: dict[str, str] = {
    "pool_vs_raw": "inferpool.bench.pool_vs_raw",  # issue 2: pool generate vs raw AsyncLLM (vLLM)
    "router_capacity": "inferpool.bench.router_capacity",  # issue 8: decisions/s, added latency
    "scaling": "inferpool.bench.scaling",  # issue 9: fake engines, efficiency vs linear
    "weight_push": "inferpool.bench.weight_push",  # issue 7: update_weights bytes/s vs ray.put + ray.get
    "state_ref_vs_json": "inferpool.bench.state_ref_vs_json",  # issue 3: session state via ObjectRef vs JSON/HTTP
    "routing_policies": "inferpool.bench.routing_policies",  # issue 8: affinity / prefix-aware vs least-loaded
    "sessions_vs_raw": "inferpool.bench.sessions_vs_raw",  # issue 17: managed sessions vs AsyncLLM with ids
    "store_turns": "inferpool.bench.store_turns",  # issue 17: one store shard's turns/s as history grows
    "router_fleet": "inferpool.bench.router_fleet",  # issue 16: lease decisions/s at fleet scale, router shards
}
"""Benchmark name -> module with ``run(quick: bool) -> dict``; run in this order (``weight_push``
right after ``scaling``: it reuses the same pool of fake engines, see :func:`inferpool.bench.common.borrow`)."""


def register(name: str, module: str) -> None:
    """Make ``--only name`` run ``module.run(quick)`` (module given as an import path)."""
    BENCHMARKS[name] = module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferpool bench", description="Benchmarks that print ratios measured side by side in one run."
    )
    parser.add_argument("--quick", action="store_true", help="smaller loads (the whole suite in ~2 minutes)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _selected(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    return names


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """Import and run one benchmark; an exception becomes an ``error`` entry, not a crash."""
    from inferpool.bench.common import CpuMeter, load_average

    t0 = time.perf_counter()
    with CpuMeter() as cpu:
        try:
            module = importlib.import_module(BENCHMARKS[name])
            res: dict[str, Any] = module.run(quick=quick)
        except Exception as exc:
            traceback.print_exc()  # the whole story on stderr; the report keeps the first line
            first = (str(exc).strip().splitlines() or [""])[0]
            res = {"name": name, "error": f"{type(exc).__name__}: {first}"}
    res["seconds"] = time.perf_counter() - t0
    res["load_average_end"] = load_average()
    # CPU seconds of this run's processes (this one, the Ray it started, subprocesses) and of all
    # others, both lower bounds: processes that exited during the benchmark are not counted
    res["cpu_s"] = {"ours": round(cpu.own_s, 1), "others": round(cpu.others_s, 1)}
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, print each one's figures and goals, return the exit status."""
    import ray

    from inferpool.bench import report
    from inferpool.bench.common import load_average, machine_info, shared_scope

    args = build_parser().parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name}\t{module}")
        return 0
    try:
        names = _selected(args.only)
    except ValueError as exc:
        print(f"inferpool bench: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("INFERPOOL_LOG_LEVEL", "WARNING")  # figures only, not pool start-up logs
    machine = machine_info()
    mode = "quick" if args.quick else "full"
    print(report.header(machine, mode, names), flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    ray_was_up = ray.is_initialized()
    ray_info: dict[str, Any] = {"address": None, "started_by_bench": False}
    try:
        # the first benchmark that needs Ray starts it (bench.common.ensure_ray) and the rest share it;
        # within this scope benchmarks also share pools (bench.common.borrow)
        with shared_scope():
            for name in names:
                res = run_one(name, args.quick)
                results.append(res)
                print(report.benchmark(res), flush=True)
    finally:
        if ray.is_initialized():
            ray_info = {"address": ray.get_runtime_context().gcs_address, "started_by_bench": not ray_was_up}
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
    total = time.perf_counter() - started
    load_end = load_average()
    print(report.footer(results, total, load_end, machine["cpu_count"] or 1), flush=True)
    if args.json:
        payload = {
            "mode": mode,
            "machine": machine,
            "load_average_end": load_end,
            "total_s": total,
            "ray": ray_info,
            "results": results,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {path}")
    return 1 if any("error" in r for r in results) else 0
