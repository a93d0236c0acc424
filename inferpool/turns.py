"""One chat or completion turn: render → route → generate → record.

Shared by the stateless ``pool.chat`` / ``pool.complete`` (no state) and the session
stores (which pass the session's sequences and commit the new nodes only after the
turn succeeded, so a failed turn leaves the state unchanged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from inferpool.chat import ChatRenderer, message_key, validate_messages
from inferpool.errors import RequestError
from inferpool.openai_types import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    usage_of,
)
from inferpool.reasoning import (
    ReasoningConfig,
    apply_reasoning,
    apply_tool_choice,
    get_tool_parser,
    split_reasoning,
    strip_control_fields,
)
from inferpool.routing.dispatch import Dispatcher
from inferpool.sequences import (
    Prefix,
    SequenceNode,
    SessionState,
    extend,
    longest_message_prefix,
    longest_text_prefix,
)
from inferpool.types import Choice, GenerateResult, SamplingParams, Split

logger = logging.getLogger(__name__)


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


def _completion_text(renderer: ChatRenderer, choice: Choice) -> str:
    """The text a client sees for a choice (no trailing EOS text)."""
    text = choice.text if choice.text is not None else renderer.decode(choice.token_ids)
    if choice.text is None and renderer.eos_text and text.endswith(renderer.eos_text):
        text = text[: -len(renderer.eos_text)]
    return text


def _assistant_message(
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


def _returned_message(message: ChatMessage) -> dict[str, Any]:
    """The assistant message as a client echoes it back next turn."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [tc.model_dump() for tc in message.tool_calls]
    return out


def _logprobs_json(renderer: ChatRenderer, choice: Choice, top: int) -> dict[str, Any]:
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


async def chat_turn(
    dispatcher: Dispatcher,
    renderer: ChatRenderer,
    messages: Any,
    *,
    n: int = 1,
    sampling: Mapping[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    tool_parser: str = "hermes",
    reasoning: ReasoningConfig | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    state: SessionState | None = None,
    split: Split = "train",
    model_name: str = "",
    stale: Callable[[SequenceNode], bool] | None = None,
) -> tuple[ChatCompletion, SequenceNode | None, list[SequenceNode]]:
    """Run one chat turn; with ``state`` the prompt extends the longest matching sequence."""
    msgs = validate_messages(messages)
    sp = sampling_from(n, sampling or {})
    kwargs = template_kwargs_for(reasoning, chat_template_kwargs)
    # render: stored tokens + only the new suffix when a stored sequence is extended
    parent, stored = (None, 0)
    if state is not None:
        parent, stored = longest_message_prefix(state.nodes, [message_key(m) for m in msgs])
    if parent is not None and stale is not None and stale(parent):
        parent = None  # requeued: a fresh prompt under the current weights
    if parent is not None:
        suffix_text = renderer.suffix(msgs, stored, parent.ended_with_eos, tools=tools, template_kwargs=kwargs)
        prefix = Prefix(parent, renderer.encode(suffix_text), suffix_text)
    else:
        text, ids = renderer.render(msgs, tools=tools, template_kwargs=kwargs)
        prefix = Prefix(None, ids, text)
    # route + generate
    result = await dispatcher.submit(prefix.prompt_ids(), sp, split, state.session_id if state else None)
    # record
    choices: list[ChatChoice] = []
    children: list[SequenceNode] = []
    for c in result.choices:
        text = _completion_text(renderer, c)
        message, finish, problem = _assistant_message(text, c, tools, tool_choice, tool_parser)
        extra: dict[str, Any] = {"tool_choice_problem": problem} if problem else {}
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                finish_reason=finish,
                logprobs=_logprobs_json(renderer, c, sp.logprobs) if (sampling or {}).get("logprobs") else None,
                token_ids=c.token_ids,
                token_logprobs=c.logprobs,
                **extra,
            )
        )
        if state is not None:
            children.append(_record(renderer, prefix, result, c, messages=[*msgs, _returned_message(message)]))
    completion = ChatCompletion(
        model=model_name,
        choices=choices,
        usage=usage_of(len(result.prompt_token_ids), result.num_generated_tokens),
        prompt_token_ids=result.prompt_token_ids,
        session_id=state.session_id if state else None,
    )
    return completion, parent, children


def _record(
    renderer: ChatRenderer,
    prefix: Prefix,
    result: GenerateResult,
    c: Choice,
    *,
    messages: list[dict[str, Any]] | None = None,
    match_text: str | None = None,
) -> SequenceNode:
    """The new sequence node of one choice: the prefix it extends plus what was sampled."""
    return extend(
        prefix,
        c.token_ids,
        c.logprobs,
        c.weight_versions or [c.weight_version] * len(c.token_ids),
        prompt_text=prefix.suffix_text,
        sampled_text=renderer.decode(c.token_ids),
        eos_token_id=renderer.eos_token_id,
        metadata=_metadata(result, c),
        messages=messages,
        match_text=match_text,
    )


def _metadata(result: GenerateResult, c: Choice) -> dict[str, Any]:
    return {
        "finish_reason": c.finish_reason,
        "engine_id": result.engine_id,
        "weight_version": c.weight_version,
        "prompt_len": len(result.prompt_token_ids),
        "request_id": result.request_id,
    }


async def completion_turn(
    dispatcher: Dispatcher,
    renderer: ChatRenderer,
    prompt: Any,
    *,
    n: int = 1,
    sampling: Mapping[str, Any] | None = None,
    state: SessionState | None = None,
    split: Split = "train",
    model_name: str = "",
    stale: Callable[[SequenceNode], bool] | None = None,
) -> tuple[Completion, SequenceNode | None, list[SequenceNode]]:
    """Run one completion turn; with ``state`` the prompt extends the longest text prefix."""
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: must be a non-empty string", field="prompt")
    sp = sampling_from(n, sampling or {})
    parent = longest_text_prefix(state.nodes, prompt) if state is not None else None
    if parent is not None and stale is not None and stale(parent):
        parent = None
    suffix_text = prompt[len(parent.match_text or "") :] if parent is not None else prompt
    prefix = Prefix(parent, renderer.encode(suffix_text) if suffix_text else [], suffix_text)
    if not prefix.prompt_ids():
        raise RequestError("prompt: encodes to no tokens", field="prompt")
    result = await dispatcher.submit(prefix.prompt_ids(), sp, split, state.session_id if state else None)
    choices: list[CompletionChoice] = []
    children: list[SequenceNode] = []
    for c in result.choices:
        text = _completion_text(renderer, c)
        choices.append(
            CompletionChoice(
                index=c.index,
                text=text,
                finish_reason=c.finish_reason,
                token_ids=c.token_ids,
                token_logprobs=c.logprobs,
            )
        )
        if state is not None:
            children.append(_record(renderer, prefix, result, c, match_text=prompt + text))
    completion = Completion(
        model=model_name,
        choices=choices,
        usage=usage_of(len(result.prompt_token_ids), result.num_generated_tokens),
        prompt_token_ids=result.prompt_token_ids,
        session_id=state.session_id if state else None,
    )
    return completion, parent, children


PLACEHOLDER_PROMPT_ID = -1
PLACEHOLDER_SAMPLED_ID = -2


async def text_call(dispatcher: Dispatcher, method: str, body: dict[str, Any], split: Split) -> dict[str, Any]:
    """A text-level call (``chat`` or ``completion``) on a text-only engine, through a lease."""
    body, _ = strip_control_fields(body)
    out: dict[str, Any] = await dispatcher.call(split, lambda h: getattr(h, method).remote(body))
    return out


async def text_chat(
    dispatcher: Dispatcher,
    messages: Any,
    n: int,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    reasoning: ReasoningConfig | None,
    split: Split,
    sampling: Mapping[str, Any],
) -> ChatCompletion:
    """A stateless chat on a text-only engine (hosted API): the engine renders and parses."""
    body: dict[str, Any] = {"messages": messages, "n": n, **sampling}
    if tools is not None:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if reasoning is not None:
        body["reasoning"] = reasoning.model_dump(exclude_none=True)
    return ChatCompletion(**await text_call(dispatcher, "chat", body, split))


async def placeholder_chat_turn(
    dispatcher: Dispatcher,
    messages: Any,
    *,
    n: int = 1,
    sampling: Mapping[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    reasoning: ReasoningConfig | None = None,
    state: SessionState,
    split: Split = "train",
) -> tuple[ChatCompletion, SequenceNode | None, list[SequenceNode]]:
    """A chat turn on a text-only engine (hosted API), recorded with placeholder tokens.

    The real text is kept (``full_text``, ``messages``); every position holds a placeholder
    id (-1 for prompt characters, -2 for sampled ones), nothing is trainable and the node's
    metadata says ``placeholder_tokens: True``. Not token-exact: never train on these ids.
    """
    import json

    msgs = validate_messages(messages)
    parent, stored = longest_message_prefix(state.nodes, [message_key(m) for m in msgs])
    new_text = json.dumps(msgs[stored:], ensure_ascii=False)
    out = await text_chat(dispatcher, msgs, n, tools, tool_choice, reasoning, split, dict(sampling or {}))
    children = []
    for choice in out.choices:
        reply = choice.message.content or ""
        prefix = Prefix(parent, [PLACEHOLDER_PROMPT_ID] * len(new_text), new_text)
        node = extend(
            prefix,
            [PLACEHOLDER_SAMPLED_ID] * len(reply),
            [0.0] * len(reply),
            [None] * len(reply),
            prompt_text=new_text,
            sampled_text=reply,
            eos_token_id=None,
            metadata={"finish_reason": choice.finish_reason, "placeholder_tokens": True, "engine_id": "text-only"},
            messages=[*msgs, _returned_message(choice.message)],
        )
        node.trainable[:] = False
        node.logprob_array[:] = 1.0
        children.append(node)
    out.session_id = state.session_id
    return out, parent, children
