"""One chat or completion turn: render → dispatch → record.

Shared by the stateless ``pool.chat`` / ``pool.complete`` (no history) and the session
stores, which pass the session's :class:`~inferpool.session_tree.SessionTree` and record
the returned segments only after the turn succeeded (a failed turn changes nothing).

- render: the sequence the turn continues (``SessionTree.match_chat`` / ``match_text``),
  then its stored tokens plus only the new suffix, rendered and encoded; or a fresh
  render. A turn whose render options (tools, chat-template kwargs) differ from those
  its sequence was rendered with is rendered fresh as a new root, flagged
  (``metadata["rerendered"]``), never silently extended without them.
- dispatch: :meth:`~inferpool.routing.dispatch.Dispatcher.submit`.
- record: one segment per choice; every returned assistant message carries the
  ``node_id`` of its sequence, so a client that echoes it back extends exactly that one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from inferpool.chat import ChatRenderer, validate_messages
from inferpool.errors import RequestError
from inferpool.openai_types import ChatChoice, ChatCompletion, Completion, CompletionChoice, usage_of
from inferpool.reasoning import ReasoningConfig, strip_control_fields
from inferpool.replies import (
    assistant_message,
    completion_text,
    logprobs_json,
    recorded_message,
    sampling_from,
    template_kwargs_for,
)
from inferpool.routing.dispatch import Dispatcher
from inferpool.session_tree import Match, Segment, SessionTree, new_node_id
from inferpool.types import GenerateResult, Split

logger = logging.getLogger(__name__)

Stale = Callable[[Segment], bool]


@dataclasses.dataclass(frozen=True)
class ChatAsk:
    """What a client asks of one chat turn, as it travels from the caller to wherever the turn
    runs (the caller's process, a session store, a stateless ``pool.chat``)."""

    messages: Any
    n: int = 1
    sampling: Mapping[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    reasoning: ReasoningConfig | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    split: Split = "train"
    extends: str | None = None
    continue_final: bool = False


@dataclasses.dataclass
class Turn:
    """A turn's response and what to record once it succeeded."""

    response: Any
    segments: list[Segment]
    ambiguous: bool = False
    rerendered: bool = False


def render_key(tools: list[dict[str, Any]] | None, template_kwargs: Mapping[str, Any]) -> str:
    """The render options a sequence was rendered with (what changes its prompt's prefix)."""
    return json.dumps([tools or None, dict(template_kwargs)], sort_keys=True, default=str)


def _parent(match: Match, key: str | None, stale: Stale | None) -> tuple[Segment | None, dict[str, Any]]:
    """The segment a turn extends after the checks, and the flags its nodes carry."""
    flags: dict[str, Any] = {}
    parent = match.parent
    if parent is None:
        return None, flags
    if match.ambiguous:
        flags["ambiguous_parent"] = {"chosen": parent.node_id, "others": match.ambiguous, "rule": "earliest recorded"}
    if key is not None and parent.render_key != key:
        flags["rerendered"] = "the tools or chat-template kwargs differ from those the sequence was rendered with"
        return None, flags
    if stale is not None and stale(parent):
        flags["rerendered"] = "requeued: the sequence's sampled tokens are older than RouterConfig.max_staleness"
        return None, flags
    return parent, flags


def _metadata(result: GenerateResult, index: int, flags: Mapping[str, Any]) -> dict[str, Any]:
    c = result.choices[index]
    return {
        "finish_reason": c.finish_reason,
        "engine_id": result.engine_id,
        "weight_version": c.weight_version,
        "prompt_len": len(result.prompt_token_ids),
        "request_id": result.request_id,
        **flags,
    }


async def chat_turn(
    dispatcher: Dispatcher,
    renderer: ChatRenderer,
    ask: ChatAsk,
    *,
    tool_parser: str = "hermes",
    tree: SessionTree | None = None,
    model_name: str = "",
    stale: Stale | None = None,
) -> Turn:
    """Run one chat turn; with ``tree`` the prompt extends the sequence the messages continue."""
    # the unchanged history stands as recorded (checked once); only the new messages are checked
    walk = tree.exact_walk(ask.messages) if tree is not None and isinstance(ask.messages, list) else None
    msgs = validate_messages(ask.messages, walk.messages if walk is not None else ())
    sp = sampling_from(ask.n, ask.sampling or {})
    tools, tool_choice, continue_final = ask.tools, ask.tool_choice, ask.continue_final
    kwargs = template_kwargs_for(ask.reasoning, ask.chat_template_kwargs)
    key = render_key(tools, kwargs)
    # render: stored tokens + only the new suffix when a stored sequence is extended
    match = tree.match_chat(msgs, ask.extends, walk) if tree is not None else Match()
    parent, flags = _parent(match, key, stale)
    continuing = parent is not None and match.stored == len(msgs) and continue_final
    suffix_text, suffix_ids = "", list[int]()

    def render() -> np.ndarray:
        """The prompt (runs while the dispatcher's lease ask is at the router)."""
        nonlocal suffix_text, suffix_ids
        if continuing:
            assert parent is not None and tree is not None
            full = tree.tokens(parent)
            return full[: len(full) - 1] if parent.ended_with_eos else full
        if parent is not None:
            assert tree is not None
            suffix_text = renderer.suffix(
                msgs, match.stored, parent.ended_with_eos, tools=tools, template_kwargs=kwargs,
                continue_final=continue_final,
            )  # fmt: skip
            suffix_ids = renderer.encode(suffix_text)
            return np.concatenate([tree.tokens(parent), np.asarray(suffix_ids, np.int64)])
        suffix_text, suffix_ids = renderer.render(
            msgs, tools=tools, template_kwargs=kwargs, continue_final=continue_final
        )
        return np.asarray(suffix_ids, np.int64)

    # dispatch
    result = await dispatcher.submit(render, sp, ask.split, tree.session_id if tree is not None else None)
    # record
    choices: list[ChatChoice] = []
    segments: list[Segment] = []
    for i, c in enumerate(result.choices):
        sampled_text = renderer.decode(c.token_ids) if tree is not None else None  # recorded, and the reply's text
        text = completion_text(renderer, c, sampled_text)
        message, finish, problem = assistant_message(text, c, tools, tool_choice, tool_parser)
        extra: dict[str, Any] = {"tool_choice_problem": problem} if problem else {}
        if tree is not None:
            message.node_id = new_node_id()
            metadata = _metadata(result, i, flags)
            assert sampled_text is not None
            versions = c.weight_versions or [c.weight_version] * len(c.token_ids)
            if continuing:
                assert parent is not None
                reply = recorded_message(message)
                reply["content"] = (msgs[-1].get("content") or "") + (message.content or "")
                segments.append(
                    tree.continuation(
                        parent, c.token_ids, c.logprobs, versions, sampled_text,
                        eos_token_id=renderer.eos_token_id, eos_text=renderer.eos_text,
                        metadata=metadata, reply=reply, node_id=message.node_id,
                    )
                )  # fmt: skip
            else:
                new_messages = msgs[match.stored :] if parent is not None else msgs
                segments.append(
                    tree.new_segment(
                        parent, suffix_ids, suffix_text, c.token_ids, c.logprobs, versions, sampled_text,
                        eos_token_id=renderer.eos_token_id, metadata=metadata,
                        messages=[*new_messages, recorded_message(message)], render_key=key, node_id=message.node_id,
                    )
                )  # fmt: skip
        choices.append(
            ChatChoice(
                index=c.index,
                message=message,
                finish_reason=finish,
                logprobs=logprobs_json(renderer, c, sp.logprobs) if (ask.sampling or {}).get("logprobs") else None,
                token_ids=c.token_ids,
                token_logprobs=c.logprobs,
                **extra,
            )
        )
    completion = ChatCompletion(
        model=model_name,
        choices=choices,
        usage=usage_of(len(result.prompt_token_ids), result.num_generated_tokens),
        prompt_token_ids=result.prompt_token_ids,
        session_id=tree.session_id if tree is not None else None,
    )
    return Turn(completion, segments, bool(flags.get("ambiguous_parent")), "rerendered" in flags)


async def completion_turn(
    dispatcher: Dispatcher,
    renderer: ChatRenderer,
    prompt: Any,
    *,
    n: int = 1,
    sampling: Mapping[str, Any] | None = None,
    tree: SessionTree | None = None,
    split: Split = "train",
    model_name: str = "",
    stale: Stale | None = None,
    extends: str | None = None,
) -> Turn:
    """Run one completion turn; with ``tree`` the prompt extends the longest recorded text prefix."""
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: must be a non-empty string", field="prompt")
    sp = sampling_from(n, sampling or {})
    match = tree.match_text(prompt, extends) if tree is not None else Match()
    parent, flags = _parent(match, None, stale)
    suffix_text = prompt[match.stored :] if parent is not None else prompt
    suffix_ids = renderer.encode(suffix_text) if suffix_text else []
    base = tree.tokens(parent) if parent is not None and tree is not None else np.zeros(0, np.int64)
    full = np.concatenate([base, np.asarray(suffix_ids, np.int64)])
    if not len(full):
        raise RequestError("prompt: encodes to no tokens", field="prompt")
    result = await dispatcher.submit(full, sp, split, tree.session_id if tree is not None else None)
    choices: list[CompletionChoice] = []
    segments: list[Segment] = []
    for i, c in enumerate(result.choices):
        text = completion_text(renderer, c)
        node_id = None
        if tree is not None:
            node_id = new_node_id()
            versions = c.weight_versions or [c.weight_version] * len(c.token_ids)
            segments.append(
                tree.new_segment(
                    parent, suffix_ids, suffix_text, c.token_ids, c.logprobs, versions, renderer.decode(c.token_ids),
                    eos_token_id=renderer.eos_token_id, metadata=_metadata(result, i, flags),
                    match_text=prompt + text, node_id=node_id,
                )
            )  # fmt: skip
        choices.append(
            CompletionChoice(
                index=c.index,
                text=text,
                finish_reason=c.finish_reason,
                token_ids=c.token_ids,
                token_logprobs=c.logprobs,
                node_id=node_id,
            )
        )
    completion = Completion(
        model=model_name,
        choices=choices,
        usage=usage_of(len(result.prompt_token_ids), result.num_generated_tokens),
        prompt_token_ids=result.prompt_token_ids,
        session_id=tree.session_id if tree is not None else None,
    )
    return Turn(completion, segments, bool(flags.get("ambiguous_parent")), "rerendered" in flags)


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


async def placeholder_chat_turn(dispatcher: Dispatcher, ask: ChatAsk, *, tree: SessionTree) -> Turn:
    """A chat turn on a text-only engine (hosted API), recorded with placeholder tokens.

    The real text is kept (``full_text``, ``messages``); every position holds a placeholder
    id (-1 for prompt characters, -2 for sampled ones), nothing is trainable and the node's
    metadata says ``placeholder_tokens: True``. Not token-exact: never train on these ids.
    """
    msgs = validate_messages(ask.messages)
    match = tree.match_chat(msgs)
    parent = match.parent
    new_text = json.dumps(msgs[match.stored :] if parent is not None else msgs, ensure_ascii=False)
    out = await text_chat(
        dispatcher, msgs, ask.n, ask.tools, ask.tool_choice, ask.reasoning, ask.split, dict(ask.sampling or {})
    )
    segments = []
    for choice in out.choices:
        reply = choice.message.content or ""
        choice.message.node_id = new_node_id()
        seg = tree.new_segment(
            parent, [PLACEHOLDER_PROMPT_ID] * len(new_text), new_text,
            [PLACEHOLDER_SAMPLED_ID] * len(reply), [0.0] * len(reply), [None] * len(reply), reply,
            eos_token_id=None,
            metadata={"finish_reason": choice.finish_reason, "placeholder_tokens": True, "engine_id": "text-only"},
            messages=[*(msgs[match.stored :] if parent is not None else msgs), recorded_message(choice.message)],
            node_id=choice.message.node_id,
        )  # fmt: skip
        seg.trainable[:] = False
        seg.logprobs[:] = 1.0
        segments.append(seg)
    out.session_id = tree.session_id
    return Turn(out, segments)
