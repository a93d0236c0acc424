"""OpenAI-shaped responses (ChatCompletion, Completion) with inferpool's token extras.

Attribute access works as with the ``openai`` client (``out.choices[0].message.content``);
``model_dump()`` gives the wire JSON. Besides the official fields each choice carries
``token_ids`` and ``token_logprobs`` (exactly what the engine sampled) and the response
``prompt_token_ids``, so RL code never has to re-tokenize.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_PROCESS_TAG = uuid.uuid4().hex[:16]
_response_ids = itertools.count(1)


def _response_id() -> str:
    """Unique per response (a process tag and a counter: no entropy drawn per response)."""
    return f"{_PROCESS_TAG}{next(_response_ids):x}"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int = Field(0, description="Prompt tokens the engine received (per choice group).")
    completion_tokens: int = Field(0, description="Tokens sampled over all choices.")
    total_tokens: int = Field(0, description="prompt_tokens + completion_tokens.")


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCallModel(_Open):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallModel] | None = None
    node_id: str | None = Field(
        None,
        description="Session turns: the sequence this reply ends. Send the message back as it came "
        "(official clients keep this field) and the next turn extends exactly that sequence.",
    )


class ChatChoice(_Open):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)


class ChatCompletion(_Open):
    id: str = Field(default_factory=lambda: f"chatcmpl-{_response_id()}")
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[ChatChoice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    prompt_token_ids: list[int] | None = None
    session_id: str | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    node_id: str | None = Field(None, description="Session turns: the sequence this choice ends (for extends=).")
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)


class Completion(_Open):
    id: str = Field(default_factory=lambda: f"cmpl-{_response_id()}")
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    prompt_token_ids: list[int] | None = None
    session_id: str | None = None


def usage_of(prompt_len: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_len,
        completion_tokens=completion_tokens,
        total_tokens=prompt_len + completion_tokens,
    )
