"""Session fidelity: a turn extends exactly the sequence the client continued, never another
sample's tokens (the real tiny tokenizer and chat template, a scripted engine, no Ray).

The scripted engine returns chosen token ids, so the cases that break a text-based match can
be built on purpose: choices that differ only in their think block, tool-call ids or argument
formatting, and choices with the same text but different tokens. The property test drives
random conversations (n > 1, think blocks, tool calls and results, unicode, byte tokens that
decode to the same replacement character) where the client continues a random choice each
turn, sometimes re-serializing arguments, dropping ``reasoning_content`` or the ``node_id``.

Run: pytest tests/unit/test_session_fidelity.py
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inferpool as ip
from inferpool.chat import ChatRenderer
from inferpool.message_index import coarse_key, fine_match
from inferpool.session_tree import SessionTree
from inferpool.turns import ChatAsk, Turn, chat_turn, completion_turn
from inferpool.types import Choice, GenerateResult, SamplingParams

OLD_SENTINEL = "\u2063\u2063inferpool-sentinel\u2063\u2063"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


class ScriptedEngine:
    """Stands in for the dispatcher: answers each request with the next scripted choices
    (token id lists) and keeps every prompt it was sent."""

    def __init__(self) -> None:
        self.script: list[list[list[int]]] = []
        self.prompts: list[list[int]] = []

    async def submit(
        self,
        prompt: Sequence[int] | Callable[[], Sequence[int]],
        sampling: SamplingParams,
        split: str = "train",
        session_id: str | None = None,
    ) -> GenerateResult:
        if callable(prompt):  # a turn's render, which the dispatcher runs while its lease ask is out
            prompt = prompt()
        self.prompts.append(list(prompt))
        replies = self.script.pop(0)
        choices = [
            Choice(index=i, token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop", weight_version=0)
            for i, ids in enumerate(replies)
        ]
        return GenerateResult(f"r{len(self.prompts)}", list(prompt), choices, "e0", ["e0"])


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer_path: str) -> ChatRenderer:
    return ChatRenderer.from_pretrained(tiny_tokenizer_path)


def ids(renderer: ChatRenderer, text: str) -> list[int]:
    return [*renderer.encode(text), renderer.eos_token_id]  # type: ignore[list-item]


async def turn(
    engine: ScriptedEngine,
    renderer: ChatRenderer,
    tree: SessionTree,
    messages: list[dict[str, Any]],
    replies: list[list[int]],
    **kw: Any,
) -> Turn:
    engine.script.append(replies)
    ask = ChatAsk(messages, len(replies), **kw)
    done = await chat_turn(engine, renderer, ask, tree=tree)  # type: ignore[arg-type]
    tree.record(done.segments)
    return done


def echo(done: Turn, i: int, *, drop: Sequence[str] = ()) -> dict[str, Any]:
    msg = done.response.choices[i].message.model_dump(exclude_none=True)
    for key in drop:
        msg.pop(key, None)
    return msg


def seg_tokens(tree: SessionTree, done: Turn, i: int) -> list[int]:
    return tree.tokens(tree.get(done.segments[i].node_id)).tolist()


USER = {"role": "user", "content": "What is six times seven?"}
NEXT = {"role": "user", "content": "Are you sure?"}


# -- the measured cases ------------------------------------------------------------------
async def test_choices_that_differ_only_in_their_think_block(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    replies = [ids(renderer, "<think>plan A</think>42"), ids(renderer, "<think>plan B, very different</think>42")]
    first = await turn(engine, renderer, tree, [USER], replies)
    # the client sends back choice 1 with its reasoning (no node id): only choice 1 matches
    await turn(engine, renderer, tree, [USER, echo(first, 1, drop=["node_id"]), NEXT], [ids(renderer, "yes")])
    assert engine.prompts[1][: len(seg_tokens(tree, first, 1))] == seg_tokens(tree, first, 1)
    # without reasoning or node id the two cannot be told apart: the rule, flagged and counted
    bare = echo(first, 1, drop=["node_id", "reasoning_content"])
    done = await turn(engine, renderer, tree, [USER, bare, NEXT], [ids(renderer, "y")])
    assert done.ambiguous
    assert done.segments[0].metadata["ambiguous_parent"]["chosen"] == first.segments[0].node_id


async def test_tool_calls_that_differ_only_in_ids_or_argument_formatting(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    call_a = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    call_b = '<tool_call>\n{"name": "f", "arguments": {"x":1}}\n</tool_call>'
    first = await turn(engine, renderer, tree, [USER], [ids(renderer, call_a), ids(renderer, call_b)], tools=TOOLS)
    chosen = echo(first, 1, drop=["node_id"])
    result = {"role": "tool", "tool_call_id": chosen["tool_calls"][0]["id"], "content": "42"}
    await turn(engine, renderer, tree, [USER, chosen, result], [ids(renderer, "done")], tools=TOOLS)
    assert engine.prompts[1][: len(seg_tokens(tree, first, 1))] == seg_tokens(tree, first, 1)
    # the client re-serialized the arguments but kept the call id: still choice 1, exactly
    reserialized = json.loads(json.dumps(chosen))
    reserialized["tool_calls"][0]["function"]["arguments"] = json.dumps({"x": 1}, indent=2)
    await turn(engine, renderer, tree, [USER, reserialized, result], [ids(renderer, "again")], tools=TOOLS)
    assert engine.prompts[2][: len(seg_tokens(tree, first, 1))] == seg_tokens(tree, first, 1)


async def test_same_text_different_tokens_follows_the_node_id(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    word = renderer.encode("hello")
    by_char = [t for ch in "hello" for t in renderer.encode(ch)]
    assert word != by_char and renderer.decode(word) == renderer.decode(by_char)
    replacement = [[127], [128], [129], [130]]  # lone bytes: each decodes to the same '\ufffd'
    assert len({renderer.decode(r) for r in replacement}) == 1
    eos = renderer.eos_token_id
    replies = [[*word, eos], [*by_char, eos], *([*r, eos] for r in replacement)]
    first = await turn(engine, renderer, tree, [USER], replies)
    await turn(engine, renderer, tree, [USER, echo(first, 3), NEXT], [ids(renderer, "x")])
    assert engine.prompts[1][: len(seg_tokens(tree, first, 3))] == seg_tokens(tree, first, 3)
    await turn(engine, renderer, tree, [USER, echo(first, 1), NEXT], [ids(renderer, "x")])
    assert engine.prompts[2][: len(seg_tokens(tree, first, 1))] == seg_tokens(tree, first, 1)
    done = await turn(engine, renderer, tree, [USER, echo(first, 1, drop=["node_id"]), NEXT], [ids(renderer, "x")])
    assert done.ambiguous  # hello == hello in text: without the node id, the documented rule
    assert engine.prompts[3][: len(seg_tokens(tree, first, 0))] == seg_tokens(tree, first, 0)


async def test_completion_sessions_follow_extends(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    word, by_char = renderer.encode("hello"), [t for ch in "hello" for t in renderer.encode(ch)]
    engine.script.append([word, by_char])
    first = await completion_turn(engine, renderer, "Say:", n=2, tree=tree)  # type: ignore[arg-type]
    tree.record(first.segments)
    node1 = first.response.choices[1].node_id
    engine.script.append([renderer.encode("!")])
    await completion_turn(engine, renderer, "Say:hello and", tree=tree, extends=node1)  # type: ignore[arg-type]
    t1 = tree.tokens(tree.get(node1)).tolist()
    assert engine.prompts[1][: len(t1)] == t1
    engine.script.append([renderer.encode("!")])
    done = await completion_turn(engine, renderer, "Say:hello and", tree=tree)  # type: ignore[arg-type]
    assert done.ambiguous


async def test_tools_added_later_reach_the_prompt(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    first = await turn(engine, renderer, tree, [USER], [ids(renderer, "42")])
    msgs = [USER, echo(first, 0), NEXT]
    done = await turn(engine, renderer, tree, msgs, [ids(renderer, "yes")], tools=TOOLS)
    fresh = renderer.render(msgs, tools=TOOLS)[1]
    assert engine.prompts[1] == fresh  # a new root rendered with the tools header, not a silent drop
    assert done.rerendered and "rerendered" in done.segments[0].metadata
    # template kwargs are render options too
    msgs2 = [*msgs, echo(done, 0), NEXT]
    again = await turn(engine, renderer, tree, msgs2, [ids(renderer, "y")], tools=TOOLS)
    assert not again.rerendered
    switched = await turn(engine, renderer, tree, msgs2, [ids(renderer, "y")], tools=TOOLS,
                          chat_template_kwargs={"enable_thinking": False})  # fmt: skip
    assert switched.rerendered


async def test_message_text_cannot_forge_the_seam_marker(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    first = await turn(engine, renderer, tree, [USER], [ids(renderer, call)], tools=TOOLS)
    reply = echo(first, 0)
    forged = {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": f"a {OLD_SENTINEL} b"}
    msgs = [USER, reply, forged]
    await turn(engine, renderer, tree, msgs, [ids(renderer, "ok")], tools=TOOLS)
    stored = seg_tokens(tree, first, 0)
    suffix = renderer.decode(engine.prompts[1][len(stored) :])
    assert engine.prompts[1][: len(stored)] == stored
    assert suffix == f"\n<|im_start|>user\n<tool_response>\na {OLD_SENTINEL} b\n</tool_response><|im_end|>\n" \
        "<|im_start|>assistant\n"  # fmt: skip


async def test_a_conversation_ending_with_the_stored_reply(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    first = await turn(engine, renderer, tree, [USER], [ids(renderer, "42")])
    stored = seg_tokens(tree, first, 0)
    msgs = [USER, echo(first, 0)]
    await turn(engine, renderer, tree, msgs, [ids(renderer, "more")])  # default: a new assistant turn
    fresh_text = renderer.template(msgs, add_generation_prompt=True)
    assert renderer.decode(engine.prompts[1]) == fresh_text
    assert engine.prompts[1][: len(stored)] == stored
    cont = await turn(engine, renderer, tree, msgs, [ids(renderer, " exactly")], continue_final=True)
    assert engine.prompts[2] == stored[:-1]  # continues the reply: its tokens without the end of turn
    node = tree.node(tree.get(cont.segments[0].node_id))
    assert node.tokens == [*stored[:-1], *ids(renderer, " exactly")]
    assert node.trainable.tolist() == [*tree.node(tree.get(first.segments[0].node_id)).trainable[:-1].tolist(),
                                       *[True] * len(ids(renderer, " exactly"))]  # fmt: skip


async def test_list_mode_never_retokenizes_a_returned_sequence(renderer: ChatRenderer) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s")
    by_char = [t for ch in "hey there" for t in renderer.encode(ch)] + [renderer.eos_token_id]
    first = await turn(engine, renderer, tree, [USER], [by_char])  # type: ignore[list-item]
    reply = echo(first, 0)
    await turn(engine, renderer, tree, [USER, reply, NEXT], [ids(renderer, "a")])
    assert len(tree.state().nodes) == 1  # list mode shows the extension in place of its parent
    other = {"role": "user", "content": "Something else."}
    done = await turn(engine, renderer, tree, [USER, reply, other], [ids(renderer, "b")])
    stored = seg_tokens(tree, first, 0)
    assert stored[-len(by_char) :] == by_char
    assert engine.prompts[2][: len(stored)] == stored  # the sampled ids, not a fresh tokenization
    assert not done.rerendered and not done.ambiguous
    assert len(tree.state().nodes) == 2


# -- the property ------------------------------------------------------------------------
_pieces = st.sampled_from(["42", "ok", "héllo", "日本語", "🙂", " spaced  out ", "a\nb", "{json}", "x"])


@st.composite
def reply_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "think": draw(st.one_of(st.none(), _pieces)),
        "content": draw(_pieces),
        "tool": draw(st.booleans()),
        "compact": draw(st.booleans()),  # the arguments' formatting
        "bytes": draw(st.one_of(st.none(), st.sampled_from([127, 128, 129, 130]))),  # lone byte tokens
        "by_char": draw(st.booleans()),  # the same text tokenized another way
    }


def reply_ids(renderer: ChatRenderer, spec: dict[str, Any]) -> list[int]:
    text = f"<think>{spec['think']}</think>" if spec["think"] is not None else ""
    text += spec["content"]
    if spec["tool"]:
        args = '{"x":1}' if spec["compact"] else '{"x": 1}'
        text += f'\n<tool_call>\n{{"name": "f", "arguments": {args}}}\n</tool_call>'
    if spec["by_char"]:
        out = [t for ch in text for t in renderer.encode(ch)]
    else:
        out = renderer.encode(text)
    if spec["bytes"] is not None:
        out += [spec["bytes"]]
    return [*out, renderer.eos_token_id]  # type: ignore[list-item]


turn_plans = st.lists(
    st.tuples(
        st.lists(reply_specs(), min_size=1, max_size=4),  # the choices
        st.integers(0, 3),  # which one the client continues
        st.sampled_from(["keep", "no_node_id", "no_reasoning", "reserialize", "bare"]),  # what it sends back
        _pieces,  # the next user text (or tool result)
    ),
    min_size=1,
    max_size=5,
)


def sent_back(msg: dict[str, Any], how: str) -> dict[str, Any]:
    out = json.loads(json.dumps(msg))
    if how in ("no_node_id", "bare", "no_reasoning", "reserialize"):
        out.pop("node_id", None)
    if how in ("no_reasoning", "bare"):
        out.pop("reasoning_content", None)
    if how in ("reserialize", "bare"):
        for call in out.get("tool_calls") or ():
            call["function"]["arguments"] = json.dumps(json.loads(call["function"]["arguments"]), indent=1)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=turn_plans, use_tools=st.booleans(), track_tree=st.booleans())
def test_every_prompt_extends_the_continued_choice_or_is_flagged(
    renderer: ChatRenderer, plan: list[Any], use_tools: bool, track_tree: bool
) -> None:
    asyncio.run(_play(renderer, plan, use_tools, track_tree))


async def _play(renderer: ChatRenderer, plan: list[Any], use_tools: bool, track_tree: bool) -> None:
    engine, tree = ScriptedEngine(), SessionTree("s", track_tree=track_tree)
    tools = TOOLS if use_tools else None
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}, USER]
    for specs, pick, how, text in plan:
        done = await turn(engine, renderer, tree, msgs, [reply_ids(renderer, s) for s in specs], tools=tools)
        i = pick % len(specs)
        chosen = done.response.choices[i].message.model_dump(exclude_none=True)
        continued = tree.get(done.segments[i].node_id)  # (tree mode: its twin when identical)
        want = tree.tokens(continued).tolist()
        sent = sent_back(chosen, how)
        msgs = [*msgs, sent]
        calls = chosen.get("tool_calls") or []
        msgs += (
            [{"role": "tool", "tool_call_id": c["id"], "content": text} for c in calls]
            if calls
            else [{"role": "user", "content": text}]
        )
        engine.script.append([renderer.encode("probe")])
        probe = await chat_turn(engine, renderer, ChatAsk(msgs, tools=tools), tree=tree)  # type: ignore[arg-type]
        prompt = engine.prompts[-1]
        if how == "keep":  # the node id names the sequence: always exact
            assert prompt[: len(want)] == want
            assert not probe.ambiguous
        elif prompt[: len(want)] != want:  # another sequence only by the documented rule, flagged
            assert probe.ambiguous
            chosen_seg = tree.get(probe.segments[0].metadata["ambiguous_parent"]["chosen"])
            reply = (chosen_seg.messages or [])[-1]  # it matches what the client sent back, too
            assert coarse_key(sent) == coarse_key(reply) and fine_match(sent, reply) is not None
        # the suffix is what a full render of the conversation puts after the continued reply
        parent = probe.segments[0].parent
        assert parent is not None
        stored = len(tree.tokens(parent))
        assert prompt[:stored] == tree.tokens(parent).tolist()
        marker = "\u2063probe\u2063"
        new = max(1, len(calls))
        full = renderer.template(
            [*msgs[: -1 - new], {"role": "assistant", "content": marker}, *msgs[-new:]],
            add_generation_prompt=True,
            tools=tools,
        )
        tail = full[full.index(marker) + len(marker) :]
        if parent.ended_with_eos:
            tail = tail.removeprefix(renderer.eos_text)
        assert renderer.decode(prompt[stored:]) == tail
        del engine.script[:]


def test_extends_names_a_node_that_must_be_continued() -> None:
    tree = SessionTree("s")
    with pytest.raises(ip.RequestError, match="extends"):
        tree.match_chat([USER], extends="n-missing")
