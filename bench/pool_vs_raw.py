"""Pool vs raw engine: generated tokens/s through the pool against vLLM's ``AsyncLLM`` called directly.

Same tiny model (``ip.tiny_model()``), the same engine and the same saturating load:
every prompt submitted at once, ``ignore_eos`` so each request samples exactly
``max_tokens`` tokens at temperature 1. Both engines are built from one
:class:`~inferpool.config.EngineConfig` (float32, seed 0, gpu_memory_utilization 0.1,
max_model_len 2048) through the vLLM backend's own argument builder, so the raw engine
gets exactly the ``AsyncEngineArgs`` the pool's engine gets (on CPU that includes the
backend's defaults: ``enforce_eager``, the ``uni`` executor) and the same process
environment (``engine_actor_options``). Three paths:

- ``raw``: ``AsyncLLM.generate`` for every prompt under one ``asyncio.gather``, in a
  subprocess of its own (:mod:`inferpool.bench.raw_engine`);
- ``pool_generate``: one ``pool.generate`` call per prompt under ``asyncio.gather``;
- ``pool_batch``: one ``pool.generate_batch`` call (few actor calls carrying many requests).

Both engines get the same OpenMP thread count: by default the one Ray gives the pool's
engine actor (``OMP_NUM_THREADS`` = its CPUs rounded down, at least 1: 1 for a CPU vLLM
engine), which vLLM's CPU worker uses for torch; a raw process would otherwise use every
core. ``INFERPOOL_BENCH_OMP_THREADS`` sets both.

The raw engine and the pool (one vLLM engine replica) start at the same time, then the
paths are measured one at a time, never together, in rotating order, after one warm-up
pass each (the first vLLM calls compile). Figures are the best of the repeats; the
goal is pool_batch / raw >= 0.98.

Run: python -m inferpool.bench.pool_vs_raw [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, finish_later, goal, ratio, result
from inferpool.bench.process_cpu import ProcessCpu
from inferpool.bench.raw_engine import RawEngine

RATIO_GOAL = 0.98
ENGINE_KWARGS: dict[str, Any] = {"gpu_memory_utilization": 0.1, "max_model_len": 2048}
DTYPE = "float32"
SEED = 0
PATHS = ("raw", "pool_generate", "pool_batch")

# size -> (prompts, prompt tokens, max_tokens, repeats)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "full": (256, 32, 64, 5),
    "quick": (64, 32, 32, 2),
    "tiny": (8, 16, 8, 1),
}

Measure = Callable[[list[list[int]], dict[str, Any]], Awaitable[tuple[int, float]]]


def make_prompts(count: int, length: int, seed: int = 0, low: int = 10, high: int = 1000) -> list[list[int]]:
    """``count`` deterministic prompts of ``length`` token ids in ``[low, high)``."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def _pool_config(model: str) -> Any:
    import inferpool as ip

    engine = ip.EngineConfig(
        backend="vllm", model=model, replicas=1, dtype=DTYPE, seed=SEED, engine_kwargs=dict(ENGINE_KWARGS)
    )
    omp = omp_threads(engine)
    engine = engine.model_copy(update={"env_vars": {**engine.env_vars, "OMP_NUM_THREADS": str(omp)}})
    return ip.PoolConfig(
        name="bench-pool-vs-raw",
        namespace="inferpool-bench",
        engines=[engine],
        sessions=ip.SessionConfig(shards=1),  # no managed sessions here: one store, one process less
    )


def engine_env(engine: Any) -> dict[str, str]:
    """The environment variables the pool gives this engine's actor process (the raw engine gets them too)."""
    from inferpool.actors.engine import engine_actor_options

    env: dict[str, str] = engine_actor_options(engine, "raw", "raw", False)["runtime_env"]["env_vars"]
    return dict(env)


def omp_threads(engine: Any) -> int:
    """Torch/OpenMP threads both engines run with: ``INFERPOOL_BENCH_OMP_THREADS``, else the
    pool's default, which is what Ray gives the engine actor (its CPUs rounded down, at least 1)."""
    forced = os.environ.get("INFERPOOL_BENCH_OMP_THREADS")
    if forced:
        return int(forced)
    return max(1, math.floor(engine.resolved_num_cpus()))


def _paths(pool: Any, raw: RawEngine) -> dict[str, Measure]:
    """Each path as ``(prompts, sampling) -> (generated tokens, seconds)``."""
    import inferpool as ip

    async def raw_path(prompts: list[list[int]], sampling: dict[str, Any]) -> tuple[int, float]:
        out = await asyncio.to_thread(raw.run, prompts, sampling)
        return int(out["tokens"]), float(out["seconds"])

    async def pool_generate(prompts: list[list[int]], sampling: dict[str, Any]) -> tuple[int, float]:
        sp = ip.SamplingParams(**sampling)
        with Stopwatch() as sw:
            results = await asyncio.gather(*(pool.generate(p, sp) for p in prompts))
        return sum(r.num_generated_tokens for r in results), sw.seconds

    async def pool_batch(prompts: list[list[int]], sampling: dict[str, Any]) -> tuple[int, float]:
        sp = ip.SamplingParams(**sampling)
        with Stopwatch() as sw:
            results = await pool.generate_batch(prompts, sp)
        return sum(r.num_generated_tokens for r in results), sw.seconds

    return {"raw": raw_path, "pool_generate": pool_generate, "pool_batch": pool_batch}


PROCESSES = ("EngineActor", "Router", "SessionStore")


async def _measure_all(
    paths: dict[str, Measure], prompts: list[list[int]], max_tokens: int, repeats: int, raw_pid: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Warm each path up, then measure each ``repeats`` times (rotating order); tokens/s samples
    and, per path, the CPU milliseconds per request of each kind of process."""
    sampling = {"max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    warm = {**sampling, "max_tokens": min(8, max_tokens)}
    for measure in paths.values():
        await measure(prompts, warm)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, dict[str, float]] = {name: {} for name in paths}
    names = list(paths)
    expected = len(prompts) * max_tokens
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            with ProcessCpu(PROCESSES, trees={"RawEngine": raw_pid}) as meter:
                tokens, seconds = await paths[name](prompts, sampling)
            if tokens != expected:
                raise RuntimeError(f"{name}: {tokens} tokens generated, expected {expected}")
            samples[name].append(tokens / seconds)
            for proc, secs in meter.seconds.items():
                cpu[name][proc] = cpu[name].get(proc, 0.0) + 1000 * secs / (len(prompts) * repeats)
    return samples, cpu


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Tokens/s of the raw engine and of both pool paths, and the pool/raw ratios."""
    import inferpool as ip

    size = "tiny" if tiny else "quick" if quick else "full"
    count, length, max_tokens, repeats = SIZES[size]
    prompts = make_prompts(count, length)
    model = ip.tiny_model()
    log_path = Path(tempfile.mkstemp(prefix="inferpool-bench-raw-", suffix=".log")[1])
    pool_config = _pool_config(model)
    engine = pool_config.engines[0]
    omp = engine.env_vars["OMP_NUM_THREADS"]
    # The raw engine starts now, alongside Ray and the pool: same engine config, same environment.
    raw = RawEngine(engine.model_dump_json(), log_path, env=engine_env(engine))
    pool: Any = None

    def teardown() -> None:
        try:
            raw.request_stop()  # the raw engine shuts down while the pool does
            if pool is not None:
                pool.shutdown()
        finally:
            raw.stop()
            log_path.unlink(missing_ok=True)

    try:
        ensure_ray()
        t0 = time.perf_counter()
        pool = ip.Pool.start(pool_config)
        pool_start_s = time.perf_counter() - t0
        raw_start_s = raw.wait_ready()
        samples, cpu = asyncio.run(_measure_all(_paths(pool, raw), prompts, max_tokens, repeats, raw.pid))
    except BaseException:
        teardown()
        raise
    # vLLM engines take seconds to exit, mostly waiting: within a run the next benchmark starts meanwhile
    finish_later(teardown, "pool_vs_raw")

    figures: dict[str, float] = {}
    for name in PATHS:
        figures[f"{name}_tokens_per_s"] = max(samples[name])
        figures[f"{name}_tokens_per_s_median"] = statistics.median(samples[name])
    raw_best = figures["raw_tokens_per_s"]
    figures["pool_generate_over_raw"] = ratio(figures["pool_generate_tokens_per_s"], raw_best)
    figures["pool_batch_over_raw"] = ratio(figures["pool_batch_tokens_per_s"], raw_best)
    figures["pool_batch_over_raw_of_medians"] = ratio(
        figures["pool_batch_tokens_per_s_median"], figures["raw_tokens_per_s_median"]
    )
    for name in PATHS:  # where the CPU goes, per request: this path's processes (Driver: this process)
        for proc, ms in cpu[name].items():
            if ms >= 0.005:
                figures[f"cpu_ms_per_request_{name}_{proc}"] = ms
    figures["raw_start_s"] = raw_start_s
    figures["pool_start_s"] = pool_start_s
    goals = [
        goal("pool_batch / raw tokens/s", figures["pool_batch_over_raw"], ">=", RATIO_GOAL),
    ]
    params = {
        "prompts": count,
        "prompt_tokens": length,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "repeats": repeats,
        "engine_replicas": 1,
        "engine": {"model": model, "dtype": DTYPE, "seed": SEED, **ENGINE_KWARGS},
        "omp_num_threads": int(omp),
        "samples_tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
    }
    notes = [
        "raw = AsyncLLM in a subprocess; pool = the same engine in a Ray actor; measured one at a time",
        "both engines are built from one EngineConfig by the vLLM backend (same AsyncEngineArgs, same env)",
        "engine start times overlap (raw and pool start together), so each is slower than alone",
        f"both engines run with OMP_NUM_THREADS={omp} (the pool's default on this machine; "
        "INFERPOOL_BENCH_OMP_THREADS overrides both)",
        "ratios use each path's best sample (the machine may be shared); *_of_medians uses medians",
    ]
    return result("pool_vs_raw", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "pool_vs_raw", *sys.argv[1:]]))
