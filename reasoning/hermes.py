"""The Hermes tool-call format (Qwen, Hermes, many others), parsed without vLLM.

A model writes each call as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:class:`HermesToolParser` reads such output into OpenAI tool calls;
:func:`render_hermes_tool_call` writes one call back in the same format.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .think import DEFAULT_END_TAG, DEFAULT_START_TAG, split_reasoning
from .tool_types import ParsedToolCalls, ToolCall, make_tool_call

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\r\n"


class _Malformed(ValueError):
    """A tool call that cannot be read; the whole output then becomes plain content."""


def render_hermes_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call in Hermes format, serialised the way chat templates' ``tojson`` does."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _arguments(obj: dict[str, Any]) -> dict[str, Any]:
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        if not args.strip():
            return {}
        try:
            args = json.loads(args)  # arguments sent as a JSON string
        except json.JSONDecodeError as exc:
            raise _Malformed(f"arguments string is not JSON: {exc}") from None
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise _Malformed(f"arguments must be a JSON object, got {type(args).__name__}")
    return args


def _to_calls(obj: Any) -> list[ToolCall]:
    items = obj if isinstance(obj, list) else [obj]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, dict):
            raise _Malformed(f"a tool call must be a JSON object, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _Malformed("a tool call needs a non-empty string 'name'")
        calls.append(make_tool_call(name, _arguments(item)))
    return calls


class HermesToolParser:
    """Parses Hermes-format tool calls; works without vLLM.

    With ``split_think`` (the default) a leading think block is split off first with
    :func:`~inferpool.reasoning.think.split_reasoning`: it goes to
    ``reasoning_content``, never to ``content``, and a ``<tool_call>`` written inside
    the reasoning is not taken for a call. Callers that split reasoning themselves can
    pass the remaining content; it has no think tags, so splitting changes nothing.

    Rules: text before, between and after the calls is the content (stripped,
    ``None`` when empty); each call is a JSON object (or a list of them) with ``name``
    and ``arguments`` (``parameters`` is accepted too; an object, a JSON string of an
    object, or absent for ``{}``). A final ``<tool_call>`` without its close tag is
    parsed when its JSON is complete (generation hit a stop string). Anything
    malformed makes the whole output plain content with no tool calls.
    """

    def __init__(
        self,
        *,
        split_think: bool = True,
        think_start_tag: str = DEFAULT_START_TAG,
        think_end_tag: str = DEFAULT_END_TAG,
    ) -> None:
        self.split_think = split_think
        self.think_start_tag = think_start_tag
        self.think_end_tag = think_end_tag

    def parse(self, text: str) -> ParsedToolCalls:
        """Parse one assistant output; see the class docstring for the rules."""
        reasoning: str | None = None
        body = text
        if self.split_think:
            reasoning, body = split_reasoning(text, self.think_start_tag, self.think_end_tag)
        try:
            content, calls = self._parse_body(body)
        except _Malformed as exc:
            logger.debug("unparseable tool call, returning plain content: %s", exc)
            return ParsedToolCalls(content=body, raw_text=text, reasoning_content=reasoning, plain_content=body)
        if not calls:
            return ParsedToolCalls(content=body, raw_text=text, reasoning_content=reasoning, plain_content=body)
        return ParsedToolCalls(
            content=content,
            tool_calls=calls,
            raw_text=text,
            reasoning_content=reasoning,
            plain_content=body,
        )

    def _parse_body(self, body: str) -> tuple[str | None, list[ToolCall]]:
        if TOOL_CALL_OPEN not in body:
            if TOOL_CALL_CLOSE in body:
                raise _Malformed(f"{TOOL_CALL_CLOSE} without {TOOL_CALL_OPEN}")
            return body, []
        segments: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while True:
            start = body.find(TOOL_CALL_OPEN, pos)
            if start == -1:
                segments.append(body[pos:])
                break
            segments.append(body[pos:start])
            json_start = _skip_ws(body, start + len(TOOL_CALL_OPEN))
            try:
                obj, json_end = _DECODER.raw_decode(body, json_start)
            except json.JSONDecodeError as exc:
                raise _Malformed(f"tool call JSON does not parse: {exc}") from None
            after = _skip_ws(body, json_end)
            if body.startswith(TOOL_CALL_CLOSE, after):
                pos = after + len(TOOL_CALL_CLOSE)
            elif after == len(body):
                logger.debug("final %s left unclosed; its JSON is complete", TOOL_CALL_OPEN)
                pos = after
            else:
                raise _Malformed(f"unexpected text after the JSON of a {TOOL_CALL_OPEN}")
            calls.extend(_to_calls(obj))
        if any(TOOL_CALL_CLOSE in segment for segment in segments):
            raise _Malformed(f"stray {TOOL_CALL_CLOSE}")
        pieces = [segment.strip() for segment in segments if segment.strip()]
        return ("\n".join(pieces) or None), calls
