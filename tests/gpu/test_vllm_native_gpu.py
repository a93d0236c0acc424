"""vLLM on a GPU: native weight transfer (CUDA IPC colocated, NCCL across two GPUs) and
sleep/wake releasing memory (measured). Skipped without a CUDA GPU and vLLM.

The model is the embedded tiny random-weight Qwen2 built in a temp dir (float32, so the
logprobs compare with a transformers forward pass at 1e-3). Model B has other weights;
after an update the pool's logprobs must match B's.

Run: .venv/bin/pytest tests/gpu/test_vllm_native_gpu.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import inferpool as ip
from inferpool.tiny_model import build_tiny_model

pytestmark = pytest.mark.gpu
pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

GREEDY = ip.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("gpu-models")
    return build_tiny_model(root / "a", seed=0), build_tiny_model(root / "b", seed=1)


def cuda_state_dict(model_dir: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.cuda() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}


def hf_logprobs(model_dir: str, ids: list[int], start: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(start, len(ids))]


def start_pool(name: str, model: str, method: str, num_gpus: float) -> ip.Pool:
    return ip.Pool.start(
        ip.PoolConfig(
            name=name,
            engines=[
                ip.EngineConfig(
                    backend="vllm",
                    model=model,
                    num_gpus=num_gpus,
                    dtype="float32",
                    engine_kwargs={"max_model_len": 1024},
                )
            ],
            weight_transfer=ip.WeightTransferConfig(method=method, timeout_s=300),  # type: ignore[arg-type]
        )
    )


async def assert_serves(pool: ip.Pool, model_dir: str, version: str) -> None:
    choice = (await pool.generate(PROMPT, GREEDY)).choices[0]
    assert choice.logprobs == pytest.approx(hf_logprobs(model_dir, PROMPT + choice.token_ids, len(PROMPT)), abs=1e-3)
    assert choice.weight_versions == [version] * len(choice.token_ids)


@pytest.fixture(scope="module")
def ipc_pool(ray_session: None, models: tuple[str, str]) -> Iterator[ip.Pool]:
    pool = start_pool("gpu-ipc", models[0], "ipc", num_gpus=0.5)  # colocated with this process on one GPU
    yield pool
    pool.shutdown()


async def test_ipc_update_from_this_process_gpu(ipc_pool: ip.Pool, models: tuple[str, str]) -> None:
    a, b = models
    out = await ipc_pool.update_weights(cuda_state_dict(b), version="ipc-B")
    assert out["method"] == "ipc" and out["bytes"] > 0
    await assert_serves(ipc_pool, b, "ipc-B")
    await ipc_pool.update_weights(cuda_state_dict(a), version="ipc-A")
    await assert_serves(ipc_pool, a, "ipc-A")


async def test_sleep_releases_memory_and_wake_serves_again(ipc_pool: ip.Pool, models: tuple[str, str]) -> None:
    torch.cuda.synchronize()
    free_awake, total = torch.cuda.mem_get_info()
    await ipc_pool.sleep(level=1)  # KV cache released (weights offloaded to CPU)
    free_asleep, _ = torch.cuda.mem_get_info()
    released = free_asleep - free_awake
    # the engine holds ~0.45 of the GPU (colocated default); most of that is KV cache
    assert released > 0.2 * total, f"sleep released only {released / 2**30:.2f} GiB of {total / 2**30:.0f}"
    await ipc_pool.wake()
    free_woken, _ = torch.cuda.mem_get_info()
    assert free_woken < free_asleep - 0.2 * total
    await assert_serves(ipc_pool, models[0], "ipc-A")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between trainer and engine needs two GPUs")
async def test_nccl_broadcast_from_another_gpu(ray_session: None, models: tuple[str, str]) -> None:
    a, b = models
    pool = start_pool("gpu-nccl", a, "nccl", num_gpus=1)
    try:
        # the engine holds one GPU through Ray; this process sends from the last visible one
        torch.cuda.set_device(torch.cuda.device_count() - 1)
        out = await pool.update_weights(cuda_state_dict(b), version="nccl-B")
        assert out["method"] == "nccl" and out["bytes"] > 0
        await assert_serves(pool, b, "nccl-B")
    finally:
        pool.shutdown()
