"""Chat rendering with the tokenizer's chat template, and the seam between turns.

Only the new part of a turn is ever rendered and encoded. To find it, a short probe is
rendered: the system message (templates may carry it into later turns), a filler user
message where needed so the stored reply keeps its position's parity (templates that
check user/assistant alternation), the stored assistant reply with its content replaced
by a marker, then the new messages. What the template puts after the marker is exactly
the end-of-turn glue plus the new messages (and the generation prompt). The marker is
random per render and must occur exactly once, so no message text can forge it. Earlier
turns are never rendered again, so the cost of a turn does not grow with the
conversation, and templates that rewrite or drop earlier think blocks cannot change
tokens the engine already saw.

A conversation that ends with an assistant message gets a new assistant turn after it
(the generation prompt, as vLLM's chat API does by default), or, with
``continue_final_message=True``, a prompt that continues that message.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from inferpool.config import PoolConfig
from inferpool.errors import RequestError
from inferpool.hub import check_model_source

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_FILLER = {"role": "user", "content": "."}
_MARKERS = random.Random(int.from_bytes(os.urandom(16), "big"))  # unpredictable to message text


def validate_messages(messages: Any, known: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Check ``messages`` is a non-empty list of role/content dicts; returns plain dict copies.

    ``known``: checked copies equal to the first messages (a session's recorded ones, see
    :meth:`~inferpool.session_tree.SessionTree.exact_walk`); they stand for them, and
    only the messages after them are checked and copied."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise RequestError(
            f"messages: must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}",
            field="messages",
        )
    if not messages:
        raise RequestError("messages: the list is empty", field="messages")
    out = list(known)
    for i, msg in enumerate(messages[len(out) :], start=len(out)):
        if type(msg) is dict and type(msg.get("content")) is str and msg.get("role") in ROLES:
            out.append(dict(msg))  # the common case, checked without the general path's tests
            continue
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


_RENDERER_LOCK = threading.Lock()  # transformers' lazy imports are not thread-safe
_RENDERERS: dict[str, ChatRenderer] = {}


def load_renderer(config: PoolConfig) -> ChatRenderer:
    """The chat renderer of a pool's tokenizer (``EngineConfig.tokenizer``, else its model, else
    the embedded tiny model for in-process engines), loaded once per process; blocking."""
    group = config.engines[0]
    path, field = group.tokenizer, "EngineConfig.tokenizer"
    if path is None:
        path, field = group.model, "EngineConfig.model"
    if path is None and group.backend in ("vllm", "sglang"):
        from inferpool.tiny_model import tiny_model

        path = tiny_model()
    if path is None:
        raise RequestError(
            f"tokenizer: the {group.backend!r} engines have no tokenizer to render chat with; "
            "set EngineConfig.tokenizer (or model)",
            field="tokenizer",
        )
    with _RENDERER_LOCK:
        renderer = _RENDERERS.get(path)
        if renderer is None:
            check_model_source(path, field)
            renderer = _RENDERERS[path] = ChatRenderer.from_pretrained(path)
    return renderer


class ChatRenderer:
    """Renders messages with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # a fast tokenizer's Rust backend, called directly: transformers' encode goes through
        # encode_batch, whose thread pool costs more than the encoding of a short suffix
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token or ""

    @classmethod
    def from_pretrained(cls, path: str) -> ChatRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def template(
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
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        continue_final: bool = False,
    ) -> tuple[str, list[int]]:
        """A fresh prompt: the generation prompt, or with ``continue_final`` (the last message
        being the assistant's) a prompt that continues that message."""
        text = self.template(
            messages,
            add_generation_prompt=not self._continues(messages, continue_final),
            continue_final=self._continues(messages, continue_final),
            tools=tools,
            template_kwargs=template_kwargs,
        )
        return text, self.encode(text)

    @staticmethod
    def _continues(messages: Sequence[Mapping[str, Any]], continue_final: bool) -> bool:
        if continue_final and messages[-1].get("role") != "assistant":
            raise RequestError(
                "continue_final_message: the last message must be the assistant's to continue it",
                field="continue_final_message",
            )
        return continue_final

    def suffix(
        self,
        messages: list[dict[str, Any]],
        stored: int,
        ended_with_eos: bool,
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        continue_final: bool = False,
    ) -> str:
        """Text to append after a stored sequence whose messages are ``messages[:stored]``.

        ``messages[stored - 1]`` is the stored assistant turn. The result is the template's
        end-of-turn glue after it plus the rendering of ``messages[stored:]`` (and the
        generation prompt, or the continued last message with ``continue_final``). When the
        stored turn already ended with the EOS/end-of-turn token, the template's own
        end-of-turn is not added a second time. Cost: the new messages only.
        """
        if stored >= len(messages) and continue_final:
            raise RequestError(
                "continue_final_message: continuing the stored reply itself needs no rendering",
                field="continue_final_message",
            )
        marker = f"\u2063inferpool-{_MARKERS.getrandbits(96):024x}\u2063"
        head: list[dict[str, Any]] = []
        if stored > 1 and messages[0].get("role") in ("system", "developer"):
            head.append(messages[0])
        if len(head) % 2 != (stored - 1) % 2:
            head.append(_FILLER)
        probe = [*head, {"role": "assistant", "content": marker}, *messages[stored:]]
        text = self.template(
            probe,
            add_generation_prompt=not self._continues(probe, continue_final),
            continue_final=continue_final,
            tools=tools,
            template_kwargs=template_kwargs,
        )
        at = text.find(marker)
        if at < 0:
            raise RequestError("messages: the chat template dropped the previous assistant turn", field="messages")
        if text.find(marker, at + 1) >= 0:
            raise RequestError("messages: the chat template repeated the previous assistant turn", field="messages")
        tail = text[at + len(marker) :]
        if ended_with_eos and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text) :]
        return tail
