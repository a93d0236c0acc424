"""Scaling: pool throughput at 1, 2, 4, 8 fake engines with a fixed service time.

Engines. Each fake engine serves ``max_concurrency`` requests at once, each taking
``base_latency_s`` (no per-token time), so one engine serves at most
``max_concurrency / base_latency_s`` requests/s and ``k`` engines ``k`` times that.

The service time is chosen so that the per-engine request rate is one a real engine
sees: a rollout request takes seconds and an engine holds hundreds in flight, which
completes on the order of 1 to 50 requests/s per engine. Here 8 requests of 0.25 s at
once give 32 requests/s per engine (256/s at 8 engines). A shorter service time (the
earlier 50 ms: 160/s per engine, 1,280/s at 8) is a rate only a no-op engine reaches; at
8 engines it asks a 2-core machine for more Ray calls per second than the driver, the
router and 8 engine processes can share, so it measures the machine's CPU rather than
how the pool spreads work. The CPU figures below show which it is.

Load: a closed loop, the steady state of a rollout job. ``2 x engines x max_concurrency``
requests stay in flight (each completion sends the next request), so every engine always
has a full batch running and one queued. The first wave of completions is a warm-up (new
engines' first calls, the loop filling up) and one more wave is sent after the last
counted one, so neither the ramp-up nor the drain is counted: throughput is measured over
``repeats`` consecutive windows of ``waves`` waves (the same number of waves at every
engine count), each from one completion to the completion ``waves`` waves later, both at
the same phase of a wave; the best window is kept. One pool is started with 1 engine,
measured, scaled up to 8 (``Pool.scale``: the 7 new engines start together), then down
to 4 and 2, so no engine starts between the last three measurements and every engine in
them was warmed up at 8; fake engines reserve no CPU, so 8 fit on 2 cores.

Paths: ``batch`` = ``generate_batch`` calls of one wave each, two in flight (leases in bulk,
one actor call per engine per chunk of up to 64 requests); ``per_request`` = one
``generate`` call per request (leases and releases coalesced into one router call per
event-loop turn, but one engine actor call per request). Which path goes first alternates
from one engine count to the next.

Figures: requests/s; efficiency vs linear = throughput(k) / (k x throughput(1)) of the
same path (goal >= 0.9 at 8 engines); utilisation = throughput(k) / (k x the engine's
service rate); ``cpu_ms_per_req`` = CPU time of this process and everything it started
(the local Ray: GCS, raylet, router, engines) per request; ``machine_busy`` = the share
of all cores busy during the pass, anyone's (near 1.0: the machine, not the pool, set
the pace).

Run: python -m inferpool.bench.scaling [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from inferpool.bench.common import CpuMeter, borrow, ensure_ray, goal, ratio, result

EFFICIENCY_GOAL = 0.9
PROMPT = list(range(1, 17))
PATHS = ("batch", "per_request")


@dataclasses.dataclass(frozen=True)
class Size:
    counts: tuple[int, ...]  # engine counts, ascending
    base_latency_s: float  # the fake engine's service time
    max_concurrency: int  # requests one fake engine serves at once
    waves: int  # waves of completions per measured window (a wave = engines x max_concurrency)
    repeats: int  # windows per path and engine count (best kept)

    @property
    def service_rate(self) -> float:
        """Requests/s one engine serves at most."""
        return self.max_concurrency / self.base_latency_s

    def engine_kwargs(self) -> dict[str, Any]:
        return {"base_latency_s": self.base_latency_s, "max_concurrency": self.max_concurrency, "vocab_size": 1024}


SIZES: dict[str, Size] = {
    "full": Size((1, 2, 4, 8), 0.25, 8, 12, 3),  # windows of 3 s
    "quick": Size((1, 2, 4, 8), 0.25, 8, 3, 1),  # one window of 0.75 s
    "tiny": Size((1, 2), 0.05, 4, 2, 1),  # tests: the figures exist, not what they are
}


def pool_config(engine_kwargs: dict[str, Any], replicas: int) -> Any:
    """A pool of fake engines (no managed sessions: one session store, one process less)."""
    import inferpool as ip

    return ip.PoolConfig(
        name="bench-fake",
        namespace="inferpool-bench",
        engines=[ip.EngineConfig(backend="fake", replicas=replicas, engine_kwargs=dict(engine_kwargs))],
        router=ip.RouterConfig(acquire_timeout_s=120.0),
        sessions=ip.SessionConfig(shards=1),
    )


@contextmanager
def fake_pool(engine_kwargs: dict[str, Any], replicas: int) -> Iterator[Any]:
    """A pool of fake engines with ``replicas`` engines, shared with any other benchmark of the
    same run that asks for the same ``engine_kwargs`` (see :func:`inferpool.bench.common.borrow`)."""
    import inferpool as ip

    key = "fake-pool:" + json.dumps(engine_kwargs, sort_keys=True)
    with borrow(key, lambda: ip.Pool.start(pool_config(engine_kwargs, replicas)), lambda p: p.shutdown()) as pool:
        if len(pool.engine_ids()) != replicas:
            pool.scale(replicas)
        yield pool


SHARED_ENGINE_KWARGS = SIZES["quick"].engine_kwargs()
"""The fake engine of quick and full runs (the same in both), also used by ``weight_push``."""


def window_rates(stamps: list[float], wave: int, window: int, windows: int) -> list[float]:
    """Completions/s in each of ``windows`` consecutive windows of ``window`` completions that
    follow the first ``wave`` (warm-up) completions.

    A window runs from the last completion before it to its own last completion, so with
    completions arriving in waves of ``wave`` (``window`` a multiple of it) both ends sit at
    the same phase of a wave and the window spans whole waves.
    """
    times = sorted(stamps)
    if len(times) < wave + windows * window:
        raise ValueError(f"{len(times)} completions, need {wave + windows * window}")
    rates = []
    for w in range(windows):
        first = wave + w * window - 1
        rates.append(ratio(window, times[first + window] - times[first]))
    return rates


async def _closed_loop(
    pool: Any, engines: int, size: Size, per_request: bool, windows: int
) -> tuple[list[float], int, CpuMeter]:
    """Requests/s of ``windows`` consecutive windows of ``size.waves`` waves each, in steady state;
    also the requests sent and the CPU the whole loop took.

    Closed loop: ``2 x engines x max_concurrency`` requests stay in flight (a completion sends
    the next request), so every engine always has a full batch running and one queued. The
    first wave is a warm-up and one more wave is sent after the last window, so every
    counted completion is one the driver handled while still sending (neither the ramp-up
    nor the drain is in a window).
    """
    import inferpool as ip

    sp = ip.SamplingParams(max_tokens=4, ignore_eos=True, seed=0)
    wave = engines * size.max_concurrency
    window = wave * size.waves
    total = wave + windows * window + wave
    stamps: list[float] = []
    issued = 0
    clock = time.perf_counter

    async def one_at_a_time() -> None:  # per_request: one pool.generate per request
        nonlocal issued
        while issued < total:
            issued += 1
            await pool.generate(PROMPT, sp)
            stamps.append(clock())

    async def batches() -> None:  # batch: generate_batch calls of one wave each
        nonlocal issued
        while issued < total:
            n = min(wave, total - issued)
            issued += n
            out = await pool.generate_batch([PROMPT] * n, sp)
            now = clock()
            if len(out) != n:
                raise RuntimeError(f"expected {n} results, got {len(out)}")
            stamps.extend([now] * n)

    with CpuMeter() as cpu:
        if per_request:
            await asyncio.gather(*(one_at_a_time() for _ in range(2 * wave)))
        else:
            await asyncio.gather(batches(), batches())
    return window_rates(stamps, wave, window, windows), total, cpu


def measurement_order(counts: tuple[int, ...]) -> list[int]:
    """The smallest count, then the rest largest first: one scale-up, then only scale-downs."""
    return [counts[0], *sorted(counts[1:], reverse=True)]


async def _sweep(pool: Any, size: Size) -> dict[str, float]:
    """Best requests/s of each path at each engine count, and the CPU figures of its closed loop."""
    figures: dict[str, float] = {}
    for i, k in enumerate(measurement_order(size.counts)):
        if len(pool.engine_ids()) != k:
            await asyncio.to_thread(pool.scale, k)
        for path in PATHS if i % 2 == 0 else tuple(reversed(PATHS)):  # alternate which path goes first
            rates, requests, cpu = await _closed_loop(pool, k, size, path == "per_request", size.repeats)
            figures[f"{path}_req_per_s@{k}"] = max(rates)
            figures[f"{path}_cpu_ms_per_req@{k}"] = 1000 * ratio(cpu.own_s, requests)
            figures[f"{path}_machine_busy@{k}"] = cpu.busy_share
    return figures


def _efficiency(measured: dict[str, float], size: Size) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Figures per path and engine count (req/s, efficiency vs linear, utilisation, CPU) and the goals."""
    figures: dict[str, float] = {}
    goals = []
    counts = size.counts
    for path in PATHS:
        one = measured[f"{path}_req_per_s@{counts[0]}"] / counts[0]
        for k in counts:
            thr = measured[f"{path}_req_per_s@{k}"]
            figures[f"{path}_req_per_s@{k}"] = thr
            figures[f"{path}_efficiency@{k}"] = ratio(thr, k * one)
            figures[f"{path}_utilisation@{k}"] = ratio(thr, k * size.service_rate)
        for k in counts:
            figures[f"{path}_cpu_ms_per_req@{k}"] = measured[f"{path}_cpu_ms_per_req@{k}"]
            figures[f"{path}_machine_busy@{k}"] = measured[f"{path}_machine_busy@{k}"]
        top = counts[-1]
        name = f"{path} efficiency vs linear at {top} engines"
        goals.append(goal(name, figures[f"{path}_efficiency@{top}"], ">=", EFFICIENCY_GOAL))
    return figures, goals


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Throughput of both submission paths at each engine count, as efficiency vs linear."""
    label = "tiny" if tiny else "quick" if quick else "full"
    size = SIZES[label]
    ensure_ray()
    with fake_pool(size.engine_kwargs(), size.counts[0]) as pool:
        measured = asyncio.run(_sweep(pool, size))
    figures, goals = _efficiency(measured, size)
    params = {
        "engine_counts": list(size.counts),
        "base_latency_s": size.base_latency_s,
        "max_concurrency": size.max_concurrency,
        "in_flight_per_engine": 2 * size.max_concurrency,
        "window_waves": size.waves,
        "windows": size.repeats,
        "service_rate_per_engine_req_per_s": size.service_rate,
    }
    notes = [
        f"fake engine: {size.max_concurrency} requests at once x {size.base_latency_s:g} s each = "
        f"{size.service_rate:g} requests/s per engine, the order of a real engine's rate on rollouts "
        "(requests of seconds, hundreds in flight), not a no-op's",
        f"closed loop: engines x {2 * size.max_concurrency} requests in flight; req/s = the best of "
        f"{size.repeats} consecutive window(s) of {size.waves} waves in steady state (warm-up wave and "
        "drain not counted)",
        f"engine counts measured in the order {measurement_order(size.counts)} (one scale-up, then scale-downs)",
        "efficiency is relative to the 1-engine figure of the same path",
        "per_request: router leases and releases are coalesced per event-loop turn, but every request "
        "is its own engine actor call, so its ceiling is this driver's call rate",
        "cpu_ms_per_req: CPU of this process and the Ray it started (router, engines, raylet) per request; "
        "machine_busy: share of all cores busy (anyone's) during the pass",
    ]
    return result("scaling", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "scaling", *sys.argv[1:]]))
