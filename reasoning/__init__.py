"""Reasoning settings, their provider-specific request fields, think blocks and tool calls.

* :class:`ReasoningConfig`: whether and how much a model reasons.
* :func:`detect_provider` / :func:`apply_reasoning`: write a config into a request the
  way a provider expects it; :func:`strip_control_fields` drops inferpool-only keys.
* :func:`split_reasoning`: separate a think block from the answer.
* Tool calls: :func:`get_tool_parser` ("hermes" built in), :func:`register_tool_parser`,
  :func:`apply_tool_choice`, :class:`ToolCallRecorder` and :func:`reconstruct_raw_text`
  for token-exact multi-turn prompts.
"""

from __future__ import annotations

from inferpool.reasoning_config import (
    DEFAULT_EFFORT,
    EFFORT_BUDGETS,
    VALID_EFFORTS,
    ReasoningConfig,
)

from .hermes import HermesToolParser, render_hermes_tool_call
from .providers import (
    CONTROL_FIELDS,
    SELF_HOSTED_PROVIDERS,
    apply_reasoning,
    detect_provider,
    is_anthropic_model,
    openai_effort_for_budget,
    strip_control_fields,
)
from .think import split_reasoning
from .tool_choice import apply_tool_choice
from .tool_types import (
    ParsedToolCalls,
    ToolCall,
    ToolCallFunction,
    ToolParser,
    make_tool_call,
    new_tool_call_id,
)
from .tools import (
    ToolCallRecorder,
    get_tool_parser,
    list_tool_parsers,
    reconstruct_raw_text,
    register_tool_parser,
)

__all__ = [
    "CONTROL_FIELDS",
    "DEFAULT_EFFORT",
    "EFFORT_BUDGETS",
    "SELF_HOSTED_PROVIDERS",
    "VALID_EFFORTS",
    "HermesToolParser",
    "ParsedToolCalls",
    "ReasoningConfig",
    "ToolCall",
    "ToolCallFunction",
    "ToolCallRecorder",
    "ToolParser",
    "apply_reasoning",
    "apply_tool_choice",
    "detect_provider",
    "get_tool_parser",
    "is_anthropic_model",
    "list_tool_parsers",
    "make_tool_call",
    "new_tool_call_id",
    "openai_effort_for_budget",
    "reconstruct_raw_text",
    "register_tool_parser",
    "render_hermes_tool_call",
    "split_reasoning",
    "strip_control_fields",
]
