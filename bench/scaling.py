"""Scaling: pool throughput at 1, 2, 4, 8 fake engines with a fixed service time.

Each fake engine serves ``max_concurrency`` requests at once, each taking
``base_latency_s`` (no per-token time), so one engine can serve at most
``max_concurrency / base_latency_s`` requests/s and ``k`` engines ``k`` times that.
Every engine count gets the same number of waves of work (requests = engines x
max_concurrency x waves), all offered at once, so the offered concurrency is at least
engines x max_concurrency x 2 and every engine stays saturated. One pool is started
and scaled up (``Pool.scale``); fake engines reserve no CPU, so 8 fit on 2 cores.

Throughput is measured through ``generate_batch`` (few actor calls) and through one
``generate`` call per request (``asyncio.gather``), best of a few repeats each.
Efficiency vs linear = throughput(k) / (k x throughput(1)) (goal >= 0.9 at 8 engines);
utilisation = throughput(k) / (k x the engine's service rate).

Run: python -m bench.scaling [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import Stopwatch, ensure_ray, goal, ratio, result

EFFICIENCY_GOAL = 0.9
PROMPT = list(range(1, 17))

# size -> (engine counts, base latency s, max concurrency, waves, repeats)
SIZES: dict[str, tuple[tuple[int, ...], float, int, int, int]] = {
    "full": ((1, 2, 4, 8), 0.05, 8, 20, 3),
    "quick": ((1, 2, 4, 8), 0.05, 8, 10, 2),
    "tiny": ((1, 2), 0.02, 4, 2, 1),
}


def _pool_config(base_latency_s: float, max_concurrency: int) -> Any:
    import inferpool as ip

    fake = {
        "base_latency_s": base_latency_s,
        "max_concurrency": max_concurrency,
        "vocab_size": 1024,
    }
    return ip.PoolConfig(
        name="bench-scaling",
        namespace="inferpool-bench",
        engines=[ip.EngineConfig(backend="fake", replicas=1, engine_kwargs=fake)],
        router=ip.RouterConfig(acquire_timeout_s=120.0),
    )


async def _measure(pool: Any, requests: int, per_request: bool) -> float:
    """Requests/s of one pass over ``requests`` prompts, all offered at once."""
    import inferpool as ip

    sp = ip.SamplingParams(max_tokens=4, ignore_eos=True, seed=0)
    prompts = [PROMPT] * requests
    with Stopwatch() as sw:
        if per_request:
            out = await asyncio.gather(*(pool.generate(p, sp) for p in prompts))
        else:
            out = await pool.generate_batch(prompts, sp)
    if len(out) != requests:
        raise RuntimeError(f"expected {requests} results, got {len(out)}")
    return requests / sw.seconds


async def _sweep(
    pool: Any, counts: tuple[int, ...], max_concurrency: int, waves: int, repeats: int
) -> dict[str, float]:
    figures: dict[str, float] = {}
    for k in counts:
        await asyncio.to_thread(pool.scale, k)
        requests = k * max_concurrency * waves
        await _measure(pool, k * max_concurrency * 2, per_request=False)  # warm the new engines
        for path, per_request in (("batch", False), ("per_request", True)):
            best = 0.0
            for _ in range(repeats):
                best = max(best, await _measure(pool, requests, per_request))
            figures[f"{path}_req_per_s@{k}"] = best
    return figures


def _efficiency(
    measured: dict[str, float], counts: tuple[int, ...], service_rate: float
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Figures per path and engine count (req/s, efficiency vs linear, utilisation) and the goals."""
    figures: dict[str, float] = {}
    goals = []
    for path in ("batch", "per_request"):
        one = measured[f"{path}_req_per_s@{counts[0]}"] / counts[0]
        for k in counts:
            thr = measured[f"{path}_req_per_s@{k}"]
            figures[f"{path}_req_per_s@{k}"] = thr
            figures[f"{path}_efficiency@{k}"] = ratio(thr, k * one)
            figures[f"{path}_utilisation@{k}"] = ratio(thr, k * service_rate)
        top = counts[-1]
        name = f"{path} efficiency vs linear at {top} engines"
        goals.append(goal(name, figures[f"{path}_efficiency@{top}"], ">=", EFFICIENCY_GOAL))
    return figures, goals


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Throughput of both submission paths at each engine count, as efficiency vs linear."""
    import inferpool as ip

    size = "tiny" if tiny else "quick" if quick else "full"
    counts, base_latency_s, max_concurrency, waves, repeats = SIZES[size]
    ensure_ray()
    pool = ip.Pool.start(_pool_config(base_latency_s, max_concurrency))
    try:
        figures = asyncio.run(_sweep(pool, counts, max_concurrency, waves, repeats))
    finally:
        pool.shutdown()
    figures, goals = _efficiency(figures, counts, max_concurrency / base_latency_s)
    params = {
        "engine_counts": list(counts),
        "base_latency_s": base_latency_s,
        "max_concurrency": max_concurrency,
        "waves": waves,
        "requests_per_engine": max_concurrency * waves,
        "repeats": repeats,
        "service_rate_per_engine_req_per_s": max_concurrency / base_latency_s,
    }
    notes = [
        f"offered concurrency = engines x {max_concurrency * waves} "
        f"(>= engines x max_concurrency x 2 = engines x {max_concurrency * 2})",
        "figures are the best of the repeats; efficiency is relative to the 1-engine figure of the same path",
        "per_request makes 3 actor calls per request (router acquire, engine generate, router release), "
        "so its ceiling is this driver's and the router actor's call rate, not the engines",
    ]
    return result("scaling", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from bench.runner import main as _main

    raise SystemExit(_main(["--only", "scaling", *sys.argv[1:]]))
