"""Enforce an OpenAI ``tool_choice`` on parsed tool calls, and set the finish reason."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from inferpool.errors import RequestError

from .tool_types import ParsedToolCalls

logger = logging.getLogger(__name__)

ToolChoice = str | Mapping[str, Any] | None


def named_tool(tool_choice: ToolChoice) -> str | None:
    """Validate ``tool_choice``; return the forced function's name, or None for a mode.

    Accepted: None (same as "auto"), "none", "auto", "required", and
    ``{"type": "function", "function": {"name": X}}``. Anything else raises
    :class:`RequestError` naming ``tool_choice``.
    """
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return None
        raise RequestError(
            f"tool_choice {tool_choice!r} is not one of 'none', 'auto', 'required' "
            "or a {'type': 'function', 'function': {'name': ...}} object",
            field="tool_choice",
        )
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return name
    raise RequestError(
        f"tool_choice {tool_choice!r} must name a function as {{'type': 'function', 'function': {{'name': ...}}}}",
        field="tool_choice",
    )


def _finish_reason(has_calls: bool, finish_reason: str | None) -> str | None:
    if finish_reason == "length":
        return "length"  # a truncated output stays reported as truncated
    if has_calls:
        return "tool_calls"
    if finish_reason == "tool_calls":
        return "stop"
    return finish_reason


def apply_tool_choice(
    parsed: ParsedToolCalls, tool_choice: ToolChoice, finish_reason: str | None
) -> tuple[ParsedToolCalls, str | None, str | None]:
    """Apply ``tool_choice`` to a parse result.

    Returns ``(parsed, finish_reason, problem)``:

    * "none": no tool calls; the text after the reasoning, unparsed, is the content.
    * "auto" (or None): the calls as parsed.
    * "required": the calls as parsed; with none, ``problem`` says so.
    * ``{"type": "function", "function": {"name": X}}``: only the calls to X are kept;
      when none is left the unparsed text becomes the content and ``problem`` says so.

    ``finish_reason`` becomes "tool_calls" when calls are returned, except that
    "length" stays "length"; a "tool_calls" finish with no calls left becomes "stop".
    ``problem`` is None when the choice was honoured; it is reported, never raised,
    because the model output already exists. An invalid ``tool_choice`` raises
    :class:`RequestError`.
    """
    name = named_tool(tool_choice)
    problem: str | None = None
    result = parsed
    if tool_choice == "none":
        if parsed.tool_calls:
            logger.debug("tool_choice 'none': %d tool call(s) kept as text", len(parsed.tool_calls))
        result = dataclasses.replace(parsed, content=parsed.plain_content, tool_calls=[])
    elif tool_choice == "required":
        if not parsed.tool_calls:
            problem = "tool_choice is 'required' but the model made no tool call"
    elif name is not None:
        kept = [call for call in parsed.tool_calls if call["function"]["name"] == name]
        if not kept:
            called = sorted({call["function"]["name"] for call in parsed.tool_calls})
            problem = (
                f"tool_choice requires a call to {name!r} but the model called "
                f"{', '.join(repr(c) for c in called) if called else 'no tool'}"
            )
            result = dataclasses.replace(parsed, content=parsed.plain_content, tool_calls=[])
        elif len(kept) != len(parsed.tool_calls):
            dropped = len(parsed.tool_calls) - len(kept)
            logger.debug("tool_choice %r: dropped %d other call(s)", name, dropped)
            result = dataclasses.replace(parsed, tool_calls=kept)
    if problem is not None:
        logger.info("%s", problem)
    return result, _finish_reason(bool(result.tool_calls), finish_reason), problem
