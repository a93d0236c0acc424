"""What a process knows of a pool's engines: their actor handles and static facts, read
from the router on demand (refreshed when an engine it has not seen is named), and what
follows from them: the vocabulary and context every engine accepts, whether the engines
return text only, each engine's request timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from inferpool.config import PoolConfig
from inferpool.errors import EngineError
from inferpool.routing.shards import RouterSet
from inferpool.types import EngineInfo


class EngineView:
    """One process's view of the engine registry (see the module docstring)."""

    def __init__(self, routers: RouterSet, config: PoolConfig, infos: Sequence[EngineInfo] = ()) -> None:
        self.routers = routers
        self.config = config
        self._handles: dict[str, Any] = {}
        self._infos: dict[str, EngineInfo] = {i.engine_id: i for i in infos}

    async def refresh(self) -> None:
        """Re-read the engine registry (handles and static facts) from the router."""
        infos, handles = await asyncio.gather(self.routers.aengine_infos(), self.routers.aengines())
        self._infos = {i.engine_id: i for i in infos}
        self._handles = dict(handles)

    def set_infos(self, infos: Iterable[EngineInfo]) -> None:
        """Replace what this process knows of the engines (after a start or scale)."""
        self._infos = {i.engine_id: i for i in infos}

    def known_infos(self) -> dict[str, EngineInfo]:
        """The engines this process knows of, without asking the router."""
        return dict(self._infos)

    def known_handles(self) -> dict[str, Any]:
        return dict(self._handles)

    async def engine_infos(self) -> dict[str, EngineInfo]:
        if not self._infos:
            await self.refresh()
        return self._infos

    async def handles(self) -> dict[str, Any]:
        """Every engine's actor handle, fresh from the router."""
        await self.refresh()
        return dict(self._handles)

    async def handle(self, engine_id: str) -> Any:
        handle = self._handles.get(engine_id)
        if handle is None:
            await self.refresh()
            handle = self._handles.get(engine_id)
            if handle is None:
                raise EngineError(f"engine {engine_id} is not registered")
        return handle

    async def limits(self) -> tuple[int, int]:
        """(vocabulary size, context length) every engine of the pool accepts."""
        infos = await self.engine_infos()
        if not infos:
            return (1 << 62, 1 << 62)
        return min(i.vocab_size for i in infos.values()), min(i.max_model_len for i in infos.values())

    async def text_only(self) -> bool:
        """Whether the pool's engines return text only (hosted APIs: no token ids)."""
        infos = await self.engine_infos()
        return bool(infos) and not all(i.supports_tokens for i in infos.values())

    def timeout_for(self, engine_id: str) -> float:
        """The request timeout of the engine's group."""
        info = self._infos.get(engine_id)
        groups = self.config.engines
        if info is not None and 0 <= info.group < len(groups):
            return groups[info.group].request_timeout_s
        return max(g.request_timeout_s for g in groups)

    def max_timeout(self) -> float:
        return max(g.request_timeout_s for g in self.config.engines)
