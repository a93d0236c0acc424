"""What a turn sends and returns in OpenAI shapes: sampling from OpenAI-style keywords,
chat-template kwargs from a reasoning config, and each sampled choice as the text and
assistant message a client sees (think block and tool calls split out) and as the
message the session records for matching the client's next turn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferpool.chat import ChatRenderer
from inferpool.openai_types import ChatMessage
from inferpool.reasoning import ReasoningConfig, apply_reasoning, apply_tool_choice, get_tool_parser, split_reasoning
from inferpool.types import Choice, SamplingParams


def sampling_from(n: int, sampling: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from OpenAI-style keyword arguments (``max_completion_tokens`` too)."""
    fields = dict(sampling)
    if "max_completion_tokens" in fields:
        value = fields.pop("max_completion_tokens")
        if value is not None:
            fields["max_tokens"] = value
    for key in ("stop",):
        if isinstance(fields.get(key), str):
            fields[key] = [fields[key]]
    if isinstance(fields.get("logprobs"), bool):
        fields["logprobs"] = int(fields.pop("top_logprobs", 0) or 0) if fields["logprobs"] else 0
    fields.pop("top_logprobs", None)
    fields = {k: v for k, v in fields.items() if v is not None}
    return SamplingParams(n=n, **fields)


def template_kwargs_for(reasoning: ReasoningConfig | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat-template kwargs for a self-hosted engine (e.g. ``enable_thinking``)."""
    fields = apply_reasoning({}, reasoning, "self_hosted") if reasoning is not None else {}
    kwargs = dict(fields.get("chat_template_kwargs") or {})
    kwargs.update(extra or {})
    return kwargs


def completion_text(renderer: ChatRenderer, choice: Choice, decoded: str | None = None) -> str:
    """The text a client sees for a choice (no trailing EOS text); ``decoded``: the choice's
    tokens already decoded, if the caller has them."""
    if choice.text is not None:
        return choice.text
    text = decoded if decoded is not None else renderer.decode(choice.token_ids)
    if renderer.eos_text and text.endswith(renderer.eos_text):
        text = text[: -len(renderer.eos_text)]
    return text


def assistant_message(
    text: str, choice: Choice, tools: list[dict[str, Any]] | None, tool_choice: Any, tool_parser: str
) -> tuple[ChatMessage, str | None, str | None]:
    """Split think block and tool calls out of the raw text; returns (message, finish, problem)."""
    finish = choice.finish_reason
    if tools and tool_choice != "none":
        parsed = get_tool_parser(tool_parser).parse(text)
        parsed, finish_out, problem = apply_tool_choice(parsed, tool_choice or "auto", finish)
        message = ChatMessage(
            content=parsed.content,
            reasoning_content=parsed.reasoning_content,
            tool_calls=list(parsed.tool_calls) or None,  # type: ignore[arg-type]
        )
        return message, finish_out, problem
    reasoning, content = split_reasoning(text)
    return ChatMessage(content=content, reasoning_content=reasoning), finish, None


def recorded_message(message: ChatMessage) -> dict[str, Any]:
    """The assistant message as the session records it for matching: what a client echoes
    back (content, ``reasoning_content``, tool calls with their ids and exact arguments,
    and the ``node_id`` that names the sequence exactly)."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        out["tool_calls"] = [tc.model_dump() for tc in message.tool_calls]
    if message.node_id is not None:
        out["node_id"] = message.node_id
    return out


def logprobs_json(renderer: ChatRenderer, choice: Choice, top: int) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of a chat choice."""
    content = []
    for i, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs, strict=True)):
        alts = (choice.top_logprobs or [])[i] if choice.top_logprobs else {}
        content.append(
            {
                "token": renderer.decode([tok]),
                "token_id": tok,
                "logprob": lp,
                "top_logprobs": [
                    {"token": renderer.decode([t]), "token_id": t, "logprob": v} for t, v in list(alts.items())[:top]
                ],
            }
        )
    return {"content": content}
