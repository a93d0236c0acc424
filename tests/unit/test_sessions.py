"""Managed sessions on fake engines with the real tiny tokenizer.

Run: pytest tests/unit/test_sessions.py
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import ray

import inferpool as ip
from inferpool.sequences import MASK, PROMPT_LOGPROB


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def echo(choice: Any) -> dict[str, Any]:
    """The assistant message as an OpenAI client sends it back."""
    return choice.message.model_dump(exclude_none=True)


def check_node(node: ip.SequenceNode) -> None:
    n = len(node.tokens)
    assert len(node.masked_tokens) == len(node.logprobs) == len(node.weight_versions) == n
    for tok, masked, lp in zip(node.tokens, node.masked_tokens, node.logprobs, strict=True):
        if masked == MASK:
            assert lp == PROMPT_LOGPROB
        else:
            assert masked == tok and lp <= 0


async def test_single_turn_masks_and_logprobs(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        out = await s.chat([user("hello")], n=1, max_tokens=6, seed=1)
        state = await s.state()
    assert len(state.nodes) == 1
    node = state.nodes[0]
    check_node(node)
    choice = out.choices[0]
    assert node.tokens == out.prompt_token_ids + choice.token_ids
    assert node.masked_tokens == [MASK] * len(out.prompt_token_ids) + choice.token_ids
    assert node.logprobs[len(out.prompt_token_ids) :] == choice.token_logprobs
    assert isinstance(node.token_array, np.ndarray)


async def test_multi_turn_is_token_exact_and_earlier_completions_stay_trainable(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        msgs = [user("first")]
        first = await s.chat(msgs, max_tokens=8, seed=2)
        msgs += [echo(first.choices[0]), user("second")]
        second = await s.chat(msgs, max_tokens=8, seed=3)
        state = await s.state()
    assert len(state.nodes) == 1  # list mode: the extension replaced its parent
    node = state.nodes[0]
    check_node(node)
    # turn 2's prompt is exactly turn 1's tokens + the new suffix; nothing re-encoded
    t1 = first.prompt_token_ids + first.choices[0].token_ids
    assert second.prompt_token_ids[: len(t1)] == t1
    assert node.tokens == second.prompt_token_ids + second.choices[0].token_ids
    # turn-1 completion stays trainable, the new suffix is masked
    assert node.masked_tokens[len(first.prompt_token_ids) : len(t1)] == first.choices[0].token_ids
    assert all(m == MASK for m in node.masked_tokens[len(t1) : len(second.prompt_token_ids)])


async def test_seam_eos_is_not_doubled_and_length_gets_glue(session_pool: ip.Pool) -> None:
    renderer = session_pool.renderer()
    eos = renderer.eos_token_id
    async with session_pool.session() as s:
        for seed in range(40):  # find one turn that ended with EOS and one that hit the length
            out = await s.chat([user(f"seam {seed}")], max_tokens=6, seed=seed)
            c = out.choices[0]
            msgs = [user(f"seam {seed}"), echo(c), user("next")]
            rendered = await s.render(msgs)
            base = out.prompt_token_ids + c.token_ids
            assert rendered["prompt_token_ids"][: len(base)] == base
            glue = rendered["prompt_token_ids"][len(base) :]
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and glue[0] != eos
            else:
                assert glue[0] == eos  # the template's end-of-turn, masked
            await s.reset()


async def test_extension_picks_the_longest_prefix(session_pool: ip.Pool) -> None:
    async with session_pool.session(track_tree=True) as s:
        a = await s.chat([user("root")], max_tokens=5, seed=4)
        msgs2 = [user("root"), echo(a.choices[0]), user("deeper")]
        b = await s.chat(msgs2, max_tokens=5, seed=5)
        msgs3 = [*msgs2, echo(b.choices[0]), user("deepest")]
        rendered = await s.render(msgs3)
        state = await s.state()
    deepest = max(state.nodes, key=lambda n: len(n.tokens))
    assert rendered["extends"] == deepest.node_id
    assert rendered["prompt_token_ids"][: len(deepest.tokens)] == deepest.tokens


async def test_n_branching_list_and_tree_modes(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        out = await s.chat([user("branch")], n=3, max_tokens=4, seed=6)
        state = await s.state()
        assert len(state.nodes) == 3
        msgs = [user("branch"), echo(out.choices[1]), user("more")]
        await s.chat(msgs, max_tokens=4, seed=7)
        state = await s.state()
        assert len(state.nodes) == 3  # child replaced choice 1's node
    async with session_pool.session(track_tree=True) as t:
        out = await t.chat([user("tree")], n=2, max_tokens=4, seed=8)
        first = await t.state()
        msgs = [user("tree"), echo(out.choices[0]), user("more")]
        await t.chat(msgs, max_tokens=4, seed=9)
        state = await t.state()
        assert len(state.nodes) == 3
        child = state.nodes[-1]
        assert child.parent_id in {n.node_id for n in first.nodes}


async def test_completion_calls_extend_on_text_prefix(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        first = await s.complete("Once upon a time", max_tokens=5, seed=10)
        prompt2 = "Once upon a time" + first.choices[0].text + " and then"
        second = await s.complete(prompt2, max_tokens=5, seed=11)
        state = await s.state()
    t1 = first.prompt_token_ids + first.choices[0].token_ids
    assert second.prompt_token_ids[: len(t1)] == t1
    node = state.nodes[0]
    assert node.tokens == second.prompt_token_ids + second.choices[0].token_ids
    assert node.masked_tokens[len(first.prompt_token_ids) : len(t1)] == first.choices[0].token_ids


async def test_failed_turn_leaves_state_unchanged(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        await s.chat([user("keep me")], max_tokens=4, seed=12)
        before = await s.state()
        engines = session_pool.engine_ids()
        for eid in engines:
            ray.get(session_pool.engine_handle(eid).control.remote("inject_fault", {"fault": "raise", "count": 1}))
        try:
            with pytest.raises(ip.BackendError):
                await s.chat([user("keep me"), {"role": "assistant", "content": "x"}, user("boom")], max_tokens=4)
        finally:
            for eid in engines:
                ray.get(session_pool.engine_handle(eid).control.remote("inject_fault", {"fault": "none"}))
        after = await s.state()
    assert [n.tokens for n in after.nodes] == [n.tokens for n in before.nodes]
    assert after.turns == before.turns


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hello", "messages"),
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        (["not a dict"], "messages[0]"),
        ([{"role": "user"}], "messages[0].content"),
    ],
)
async def test_bad_messages_are_rejected_and_state_unchanged(session_pool: ip.Pool, messages: Any, field: str) -> None:
    async with session_pool.session() as s:
        with pytest.raises(ip.RequestError) as info:
            await s.chat(messages, max_tokens=2)
        assert info.value.field == field
        assert (await s.state()).nodes == []


async def test_prompt_beyond_context_is_a_clear_error(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        with pytest.raises(ip.RequestError, match="context"):
            await s.chat([user("word " * 600)], max_tokens=2)


async def test_unknown_and_expired_sessions(session_pool: ip.Pool) -> None:
    ghost = session_pool.session(session_id="ab" * 16, existing=True)  # the store does not know it
    with pytest.raises(ip.SessionNotFoundError):
        await ghost.state()
    s = session_pool.session()
    await s.chat([user("ttl")], max_tokens=2)
    store = session_pool.session_store(s.session_id)
    evicted = ray.get(store.expire_idle.remote(now=1e18), timeout=30)  # far past the idle TTL
    assert evicted >= 1
    with pytest.raises(ip.SessionExpiredError, match="idle"):
        await s.chat([user("ttl")], max_tokens=2)


async def test_concurrent_closes_travel_together_and_each_takes_effect(session_pool: ip.Pool) -> None:
    sessions = [session_pool.session() for _ in range(24)]
    await asyncio.gather(*(s.chat([user(f"close {i}")], max_tokens=2) for i, s in enumerate(sessions)))
    await asyncio.gather(*(s.close() for s in sessions), sessions[0].close())  # closing twice is fine
    for s in sessions:
        with pytest.raises(ip.SessionNotFoundError):
            await session_pool.session(session_id=s.session_id, existing=True).state()
    rows = await asyncio.gather(*(st.list_sessions.remote() for st in session_pool.session_stores()))
    open_ids = {row["session_id"] for shard in rows for row in shard}
    assert open_ids.isdisjoint(s.session_id for s in sessions)
    store = session_pool.session_store(sessions[0].session_id)
    assert await store.close_batch.remote([sessions[0].session_id, "never-made"]) == [False, False]


async def test_requests_to_one_session_are_serialized(session_pool: ip.Pool) -> None:
    async with session_pool.session(track_tree=True) as s:
        outs = await asyncio.gather(*(s.chat([user(f"c{i}")], max_tokens=3, seed=i) for i in range(6)))
        state = await s.state()
    assert state.turns == 6
    assert len(state.nodes) == 6
    assert {o.session_id for o in outs} == {s.session_id}


async def test_state_ref_from_another_task_equals_state(session_pool: ip.Pool) -> None:
    s = session_pool.session()
    await s.chat([user("ref")], n=2, max_tokens=4, seed=13)
    ref = s.state_ref()

    @ray.remote(num_cpus=0)
    def fetch(refs: list[ray.ObjectRef]) -> list[list[int]]:
        state = ray.get(refs[0])
        return [n.tokens for n in state.nodes]

    remote_tokens = ray.get(fetch.remote([ref]), timeout=60)
    assert remote_tokens == [n.tokens for n in (await s.state()).nodes]
    await s.close()


def test_session_from_sync_code_without_context_manager(session_pool: ip.Pool) -> None:
    s = session_pool.session()
    out = asyncio.run(s.chat([user("sync")], max_tokens=3, seed=14))
    state = ray.get(s.state_ref(), timeout=30)
    assert state.nodes[0].tokens == out.prompt_token_ids + out.choices[0].token_ids
    assert session_pool.stats()["sessions"]


async def test_openai_adapter_runs_agent_code(session_pool: ip.Pool) -> None:
    async with session_pool.session() as s:
        client = s.as_openai()
        r1 = await client.chat.completions.create(model="any", messages=[user("agent")], max_tokens=4)
        msgs = [user("agent"), echo(r1.choices[0]), user("step 2")]
        r2 = await client.chat.completions.create(model="any", messages=msgs, max_tokens=4)
        state = await s.state()
    assert len(state.nodes) == 1
    assert state.nodes[0].tokens == r2.prompt_token_ids + r2.choices[0].token_ids


async def test_stateless_chat_and_complete(session_pool: ip.Pool) -> None:
    out = await session_pool.chat([user("stateless")], n=2, max_tokens=4, seed=15)
    assert out.object == "chat.completion" and len(out.choices) == 2
    assert out.usage.completion_tokens == sum(len(c.token_ids) for c in out.choices)
    comp = await session_pool.complete("abc", n=1, max_tokens=3, seed=16)
    assert comp.object == "text_completion" and comp.choices[0].token_ids
