"""CPU accounting of one block of a benchmark, by process role: CPU seconds, and how long
each role's threads were runnable but waited for a core (the kernel's run-queue wait).

On a machine with few cores, a pool's own processes (caller, engine actor, router, stores)
compete with vLLM's engine core for the same cores. The core's CPU per token is the same
whichever process feeds it; what such contention costs shows as the core's run-queue wait,
which :class:`ProcessCpu` reads from ``/proc/<pid>/task/<tid>/schedstat`` (Linux; zero
elsewhere) beside the CPU seconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but not running, so far (0 where the kernel
    does not say: no schedstat, or the process is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # the thread ended meanwhile
            continue
        if len(fields) >= 2:
            total += int(fields[1])
    return total / 1e9


ENGINE_CORE_TITLE = "VLLM::EngineCore"
"""How a vLLM engine core's process names itself (its command line starts with it)."""


def is_engine_core(title: str) -> bool:
    """Whether a process with this command line is a vLLM engine core."""
    return title.startswith(ENGINE_CORE_TITLE)


class ProcessCpu:
    """CPU seconds used during a block by processes of this run, by what they are: Ray actors
    by class (``ray::SessionStore...`` -> ``SessionStore``) for the names given, vLLM engine
    cores (``EngineCore``), the processes under the pids given in ``trees`` (a name each, a
    process and its descendants: a raw engine's subprocess), and this process as ``Driver``.
    Read from /proc (psutil) at the start and the end of the block; processes that exit
    meanwhile are not counted. Needs psutil (a dependency of Ray).

    ``wait_seconds`` has the run-queue wait of the same roles; ``core_wait_seconds`` that of
    every vLLM engine core on the machine, inside a tree or not (a raw engine's core is one),
    and ``core_pids`` the engine cores it counted."""

    def __init__(self, names: Sequence[str], trees: dict[str, int] | None = None) -> None:
        self.names = tuple(names)
        self.trees = dict(trees or {})
        self.seconds: dict[str, float] = {}
        self.wait_seconds: dict[str, float] = {}
        self.core_wait_seconds = 0.0
        self.core_pids: set[int] = set()
        self._start: dict[int, tuple[str, float, float, bool]] = {}

    def _name(self, pid: int, title: str, parents: dict[int, int]) -> str:
        node, hops = pid, 0
        while node > 1 and hops < 64:
            for tree, root in self.trees.items():
                if node == root:
                    return tree
            node, hops = parents.get(node, 0), hops + 1
        if pid == os.getpid():
            return "Driver"
        if is_engine_core(title):
            return "EngineCore"
        return next((n for n in self.names if title.startswith(f"ray::{n}")), "")

    def _sample(self) -> dict[int, tuple[str, float, float, bool]]:
        """pid -> (role, CPU seconds, run-queue wait seconds, is an engine core)."""
        import psutil

        procs = list(psutil.process_iter(["ppid", "cmdline", "cpu_times"]))
        parents = {p.pid: p.info["ppid"] or 0 for p in procs}
        out: dict[int, tuple[str, float, float, bool]] = {}
        for proc in procs:
            times = proc.info["cpu_times"]
            if times is None:
                continue
            title = " ".join(proc.info["cmdline"] or ())
            name = self._name(proc.pid, title, parents)
            if name:
                core = is_engine_core(title)
                out[proc.pid] = (name, times.user + times.system, runqueue_wait_s(proc.pid), core)
        return out

    def __enter__(self) -> ProcessCpu:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        roles = (*self.names, *self.trees, "EngineCore", "Driver")
        self.seconds = {n: 0.0 for n in roles}
        self.wait_seconds = {n: 0.0 for n in roles}
        self.core_wait_seconds = 0.0
        self.core_pids = set()
        for pid, (name, seconds, wait, core) in end.items():
            _, cpu_before, wait_before, _ = self._start.get(pid, (name, 0.0, 0.0, core))
            self.seconds[name] += seconds - cpu_before
            self.wait_seconds[name] += wait - wait_before
            if core:
                self.core_wait_seconds += wait - wait_before
                self.core_pids.add(pid)
