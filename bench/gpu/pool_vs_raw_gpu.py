"""Pool vs raw vLLM ``AsyncLLM`` on a GPU: a 0.5B-shaped random-weight Qwen2, at saturation and in sessions.

Needs a CUDA GPU and the GPU build of vLLM. Without a GPU it prints ``skipped: no GPU``
and exits 0 (without vLLM: ``skipped: vLLM not installed``, exit 0).

Run (from the repository root, on a machine with a GPU)::

    python -m inferpool.bench.gpu.pool_vs_raw_gpu            # full: 1024 prompts x 256 tokens, 3 repeats
    python -m inferpool.bench.gpu.pool_vs_raw_gpu --quick    # the same load once, fewer sessions
    python -m inferpool.bench.gpu.pool_vs_raw_gpu --json bench/results/gpu.json

or, once registered in :mod:`inferpool.bench.runner`, ``python -m bench --only pool_vs_raw_gpu``.

Model and workload: :mod:`inferpool.bench.gpu.workload` (a random-weight model of
Qwen2.5-0.5B's shape, built locally once; deterministic prompts and conversations).

Both sides run the same engine arguments (bfloat16, seed 0, ``ENGINE_KWARGS``) one after
the other, never together on the GPU: first the raw engine, ``AsyncLLM`` in a subprocess
of its own (this module with ``--raw-child``), then a pool of one vLLM engine replica
(``num_gpus=1``). Each warms up before it is measured (CUDA graphs, compilation; a few
one-turn sessions before the session workload, which load the session stores' renderers).

- saturation: every prompt submitted at once (``ignore_eos``, temperature 1): raw
  ``AsyncLLM.generate`` under one ``asyncio.gather``; pool ``generate_batch`` and one
  ``pool.generate`` per prompt.
- sessions: ``sessions`` concurrent multi-turn chats of ``turns`` turns through
  ``pool.session()`` (chat template rendering, token-exact state in the session store);
  the raw side runs the same conversations token-exactly as a caller of ``AsyncLLM``
  would (previous prompt + sampled ids + the rendered new user turn).

Figures: generated tokens/s of each path (best of the repeats) and pool/raw ratios.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, goal, ratio, result
from inferpool.bench.gpu.workload import SEED, SIZES, Workload, build_model, make_workload, model_parameters

NAME = "pool_vs_raw_gpu"
RATIO_GOAL = 0.98  # pool_batch / raw at saturation, as in bench.pool_vs_raw
WARM_SESSIONS = 8  # one-turn sessions run before the session workload is timed (both sides)
REPO_ROOT = Path(__file__).resolve().parents[2]

GPU_ENGINE: dict[str, Any] = {
    "dtype": "bfloat16",
    "engine_kwargs": {"gpu_memory_utilization": 0.85, "max_model_len": 4096, "enable_prefix_caching": True},
}
CPU_SMOKE_ENGINE: dict[str, Any] = {  # tiny mode without a GPU: the code path on vLLM's CPU build
    "dtype": "float32",
    "engine_kwargs": {
        "gpu_memory_utilization": 0.1,
        "max_model_len": 2048,
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
    },
}


# -- environment ------------------------------------------------------------------------------
def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:
        return False


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _warm(sampling: dict[str, Any]) -> dict[str, Any]:
    """Warm-up sampling: the same, with at most 8 tokens."""
    return {**sampling, "max_tokens": min(8, sampling["max_tokens"])}


# -- the raw side (a subprocess) -------------------------------------------------------------
def run_raw(model: str, engine: dict[str, Any], w: Workload, repeats: int, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run the raw engine's measurements in a subprocess (this module, ``--raw-child``)."""
    with tempfile.TemporaryDirectory(prefix="inferpool-bench-gpu-") as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        log = Path(tmp) / "raw.log"
        spec.write_text(
            json.dumps({"model": model, "engine": engine, "workload": dataclasses.asdict(w), "repeats": repeats})
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        if "OMP_NUM_THREADS" not in env and not gpu_available():
            env["OMP_NUM_THREADS"] = "1"  # CPU smoke: the pool's CPU engine gets 1 thread too
        cmd = [sys.executable, "-m", "bench.gpu.pool_vs_raw_gpu", "--raw-child", str(spec), str(out)]
        with open(log, "wb") as fh:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s)
        if proc.returncode != 0 or not out.is_file():
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"raw engine failed (exit {proc.returncode}):\n{tail}")
        answer: dict[str, Any] = json.loads(out.read_text())
        return answer


async def _raw_measure(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from inferpool.actors.backends.vllm.backend import to_vllm_sampling
    from inferpool.types import SamplingParams

    w = spec["workload"]
    engine_cfg = spec["engine"]
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=spec["model"],
            seed=SEED,
            dtype=engine_cfg["dtype"],
            disable_log_stats=True,
            **engine_cfg["engine_kwargs"],
        )
    )
    start_s = time.perf_counter() - t0
    ids = itertools.count()

    async def one(prompt: list[int], sp: Any) -> list[int]:
        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), sp, f"raw-{next(ids)}"):
            final = out
        assert final is not None
        return list(final.outputs[0].token_ids)

    async def saturation(sampling: dict[str, Any]) -> tuple[int, float]:
        sp = to_vllm_sampling(SamplingParams(**sampling))
        t = time.perf_counter()
        outs = await asyncio.gather(*(one(p, sp) for p in w["prompts"]))
        return sum(len(o) for o in outs), time.perf_counter() - t

    async def conversation(i: int, turns: int, sp: Any) -> int:
        prompt = list(w["first_ids"][i])
        generated = 0
        for turn in range(turns):
            reply = await one(prompt, sp)
            generated += len(reply)
            if turn + 1 < turns:
                prompt = prompt + reply + list(w["suffix_ids"][i][turn])
        return generated

    async def sessions(count: int, turns: int, sampling: dict[str, Any]) -> tuple[int, float]:
        sp = to_vllm_sampling(SamplingParams(**sampling))
        t = time.perf_counter()
        outs = await asyncio.gather(*(conversation(i, turns, sp) for i in range(count)))
        return sum(outs), time.perf_counter() - t

    count, turns = len(w["first_ids"]), len(w["suffix_ids"][0]) + 1
    try:
        await saturation(_warm(w["sampling"]))
        sat = [await saturation(w["sampling"]) for _ in range(spec["repeats"])]
        await sessions(min(WARM_SESSIONS, count), 1, _warm(w["session_sampling"]))
        ses = [await sessions(count, turns, w["session_sampling"]) for _ in range(spec["repeats"])]
    finally:
        engine.shutdown()
    return {"start_s": start_s, "saturation": sat, "sessions": ses}


def _raw_child(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    answer = asyncio.run(_raw_measure(spec))
    Path(out_path).write_text(json.dumps(answer))
    return 0


# -- the pool side ----------------------------------------------------------------------------
def _pool_config(model: str, engine: dict[str, Any], gpu: bool) -> Any:
    import inferpool as ip

    env = {} if gpu else {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return ip.PoolConfig(
        name="bench-pool-vs-raw-gpu",
        namespace="inferpool-bench",
        engines=[
            ip.EngineConfig(
                backend="vllm",
                model=model,
                replicas=1,
                num_gpus=1.0 if gpu else 0.0,
                dtype=engine["dtype"],
                seed=SEED,
                engine_kwargs=dict(engine["engine_kwargs"]),
                env_vars=env,
                request_timeout_s=3600.0,
            )
        ],
        router=ip.RouterConfig(max_requests_per_engine=100_000, eval_requests_per_engine=0, acquire_timeout_s=600.0),
        sessions=ip.SessionConfig(shards=2),
    )


async def _pool_measure(pool: Any, w: Workload, repeats: int) -> dict[str, list[tuple[int, float]]]:
    import inferpool as ip

    async def batch(sampling: dict[str, Any]) -> tuple[int, float]:
        with Stopwatch() as sw:
            out = await pool.generate_batch(w.prompts, ip.SamplingParams(**sampling))
        return sum(r.num_generated_tokens for r in out), sw.seconds

    async def per_request(sampling: dict[str, Any]) -> tuple[int, float]:
        sp = ip.SamplingParams(**sampling)
        with Stopwatch() as sw:
            out = await asyncio.gather(*(pool.generate(p, sp) for p in w.prompts))
        return sum(r.num_generated_tokens for r in out), sw.seconds

    async def conversation(i: int, turns: int, sampling: dict[str, Any]) -> int:
        msgs = list(w.messages[i])
        generated = 0
        async with pool.session() as s:
            for turn in range(turns):
                out = await s.chat(msgs, **sampling)
                generated += out.usage.completion_tokens
                if turn + 1 < turns:
                    msgs = [*msgs, out.choices[0].message.model_dump(exclude_none=True), w.user_turns[i][turn]]
        return generated

    async def sessions(count: int, turns: int, sampling: dict[str, Any]) -> tuple[int, float]:
        with Stopwatch() as sw:
            outs = await asyncio.gather(*(conversation(i, turns, sampling) for i in range(count)))
        return sum(outs), sw.seconds

    await batch(_warm(w.sampling))
    samples: dict[str, list[tuple[int, float]]] = {"pool_batch": [], "pool_generate": [], "sessions": []}
    for rep in range(repeats):
        order = ("pool_batch", "pool_generate") if rep % 2 == 0 else ("pool_generate", "pool_batch")
        for name in order:
            samples[name].append(await (batch if name == "pool_batch" else per_request)(w.sampling))
    count, turns = len(w.messages), len(w.user_turns[0]) + 1
    await sessions(min(WARM_SESSIONS, count), 1, _warm(w.session_sampling))  # loads the stores' renderers
    for _ in range(repeats):
        samples["sessions"].append(await sessions(count, turns, w.session_sampling))
    return samples


def _best(samples: list[Any]) -> float:
    return max(tokens / seconds for tokens, seconds in samples)


def skipped(reason: str) -> dict[str, Any]:
    return result(NAME, {}, {}, [], [f"skipped: {reason}"])


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Tokens/s of raw AsyncLLM and of the pool at saturation and in sessions, and the ratios.

    ``tiny``: the tiny model and a few requests; without a GPU it runs on vLLM's CPU build
    (a smoke test of the code path, not a measurement).
    """
    gpu = gpu_available()
    if not gpu and not tiny:
        return skipped("no GPU")
    if not vllm_installed():
        return skipped("vLLM not installed")
    import inferpool as ip
    from inferpool.tiny_model import tiny_model

    size_name = "tiny" if tiny else "quick" if quick else "full"
    size = SIZES[size_name]
    engine = GPU_ENGINE if gpu else CPU_SMOKE_ENGINE
    model = tiny_model() if tiny else build_model()
    w = make_workload(model, size)
    raw = run_raw(model, engine, w, size.repeats)  # alone on the GPU, before the pool starts
    ensure_ray()
    t0 = time.perf_counter()
    pool = ip.Pool.start(_pool_config(model, engine, gpu))
    pool_start_s = time.perf_counter() - t0
    try:
        samples = asyncio.run(_pool_measure(pool, w, size.repeats))
    finally:
        pool.shutdown()

    expected = size.prompts * size.max_tokens
    for name, values in [("raw", raw["saturation"]), ("pool_batch", samples["pool_batch"])]:
        if any(int(tokens) != expected for tokens, _ in values):
            raise RuntimeError(f"{name}: generated {[t for t, _ in values]} tokens, expected {expected} per pass")
    figures = {
        "saturation_raw_tokens_per_s": _best(raw["saturation"]),
        "saturation_pool_batch_tokens_per_s": _best(samples["pool_batch"]),
        "saturation_pool_generate_tokens_per_s": _best(samples["pool_generate"]),
        "sessions_raw_tokens_per_s": _best(raw["sessions"]),
        "sessions_pool_tokens_per_s": _best(samples["sessions"]),
    }
    figures["saturation_pool_batch_over_raw"] = ratio(
        figures["saturation_pool_batch_tokens_per_s"], figures["saturation_raw_tokens_per_s"]
    )
    figures["saturation_pool_generate_over_raw"] = ratio(
        figures["saturation_pool_generate_tokens_per_s"], figures["saturation_raw_tokens_per_s"]
    )
    figures["sessions_pool_over_raw"] = ratio(
        figures["sessions_pool_tokens_per_s"], figures["sessions_raw_tokens_per_s"]
    )
    turns = size.sessions * size.turns
    figures["sessions_raw_turns_per_s"] = max(turns / s for _, s in raw["sessions"])
    figures["sessions_pool_turns_per_s"] = max(turns / s for _, s in samples["sessions"])
    figures["raw_start_s"] = raw["start_s"]
    figures["pool_start_s"] = pool_start_s
    goals = [goal("saturation pool_batch / raw tokens/s", figures["saturation_pool_batch_over_raw"], ">=", RATIO_GOAL)]
    params = {
        **dataclasses.asdict(size),
        "model": "tiny" if tiny else f"qwen2-0.5b-shape random ({model_parameters():,} parameters)",
        "device": "gpu" if gpu else "cpu (smoke)",
        "engine": engine,
        "mean_first_session_prompt_tokens": sum(len(x) for x in w.first_ids) / max(1, len(w.first_ids)),
    }
    notes = [
        "raw = AsyncLLM in its own process, measured first; the pool (1 vLLM engine replica) afterwards, "
        "never both on the device at once",
        "tokens/s = generated tokens / wall seconds, best of the repeats",
        "sessions: pool.session().chat per turn vs raw AsyncLLM on the same conversations token by token",
    ]
    if not gpu:
        notes.append("no GPU: tiny smoke run on vLLM's CPU build, not a measurement")
    return result(NAME, params, figures, goals, notes)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--raw-child":
        raise SystemExit(_raw_child(sys.argv[2], sys.argv[3]))
    if not gpu_available():
        print("skipped: no GPU")
        raise SystemExit(0)
    if not vllm_installed():
        print("skipped: vLLM not installed")
        raise SystemExit(0)

    from inferpool.bench.runner import main as _main
    from inferpool.bench.runner import register

    register(NAME, "bench.gpu.pool_vs_raw_gpu")
    raise SystemExit(_main(["--only", NAME, *sys.argv[1:]]))
