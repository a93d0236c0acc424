"""The shapes shared by tool-call parsers: OpenAI tool-call dicts and parse results."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, runtime_checkable

logger = logging.getLogger(__name__)

TOOL_CALL_ID_PREFIX = "call_"


class ToolCallFunction(TypedDict):
    """The ``function`` part of an OpenAI tool call: ``arguments`` is a JSON string."""

    name: str
    arguments: str


class ToolCall(TypedDict):
    """An OpenAI-shaped tool call: ``{"id", "type": "function", "function": {...}}``."""

    id: str
    type: str
    function: ToolCallFunction


def new_tool_call_id() -> str:
    """A fresh tool-call id: ``call_`` followed by 24 lowercase hex digits."""
    return TOOL_CALL_ID_PREFIX + uuid.uuid4().hex[:24]


def make_tool_call(name: str, arguments: dict[str, Any] | str, *, call_id: str | None = None) -> ToolCall:
    """Build an OpenAI tool-call dict; a dict ``arguments`` is serialised to JSON.

    Serialisation keeps key order and non-ASCII characters (``ensure_ascii=False``)
    and uses ``", "`` / ``": "`` separators, as chat templates' ``tojson`` does.
    """
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call_id or new_tool_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


@dataclass(frozen=True)
class ParsedToolCalls:
    """What a tool parser made of one assistant output.

    ``content`` is the text outside the tool calls (``None`` when there is none),
    ``tool_calls`` the OpenAI-shaped calls, ``raw_text`` the parser's input, untouched.
    ``reasoning_content`` is the think block the parser split off (``None`` if none)
    and ``plain_content`` the text after the reasoning, without any tool-call parsing:
    what ``content`` becomes when tool calls are refused (tool_choice "none").
    """

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_text: str = ""
    reasoning_content: str | None = None
    plain_content: str | None = None

    def __post_init__(self) -> None:
        if self.plain_content is None:
            object.__setattr__(self, "plain_content", self.raw_text)

    @property
    def has_tool_calls(self) -> bool:
        """True when at least one tool call was parsed."""
        return bool(self.tool_calls)


@runtime_checkable
class ToolParser(Protocol):
    """Turns a model's raw output text into content and OpenAI tool calls."""

    def parse(self, text: str) -> ParsedToolCalls:
        """Parse ``text``; never raises on malformed model output (it becomes content)."""
        ...
