"""Pause modes and session abort on real vLLM CPU engines, with requests in flight.

Run: pytest tests/integration/test_vllm_lifecycle.py
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from waiting import wait_in_flight

import inferpool as ip

pytestmark = pytest.mark.integration

LONG = ip.SamplingParams(max_tokens=1500, ignore_eos=True, temperature=1.0, seed=0)


def prompt(tokenizer: Any, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


async def test_pause_abort_ends_in_flight_requests(vllm_pool: ip.Pool, tokenizer: Any) -> None:
    task = asyncio.ensure_future(vllm_pool.generate(prompt(tokenizer, "abort me"), LONG))
    await wait_in_flight(vllm_pool, deadline_s=30, stat="queue_len")
    await vllm_pool.pause("abort")
    try:
        res = await asyncio.wait_for(task, 30)
        assert res.choices[0].finish_reason == "abort"
        assert len(res.choices[0].token_ids) < LONG.max_tokens
        held = asyncio.ensure_future(vllm_pool.generate(prompt(tokenizer, "later"), ip.SamplingParams(max_tokens=4)))
        done, _ = await asyncio.wait({held}, timeout=0.5)
        assert not done  # new requests wait while paused
    finally:
        await vllm_pool.resume()
    assert (await asyncio.wait_for(held, 30)).choices[0].finish_reason == "length"


async def test_pause_wait_drains_in_flight_requests(vllm_pool: ip.Pool, tokenizer: Any) -> None:
    sp = ip.SamplingParams(max_tokens=300, ignore_eos=True)
    task = asyncio.ensure_future(vllm_pool.generate(prompt(tokenizer, "drain me"), sp))
    await wait_in_flight(vllm_pool, deadline_s=30, stat="queue_len")
    try:
        await vllm_pool.pause("wait")
        # pause returned once the engines had finished it (the caller's task may need one more
        # turn of its event loop to see the reply, so the engines are asked, not the task)
        stats = await asyncio.gather(*(vllm_pool.engine_handle(e).stats.remote() for e in vllm_pool.engine_ids()))
        assert sum(s.in_flight + s.queue_len for s in stats) == 0
        res = await asyncio.wait_for(task, 30)  # while still paused: it needs no more engine work
    finally:
        await vllm_pool.resume()
    assert res.choices[0].finish_reason == "length" and len(res.choices[0].token_ids) == 300


async def test_pause_keep_freezes_and_resume_continues(vllm_pool: ip.Pool, tokenizer: Any) -> None:
    task = asyncio.ensure_future(vllm_pool.generate(prompt(tokenizer, "keep me"), LONG))
    await wait_in_flight(vllm_pool, deadline_s=30, stat="queue_len")
    await vllm_pool.pause("keep")
    try:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done  # frozen, not aborted
    finally:
        await vllm_pool.resume()
    res = await asyncio.wait_for(task, 120)
    assert res.choices[0].finish_reason == "length" and len(res.choices[0].token_ids) == LONG.max_tokens


async def test_session_abort_records_the_partial_turn(vllm_pool: ip.Pool) -> None:
    async with vllm_pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "a long story"}]
        turn = asyncio.ensure_future(s.chat(msgs, max_tokens=1500, ignore_eos=True))
        await wait_in_flight(vllm_pool, deadline_s=30, stat="queue_len")
        assert await s.abort() == 1
        out = await asyncio.wait_for(turn, 30)
        assert out.choices[0].finish_reason == "abort"
        sampled = out.choices[0].token_ids
        assert len(sampled) < 1500
        node = (await s.state()).nodes[0]
        assert node.tokens[len(node.tokens) - len(sampled) :] == sampled  # the partial turn is recorded
