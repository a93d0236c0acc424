"""Managed sessions, client side: the Session handle and its OpenAI-client adapter.

A Session is a cheap handle (an id and the store shard that owns it); the state lives
in a SessionStore actor. It works with ``async with pool.session() as s:`` and without
the context manager (``s = pool.session()``, then ``asyncio.run(s.chat(...))`` from a
synchronous Ray task). Every call carries the session's creation options, and the store
creates the session on the first call that reaches it (idempotently), so a handle stays
usable whatever its first call did: failed, raced with another, or was cancelled.
A handle made with ``existing=True`` never creates: an unknown id raises.

Where a turn runs (``SessionConfig.turns_in_caller``): a handle made by ``pool.session()``
runs its turns here, in the caller's process — it keeps a mirror of the session's history
(fetched from the store on first use), renders only the new messages, dispatches through
the pool's own :class:`~inferpool.routing.dispatch.Dispatcher`, and sends the store what
each turn added, where it is checked and recorded (records of concurrent sessions travel
together, one call per event-loop turn). The store stays the owner: ``state()`` and
``state_ref()`` read it. Handles on existing sessions run their turns in the store.
Use one handle per session per process: turns of a handle are serialized, two handles in
one process would each keep their own mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ray
from ray import exceptions as rex

from inferpool.errors import EngineDeadError, SessionError
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.ray_utils import await_ref
from inferpool.reasoning import ReasoningConfig
from inferpool.routing.batching import LoopLocal
from inferpool.sequences import SessionOptions, SessionState, shard_of
from inferpool.session_sync import rebuild, to_wire
from inferpool.session_tree import SessionTree
from inferpool.staleness import staleness_check
from inferpool.turns import ChatAsk, Stale, Turn, chat_turn, completion_turn
from inferpool.types import Split

if TYPE_CHECKING:
    from inferpool.pool import Pool

logger = logging.getLogger(__name__)


class Session:
    """A token-exact multi-turn session. Turns to one session are serialized."""

    def __init__(
        self,
        pool: Pool,
        session_id: str,
        store: Any,
        options: SessionOptions,
        *,
        existing: bool = False,
        fresh: bool = False,
    ) -> None:
        """``fresh``: ``session_id`` was made for this handle, so no store holds it yet."""
        self.pool = pool
        self.session_id = session_id
        self._store = store
        self._options = options
        self._existing = existing  # never create: the session was made elsewhere
        self._local = not existing and pool.config.sessions.turns_in_caller
        self._mirror: SessionTree | None = None  # turns run here: the session's history, as the store has it
        # a new id: the first turn starts from an empty mirror without waiting for the store (an
        # empty record, sent along, creates the session there); later a lost mirror is fetched again
        self._fresh = fresh and self._local
        self._lock: LoopLocal[asyncio.Lock] = LoopLocal(asyncio.Lock)
        self.busy = 0  # turns of this handle running here or waiting for its lock

    async def _here(self) -> bool:
        """Whether this call's turn runs in this process (text-only engines: in the store)."""
        return self._local and not await self.pool.dispatcher.engines.text_only()

    async def _run_here(self, run: Callable[[SessionTree, Stale | None], Awaitable[Turn]]) -> Any:
        """A turn in this process: under this handle's lock, on the mirror; the store checks
        and records what it added before the mirror does (a failed turn changes nothing)."""
        self.busy += 1
        try:
            return await self._locked(run)
        finally:
            self.busy -= 1

    async def _locked(self, run: Callable[[SessionTree, Stale | None], Awaitable[Turn]]) -> Any:
        async with self._lock.get():
            if self._mirror is None and self._fresh:  # the store creates it meanwhile (no wait)
                self._mirror = SessionTree(self.session_id, self._options.track_tree)
                self.pool.session_recorder(self.session_id).enqueue((self.session_id, self._create(), [], False, False))
            elif self._mirror is None:
                track, turns, wires = await self._call(self._store.export.remote(self.session_id, self._create()))
                self._mirror = rebuild(self.session_id, track, turns, wires)
            self._fresh = False
            tree = self._mirror
            # the turn's lease give-back is confirmed together with its record (one wait, not two)
            async with self.pool.dispatcher.confirm_releases_at_end():
                done = await run(tree, await staleness_check(self.pool.router, self.pool.config.router, tree))
                # the store checks and records what the turn added (records of concurrent turns
                # travel together) before the mirror does, so a turn the store refuses changes nothing
                wires = [to_wire(tree, seg) for seg in done.segments]
                record = (self.session_id, self._create(), wires, done.ambiguous, done.rerendered)
                try:
                    with self._store_errors():
                        await self.pool.session_recorder(self.session_id).submit(record)
                except BaseException:
                    self._mirror = None  # the store may hold more or less than the mirror now: fetch it again
                    raise
            tree.record(done.segments)
            return done.response

    async def _renderer(self) -> Any:
        if self.pool._renderer is not None:
            return self.pool._renderer
        return await asyncio.to_thread(self.pool.renderer)

    def _create(self) -> SessionOptions | None:
        """The options a call sends so the store creates the session if it is new."""
        return None if self._existing else self._options

    async def _call(self, ref: ray.ObjectRef) -> Any:
        with self._store_errors():
            return await await_ref(ref, self.pool.session_timeout_s(), f"session {self.session_id}")

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """A store call whose actor died raises a SessionError naming the shard."""
        try:
            yield
        except EngineDeadError as exc:
            lost = self._store_lost(exc)
            if lost is None:
                raise
            raise lost from exc

    def _store_lost(self, exc: EngineDeadError) -> SessionError | None:
        """A store call's actor death as a SessionError naming the shard (stores are not restarted:
        the session's state went with it); None for an engine's death inside a store turn."""
        cause = exc.__cause__
        if not isinstance(cause, rex.RayActorError):
            return None
        shard = shard_of(self.session_id, len(self.pool.session_stores()))
        reason = " ".join(str(cause).split())[:300]
        where = f"session {self.session_id}: session store shard {shard} of pool {self.pool.name!r}"
        if isinstance(cause, rex.ActorUnavailableError):  # not (yet) known to be dead
            what = "is unreachable; if its node was lost, the session's state, which lived only there, is lost"
        else:
            node = " (its node was lost)" if "node" in reason.lower() and "died" in reason.lower() else ""
            what = f"is gone{node}; the session's state lived only there and is lost"
        return SessionError(f"{where} {what}. Ray: {reason}", field="session_id")

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
        ask = ChatAsk(
            messages, n, sampling, tools, tool_choice, reasoning, chat_template_kwargs, split, extends,
            continue_final_message,
        )  # fmt: skip
        if await self._here():
            renderer = await self._renderer()

            async def run(tree: SessionTree, stale: Stale | None) -> Turn:
                return await chat_turn(
                    self.pool.dispatcher,
                    renderer,
                    ask,
                    tool_parser=self._options.tool_parser,
                    tree=tree,
                    model_name=self.pool.model_name(),
                    stale=stale,
                )

            local: ChatCompletion = await self._run_here(run)
            return local
        out: ChatCompletion = await self._call(self._store.chat.remote(self.session_id, self._create(), ask))
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
        if await self._here():
            renderer = await self._renderer()

            async def run(tree: SessionTree, stale: Stale | None) -> Turn:
                return await completion_turn(
                    self.pool.dispatcher,
                    renderer,
                    prompt,
                    n=n,
                    sampling=sampling,
                    tree=tree,
                    split=split,
                    model_name=self.pool.model_name(),
                    stale=stale,
                    extends=extends,
                )

            local: Completion = await self._run_here(run)
            return local
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
        runs_here = self.pool.dispatcher.runs_session(self.session_id)
        here = await self.pool.dispatcher.abort_session(self.session_id)  # turns run in this process
        ref = self._store.abort.remote(self.session_id, missing_ok=not self._existing)
        count = here + int(await self._call(ref))
        if not runs_here:  # another process (the one that made the session) may run its turns
            count += await self.pool._abort_on_engines(self.session_id)
        return count

    async def reset(self) -> None:
        """Drop every stored sequence (the session stays open)."""
        await self._call(self._store.reset.remote(self.session_id, self._create()))
        self._mirror = None

    async def close(self) -> None:
        """Forget the session and its state (idempotent). Closes of concurrent sessions travel
        together, one call per store and event-loop turn."""
        with self._store_errors():
            await self.pool.session_recorder(self.session_id, "close_batch").submit(self.session_id)
        self._mirror = None

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
