"""The RL lifecycle of a pool's engines: weight pushes, pause and resume around them, sleep
and wake to hand the accelerator to a trainer, prefix-cache resets.

:class:`EngineLifecycle` is mixed into :class:`~inferpool.pool.Pool`: every call reaches all
engines through the fleet's broadcast (one bounded call each), weight pushes go through the
:class:`~inferpool.weights.push.WeightPusher`.
"""

from __future__ import annotations

from typing import Any

from inferpool.actors.backends.base import PauseMode
from inferpool.actors.fleet import Fleet
from inferpool.config import WeightTransferMethod
from inferpool.errors import RequestError
from inferpool.ray_utils import CONTROL_TIMEOUT_S
from inferpool.routing.dispatch import Dispatcher
from inferpool.weights.push import WeightPusher


class EngineLifecycle:
    """Lifecycle calls on every engine of a pool (expects the pool's fleet, dispatcher, pusher)."""

    fleet: Fleet
    dispatcher: Dispatcher
    _weights: WeightPusher

    async def update_weights(
        self,
        weights: Any,
        version: int | str | None = None,
        *,
        chunk_bytes: int = 256 << 20,
        pause_mode: PauseMode | None = "keep",
        timeout_s: float = 1800.0,
        method: WeightTransferMethod | None = None,
    ) -> dict[str, Any]:
        """Push new weights to every engine, by ``method`` (None: ``PoolConfig.weight_transfer.method``;
        ``"object_store"`` works on any pool, a native method only on a pool configured with it).

        ``weights``: a state dict, an iterable of ``(name, tensor)``, or an ObjectRef to
        either. Generation pauses with ``pause_mode`` during the load, so every sampled
        token's weight version is exact; the prefix cache is reset. See
        :mod:`inferpool.weights.push`. Returns bytes, seconds and per-engine reports.
        """
        return await self._weights.push(
            weights, version, chunk_bytes=chunk_bytes, pause_mode=pause_mode, timeout_s=timeout_s, method=method
        )

    async def pause(self, mode: PauseMode = "keep") -> None:
        """Pause every engine: ``abort`` in-flight requests (finish 'abort'), ``wait`` for them
        to drain, or ``keep`` them frozen until resume. New requests wait meanwhile."""
        if mode not in ("abort", "wait", "keep"):
            raise RequestError(f"mode: must be abort, wait or keep, got {mode!r}", field="mode")
        await self.fleet.broadcast("pause", lambda h: h.pause.remote(mode), self.dispatcher.engines.max_timeout())

    async def resume(self) -> None:
        await self.fleet.broadcast("resume", lambda h: h.resume.remote(), CONTROL_TIMEOUT_S)

    async def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (weights and KV cache at level 2; KV cache at level 1)."""
        await self.fleet.broadcast("sleep", lambda h: h.sleep.remote(level), CONTROL_TIMEOUT_S * 5)

    async def wake(self, tags: list[str] | None = None) -> None:
        await self.fleet.broadcast("wake", lambda h: h.wake.remote(tags), CONTROL_TIMEOUT_S * 5)

    async def reset_prefix_cache(self) -> None:
        await self.fleet.broadcast("reset_prefix_cache", lambda h: h.reset_prefix_cache.remote(), CONTROL_TIMEOUT_S)
