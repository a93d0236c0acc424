"""Weight push: bytes/s of ``pool.update_weights`` to 1 and 2 engines vs a plain ``ray.put`` + ``ray.get``.

Two state dicts of torch tensors (what a trainer hands over):

- ``tiny``: the tiny model's weights (``ip.tiny_model()`` -> ``model.safetensors``, ~2.5 MB);
- ``synthetic``: float32 tensors of 4 MiB each, 32 MiB in ``--quick``, 256 MiB in full, so
  the bytes/s reflect moving data rather than per-call overheads.

``pool`` is ``await pool.update_weights(state_dict, version=...)`` on a pool of fake
engines, scaled to 2 then 1 replicas (within one ``inferpool bench`` run it is the pool the
``scaling`` benchmark started: the fake engines' latency settings do not touch a weight
push, and no engine starts twice): the tensors are put into the object store in chunks
(``chunk_bytes``, the default 256 MiB), every engine fetches the chunks one at a time
and "loads" them (the fake counts the bytes, checked here); the router records the
version and generation is paused and resumed around the load, as for a real engine.

``raw`` is the same path without the pool: the same chunks ``ray.put`` from this driver
and fetched chunk by chunk by one Ray task per engine (1 or 2, concurrently), each
summing the bytes it got; timed from before the first put until every task returned,
as the pool's figure is timed around the whole ``update_weights`` call.

Each path runs ``repeats`` times after one warm-up push, alternating; figures are the
best bytes/s (bytes of one copy of the state dict over wall seconds) and
``pool_over_raw`` their ratio. In full mode, when vLLM is installed, the tiny model's
weights are also pushed to one real vLLM CPU engine (reported, no raw counterpart).

Run: python -m inferpool.bench.weight_push [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, ratio, result
from inferpool.bench.scaling import SHARED_ENGINE_KWARGS, fake_pool

TENSOR_BYTES = 4 << 20  # synthetic tensors of 4 MiB (1 Mi float32)
CHUNK_BYTES = 256 << 20  # pool.update_weights' default chunk size, used by both paths

# size -> (synthetic MiB, repeats, engine counts, vLLM engine too); the larger count first, so
# engines and fetching workers start (and import torch) once, in parallel, and a shared pool
# that arrives with more engines only scales down
SIZES: dict[str, tuple[int, int, tuple[int, ...], bool]] = {
    "full": (256, 5, (2, 1), True),
    "quick": (32, 2, (2, 1), False),
    "tiny": (8, 1, (2, 1), False),
}


def tiny_state_dict() -> dict[str, Any]:
    """The tiny model's weights as torch tensors (float32)."""
    from safetensors.torch import load_file

    from inferpool.tiny_model import tiny_model

    return load_file(str(Path(tiny_model()) / "model.safetensors"))


def synthetic_state_dict(mebibytes: int, seed: int = 0) -> dict[str, Any]:
    """``mebibytes`` MiB of float32 tensors of TENSOR_BYTES each, named like model layers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    count = max(1, math.ceil((mebibytes << 20) / TENSOR_BYTES))
    numel = TENSOR_BYTES // 4
    return {f"model.layers.{i}.mlp.weight": torch.randn(numel, generator=gen) for i in range(count)}


def nbytes(state: dict[str, Any]) -> int:
    return sum(int(t.nbytes) for t in state.values())


def chunks_of(state: dict[str, Any], chunk_bytes: int) -> list[list[tuple[str, Any]]]:
    """The (name, tensor) chunks of at most ``chunk_bytes`` (as update_weights cuts them)."""
    out: list[list[tuple[str, Any]]] = []
    chunk: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in state.items():
        nb = int(tensor.nbytes)
        if chunk and size + nb > chunk_bytes:
            out.append(chunk)
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nb
    if chunk:
        out.append(chunk)
    return out


def _fetch_chunks(chunk_refs: list[Any]) -> int:
    """A Ray task: fetch each chunk in turn (as an engine does) and count its bytes."""
    import ray

    total = 0
    for ref in chunk_refs:
        named = ray.get(ref)
        total += sum(int(getattr(t, "nbytes", 0)) for _, t in named)
        del named
    return total


async def _raw_push(state: dict[str, Any], engines: int) -> float:
    """Seconds to put the chunks and have ``engines`` tasks fetch them all."""
    import ray

    fetch = ray.remote(num_cpus=0)(_fetch_chunks)
    want = nbytes(state)
    with Stopwatch() as sw:
        refs = [ray.put(chunk) for chunk in chunks_of(state, CHUNK_BYTES)]
        got = await asyncio.gather(*(fetch.remote(refs) for _ in range(engines)))
    if any(g != want for g in got):
        raise RuntimeError(f"raw push: tasks got {got} bytes, expected {want}")
    del refs
    return sw.seconds


async def _pool_push(pool: Any, state: dict[str, Any], version: int) -> float:
    """Seconds of one ``pool.update_weights`` (all engines loaded), checked against the bytes."""
    want = nbytes(state)
    with Stopwatch() as sw:
        out = await pool.update_weights(state, version=version, chunk_bytes=CHUNK_BYTES)
    for eid, per in out["engines"].items():
        if per["bytes"] != want:
            raise RuntimeError(f"pool push: engine {eid} loaded {per['bytes']} bytes, expected {want}")
    return sw.seconds


async def _compare(
    pool: Any, states: dict[str, dict[str, Any]], counts: tuple[int, ...], repeats: int
) -> dict[str, float]:
    """Best bytes/s of both paths for each state dict and engine count."""
    figures: dict[str, float] = {}
    version = 0
    for k in counts:
        await asyncio.to_thread(pool.scale, k)
        for label, state in states.items():
            size = nbytes(state)
            version += 1
            await _pool_push(pool, state, version)  # warm-up: worker processes, first fetches
            await _raw_push(state, k)
            best = {"pool": math.inf, "raw": math.inf}
            for rep in range(repeats):
                for path in ("pool", "raw") if rep % 2 == 0 else ("raw", "pool"):
                    if path == "pool":
                        version += 1
                        seconds = await _pool_push(pool, state, version)
                    else:
                        seconds = await _raw_push(state, k)
                    best[path] = min(best[path], seconds)
            figures[f"{label}_pool_MB_per_s@{k}"] = size / best["pool"] / 1e6
            figures[f"{label}_raw_MB_per_s@{k}"] = size / best["raw"] / 1e6
            figures[f"{label}_pool_over_raw@{k}"] = ratio(best["raw"], best["pool"])
            figures[f"{label}_pool_ms@{k}"] = 1000 * best["pool"]
            figures[f"{label}_raw_ms@{k}"] = 1000 * best["raw"]
    return figures


def _vllm_push(state: dict[str, Any], repeats: int) -> dict[str, float]:
    """Push the tiny model's weights to one real vLLM CPU engine (best of ``repeats``)."""
    import inferpool as ip
    from inferpool.tiny_model import tiny_model

    config = ip.PoolConfig(
        name="bench-weight-push-vllm",
        namespace="inferpool-bench",
        engines=[
            ip.EngineConfig(
                backend="vllm",
                model=tiny_model(),
                replicas=1,
                engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.1},
            )
        ],
    )
    pool = ip.Pool.start(config)
    try:

        async def pushes() -> float:
            best = math.inf
            for v in range(repeats + 1):  # the first push is a warm-up
                seconds = await _pool_push(pool, state, 1000 + v)
                if v:
                    best = min(best, seconds)
            return best

        best = asyncio.run(pushes())
    finally:
        pool.shutdown()
    return {"tiny_vllm_pool_MB_per_s@1": nbytes(state) / best / 1e6, "tiny_vllm_pool_ms@1": 1000 * best}


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Bytes/s of the pool's weight push and of a plain put + get, per engine count."""
    size = "tiny" if tiny else "quick" if quick else "full"
    mebibytes, repeats, counts, with_vllm = SIZES[size]
    states = {"tiny": tiny_state_dict(), "synthetic": synthetic_state_dict(mebibytes)}
    ensure_ray()
    with fake_pool(SHARED_ENGINE_KWARGS, counts[0]) as pool:
        figures = asyncio.run(_compare(pool, states, counts, repeats))
    notes = [
        "MB/s = bytes of one copy of the state dict / wall seconds of the push (best of the repeats); "
        "with 2 engines each engine fetches every byte",
        "pool = await pool.update_weights(...) to fake engines (they count the bytes; object store path is real); "
        "raw = ray.put of the same chunks + one Ray task per engine fetching them chunk by chunk",
        "tensors are torch tensors, serialized by torch's own pickling on both paths "
        "(RAY_ENABLE_ZERO_COPY_TORCH_TENSORS is off by default)",
    ]
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if with_vllm and vllm_installed:
        figures.update(_vllm_push(states["tiny"], repeats))
        notes.append("tiny_vllm: the tiny model's weights pushed to 1 real vLLM CPU engine (no raw counterpart)")
    elif with_vllm:
        notes.append("vLLM is not installed: the real-engine push was skipped")
    goals: list[dict[str, Any]] = []  # no goal set for this one: the figures are reported
    params = {
        "tiny_bytes": nbytes(states["tiny"]),
        "tiny_tensors": len(states["tiny"]),
        "synthetic_bytes": nbytes(states["synthetic"]),
        "synthetic_tensors": len(states["synthetic"]),
        "chunk_bytes": CHUNK_BYTES,
        "engine_counts": list(counts),
        "repeats": repeats,
    }
    return result("weight_push", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main
    from inferpool.bench.runner import register

    register("weight_push", "inferpool.bench.weight_push")
    raise SystemExit(_main(["--only", "weight_push", *sys.argv[1:]]))
