"""Weight updates on real vLLM CPU engines: through the object store, and broadcast from this
process over Gloo through vLLM's own weight-transfer protocol (the path NCCL/IPC take on GPUs).

Run: pytest tests/integration/test_vllm_weights.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import inferpool as ip

pytestmark = pytest.mark.integration


def hf_logprobs(model_dir: str, ids: list[int], start: int) -> list[float]:
    """Logprob of ids[i] given ids[:i], for i >= start, from a transformers forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(start, len(ids))]


def state_dict(model_dir: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    from inferpool.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model_b") / "b", seed=1)


async def test_update_weights_switches_logprobs_and_versions(
    vllm_pool: ip.Pool, tiny_model_path: str, model_b: str, tokenizer: Any
) -> None:
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "weights"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    greedy = ip.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    try:
        before = await vllm_pool.generate(prompt, greedy)
        a = before.choices[0]
        assert a.logprobs == pytest.approx(hf_logprobs(tiny_model_path, prompt + a.token_ids, len(prompt)), abs=1e-3)

        # small chunks: every engine loads the state dict piece by piece
        out = await vllm_pool.update_weights(
            state_dict(model_b), version="B", chunk_bytes=512 << 10, method="object_store"
        )
        assert out["chunks"] > 1 and out["bytes"] > 0
        after = await vllm_pool.generate(prompt, greedy)
        b = after.choices[0]
        want = hf_logprobs(model_b, prompt + b.token_ids, len(prompt))
        assert b.logprobs == pytest.approx(want, abs=1e-3)
        assert b.weight_versions == ["B"] * len(b.token_ids)
        assert b.logprobs != pytest.approx(a.logprobs, abs=1e-3)
        stats = vllm_pool.stats()["engines"]
        assert all(e["weight_version"] == "B" and e["last_update_bytes"] > 0 for e in stats.values())
    finally:
        await vllm_pool.update_weights(state_dict(tiny_model_path), version="A")


async def test_gloo_broadcast_switches_logprobs_and_versions(
    vllm_pool: ip.Pool, tiny_model_path: str, model_b: str, tokenizer: Any
) -> None:
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "broadcast"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    greedy = ip.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    try:
        sent = state_dict(model_b)
        out = await vllm_pool.update_weights(sent, version="gloo-B")
        assert out["method"] == "gloo"
        assert out["bytes"] == sum(t.nbytes for t in sent.values())
        assert {e["tensors"] for e in out["engines"].values()} == {len(sent)}
        for _ in range(2):  # both engines serve B (least-loaded spreads consecutive requests)
            b = (await vllm_pool.generate(prompt, greedy)).choices[0]
            assert b.logprobs == pytest.approx(hf_logprobs(model_b, prompt + b.token_ids, len(prompt)), abs=1e-3)
            assert b.weight_versions == ["gloo-B"] * len(b.token_ids)
        await vllm_pool.update_weights(state_dict(tiny_model_path), version="gloo-A")  # the group is reused
        a = (await vllm_pool.generate(prompt, greedy)).choices[0]
        assert a.logprobs == pytest.approx(hf_logprobs(tiny_model_path, prompt + a.token_ids, len(prompt)), abs=1e-3)
        assert a.weight_versions == ["gloo-A"] * len(a.token_ids)
    finally:
        await vllm_pool.update_weights(state_dict(tiny_model_path), version="A", method="object_store")


async def test_session_spanning_an_update_records_both_versions(
    vllm_pool: ip.Pool, tiny_model_path: str, model_b: str
) -> None:
    try:
        await vllm_pool.update_weights(state_dict(tiny_model_path), version="v-old")
        async with vllm_pool.session() as s:
            msgs: list[dict[str, Any]] = [{"role": "user", "content": "span"}]
            first = await s.chat(msgs, max_tokens=6, seed=1)
            msgs += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
            await vllm_pool.update_weights(state_dict(model_b), version="v-new")
            second = await s.chat(msgs, max_tokens=6, seed=2)
            node = (await s.state()).nodes[0]
        start1 = len(first.prompt_token_ids)
        end1 = start1 + len(first.choices[0].token_ids)
        start2 = len(second.prompt_token_ids)
        assert node.weight_versions[start1:end1] == ["v-old"] * (end1 - start1)
        assert node.weight_versions[start2:] == ["v-new"] * (len(node.tokens) - start2)
        assert all(v is None for v in node.weight_versions[end1:start2])  # masked glue + user turn
    finally:
        await vllm_pool.update_weights(state_dict(tiny_model_path), version="A")
