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


async def branching_session(pool: ip.Pool, rng: random.Random) -> list[tuple[Any, str, list[int], bool]]:
    """Random turns with n in 1..3; each turn the client continues a random choice, sending it
    back as returned, without its node_id, or without its reasoning. Returns, per turn after
    the first, (response, how it was sent back, the continued choice's sequence, flagged)."""
    seen = []
    async with pool.session(track_tree=rng.random() < 0.5) as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=4))}]
        out = await s.chat(msgs, n=rng.randint(1, 3), max_tokens=rng.randint(3, 10), seed=rng.randint(0, 9999))
        for turn in range(rng.randint(1, 3)):
            pick = rng.randrange(len(out.choices))
            continued = out.prompt_token_ids + out.choices[pick].token_ids
            how = rng.choice(["as_returned", "no_node_id", "no_reasoning"])
            sent = out.choices[pick].message.model_dump(exclude_none=True)
            if how != "as_returned":
                sent.pop("node_id", None)
            if how == "no_reasoning":
                sent.pop("reasoning_content", None)
            msgs = [*msgs, sent, {"role": "user", "content": f"t{turn} " + " ".join(rng.choices(WORDS, k=2))}]
            out = await s.chat(msgs, n=rng.randint(1, 3), max_tokens=rng.randint(3, 10), seed=rng.randint(0, 9999))
            state = await s.state()
            node = next(n for n in state.nodes if n.node_id == out.choices[0].message.node_id)
            seen.append((out, how, continued, "ambiguous_parent" in node.metadata))
            # the node is what the engine reported it received plus what it sampled
            assert node.tokens == out.prompt_token_ids + out.choices[0].token_ids
    return seen


async def test_two_hundred_branching_sessions_extend_the_continued_choice(vllm_pool: ip.Pool) -> None:
    rng = random.Random(7)
    sessions = await asyncio.gather(*(branching_session(vllm_pool, random.Random(rng.random())) for _ in range(200)))
    turns = [t for seen in sessions for t in seen]
    assert len(turns) >= 200
    for out, how, continued, flagged in turns:
        exact = out.prompt_token_ids[: len(continued)] == continued
        if how == "as_returned":
            assert exact and not flagged  # the node_id names the sequence
        else:
            assert exact or flagged  # another sequence only by the documented rule, and marked


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
