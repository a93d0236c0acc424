"""Managed sessions, client side: the Session handle and its OpenAI-client adapter.

A Session is a cheap handle (an id and the store shard that owns it); the state lives
in a SessionStore actor. It works with ``async with pool.session() as s:`` and without
the context manager (``s = pool.session()``, then ``asyncio.run(s.chat(...))`` from a
synchronous Ray task). Every call carries the session's creation options, and the store
creates the session on the first call that reaches it (idempotently), so a handle stays
usable whatever its first call did: failed, raced with another, or was cancelled.
A handle made with ``existing=True`` never creates: an unknown id raises.
"""

from __future__ import annotations

import dataclasses
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ray

from inferpool.openai_types import ChatCompletion, Completion
from inferpool.ray_utils import await_ref
from inferpool.reasoning import ReasoningConfig
from inferpool.sequences import SessionOptions, SessionState
from inferpool.types import Split

if TYPE_CHECKING:
    from inferpool.pool import Pool

logger = logging.getLogger(__name__)


class Session:
    """A token-exact multi-turn session. Turns to one session are serialized."""

    def __init__(
        self, pool: Pool, session_id: str, store: Any, options: SessionOptions, *, existing: bool = False
    ) -> None:
        self.pool = pool
        self.session_id = session_id
        self._store = store
        self._options = options
        self._existing = existing  # never create: the session was made elsewhere

    def _create(self) -> SessionOptions | None:
        """The options a call sends so the store creates the session if it is new."""
        return None if self._existing else self._options

    async def _call(self, ref: ray.ObjectRef) -> Any:
        return await await_ref(ref, self.pool.session_timeout_s(), f"session {self.session_id}")

    async def chat(
        self,
        messages: list[dict[str, Any]],
        n: int = 1,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        reasoning: ReasoningConfig | None = None,
        skip_reasoning: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        split: Split = "train",
        extends: str | None = None,
        continue_final_message: bool = False,
        **sampling: Any,
    ) -> ChatCompletion:
        """One chat turn; returns an OpenAI-shaped ChatCompletion (plus token extras).

        The prompt extends the recorded sequence the messages continue: each returned
        assistant message carries the ``node_id`` of its sequence, and a message sent back
        with it names that sequence exactly (``extends=node_id`` does the same explicitly).
        A conversation ending with an assistant message gets a new assistant turn, or with
        ``continue_final_message=True`` a continuation of that message.
        """
        reasoning = self.pool.effective_reasoning(reasoning, skip_reasoning)
        out: ChatCompletion = await self._call(
            self._store.chat.remote(
                self.session_id,
                self._create(),
                messages,
                n,
                sampling,
                tools,
                tool_choice,
                reasoning,
                chat_template_kwargs,
                split,
                extends,
                continue_final_message,
            )
        )
        return out

    async def complete(
        self,
        prompt: str,
        n: int = 1,
        *,
        split: Split = "train",
        skip_reasoning: bool = False,
        extends: str | None = None,
        **sampling: Any,
    ) -> Completion:
        """One completion turn: extends the recorded completion whose prompt + text is the
        longest prefix of ``prompt`` (or exactly ``extends``, a choice's ``node_id``)."""
        out: Completion = await self._call(
            self._store.complete.remote(self.session_id, self._create(), prompt, n, sampling, split, extends)
        )
        return out

    async def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        reasoning: ReasoningConfig | None = None,
        skip_reasoning: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        extends: str | None = None,
        continue_final_message: bool = False,
    ) -> dict[str, Any]:
        """The prompt text and token ids a chat call would send now (nothing generated)."""
        reasoning = self.pool.effective_reasoning(reasoning, skip_reasoning)
        out: dict[str, Any] = await self._call(
            self._store.render.remote(
                self.session_id,
                messages,
                tools,
                reasoning,
                chat_template_kwargs,
                self._create(),
                extends,
                continue_final_message,
            )
        )
        return out

    async def state(self) -> SessionState:
        """The session's sequences (token ids, masks, logprobs, metadata)."""
        out: SessionState = await self._call(self._store.get_state.remote(self.session_id, self._create()))
        return out

    def state_ref(self) -> ray.ObjectRef:
        """An ObjectRef to the SessionState, fetchable with ray.get anywhere in the cluster
        (no wait here: usable from async code and during a running turn)."""
        return self._store.get_state.remote(self.session_id, self._create())

    async def abort(self) -> int:
        """Abort this session's in-flight requests: a running turn returns at once with finish
        reason ``abort`` and the tokens sampled so far, which the session records. Returns how
        many requests were aborted (0 when nothing was running)."""
        ref = self._store.abort.remote(self.session_id, missing_ok=not self._existing)
        return int(await await_ref(ref, self.pool.session_timeout_s(), f"session {self.session_id}"))

    async def reset(self) -> None:
        """Drop every stored sequence (the session stays open)."""
        await self._call(self._store.reset.remote(self.session_id, self._create()))

    async def close(self) -> None:
        """Forget the session and its state (idempotent)."""
        await self._call(self._store.close.remote(self.session_id))

    async def __aenter__(self) -> Session:
        if not self._existing:
            await self._call(self._store.create.remote(self.session_id, self._options))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def as_openai(self) -> OpenAIAdapter:
        """An object with async ``chat.completions.create`` / ``completions.create`` on this session."""
        return OpenAIAdapter(self)

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, pool={self.pool.name!r})"


@dataclasses.dataclass
class _ChatCompletions:
    session: Session

    async def create(self, *, messages: list[dict[str, Any]], model: str | None = None, n: int = 1, **kw: Any) -> Any:
        kw.pop("stream", None)
        return await self.session.chat(messages, n, **kw)


@dataclasses.dataclass
class _Chat:
    completions: _ChatCompletions


@dataclasses.dataclass
class _Completions:
    session: Session

    async def create(self, *, prompt: str, model: str | None = None, n: int = 1, **kw: Any) -> Any:
        kw.pop("stream", None)
        return await self.session.complete(prompt, n, **kw)


class OpenAIAdapter:
    """Agent code written against ``openai.AsyncOpenAI`` runs on a tracked session."""

    def __init__(self, session: Session) -> None:
        self.chat = _Chat(_ChatCompletions(session))
        self.completions = _Completions(session)
