"""SessionStore actors: the managed sessions, sharded over a few actors by session id.

A store owns its sessions' token-exact history (one
:class:`~inferpool.session_tree.SessionTree` each) and runs their turns (render →
dispatch → record: :mod:`inferpool.turns` over the store's own
:class:`~inferpool.routing.dispatch.Dispatcher`), so HTTP ingress replicas and rollout
workers hold no state. Requests to one session are serialized by a per-session lock; a
turn's segments are recorded only after it succeeded. Idle sessions expire after the
TTL. Every call that may create a session does so idempotently (a session id names one
session however many calls race to create it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from inferpool.chat import ChatRenderer, load_renderer, validate_messages
from inferpool.config import PoolConfig
from inferpool.errors import InferpoolError, SessionError, SessionExpiredError, SessionNotFoundError
from inferpool.heap import freeze_heap
from inferpool.log import setup_logging
from inferpool.metrics import MetricsRegistry
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.reasoning import ReasoningConfig
from inferpool.replies import template_kwargs_for
from inferpool.routing.dispatch import Dispatcher
from inferpool.sequences import SessionOptions, SessionState
from inferpool.session_sync import SegmentWire, adopt, export
from inferpool.session_tree import SessionTree
from inferpool.staleness import staleness_check
from inferpool.turns import ChatAsk, Turn, chat_turn, completion_turn, placeholder_chat_turn, render_key
from inferpool.types import Split

logger = logging.getLogger(__name__)

_EXPIRED_MEMORY = 100_000


@dataclasses.dataclass
class _Entry:
    tree: SessionTree
    options: SessionOptions
    lock: asyncio.Lock
    last_used: float
    busy: int = 0


class SessionStore:
    """One shard of sessions."""

    def __init__(self, pool_config: PoolConfig, routers: Any, shard: int) -> None:
        """``routers``: the pool's router shards (a list; or the one router)."""
        setup_logging()
        self.shard = shard
        self.config = pool_config
        self.dispatcher = Dispatcher(routers, pool_config)
        self.router = self.dispatcher.router  # the primary: the weight-version ledger
        self._sessions: dict[str, _Entry] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._renderer: ChatRenderer | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.expired_total = 0
        self.ambiguous_total = 0  # turns whose parent the earliest-recorded rule chose
        self.rerendered_total = 0  # turns rendered fresh instead of extending their sequence
        self.metrics = MetricsRegistry()
        self.gc_frozen_objects = 0  # frozen out of this process's garbage collection (PoolConfig.gc_freeze)

    async def start(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())
            self._freeze_heap("started")

    def _freeze_heap(self, when: str) -> None:
        if self.config.gc_freeze != "off":
            self.gc_frozen_objects = freeze_heap(f"session store {self.shard} {when}")

    async def _renderer_ready(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = await asyncio.to_thread(load_renderer, self.config)
            self._freeze_heap("with its renderer")  # the tokenizer's import and its objects
        return self._renderer

    # -- lifetime ---------------------------------------------------------------------
    def _get(self, session_id: str, create: SessionOptions | None) -> _Entry:
        entry = self._sessions.get(session_id)
        if entry is not None:
            return entry
        if session_id in self._expired:
            raise SessionExpiredError(
                f"session {session_id} expired after {self.config.sessions.idle_ttl_s}s idle (SessionConfig.idle_ttl_s)"
            )
        if create is None:
            raise SessionNotFoundError(f"no session {session_id}")
        entry = _Entry(
            tree=SessionTree(session_id, track_tree=create.track_tree),
            options=create,
            lock=asyncio.Lock(),
            last_used=time.monotonic(),
        )
        self._sessions[session_id] = entry
        self.metrics.set("inferpool_sessions_open", len(self._sessions), shard=str(self.shard))
        return entry

    async def create(self, session_id: str, options: SessionOptions, exclusive: bool = False) -> None:
        """Create the session unless it exists (idempotent); ``exclusive`` refuses an id in use
        (an explicit create over HTTP naming its own id)."""
        if exclusive and session_id in self._sessions:
            raise SessionError(f"session {session_id} already exists")
        self._get(session_id, options)

    async def _reap_loop(self) -> None:
        ttl = self.config.sessions.idle_ttl_s
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.05), 30.0))
            self.expire_idle()

    def expire_idle(self, now: float | None = None) -> int:
        """Evict sessions idle longer than the TTL (never one with a turn in flight)."""
        now = time.monotonic() if now is None else now
        ttl = self.config.sessions.idle_ttl_s
        gone = [sid for sid, e in self._sessions.items() if e.busy == 0 and now - e.last_used > ttl]
        for sid in gone:
            del self._sessions[sid]
            self._expired[sid] = None
            self.expired_total += 1
        if gone:
            self.metrics.inc("inferpool_sessions_expired_total", len(gone), shard=str(self.shard))
            self.metrics.set("inferpool_sessions_open", len(self._sessions), shard=str(self.shard))
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)
        return len(gone)

    async def _run(
        self, session_id: str, create: SessionOptions | None, turn: Callable[[_Entry], Awaitable[Turn]]
    ) -> Any:
        """Run ``turn(entry)`` under the session's lock and record its segments only after it
        succeeded, so a failed turn changes nothing."""
        entry = self._get(session_id, create)
        entry.busy += 1
        try:
            async with entry.lock:  # one turn at a time per session
                entry.last_used = time.monotonic()
                done = await turn(entry)
                entry.tree.record(done.segments)
                self._count(entry, done.ambiguous, done.rerendered)
                return done.response
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()

    def _count(self, entry: _Entry, ambiguous: bool, rerendered: bool) -> None:
        if ambiguous:
            self.ambiguous_total += 1
            entry.tree.ambiguous_turns += 1
        if rerendered:
            self.rerendered_total += 1
            entry.tree.rerendered_turns += 1

    # -- placeholder mode (text-only engines) -----------------------------------------
    def _placeholders_allowed(self) -> bool:
        env = os.environ.get("INFERPOOL_ALLOW_PLACEHOLDER_TOKENS", "").strip().lower()
        return self.config.sessions.allow_placeholder_tokens or env in ("1", "true", "yes")

    def _check_placeholders(self) -> None:
        if not self._placeholders_allowed():
            raise SessionError(
                "sessions need token ids, but this pool's engines only return text (a hosted/OpenAI-style "
                "API): the session could not record what the model saw and sampled. Use pool.chat for "
                "stateless calls, or opt in to text with placeholder tokens (not trainable, not token-exact) "
                "with SessionConfig.allow_placeholder_tokens=True or INFERPOOL_ALLOW_PLACEHOLDER_TOKENS=1"
            )

    # -- turns ------------------------------------------------------------------------
    async def chat(self, session_id: str, create: SessionOptions | None, ask: ChatAsk) -> ChatCompletion:
        if await self.dispatcher.engines.text_only():
            self._check_placeholders()

            async def placeholder(entry: _Entry) -> Turn:
                return await placeholder_chat_turn(self.dispatcher, ask, tree=entry.tree)

            out: ChatCompletion = await self._run(session_id, create, placeholder)
            return out
        renderer = await self._renderer_ready()

        async def turn(entry: _Entry) -> Turn:
            return await chat_turn(
                self.dispatcher,
                renderer,
                ask,
                tool_parser=entry.options.tool_parser,
                tree=entry.tree,
                model_name=self.config.model_name(),
                stale=await staleness_check(self.router, self.config.router, entry.tree),
            )

        result: ChatCompletion = await self._run(session_id, create, turn)
        return result

    async def complete(
        self,
        session_id: str,
        create: SessionOptions | None,
        prompt: Any,
        n: int = 1,
        sampling: dict[str, Any] | None = None,
        split: Split = "train",
        extends: str | None = None,
    ) -> Completion:
        renderer = await self._renderer_ready()

        async def turn(entry: _Entry) -> Turn:
            return await completion_turn(
                self.dispatcher,
                renderer,
                prompt,
                n=n,
                sampling=sampling,
                tree=entry.tree,
                split=split,
                model_name=self.config.model_name(),
                stale=await staleness_check(self.router, self.config.router, entry.tree),
                extends=extends,
            )

        result: Completion = await self._run(session_id, create, turn)
        return result

    async def render(
        self,
        session_id: str,
        messages: Any,
        tools: list[dict[str, Any]] | None = None,
        reasoning: ReasoningConfig | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        create: SessionOptions | None = None,
        extends: str | None = None,
        continue_final: bool = False,
    ) -> dict[str, Any]:
        """The prompt text and token ids a chat call would send now, without generating."""
        renderer = await self._renderer_ready()
        entry = self._get(session_id, create)
        msgs = validate_messages(messages)
        kwargs = template_kwargs_for(reasoning, chat_template_kwargs)
        match = entry.tree.match_chat(msgs, extends)
        parent = match.parent
        if parent is None or parent.render_key != render_key(tools, kwargs):
            text, ids = renderer.render(msgs, tools=tools, template_kwargs=kwargs, continue_final=continue_final)
            return {"prompt_text": text, "prompt_token_ids": ids, "extends": None}
        node = entry.tree.node(parent)
        if match.stored == len(msgs) and continue_final:
            cut = 1 if parent.ended_with_eos else 0
            text = node.full_text.removesuffix(renderer.eos_text) if cut else node.full_text
            return {"prompt_text": text, "prompt_token_ids": node.tokens[: len(node) - cut], "extends": parent.node_id}
        suffix = renderer.suffix(
            msgs, match.stored, parent.ended_with_eos, tools=tools, template_kwargs=kwargs,
            continue_final=continue_final,
        )  # fmt: skip
        return {
            "prompt_text": node.full_text + suffix,
            "prompt_token_ids": node.tokens + renderer.encode(suffix),
            "extends": parent.node_id,
        }

    # -- state ------------------------------------------------------------------------
    async def abort(self, session_id: str, missing_ok: bool = False) -> int:
        """Abort the session's in-flight requests (its running turn ends with finish reason 'abort').
        Unknown or expired sessions raise, or count 0 with ``missing_ok``."""
        if missing_ok and session_id not in self._sessions:
            return 0
        self._get(session_id, None)
        return await self.dispatcher.abort_session(session_id)

    # -- turns run by the caller (SessionConfig.turns_in_caller) -----------------------------
    async def record_batch(
        self, items: list[tuple[str, SessionOptions | None, list[SegmentWire], bool, bool]]
    ) -> list[InferpoolError | None]:
        """Adopt turns callers ran: ``(session_id, create, segments, ambiguous, rerendered)`` each,
        checked (each segment extends a sequence the session holds, arrays aligned) and recorded
        as one turn; an item that fails gets its error, the others are recorded. An item without
        segments only creates the session (a new handle's first turn sends one as it starts)."""
        out: list[InferpoolError | None] = []
        for session_id, create, wires, ambiguous, rerendered in items:
            try:
                entry = self._get(session_id, create)
                if not wires:
                    out.append(None)
                    continue
                adopt(entry.tree, wires)
            except InferpoolError as exc:
                out.append(exc)
                continue
            entry.last_used = time.monotonic()
            self._count(entry, ambiguous, rerendered)
            out.append(None)
        return out

    async def export(
        self, session_id: str, create: SessionOptions | None = None
    ) -> tuple[bool, int, list[SegmentWire]]:
        """The session's history for a caller's mirror: (track_tree, turns, segments)."""
        entry = self._get(session_id, create)
        entry.last_used = time.monotonic()
        return entry.tree.track_tree, entry.tree.turns, export(entry.tree)

    async def get_state(self, session_id: str, create: SessionOptions | None = None) -> SessionState:
        entry = self._get(session_id, create)
        entry.last_used = time.monotonic()
        return entry.tree.state()

    async def reset(self, session_id: str, create: SessionOptions | None = None) -> None:
        entry = self._get(session_id, create)
        async with entry.lock:
            entry.tree.reset()

    async def close(self, session_id: str) -> bool:
        return (await self.close_batch([session_id]))[0]

    async def close_batch(self, session_ids: list[str]) -> list[bool]:
        """Forget these sessions (one call for the closes of one caller's event-loop turn);
        whether each was open."""
        closed = [self._sessions.pop(sid, None) is not None for sid in session_ids]
        self.metrics.set("inferpool_sessions_open", len(self._sessions), shard=str(self.shard))
        return closed

    def metrics_snapshot(self) -> dict[str, float]:
        return self.metrics.snapshot()

    def list_sessions(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "session_id": sid,
                "nodes": len(e.tree.visible()),
                "turns": e.tree.turns,
                "idle_s": round(now - e.last_used, 3),
                "busy": e.busy,  # turns running or waiting for the session's lock
                "track_tree": e.tree.track_tree,
                "ambiguous_turns": e.tree.ambiguous_turns,
                "rerendered_turns": e.tree.rerendered_turns,
                "shard": self.shard,
            }
            for sid, e in self._sessions.items()
        ]

    def counts(self) -> dict[str, int]:
        """Open and expired sessions, and the turns that did not extend their sequence as sent:
        ``ambiguous_turns`` (parent chosen by the earliest-recorded rule) and ``rerendered_turns``
        (rendered fresh: render options changed, or requeued as stale), and ``gc_frozen_objects``
        (frozen out of the store's garbage collection, ``PoolConfig.gc_freeze``)."""
        return {
            "open": len(self._sessions),
            "expired": self.expired_total,
            "ambiguous_turns": self.ambiguous_total,
            "rerendered_turns": self.rerendered_total,
            "gc_frozen_objects": self.gc_frozen_objects,
        }

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()


SessionStoreActor = ray.remote(num_cpus=0, max_restarts=0)(SessionStore)
