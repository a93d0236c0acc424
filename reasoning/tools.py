"""Tool-call parser registry, and the raw assistant text behind tool calls.

For token-exact multi-turn rollouts the prompt of the next turn must contain the
assistant turn exactly as the model wrote it. :class:`ToolCallRecorder` remembers
that raw text per tool-call id; :func:`reconstruct_raw_text` rebuilds Hermes-format
text from content and tool calls when nothing was recorded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from inferpool.errors import ConfigError, RequestError

from .hermes import HermesToolParser, render_hermes_tool_call
from .tool_types import ParsedToolCalls, ToolParser

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., ToolParser]] = {}
_REGISTRY_LOCK = threading.Lock()


def _key(name: str) -> str:
    return name.strip().lower()


def register_tool_parser(name: str, cls: Callable[..., ToolParser], *, replace: bool = False) -> None:
    """Register a tool-parser class (or factory) under ``name`` (case-insensitive).

    Registering the same class again is a no-op; a different one under a taken name
    raises :class:`ConfigError` unless ``replace`` is true.
    """
    if not callable(cls):
        raise ConfigError(f"tool parser {name!r} must be a class or factory", field="tool_parser")
    key = _key(name)
    if not key:
        raise ConfigError("tool parser name must be non-empty", field="tool_parser")
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls and not replace:
            raise ConfigError(
                f"tool parser {name!r} is already registered; pass replace=True to override",
                field="tool_parser",
            )
        _REGISTRY[key] = cls
    logger.debug("registered tool parser %r", key)


def get_tool_parser(name: str, **kwargs: Any) -> ToolParser:
    """A new instance of the tool parser registered as ``name``, built with ``kwargs``."""
    with _REGISTRY_LOCK:
        factory = _REGISTRY.get(_key(name))
        known = sorted(_REGISTRY)
    if factory is None:
        raise ConfigError(f"unknown tool parser {name!r}; registered: {', '.join(known)}", field="tool_parser")
    parser = factory(**kwargs)
    if not isinstance(parser, ToolParser):
        raise ConfigError(f"tool parser {name!r} has no parse(text) method", field="tool_parser")
    return parser


def list_tool_parsers() -> list[str]:
    """The registered tool-parser names, sorted."""
    with _REGISTRY_LOCK:
        return sorted(_REGISTRY)


register_tool_parser("hermes", HermesToolParser)


def _call_parts(index: int, call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    where = f"tool_calls[{index}]"
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise RequestError(f"{where}.function must be an object", field=where)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.function.name must be a non-empty string", field=where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError(
                f"{where}.function.arguments is not valid JSON: {exc}",
                field=f"{where}.function.arguments",
            ) from None
    if not isinstance(arguments, dict):
        raise RequestError(
            f"{where}.function.arguments must be a JSON object",
            field=f"{where}.function.arguments",
        )
    return name, arguments


def reconstruct_raw_text(content: str | None, tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """Rebuild Hermes-format raw text from an assistant message's content and tool calls.

    The stripped content (if any) comes first, then one
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` per call, all
    joined by newlines. ``arguments`` may be a JSON string (OpenAI) or an object. For
    text this function produced, parsing it with the "hermes" parser and rebuilding
    gives the same text. Reasoning is not rebuilt: record the raw text for that.
    """
    parts = [content.strip()] if content and content.strip() else []
    for index, call in enumerate(tool_calls):
        parts.append(render_hermes_tool_call(*_call_parts(index, call)))
    return "\n".join(parts)


class ToolCallRecorder:
    """Remembers, per tool-call id, the exact raw text of the assistant turn it came from.

    Bounded: once more than ``max_entries`` ids are held the oldest are forgotten.
    Thread-safe.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ConfigError("max_entries must be at least 1", field="max_entries")
        self.max_entries = max_entries
        self._raw: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._raw)

    def record(self, raw_text: str, tool_calls: Sequence[Mapping[str, Any]]) -> None:
        """Remember ``raw_text`` as the source of each call in ``tool_calls``."""
        with self._lock:
            for call in tool_calls:
                call_id = call.get("id")
                if not isinstance(call_id, str) or not call_id:
                    logger.debug("tool call without an id not recorded")
                    continue
                self._raw[call_id] = raw_text
                self._raw.move_to_end(call_id)
            while len(self._raw) > self.max_entries:
                self._raw.popitem(last=False)

    def record_parsed(self, parsed: ParsedToolCalls) -> None:
        """Remember the raw text of a parse result for each of its tool calls."""
        self.record(parsed.raw_text, parsed.tool_calls)

    def raw_text_for(self, tool_call_id: str) -> str | None:
        """The recorded raw text of the turn that made ``tool_call_id``, or None."""
        with self._lock:
            return self._raw.get(tool_call_id)

    def raw_text_for_message(self, content: str | None, tool_calls: Sequence[Mapping[str, Any]]) -> str:
        """The raw text of an assistant message: recorded when possible, else rebuilt.

        The record is used when every call's id is known and all point to the same
        turn; otherwise the text is rebuilt with :func:`reconstruct_raw_text`.
        """
        if not tool_calls:
            return content or ""
        with self._lock:
            texts = [self._raw.get(str(call.get("id"))) for call in tool_calls]
        first = texts[0]
        if first is not None and all(text == first for text in texts):
            return first
        if None not in texts:
            logger.warning("tool calls of one message were recorded from different turns")
        return reconstruct_raw_text(content, tool_calls)

    def forget(self, tool_call_id: str) -> None:
        """Drop the record of one tool-call id (no error when absent)."""
        with self._lock:
            self._raw.pop(tool_call_id, None)

    def clear(self) -> None:
        """Drop every record."""
        with self._lock:
            self._raw.clear()
