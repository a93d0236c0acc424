"""Think-block splitting, Hermes tool-call parsing, raw-text memory and tool_choice."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from inferpool.errors import ConfigError, RequestError
from inferpool.reasoning import (
    HermesToolParser,
    ParsedToolCalls,
    ToolCallRecorder,
    ToolParser,
    apply_tool_choice,
    get_tool_parser,
    list_tool_parsers,
    make_tool_call,
    reconstruct_raw_text,
    register_tool_parser,
    split_reasoning,
)

ID_RE = re.compile(r"^call_[0-9a-f]{24}$")


def call(name: str, args: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def names_and_args(parsed: ParsedToolCalls) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


@pytest.fixture
def parser() -> ToolParser:
    return get_tool_parser("hermes")


# ---- split_reasoning -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        pytest.param("Just an answer.", None, "Just an answer.", id="no-tags"),
        pytest.param("<think>\nhmm\n</think>\n\nAnswer", "hmm", "Answer", id="standard"),
        pytest.param("  \n<think>x</think>y", "x", "y", id="leading-whitespace"),
        pytest.param("<think>\nstill thinking when", "still thinking when", "", id="unclosed"),
        pytest.param("planned it\n</think>\n\nDone.", "planned it", "Done.", id="start-in-prompt"),
        pytest.param("<think>\n\n</think>\n\nHi", None, "Hi", id="empty-think"),
        pytest.param("<think>a\n  b\n</think>\nc\n", "a\n  b", "c\n", id="inner-whitespace-kept"),
        pytest.param("Hi <think>x</think> there", None, "Hi <think>x</think> there", id="mid-text"),
        pytest.param("<think>a</think>b</think>c", "a", "b</think>c", id="first-end-tag"),
        pytest.param("", None, "", id="empty"),
    ],
)
def test_split_reasoning(text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text) == (reasoning, content)


def test_split_reasoning_custom_tags() -> None:
    assert split_reasoning("[R]why[/R]ok", "[R]", "[/R]") == ("why", "ok")
    with pytest.raises(ConfigError):
        split_reasoning("x", "", "</think>")


# ---- Hermes parsing --------------------------------------------------------------------


def test_registry() -> None:
    assert "hermes" in list_tool_parsers()
    assert isinstance(get_tool_parser("HERMES"), HermesToolParser)
    with pytest.raises(ConfigError) as info:
        get_tool_parser("nope")
    assert "nope" in str(info.value) and info.value.field == "tool_parser"


def test_register_custom_parser() -> None:
    class Upper:
        def parse(self, text: str) -> ParsedToolCalls:
            return ParsedToolCalls(content=text.upper(), raw_text=text)

    register_tool_parser("upper-test", Upper)
    register_tool_parser("upper-test", Upper)  # same class again: no-op
    assert get_tool_parser("upper-test").parse("a").content == "A"
    with pytest.raises(ConfigError):
        register_tool_parser("upper-test", HermesToolParser)
    register_tool_parser("upper-test", HermesToolParser, replace=True)
    assert isinstance(get_tool_parser("upper-test"), HermesToolParser)


def test_no_tool_call(parser: ToolParser) -> None:
    parsed = parser.parse("Hello there.")
    assert parsed == ParsedToolCalls(content="Hello there.", tool_calls=[], raw_text="Hello there.")


def test_single_call_shape(parser: ToolParser) -> None:
    text = call("get_weather", {"city": "Paris"})
    parsed = parser.parse(text)
    assert parsed.content is None
    assert parsed.raw_text == text
    [tc] = parsed.tool_calls
    assert ID_RE.match(tc["id"])
    assert tc["type"] == "function"
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_content_before_call(parser: ToolParser) -> None:
    parsed = parser.parse("Let me check.\n" + call("f", {"a": 1}))
    assert parsed.content == "Let me check."
    assert names_and_args(parsed) == [("f", {"a": 1})]


def test_think_block_before_call(parser: ToolParser) -> None:
    text = "<think>\nI could write <tool_call> here.\n</think>\n\nSure.\n" + call("f", {})
    parsed = parser.parse(text)
    assert parsed.reasoning_content == "I could write <tool_call> here."
    assert parsed.content == "Sure."
    assert "think" not in (parsed.content or "")
    assert names_and_args(parsed) == [("f", {})]
    assert parsed.raw_text == text


def test_think_left_to_caller() -> None:
    parser = get_tool_parser("hermes", split_think=False)
    reasoning, content = split_reasoning("<think>r</think>\n" + call("f", {}))
    parsed = parser.parse(content)
    assert reasoning == "r"
    assert parsed.content is None and names_and_args(parsed) == [("f", {})]


def test_several_calls(parser: ToolParser) -> None:
    text = "\n".join([call("a", {"x": 1}), call("b", {"y": [1, 2]}), call("a", {"x": 2})])
    parsed = parser.parse(text)
    assert names_and_args(parsed) == [("a", {"x": 1}), ("b", {"y": [1, 2]}), ("a", {"x": 2})]
    assert len({c["id"] for c in parsed.tool_calls}) == 3
    assert parsed.content is None


def test_nested_arguments(parser: ToolParser) -> None:
    args = {"filter": {"and": [{"field": "a", "op": "=", "value": {"deep": [1, {"x": None}]}}]}}
    parsed = parser.parse(call("search", args))
    assert names_and_args(parsed) == [("search", args)]


def test_empty_arguments(parser: ToolParser) -> None:
    parsed = parser.parse(call("ping", {}))
    assert parsed.tool_calls[0]["function"]["arguments"] == "{}"


def test_missing_arguments_is_empty(parser: ToolParser) -> None:
    parsed = parser.parse('<tool_call>\n{"name": "ping"}\n</tool_call>')
    assert names_and_args(parsed) == [("ping", {})]


def test_arguments_as_json_string(parser: ToolParser) -> None:
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": {\\"b\\": 2}}"}\n</tool_call>'
    parsed = parser.parse(text)
    assert names_and_args(parsed) == [("f", {"a": {"b": 2}})]


def test_arguments_string_with_close_tag(parser: ToolParser) -> None:
    parsed = parser.parse(call("echo", {"text": "a </tool_call> b"}))
    assert names_and_args(parsed) == [("echo", {"text": "a </tool_call> b"})]


def test_non_ascii_arguments_kept(parser: ToolParser) -> None:
    parsed = parser.parse('<tool_call>\n{"name": "f", "arguments": {"q": "café"}}\n</tool_call>')
    assert parsed.tool_calls[0]["function"]["arguments"] == '{"q": "café"}'


OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Hi\n" + OPEN + '{"name": "f", "arguments": {"a": }' + CLOSE, id="bad-json"),
        pytest.param(call("ok", {}) + "\n" + OPEN + '{"name": oops}' + CLOSE, id="second-bad"),
        pytest.param(OPEN + '{"arguments": {}}' + CLOSE, id="no-name"),
        pytest.param(OPEN + '{"name": "f", "arguments": [1]}' + CLOSE, id="args-list"),
        pytest.param(OPEN + '{"name": "f", "arguments": "nope"}' + CLOSE, id="args-str"),
        pytest.param(OPEN + '{"name": "f"} extra' + CLOSE, id="trailing-junk"),
        pytest.param(OPEN + '"just a string"' + CLOSE, id="not-object"),
        pytest.param(OPEN + '{"name": "f", "arguments": {"a": 1', id="unclosed-incomplete"),
        pytest.param("<tool_call>", id="bare-open"),
        pytest.param('{"name": "f"}' + CLOSE, id="stray-close"),
    ],
)
def test_malformed_falls_back_to_plain_content(parser: ToolParser, text: str) -> None:
    parsed = parser.parse(text)
    assert parsed.tool_calls == []
    assert parsed.content == text
    assert parsed.raw_text == text


def test_malformed_after_think_keeps_reasoning_out(parser: ToolParser) -> None:
    parsed = parser.parse('<think>r</think>\nx <tool_call>{"name": </tool_call>')
    assert parsed.reasoning_content == "r"
    assert parsed.content == 'x <tool_call>{"name": </tool_call>'
    assert parsed.tool_calls == []


def test_unclosed_final_call_with_complete_json(parser: ToolParser) -> None:
    text = "Calling.\n" + call("a", {}) + '\n<tool_call>\n{"name": "b", "arguments": {"k": "v"}}\n'
    parsed = parser.parse(text)
    assert parsed.content == "Calling."
    assert names_and_args(parsed) == [("a", {}), ("b", {"k": "v"})]


def test_text_after_calls_joins_content(parser: ToolParser) -> None:
    parsed = parser.parse("Before.\n" + call("a", {}) + "\nAfter.")
    assert parsed.content == "Before.\nAfter."


def test_list_of_calls_in_one_block(parser: ToolParser) -> None:
    body = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"z": 0}}])
    parsed = parser.parse(f"<tool_call>\n{body}\n</tool_call>")
    assert names_and_args(parsed) == [("a", {}), ("b", {"z": 0})]


# ---- raw text: reconstruct and record --------------------------------------------------


def test_reconstruct_format() -> None:
    calls = [make_tool_call("f", {"a": 1}), make_tool_call("g", '{"b": [1, 2]}')]
    assert reconstruct_raw_text("Hi there.", calls) == (
        'Hi there.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"b": [1, 2]}}\n</tool_call>'
    )
    assert reconstruct_raw_text(None, calls[:1]) == ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')


@pytest.mark.parametrize(
    ("content", "calls"),
    [
        (None, [("f", {})]),
        ("Let me look.", [("search", {"q": "x", "opts": {"n": 3, "tags": ["a", "é"]}})]),
        ("Two lines\nof text.", [("a", {"x": 1.5}), ("b", {}), ("a", {"s": "</tool_call>"})]),
    ],
)
def test_round_trip(parser: ToolParser, content: str | None, calls: list[tuple[str, Any]]) -> None:
    tool_calls = [make_tool_call(name, args) for name, args in calls]
    raw = reconstruct_raw_text(content, tool_calls)
    parsed = parser.parse(raw)
    assert parsed.content == content
    assert names_and_args(parsed) == calls
    assert reconstruct_raw_text(parsed.content, parsed.tool_calls) == raw


def test_reconstruct_rejects_bad_arguments() -> None:
    bad = [{"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{"}}]
    with pytest.raises(RequestError) as info:
        reconstruct_raw_text(None, bad)
    assert info.value.field == "tool_calls[0].function.arguments"


def test_recorder_returns_exact_raw_text(parser: ToolParser) -> None:
    # Odd spacing and a think block: reconstruction could not reproduce this exactly.
    raw = '<think>\nplan\n</think>\n\nOk  \n<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>'
    parsed = parser.parse(raw)
    recorder = ToolCallRecorder()
    recorder.record_parsed(parsed)
    [tc] = parsed.tool_calls
    assert recorder.raw_text_for(tc["id"]) == raw
    assert recorder.raw_text_for_message(parsed.content, parsed.tool_calls) == raw
    assert reconstruct_raw_text(parsed.content, parsed.tool_calls) != raw


def test_recorder_falls_back_to_reconstruction() -> None:
    recorder = ToolCallRecorder()
    calls = [make_tool_call("f", {})]
    assert recorder.raw_text_for(calls[0]["id"]) is None
    assert recorder.raw_text_for_message("Hi", calls) == reconstruct_raw_text("Hi", calls)
    assert recorder.raw_text_for_message("Just text", []) == "Just text"


def test_recorder_is_bounded_and_forgets() -> None:
    recorder = ToolCallRecorder(max_entries=2)
    calls = [make_tool_call(f"f{i}", {}) for i in range(3)]
    for i, tc in enumerate(calls):
        recorder.record(f"raw{i}", [tc])
    assert len(recorder) == 2
    assert recorder.raw_text_for(calls[0]["id"]) is None
    assert recorder.raw_text_for(calls[2]["id"]) == "raw2"
    recorder.forget(calls[2]["id"])
    assert recorder.raw_text_for(calls[2]["id"]) is None
    recorder.clear()
    assert len(recorder) == 0


# ---- tool_choice -----------------------------------------------------------------------

TEXT = "<think>r</think>\nSure.\n" + call("a", {"x": 1}) + "\n" + call("b", {})


@pytest.mark.parametrize(
    ("tool_choice", "finish_in", "names", "content", "finish_out", "problem"),
    [
        pytest.param("auto", "stop", ["a", "b"], "Sure.", "tool_calls", None, id="auto"),
        pytest.param(None, "stop", ["a", "b"], "Sure.", "tool_calls", None, id="default-auto"),
        pytest.param("auto", "length", ["a", "b"], "Sure.", "length", None, id="length-stays"),
        pytest.param("required", "stop", ["a", "b"], "Sure.", "tool_calls", None, id="required"),
        pytest.param(
            "none",
            "tool_calls",
            [],
            "Sure.\n" + call("a", {"x": 1}) + "\n" + call("b", {}),
            "stop",
            None,
            id="none",
        ),
        pytest.param(
            {"type": "function", "function": {"name": "b"}},
            "stop",
            ["b"],
            "Sure.",
            "tool_calls",
            None,
            id="named",
        ),
        pytest.param(
            {"type": "function", "function": {"name": "zzz"}},
            "stop",
            [],
            "Sure.\n" + call("a", {"x": 1}) + "\n" + call("b", {}),
            "stop",
            "zzz",
            id="named-missing",
        ),
    ],
)
def test_apply_tool_choice(
    parser: ToolParser,
    tool_choice: Any,
    finish_in: str,
    names: list[str],
    content: str,
    finish_out: str,
    problem: str | None,
) -> None:
    parsed = parser.parse(TEXT)
    result, finish, found = apply_tool_choice(parsed, tool_choice, finish_in)
    assert [c["function"]["name"] for c in result.tool_calls] == names
    assert result.content == content
    assert result.reasoning_content == "r"
    assert finish == finish_out
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_required_without_call_reports_problem(parser: ToolParser) -> None:
    parsed = parser.parse("No tools needed.")
    result, finish, problem = apply_tool_choice(parsed, "required", "stop")
    assert result.tool_calls == [] and result.content == "No tools needed."
    assert finish == "stop"
    assert problem is not None and "required" in problem


def test_auto_without_call_keeps_finish(parser: ToolParser) -> None:
    parsed = parser.parse("Plain.")
    assert apply_tool_choice(parsed, "auto", "stop") == (parsed, "stop", None)
    assert apply_tool_choice(parsed, "auto", "length")[1] == "length"


@pytest.mark.parametrize("bad", ["sometimes", {"type": "function"}, {"type": "function", "function": {}}, {"x": 1}, 3])
def test_invalid_tool_choice(parser: ToolParser, bad: Any) -> None:
    with pytest.raises(RequestError) as info:
        apply_tool_choice(parser.parse("x"), bad, "stop")
    assert info.value.field == "tool_choice"
