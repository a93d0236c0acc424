"""Request bodies of the HTTP ingress (pydantic models that FastAPI validates).

The unknown-field rule: the top level of every request body is closed. A field the
ingress would not honour is rejected with HTTP 400 (OpenAI error shape, ``param`` names
the field, ``code`` is ``unknown_parameter``) instead of being dropped silently, because
a silently dropped sampling field corrupts an RL experiment without anyone noticing.
A few OpenAI fields that do not change what is generated are accepted and ignored:
``user``, ``metadata``, ``store``, ``service_tier`` (and ``parallel_tool_calls`` when
true, which is what the tool parser does anyway). Nested objects a client echoes back
(messages, tool calls, tool definitions) keep unknown keys, as OpenAI's own do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inferpool.reasoning import ReasoningConfig

#: Largest ``n`` one HTTP request may ask for (larger batches: several requests).
MAX_N = 128
#: Accepted and ignored top-level fields (they do not change what is generated).
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")

#: inferpool.reasoning.VALID_EFFORTS as a type (tests check they agree).
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
SESSION_ID_PATTERN = r"^[0-9a-fA-F]{1,64}$"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- messages and tools ---------------------------------------------------------------
class TextPart(_Open):
    """A text part of a message's content (the only kind a text model renders)."""

    type: Literal["text"] = "text"
    text: str


Content = str | list[TextPart]


class ToolCallFunctionIn(_Open):
    name: str = Field(description="Function name.")
    arguments: str | dict[str, Any] = Field("", description="Arguments as a JSON string (or object).")


class ToolCallIn(_Open):
    id: str | None = Field(None, description="Tool call id.")
    type: Literal["function"] = "function"
    function: ToolCallFunctionIn


class _Message(_Open):
    """Base of chat messages (extra keys a client echoes back, e.g. ``refusal``, are kept)."""

    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = Field(None, description="May be null when the message has tool calls.")
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None


MessageIn = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDef(_Open):
    name: str = Field(min_length=1, description="Function name.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments.")
    strict: bool | None = None


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Closed):
    name: str = Field(min_length=1)


class NamedToolChoice(_Closed):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(_Closed):
    include_usage: bool = Field(False, description="Send a last chunk with the request's usage.")


# -- shared sampling fields -------------------------------------------------------------
def _float(default: float | None = None, **kw: Any) -> Any:
    return Field(default, allow_inf_nan=False, **kw)


class _Sampling(_Closed):
    """Sampling fields passed through to the engine (None: the pool's default)."""

    model: str | None = Field(None, description="Accepted for OpenAI compatibility; the pool serves one model.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to sample.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to sample per choice (pool default: 16).")
    temperature: float | None = _float(ge=0.0, description="Softmax temperature; 0 is greedy.")
    top_p: float | None = _float(gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1 << 31, description="-1 or 0: all tokens.")
    min_p: float | None = _float(ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: str | list[str] | None = Field(None, description="Stop strings.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a choice.")
    presence_penalty: float | None = _float(ge=-2.0, le=2.0)
    frequency_penalty: float | None = _float(ge=-2.0, le=2.0)
    repetition_penalty: float | None = _float(gt=0.0, le=100.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    skip_reasoning: bool = Field(False, description="Do not apply the pool's default reasoning settings.")
    split: Literal["train", "eval"] = Field("train", description="Capacity split the request is charged to.")
    stream: bool = Field(False, description="Answer as server-sent events (generated fully, then streamed).")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")

    def sampling(self) -> dict[str, Any]:
        """The sampling keyword arguments that were set (unset ones keep the pool's defaults)."""
        fields = (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "stop_token_ids",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "min_tokens",
            "ignore_eos",
        )
        out = {k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out

    def budget(self) -> int | None:
        return self.max_tokens


class _ChatFields(_Closed):
    """Fields a chat request and a render request share."""

    messages: list[MessageIn] = Field(min_length=1, description="The conversation so far.")
    tools: list[ToolDef] | None = Field(None, description="Tools the model may call (OpenAI format).")
    reasoning: ReasoningConfig | None = Field(None, description="Reasoning settings (enabled, effort, max_tokens).")
    reasoning_effort: Effort | None = Field(None, description="OpenAI shorthand for reasoning={'effort': ...}.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra chat-template variables.")
    continue_final_message: bool = Field(
        False,
        description="When the last message is the assistant's: continue it (True) instead of starting a new "
        "assistant turn after it (False, the default, as vLLM's chat API).",
    )
    extends: str | None = Field(
        None,
        max_length=128,
        description="Session routes: the node_id of the recorded sequence this turn extends (the node_id in a "
        "returned assistant message, sent back with it, says the same).",
    )

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools is not None else None

    def reasoning_config(self) -> ReasoningConfig | None:
        if self.reasoning_effort is None:
            return self.reasoning
        if self.reasoning is not None:
            from inferpool.errors import RequestError

            raise RequestError(
                "reasoning_effort: give either reasoning or reasoning_effort, not both", field="reasoning_effort"
            )
        return ReasoningConfig(effort=self.reasoning_effort)


class ChatCompletionRequest(_Sampling, _ChatFields):
    """``POST /v1/chat/completions`` (and the per-session route)."""

    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (wins when both).")
    logprobs: bool | None = Field(None, description="Return per-token logprobs in choices[].logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per position with logprobs.")
    tool_choice: ToolChoice | None = Field(None, description="'none', 'auto', 'required' or a named function.")
    parallel_tool_calls: bool | None = Field(None, description="Only true (the default) is supported.")

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
            if self.top_logprobs is not None:
                out["top_logprobs"] = self.top_logprobs
        return out

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_choice_value(self) -> Any:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (and the per-session route)."""

    prompt: str = Field(min_length=1, description="The prompt text (one prompt per request).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per sampled position.")
    extends: str | None = Field(
        None, max_length=128, description="Session routes: the node_id of the recorded completion this turn extends."
    )

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


class RenderRequest(_ChatFields):
    """``POST /sessions/{id}/render``: the prompt a chat call would send now."""

    model: str | None = Field(None, description="Accepted and ignored.")
    skip_reasoning: bool = False


class SessionCreateRequest(_Closed):
    """``POST /sessions``."""

    tool_parser: str = Field("hermes", min_length=1, description="Tool-call parser of the session's chat turns.")
    track_tree: bool = Field(False, description="Keep every distinct sequence with parent links (tree mode).")
    session_id: str | None = Field(
        None, pattern=SESSION_ID_PATTERN, description="Hex id to use (default: a random 128-bit id)."
    )
