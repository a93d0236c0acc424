"""The engine side of weight updates: what an engine actor does when a trainer pushes weights.

:class:`WeightReceiver` is mixed into :class:`~inferpool.actors.engine.EngineActor`:

- ``update_weights``: the object-store path; chunks (ObjectRefs) fetched and loaded one at
  a time, so peak memory is one chunk.
- ``init_weight_transfer`` / ``start_weight_update`` / ``receive_weights`` /
  ``finish_weight_update``: the native path, vLLM's four-phase protocol, driven by the
  trainer side (:class:`inferpool.weights.trainer.PoolWeightSyncClient`).

Generation is paused for an update (``pause_mode``), so every sampled token's weight
version is exact; the prefix cache is reset with the new weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any

import ray

from inferpool.actors.backends.base import EngineBackend, PauseMode
from inferpool.metrics import MetricsRegistry
from inferpool.types import EngineStats

logger = logging.getLogger(__name__)


class WeightReceiver:
    """Weight-update calls of an engine actor (expects ``backend``, ``engine_id``, ``_stats``,
    ``metrics`` and ``_call`` from the actor)."""

    backend: EngineBackend
    engine_id: str
    _stats: EngineStats
    metrics: MetricsRegistry
    _native: dict[str, Any]
    _transfer_joined: bool

    async def _call(self, what: str, coro: Coroutine[Any, Any, Any]) -> Any:
        raise NotImplementedError

    async def update_weights(
        self,
        chunks: list[Any],
        version: int | str,
        pause_mode: PauseMode | None = "keep",
        version_index: int | None = None,
    ) -> dict[str, Any]:
        """Load new weights chunk by chunk (ObjectRefs fetched one at a time, so peak memory is
        one chunk), label them ``version``, reset the prefix cache. Generation is paused with
        ``pause_mode`` meanwhile, so each token's version is exact."""
        t0 = time.perf_counter()
        nbytes = loaded = 0
        if pause_mode is not None:
            await self.backend.pause(pause_mode)
        try:
            for chunk in chunks:
                named = await chunk if isinstance(chunk, ray.ObjectRef) else chunk
                pairs = list(named.items()) if isinstance(named, dict) else list(named)
                nbytes += sum(int(getattr(t, "nbytes", 0)) for _, t in pairs)
                loaded += await self.backend.load_weights(pairs)
                del named, pairs
            await self.backend.set_weight_version(version)
        finally:
            if pause_mode is not None:
                await self.backend.resume()
        return self._record_update(version, loaded, nbytes, t0, version_index)

    # -- native weight transfer (driven by inferpool.weights.trainer.PoolWeightSyncClient) -------
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's weight-transfer group at ``init_info['rank_offset']``."""
        await self._call("init_weight_transfer", self.backend.init_weight_transfer(init_info))
        self._transfer_joined = True

    def weight_transfer_joined(self) -> bool:
        """Whether this process joined a transfer group (False after a restart: the pool re-forms it)."""
        return self._transfer_joined

    async def start_weight_update(self, pause_mode: PauseMode | None = "keep") -> None:
        """Pause generation (so every token's version stays exact), then prepare to receive."""
        self._native = {"t0": time.perf_counter(), "paused": pause_mode is not None, "tensors": 0}
        if pause_mode is not None:
            await self.backend.pause(pause_mode)
        try:
            await self._call("start_weight_update", self.backend.start_weight_update())
        except BaseException:
            await self._end_native()
            raise

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Receive one round of tensors while the trainer broadcasts them."""
        try:
            n = int(await self._call("receive_weights", self.backend.receive_weights(update_info)))
        except BaseException:
            await self._end_native()
            raise
        self._native["tensors"] = self._native.get("tensors", 0) + n
        return n

    async def finish_weight_update(
        self, version: int | str, nbytes: int = 0, version_index: int | None = None
    ) -> dict[str, Any]:
        """Finalise, label the weights ``version``, reset the prefix cache, resume generation."""
        try:
            await self._call("finish_weight_update", self.backend.finish_weight_update(version))
        finally:
            state = await self._end_native()
        return self._record_update(version, int(state.get("tensors", 0)), nbytes, state.get("t0"), version_index)

    async def _end_native(self) -> dict[str, Any]:
        state, self._native = self._native, {}
        if state.get("paused"):
            await self.backend.resume()
        return state

    def _record_update(
        self, version: int | str, tensors: int, nbytes: int, t0: float | None, version_index: int | None = None
    ) -> dict[str, Any]:
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
        if version_index is not None:  # the update's position in the pool's history (0: the checkpoint)
            self.metrics.set("inferpool_weight_version", version_index, engine=self.engine_id)
        self._stats.weight_updates += 1
        self._stats.last_update_bytes = nbytes
        self._stats.last_update_s = seconds
        self.metrics.inc("inferpool_weight_updates_total", engine=self.engine_id)
        self.metrics.set("inferpool_weight_update_bytes", nbytes, engine=self.engine_id)
        self.metrics.set("inferpool_weight_update_seconds", seconds, engine=self.engine_id)
        logger.info(
            "engine %s: weights %s loaded (%d tensors, %d bytes) in %.3fs",
            *(self.engine_id, version, tensors, nbytes, seconds),
        )
        return {
            "engine_id": self.engine_id,
            "version": version,
            "tensors": tensors,
            "bytes": nbytes,
            "seconds": seconds,
        }
