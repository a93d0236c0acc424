"""Chat rendering with the tokenizer's chat template, and the seam between turns.

Only the new part of a turn is ever encoded. To find it, the messages are rendered
with the content of the last stored assistant message replaced by a sentinel: what
the template puts after the sentinel is exactly the end-of-turn glue plus the new
messages (and the generation prompt). Earlier turns are never rendered into the
prompt again, so templates that rewrite or drop earlier think blocks cannot change
tokens the engine already saw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from inferpool.errors import RequestError

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_SENTINEL = "\u2063\u2063inferpool-sentinel\u2063\u2063"


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` is a non-empty list of role/content dicts; returns plain dict copies."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise RequestError(
            f"messages: must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}",
            field="messages",
        )
    if not messages:
        raise RequestError("messages: the list is empty", field="messages")
    out = []
    for i, msg in enumerate(messages):
        if hasattr(msg, "model_dump"):
            msg = msg.model_dump(exclude_none=True)
        if not isinstance(msg, Mapping):
            raise RequestError(
                f"messages[{i}]: must be a dict with 'role' and 'content', got {type(msg).__name__}",
                field=f"messages[{i}]",
            )
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role: unknown role {role!r} (known: {sorted(ROLES)})",
                field=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
                content = "".join(str(p.get("text", "")) for p in content)
            else:
                raise RequestError(
                    f"messages[{i}].content: must be a string (or text parts), got {type(content).__name__}",
                    field=f"messages[{i}].content",
                )
        if content is None and not (role == "assistant" and msg.get("tool_calls")):
            raise RequestError(f"messages[{i}].content: missing", field=f"messages[{i}].content")
        clean = dict(msg)
        clean["content"] = content
        out.append(clean)
    return out


def message_key(msg: Mapping[str, Any]) -> str:
    """What identifies a message for prefix matching: role, content, tool calls, tool ids.

    Extra keys a client echoes back (``reasoning_content``, ``refusal``, ...) are ignored;
    tool calls compare by function name and arguments (and id when both sides have one).
    """
    calls = []
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        calls.append([fn.get("name"), args])
    return json.dumps(
        [msg.get("role"), msg.get("content") or "", calls, msg.get("tool_call_id"), msg.get("name")],
        sort_keys=True,
        default=str,
    )


class ChatRenderer:
    """Renders messages with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token or ""

    @classmethod
    def from_pretrained(cls, path: str) -> ChatRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def _template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final: bool = False,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final,
                **dict(template_kwargs or {}),
            )
        except Exception as exc:  # template errors are bad input (roles, tool shapes)
            raise RequestError(f"messages: the chat template cannot render them: {exc}", field="messages") from exc
        return str(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """A fresh prompt: generation prompt unless the last message is the assistant's."""
        last_is_assistant = messages[-1]["role"] == "assistant"
        text = self._template(
            messages,
            add_generation_prompt=not last_is_assistant,
            continue_final=last_is_assistant,
            tools=tools,
            template_kwargs=template_kwargs,
        )
        return text, self.encode(text)

    def suffix(
        self,
        messages: list[dict[str, Any]],
        stored: int,
        ended_with_eos: bool,
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Text to append after a stored sequence whose messages are ``messages[:stored]``.

        ``messages[stored - 1]`` is the stored assistant turn. The result is the template's
        end-of-turn glue after it plus the rendering of ``messages[stored:]`` (and the
        generation prompt). When the stored turn already ended with the EOS/end-of-turn
        token, the template's own end-of-turn is not added a second time.
        """
        probe = [dict(m) for m in messages]
        probe[stored - 1] = {"role": "assistant", "content": _SENTINEL}
        last_is_assistant = stored == len(messages) or messages[-1]["role"] == "assistant"
        text = self._template(
            probe,
            add_generation_prompt=not last_is_assistant,
            continue_final=last_is_assistant,
            tools=tools,
            template_kwargs=template_kwargs,
        )
        at = text.rfind(_SENTINEL)
        if at < 0:
            raise RequestError("messages: the chat template dropped the previous assistant turn", field="messages")
        tail = text[at + len(_SENTINEL) :]
        if ended_with_eos and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text) :]
        return tail
