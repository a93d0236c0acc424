"""Managed sessions on real vLLM CPU engines: token-exact across turns.

Run: pytest tests/integration/test_vllm_sessions.py
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import ray

import inferpool as ip
from inferpool.sequences import MASK

pytestmark = pytest.mark.integration

WORDS = "alpha beta gamma delta tool search compute answer think plan code test".split()


async def three_turns(pool: ip.Pool, rng: random.Random) -> tuple[ip.SessionState, list[Any]]:
    outs = []
    async with pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=5))}]
        for turn in range(3):
            out = await s.chat(msgs, max_tokens=rng.randint(4, 16), seed=rng.randint(0, 10_000))
            outs.append(out)
            msgs = [
                *msgs,
                out.choices[0].message.model_dump(exclude_none=True),
                {"role": "user", "content": f"turn {turn}: " + " ".join(rng.choices(WORDS, k=3))},
            ]
        state = await s.state()
    return state, outs


async def test_fifty_three_turn_sessions_are_token_exact(vllm_pool: ip.Pool) -> None:
    rng = random.Random(0)
    results = await asyncio.gather(*(three_turns(vllm_pool, random.Random(rng.random())) for _ in range(50)))
    for state, outs in results:
        assert len(state.nodes) == 1
        node = state.nodes[0]
        last = outs[-1]
        # the node is exactly what the engine received on the last turn plus what it sampled
        assert node.tokens == last.prompt_token_ids + last.choices[0].token_ids
        # and every earlier turn is a prefix: prompt received + sampled, never re-encoded
        for out in outs[:-1]:
            seq = out.prompt_token_ids + out.choices[0].token_ids
            assert node.tokens[: len(seq)] == seq
            start = len(out.prompt_token_ids)
            assert node.masked_tokens[start : len(seq)] == out.choices[0].token_ids
            assert node.logprobs[start : len(seq)] == out.choices[0].token_logprobs
        assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
        assert node.masked_tokens[: len(outs[0].prompt_token_ids)] == [MASK] * len(outs[0].prompt_token_ids)


async def test_state_ref_fetched_in_another_task_equals_state(vllm_pool: ip.Pool) -> None:
    async with vllm_pool.session() as s:
        await s.chat([{"role": "user", "content": "remote fetch"}], n=2, max_tokens=8, seed=3)
        local = await s.state()
        ref = s.state_ref()

        @ray.remote(num_cpus=0)
        def fetch(refs: list[ray.ObjectRef]) -> list[tuple[list[int], list[float]]]:
            state = ray.get(refs[0])
            return [(n.tokens, n.logprobs) for n in state.nodes]

        remote = ray.get(fetch.remote([ref]), timeout=60)
    assert remote == [(n.tokens, n.logprobs) for n in local.nodes]


async def test_stateless_chat_on_vllm(vllm_pool: ip.Pool) -> None:
    out = await vllm_pool.chat([{"role": "user", "content": "hi"}], n=2, max_tokens=6, seed=1)
    assert len(out.choices) == 2
    assert all(c.token_ids and len(c.token_ids) == len(c.token_logprobs) for c in out.choices)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]


async def test_tool_turn_keeps_tokens_exact(vllm_pool: ip.Pool) -> None:
    async with vllm_pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "find the weather"}]
        first = await s.chat(msgs, tools=TOOLS, max_tokens=12, seed=5)
        reply = first.choices[0].message.model_dump(exclude_none=True)
        # the agent answers with a tool call of its own making and the tool's result
        reply["tool_calls"] = reply.get("tool_calls") or []
        msgs += [reply, {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21}'}]
        second = await s.chat(msgs, tools=TOOLS, max_tokens=12, seed=6)
        node = (await s.state()).nodes[0]
    seq1 = first.prompt_token_ids + first.choices[0].token_ids
    assert second.prompt_token_ids[: len(seq1)] == seq1
    assert node.tokens == second.prompt_token_ids + second.choices[0].token_ids
    suffix = node.masked_tokens[len(seq1) : len(second.prompt_token_ids)]
    assert suffix and all(m == MASK for m in suffix)  # tool result + template glue are masked
