"""What the HTTP routes do, without HTTP: a lazily connected Pool client.

The gateway holds no session state: sessions live in the pool's SessionStore actors,
and every call here addresses them by id, so any ingress replica can serve any
session's next turn (Serve may add or remove ingress replicas at will).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from inferpool.errors import ConfigError, NoHealthyEngineError, RequestError, SessionNotFoundError
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.ray_utils import await_ref

from .schemas import (
    SESSION_ID_PATTERN,
    ChatCompletionRequest,
    CompletionRequest,
    RenderRequest,
    SessionCreateRequest,
)

if TYPE_CHECKING:
    from inferpool.pool import Pool
    from inferpool.session import Session

logger = logging.getLogger(__name__)

_CONTROL_TIMEOUT_S = 30.0
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def _stateless(extends: str | None) -> None:
    if extends is not None:
        raise RequestError("extends: only session routes extend a recorded sequence", field="extends")


class PoolGateway:
    """One pool, addressed by name (connected on first use) or given directly."""

    def __init__(
        self,
        pool_name: str = "default",
        namespace: str = "inferpool",
        *,
        pool: Pool | None = None,
        connect_timeout_s: float = 30.0,
        info_ttl_s: float = 10.0,
    ) -> None:
        self.pool_name = pool.name if pool is not None else pool_name
        self.namespace = pool.namespace if pool is not None else namespace
        self._pool = pool
        self._lock = asyncio.Lock()
        self._connect_timeout_s = connect_timeout_s
        self._info_ttl_s = info_ttl_s
        self._context: tuple[float, int | None] = (0.0, None)  # (fetched at, smallest max_model_len)

    # -- the pool -------------------------------------------------------------------------
    async def pool(self) -> Pool:
        """The pool client, connected on first use (a failed connect is retried next call)."""
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                from inferpool.pool import Pool

                try:
                    self._pool = await asyncio.wait_for(
                        asyncio.to_thread(Pool.connect, self.pool_name, self.namespace, self._connect_timeout_s),
                        self._connect_timeout_s + 5,
                    )
                except (ConfigError, asyncio.TimeoutError) as exc:
                    raise NoHealthyEngineError(
                        f"pool {self.pool_name!r} (namespace {self.namespace!r}) is not reachable: {exc}"
                    ) from None
                logger.info("ingress connected to pool %r", self.pool_name)
        return self._pool

    @staticmethod
    def _stores(pool: Pool) -> list[Any]:
        return pool.session_stores()

    async def _max_context(self, pool: Pool) -> int | None:
        """Smallest context length over the registered engines (cached for a few seconds)."""
        fetched, ctx = self._context
        if time.monotonic() - fetched < self._info_ttl_s and ctx is not None:
            return ctx
        infos = await pool.routers.aengine_infos()
        ctx = min((i.max_model_len for i in infos), default=None)
        self._context = (time.monotonic(), ctx)
        return ctx

    async def _check_budget(self, pool: Pool, max_tokens: int | None) -> None:
        if max_tokens is None:
            return
        ctx = await self._max_context(pool)
        if ctx is not None and max_tokens >= ctx:
            raise RequestError(
                f"max_tokens: {max_tokens} does not fit the model's context of {ctx} tokens", field="max_tokens"
            )

    # -- status -----------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """Raises NoHealthyEngineError unless the router answers and an engine is healthy."""
        pool = await self.pool()
        load = {eid: e for part in await pool.routers.agather("load") for eid, e in part.items()}
        healthy = sorted(eid for eid, e in load.items() if e.get("healthy"))
        if not healthy:
            raise NoHealthyEngineError(f"pool {self.pool_name!r} has no healthy engine ({len(load)} registered)")
        return {"status": "ok", "pool": self.pool_name, "engines": len(load), "healthy_engines": len(healthy)}

    async def models(self) -> dict[str, Any]:
        pool = await self.pool()
        infos = await pool.routers.aengine_infos()
        name = pool.model_name()
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "inferpool",
                    "max_model_len": min((i.max_model_len for i in infos), default=None),
                    "engines": len(infos),
                }
            ],
        }

    # -- generation ---------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, session_id: str | None = None) -> ChatCompletion:
        """A chat completion: stateless, or one turn of a managed session."""
        if req.parallel_tool_calls is False:
            raise RequestError(
                "parallel_tool_calls: false is not supported (every parsed call is returned)",
                field="parallel_tool_calls",
            )
        pool = await self.pool()
        await self._check_budget(pool, req.budget())
        kwargs: dict[str, Any] = dict(
            tools=req.tool_dicts(),
            tool_choice=req.tool_choice_value(),
            reasoning=req.reasoning_config(),
            skip_reasoning=req.skip_reasoning,
            chat_template_kwargs=req.chat_template_kwargs,
            continue_final_message=req.continue_final_message,
            split=req.split,
            **req.sampling(),
        )
        if session_id is None:
            _stateless(req.extends)
            return await pool.chat(req.message_dicts(), req.n, **kwargs)
        return await self._session(pool, session_id).chat(req.message_dicts(), req.n, extends=req.extends, **kwargs)

    async def complete(self, req: CompletionRequest, session_id: str | None = None) -> Completion:
        """A text completion: stateless, or one turn of a managed session."""
        pool = await self.pool()
        await self._check_budget(pool, req.budget())
        kwargs: dict[str, Any] = dict(split=req.split, skip_reasoning=req.skip_reasoning, **req.sampling())
        if session_id is None:
            _stateless(req.extends)
            return await pool.complete(req.prompt, req.n, **kwargs)
        return await self._session(pool, session_id).complete(req.prompt, req.n, extends=req.extends, **kwargs)

    # -- sessions ----------------------------------------------------------------------------
    @staticmethod
    def check_session_id(session_id: str) -> str:
        if not _SESSION_ID.match(session_id):
            raise SessionNotFoundError(f"no session {session_id[:80]!r} (session ids are hex strings)")
        return session_id

    def _session(self, pool: Pool, session_id: str) -> Session:
        """A handle on an existing session (its store raises SessionNotFoundError if there is none)."""
        return pool.session(session_id=self.check_session_id(session_id), existing=True)

    async def create_session(self, req: SessionCreateRequest) -> str:
        from inferpool.reasoning import get_tool_parser
        from inferpool.sequences import SessionOptions, new_session_id

        get_tool_parser(req.tool_parser)  # unknown parser: ConfigError (400) now, not on the first turn
        pool = await self.pool()
        sid = req.session_id or new_session_id()
        options = SessionOptions(track_tree=req.track_tree, tool_parser=req.tool_parser)
        create = pool.session_store(sid).create.remote(sid, options, exclusive=True)
        await await_ref(create, _CONTROL_TIMEOUT_S, "session store")
        return sid

    async def list_sessions(self) -> list[dict[str, Any]]:
        pool = await self.pool()
        lists = await asyncio.gather(
            *(await_ref(s.list_sessions.remote(), _CONTROL_TIMEOUT_S, "session store") for s in self._stores(pool))
        )
        return [row for rows in lists for row in rows]

    async def render(self, session_id: str, req: RenderRequest) -> dict[str, Any]:
        pool = await self.pool()
        return await self._session(pool, session_id).render(
            req.message_dicts(),
            tools=req.tool_dicts(),
            reasoning=req.reasoning_config(),
            skip_reasoning=req.skip_reasoning,
            chat_template_kwargs=req.chat_template_kwargs,
            extends=req.extends,
            continue_final_message=req.continue_final_message,
        )

    async def nodes(self, session_id: str) -> dict[str, Any]:
        pool = await self.pool()
        state = await self._session(pool, session_id).state()
        return state.to_dict()

    async def reset(self, session_id: str) -> None:
        pool = await self.pool()
        await self._session(pool, session_id).reset()

    async def abort(self, session_id: str) -> int:
        pool = await self.pool()
        return await self._session(pool, session_id).abort()

    async def delete(self, session_id: str) -> None:
        pool = await self.pool()
        sid = self.check_session_id(session_id)
        closed = await await_ref(pool.session_store(sid).close.remote(sid), _CONTROL_TIMEOUT_S, "session store")
        if not closed:
            raise SessionNotFoundError(f"no session {sid}")
