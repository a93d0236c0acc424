"""The SGLang backend on a real ``sgl.Engine`` (CUDA GPU and ``sglang`` installed; else skipped).

The model is the embedded tiny random-weight Qwen2 (2 layers, hidden 128, head_dim 64),
written into a temporary directory with ``build_tiny_model``, served in bfloat16 with the
Triton attention backend and no CUDA graphs (a quick start). Checked: engine facts, greedy
generation with the sampled tokens' logprobs, n samples, prompt logprobs against a
float32 transformers forward pass, pause(abort)/resume, prefix-cache reset, and sleep/wake
(memory measured; needs ``torch_memory_saver``) followed by a weight push through
``load_weights``.

Run: .venv/bin/pytest tests/gpu/test_sglang_gpu.py -q
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from inferpool.actors.backends.sglang.backend import SGLangBackend
from inferpool.config import EngineConfig
from inferpool.tiny_model import EOS_TOKEN, build_tiny_model
from inferpool.types import EngineInfo, GenerateRequest, SamplingParams

pytestmark = pytest.mark.gpu
pytest.importorskip("sglang")

MEMORY_SAVER = importlib.util.find_spec("torch_memory_saver") is not None
GIB = 1 << 30
Tokenize = Callable[[str], list[int]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-sglang"))


@pytest.fixture(scope="module")
def tokenize(model_dir: str) -> Tokenize:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda text: list(tok.encode(text).ids)


@pytest.fixture(scope="module")
async def engine(model_dir: str) -> AsyncIterator[tuple[SGLangBackend, EngineInfo]]:
    kwargs = {
        "attention_backend": "triton",
        "disable_cuda_graph": True,
        "mem_fraction_static": 0.3,
        "log_level": "error",
        "enable_memory_saver": MEMORY_SAVER,
    }
    config = EngineConfig(backend="sglang", model=model_dir, num_gpus=1, dtype="bfloat16", engine_kwargs=kwargs)
    backend = SGLangBackend(config, "sglang-gpu")
    info = await backend.start()
    try:
        yield backend, info
    finally:
        await backend.shutdown()


def greedy(prompt: list[int], rid: str, max_tokens: int = 8) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)


async def test_engine_facts_and_health(engine: tuple[SGLangBackend, EngineInfo], model_dir: str) -> None:
    import json

    backend, info = engine
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert info.backend == "sglang" and info.model == model_dir
    assert info.vocab_size == config["vocab_size"] and info.max_model_len == config["max_position_embeddings"]
    tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == EOS_TOKEN)
    assert info.eos_token_id == eos
    await backend.health()


async def test_greedy_generation_with_logprobs(engine: tuple[SGLangBackend, EngineInfo], tokenize: Tokenize) -> None:
    backend, _ = engine
    prompt = tokenize("alice writes code and bob reads it")
    first = await backend.generate(greedy(prompt, "g-1"))
    second = await backend.generate(greedy(prompt, "g-2"))
    (a,), (b,) = first.choices, second.choices
    assert len(a.token_ids) == len(a.logprobs) == len(a.weight_versions) == 8
    assert a.finish_reason == "length" and a.weight_versions == [0] * 8
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in a.logprobs)
    assert a.token_ids == b.token_ids  # greedy is repeatable
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-2)
    assert isinstance(a.text, str)


async def test_n_samples(engine: tuple[SGLangBackend, EngineInfo], tokenize: Tokenize) -> None:
    backend, _ = engine
    request = GenerateRequest(
        request_id="n-3",
        prompt_token_ids=tokenize("carol counts"),
        sampling=SamplingParams(n=3, max_tokens=6, temperature=1.0, ignore_eos=True, logprobs=2),
        choice_offset=1,
    )
    result = await backend.generate(request)
    assert [c.index for c in result.choices] == [1, 2, 3]
    for choice in result.choices:
        assert len(choice.token_ids) == len(choice.logprobs) == 6
        assert choice.top_logprobs is not None and all(len(top) == 2 for top in choice.top_logprobs)


async def test_prompt_logprobs_match_transformers(
    engine: tuple[SGLangBackend, EngineInfo], tokenize: Tokenize, model_dir: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    backend, _ = engine
    prompt = tokenize("dave and eve talk about frank and grace")
    k = 3
    out = await backend.prompt_logprobs(prompt, k)
    assert out.prompt_topk_token_ids[0] == [] and out.prompt_topk_logprobs[0] == []
    assert all(len(ids) == k for ids in out.prompt_topk_token_ids[1:])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    agree = 0
    for pos in range(1, len(prompt)):
        top = torch.topk(ref[pos - 1], k)
        assert out.prompt_topk_logprobs[pos][0] == pytest.approx(float(top.values[0]), abs=0.1)  # bfloat16 engine
        agree += out.prompt_topk_token_ids[pos][0] == int(top.indices[0])
    assert agree >= 0.8 * (len(prompt) - 1)

    # the sampled tokens' logprobs agree with scoring the same sequence
    (choice,) = (await backend.generate(greedy(prompt, "g-score", max_tokens=4))).choices
    scored = await backend.prompt_logprobs(prompt + choice.token_ids, 1)
    for i, lp in enumerate(choice.logprobs):
        assert scored.prompt_topk_logprobs[len(prompt) + i][0] == pytest.approx(lp, abs=0.05)


async def test_pause_abort_then_resume(engine: tuple[SGLangBackend, EngineInfo], tokenize: Tokenize) -> None:
    backend, _ = engine
    prompt = tokenize("heidi")
    long = asyncio.create_task(backend.generate(greedy(prompt, "long", max_tokens=3000)))
    await asyncio.sleep(0.3)
    await backend.pause("abort")
    (choice,) = (await asyncio.wait_for(long, 60)).choices
    assert choice.finish_reason == "abort" and len(choice.token_ids) < 3000
    assert len(choice.token_ids) == len(choice.logprobs)
    await backend.resume()
    (after,) = (await backend.generate(greedy(prompt, "after"))).choices
    assert after.finish_reason == "length"
    await backend.reset_prefix_cache()


@pytest.mark.skipif(not MEMORY_SAVER, reason="sleep/wake needs torch_memory_saver")
async def test_sleep_frees_memory_and_wake_takes_pushed_weights(
    engine: tuple[SGLangBackend, EngineInfo], tokenize: Tokenize, model_dir: str
) -> None:
    import torch
    from safetensors.torch import load_file

    backend, _ = engine
    prompt = tokenize("grace and heidi")
    (before,) = (await backend.generate(greedy(prompt, "before"))).choices
    free_awake = torch.cuda.mem_get_info()[0]
    await backend.sleep(1)
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > GIB, (free_awake, free_asleep)
    await backend.wake(None)
    assert torch.cuda.mem_get_info()[0] < free_asleep - GIB
    state = {name: t.to("cuda") for name, t in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    report = await backend.load_weights_from_tensor(state, version=1)
    assert report["weight_version"] == 1 and report["num_tensors"] == len(state) and report["bytes"] > 0
    (after,) = (await backend.generate(greedy(prompt, "after-wake"))).choices
    assert after.weight_versions == [1] * len(after.token_ids)
    assert after.token_ids[0] == before.token_ids[0]
    assert after.logprobs[0] == pytest.approx(before.logprobs[0], abs=1e-2)
