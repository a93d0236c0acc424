"""The chat message index finds exactly what a field-by-field comparison of every recorded
conversation finds: the deepest recorded conversations the request's messages continue,
each with its count of loose (JSON-only) tool-argument matches — also where the walk takes
its shortcut (a message equal to the only recorded one that follows), and when a turn
takes up the exact walk over its unchanged history (those messages stand as recorded and
are not checked or copied again).

Run: pytest tests/unit/test_message_index.py
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool.chat import validate_messages
from inferpool.message_index import MessageIndex, coarse_key, fine_match


def _call(call_id: str | None, args: dict[str, int], indent: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {"name": "f", "arguments": json.dumps(args, indent=indent)}}
    if call_id is not None:
        out["id"] = call_id
    return out


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """Few distinct values, so recorded messages collide in their coarse key and differ only
    in what fine_match compares (node ids, reasoning, call ids, argument formatting)."""
    msg: dict[str, Any] = {"role": draw(st.sampled_from(["user", "assistant"])), "content": draw(st.sampled_from("ab"))}
    if msg["role"] == "assistant":
        node = draw(st.sampled_from([None, "n1", "n2"]))
        if node is not None:
            msg["node_id"] = node
        reasoning = draw(st.sampled_from([None, "r1", "r2"]))
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if draw(st.booleans()):
            msg["tool_calls"] = [
                _call(
                    draw(st.sampled_from([None, "c1", "c2"])),
                    {"x": draw(st.integers(0, 1))},
                    draw(st.sampled_from([None, 1])),
                )
            ]
    return msg


def _reference(
    paths: list[tuple[list[dict[str, Any]], int]], request: list[dict[str, Any]]
) -> tuple[list[tuple[int, int]], int]:
    """Every recorded conversation the request continues, compared message by message."""
    found: list[tuple[int, int, int]] = []  # (depth, item, loose)
    for path, item in paths:
        if len(path) > len(request):
            continue
        loose = 0
        for req, stored in zip(request, path, strict=False):
            extra = fine_match(req, stored) if coarse_key(req) == coarse_key(stored) else None
            if extra is None:
                break
            loose += extra
        else:
            found.append((len(path), item, loose))
    if not found:
        return [], 0
    depth = max(d for d, _, _ in found)
    return sorted((item, loose) for d, item, loose in found if d == depth), depth


@settings(max_examples=600, deadline=None)
@given(
    recorded=st.lists(st.lists(messages(), min_size=1, max_size=5), min_size=1, max_size=6),
    request=st.lists(messages(), min_size=1, max_size=6),
    echo=st.integers(0, 5),
    tweak=st.integers(0, 19),
)
def test_match_finds_what_comparing_every_recorded_conversation_finds(
    recorded: list[list[dict[str, Any]]], request: list[dict[str, Any]], echo: int, tweak: int
) -> None:
    index: MessageIndex[int] = MessageIndex()
    for item, path in enumerate(recorded):
        index.add(None, path, item)
    # mostly the request starts with a recorded conversation, as a client sends it back:
    # copies, or with a message's node id changed or dropped, or its arguments reformatted
    source = recorded[echo % len(recorded)]
    if echo % 3 != 2:
        echoed = [dict(m) for m in source]
        last = echoed[tweak % len(echoed)]
        if tweak % 4 == 1:
            last["node_id"] = "n2" if last.get("node_id") == "n1" else "n1"
        elif tweak % 4 == 2:
            last.pop("node_id", None)
        elif tweak % 4 == 3 and last.get("tool_calls"):
            args = json.loads(last["tool_calls"][0]["function"]["arguments"])
            last["tool_calls"] = [
                {**last["tool_calls"][0], "function": {"name": "f", "arguments": json.dumps(args, indent=2)}}
            ]
        request = echoed + request
    want = _reference(list(zip(recorded, range(len(recorded)), strict=True)), request)
    best, depth = index.match(request)
    assert (sorted(best), depth) == want
    # a turn's way: the unchanged history stands as recorded, the walk taken up where it stands
    walk = index.exact_walk(request)
    msgs = validate_messages(request, walk.messages)
    assert msgs == validate_messages(request)
    assert all(m is r for m, r in zip(msgs, walk.messages, strict=False))
    best, depth = index.match(msgs, walk)
    assert (sorted(best), depth) == want


def test_a_message_that_differs_only_loosely_takes_the_general_path() -> None:
    """A recorded reply followed by one recorded message: a request echoing the reply with
    reformatted arguments is not equal to it, and still matches, loosely."""
    reply = {"role": "assistant", "content": "", "tool_calls": [_call("c1", {"x": 1}, None)]}
    index: MessageIndex[str] = MessageIndex()
    index.add(None, [{"role": "user", "content": "q"}, reply], "turn")
    echoed = {**reply, "tool_calls": [_call("c1", {"x": 1}, 1)]}
    assert index.match([{"role": "user", "content": "q"}, echoed]) == ([("turn", 1)], 2)
    assert index.match([{"role": "user", "content": "q"}, dict(reply)]) == ([("turn", 0)], 2)


def test_an_equal_message_still_meets_every_recorded_one_it_matches() -> None:
    """Two replies recorded after one question, one with a node id: a request echoing the
    reply without it is equal to the first and matches both (no shortcut past the second)."""
    question = {"role": "user", "content": "q"}
    index: MessageIndex[str] = MessageIndex()
    index.add(None, [question, {"role": "assistant", "content": "a"}], "plain")
    index.add(None, [question, {"role": "assistant", "content": "a", "node_id": "n1"}], "named")
    assert sorted(index.match([question, {"role": "assistant", "content": "a"}])[0]) == [("named", 0), ("plain", 0)]
    assert index.match([question, {"role": "assistant", "content": "a", "node_id": "n1"}]) == ([("named", 0)], 2)
