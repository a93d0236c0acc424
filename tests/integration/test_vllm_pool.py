"""The pool on two real vLLM CPU engines serving the tiny model.

Run: pytest tests/integration/test_vllm_pool.py
"""

from __future__ import annotations

import asyncio
import math

import pytest
import ray

import inferpool as ip

pytestmark = pytest.mark.integration


def prompt(tokenizer: object, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


async def test_generate_returns_requested_choices(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "Say something.")
    res = await vllm_pool.generate(ids, ip.SamplingParams(n=3, max_tokens=12, seed=1))
    assert res.prompt_token_ids == ids
    assert len(res.choices) == 3
    assert [c.index for c in res.choices] == [0, 1, 2]
    for c in res.choices:
        assert 1 <= len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        text = tokenizer.decode(c.token_ids)  # type: ignore[attr-defined]
        assert isinstance(text, str)
    assert res.engine_id in vllm_pool.engine_ids()


async def test_fixed_seed_is_reproducible(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "Count to three.")
    sp = ip.SamplingParams(n=2, max_tokens=16, seed=1234, temperature=1.0)
    a = await vllm_pool.generate(ids, sp)
    b = await vllm_pool.generate(ids, sp)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    for ca, cb in zip(a.choices, b.choices, strict=True):
        assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-4)


async def test_n_above_cap_is_split_across_sub_requests(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "Hello")
    res = await vllm_pool.generate(ids, ip.SamplingParams(n=10, max_tokens=4, seed=7))
    assert [c.index for c in res.choices] == list(range(10))
    assert len(res.engine_ids) == 2


async def test_two_engines_both_receive_load(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "Load")
    results = await asyncio.gather(*(vllm_pool.generate(ids, ip.SamplingParams(max_tokens=4)) for _ in range(16)))
    assert {r.engine_id for r in results} == set(vllm_pool.engine_ids())
    stats = vllm_pool.stats()["engines"]
    assert all(e["served"] > 0 for e in stats.values())


async def test_generate_batch(vllm_pool: ip.Pool, tokenizer: object) -> None:
    prompts = [prompt(tokenizer, f"Item {i}") for i in range(24)]
    results = await vllm_pool.generate_batch(prompts, ip.SamplingParams(max_tokens=6, seed=3))
    assert [r.prompt_token_ids for r in results] == prompts
    assert all(len(r.choices[0].token_ids) >= 1 for r in results)


async def test_stop_token_and_greedy(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "Greedy please")
    greedy = ip.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = await vllm_pool.generate(ids, greedy)
    stop_at = a.choices[0].token_ids[2]
    b = await vllm_pool.generate(ids, greedy.model_copy(update={"stop_token_ids": [stop_at]}))
    cut = a.choices[0].token_ids.index(stop_at) + 1
    assert b.choices[0].token_ids == a.choices[0].token_ids[:cut]
    assert b.choices[0].finish_reason == "stop"


async def test_out_of_vocab_and_too_long_prompts_are_rejected(vllm_pool: ip.Pool) -> None:
    info = vllm_pool.engine_infos()[0]
    with pytest.raises(ip.RequestError, match="vocabulary"):
        await vllm_pool.generate([1, info.vocab_size + 5])
    with pytest.raises(ip.RequestError, match="context"):
        await vllm_pool.generate([1] * info.max_model_len)


def test_connect_from_a_ray_task(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "From a task")

    @ray.remote(num_cpus=0)
    def worker(name: str, namespace: str, ids: list[int]) -> tuple[list[int], str]:
        pool = ip.Pool.connect(name, namespace=namespace)
        res = asyncio.run(pool.generate(ids, ip.SamplingParams(max_tokens=5, seed=2)))
        return res.choices[0].token_ids, res.engine_id

    tokens, engine = ray.get(worker.remote(vllm_pool.name, vllm_pool.namespace, ids), timeout=120)
    assert 1 <= len(tokens) <= 5
    assert engine in vllm_pool.engine_ids()


async def test_prompt_logprob_scoring(vllm_pool: ip.Pool, tokenizer: object) -> None:
    ids = prompt(tokenizer, "score me")
    out = await vllm_pool.get_logprobs(input_ids=ids, top_k=3)
    assert out["prompt_tokens"] == ids
    assert out["prompt_topk_token_ids"][0] == [] and out["prompt_topk_logprobs"][0] == []
    for tops, lps in zip(out["prompt_topk_token_ids"][1:], out["prompt_topk_logprobs"][1:], strict=True):
        assert len(tops) == len(lps) == 3
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    by_messages = await vllm_pool.get_logprobs(messages=[{"role": "user", "content": "score me"}], top_k=1)
    assert len(by_messages["prompt_topk_token_ids"]) == len(by_messages["prompt_tokens"])


async def test_a_seeded_storm_never_kills_a_cpu_engine(vllm_pool: ip.Pool) -> None:
    """Hundreds of concurrent seeded requests whose prompts together exceed one step's token
    budget: with chunked prefill some would be split across steps and vLLM's CPU generator
    rewind would kill the engine core. Every request is served, the engines stay healthy and
    the seeds still reproduce."""
    vocab = min(i.vocab_size for i in vllm_pool.engine_infos())

    def storm_prompt(i: int) -> list[int]:
        return [(i * 7 + k) % (vocab - 20) + 10 for k in range(300 + (i * 37) % 200)]

    async def one(i: int) -> list[int]:
        res = await vllm_pool.generate(storm_prompt(i), ip.SamplingParams(max_tokens=6, seed=i, temperature=1.0))
        return res.choices[0].token_ids

    first = await asyncio.gather(*(one(i) for i in range(300)))
    assert all(tokens for tokens in first)
    health = await vllm_pool.router.check_health.remote()
    assert all(health.values()), health
    again = await asyncio.gather(*(one(i) for i in range(0, 300, 10)))
    assert again == first[::10]
