"""The router's health checks: periodic cheap probes of every engine (no generation), a
circuit that opens when an engine fails and closes when a probe passes again, engines that
Ray restarted brought back (backend started, the latest weights loaded), and, after the
router actor itself was restarted, the registry rebuilt from the pool's named actors.

:class:`HealthChecks` is mixed into :class:`~inferpool.routing.router.Router`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import ray

from inferpool.config import PoolConfig, RouterConfig
from inferpool.heap import freeze_heap
from inferpool.ray_utils import bounded
from inferpool.routing.policy import EngineSlot
from inferpool.routing.shards import engine_shard
from inferpool.routing.weight_ledger import WeightLedger
from inferpool.types import EngineInfo

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class EngineEntry:
    """The router's record of one engine."""

    slot: EngineSlot
    handle: Any
    info: EngineInfo
    group: int = 0
    failures: int = 0
    prefix_cache_hit_rate: float | None = None
    last_error: str = ""
    reloading: bool = False  # a probe is loading its backend (Ray restarted the actor)
    failed_at: float = 0.0  # monotonic time of the last failure reported or probed


def _as_future(ref: Any) -> Any:
    """An ObjectRef as an asyncio future (so wait_for can cancel the wait)."""
    if isinstance(ref, ray.ObjectRef):
        return asyncio.wrap_future(ref.future())
    return ref


class HealthChecks(WeightLedger):
    """Health probing of a router's engines (expects the router's registry attributes); an engine
    that (re)starts loads the ledger's latest weights."""

    config: RouterConfig
    pool_config: PoolConfig | None
    _engines: dict[str, EngineEntry]
    _stores: list[Any]
    _health_task: asyncio.Task[None] | None
    _loading: set[asyncio.Task[None]]  # engines found unstarted after a router restart, loading
    shard: int
    gc_frozen_objects: int = 0  # frozen out of this shard's garbage collection (PoolConfig.gc_freeze)

    async def _notify(self) -> None:
        raise NotImplementedError

    async def register(
        self, info: EngineInfo, handle: Any, capacity: int | None = None, eval_quota: int | None = None, group: int = 0
    ) -> None:
        raise NotImplementedError

    def _reap_expired_leases(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Start the background health checks (idempotent). After a restart of the router
        actor (Ray re-runs only the constructor) the first call also rebuilds the registry
        from the pool's named engine and session-store actors."""
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
            if not self._engines and self.pool_config is not None:
                await self._rediscover()
            if self.pool_config is not None and self.pool_config.gc_freeze != "off":
                self.gc_frozen_objects = freeze_heap(f"router shard {self.shard}")

    def frozen_objects(self) -> int:
        """Objects this shard froze out of its garbage collection (0 before start or with ``off``)."""
        return self.gc_frozen_objects

    async def _rediscover(self) -> None:
        assert self.pool_config is not None
        name, namespace = self.pool_config.name, self.pool_config.namespace
        actors = await bounded(
            asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True), self.config.health_timeout_s
        )
        engines, stores = [], []
        shards = self.config.shards
        for entry in actors:
            if entry.get("namespace") != namespace:
                continue
            actor_name = entry.get("name", "")
            if actor_name.startswith(f"{name}:engine:"):
                if engine_shard(actor_name.split(":engine:", 1)[1], shards) == self.shard:  # this shard's
                    engines.append(actor_name)
            elif actor_name.startswith(f"{name}:sessions:") and self.shard == 0:
                stores.append(actor_name)
        for actor_name in engines:
            try:
                handle = await asyncio.to_thread(ray.get_actor, actor_name, namespace)
                info = await bounded(_as_future(handle.get_info.remote()), self.config.health_timeout_s)
            except Exception:  # an engine that is gone or broken stays out
                logger.warning("router: could not re-register %s", actor_name, exc_info=True)
                continue
            if info is not None:
                await self.register(info, handle)
            else:  # Ray restarted it too and nobody loaded its backend: do that, then register it
                task = asyncio.ensure_future(self._load_and_register(actor_name, handle))
                self._loading.add(task)
                task.add_done_callback(self._loading.discard)
        if stores:
            ordered = sorted(stores, key=lambda n: int(n.rsplit(":", 1)[1]))
            self._stores = [await asyncio.to_thread(ray.get_actor, n, namespace) for n in ordered]
        logger.info("router: rebuilt registry with %d engines and %d session stores", len(self._engines), len(stores))

    async def _ensure_started(self) -> None:
        if self._health_task is None:
            await self.start()

    async def _probe(self, engine_id: str, engine: EngineEntry) -> None:
        if engine.reloading:  # another probe is loading its backend; that probe reports the outcome
            return
        began = time.monotonic()
        try:
            healthy = await bounded(_as_future(engine.handle.health.remote()), self.config.health_timeout_s)
            if healthy is False:  # the actor was restarted by Ray: load its backend again
                await self._reload(engine_id, engine)
                began = time.monotonic()  # loaded now: failures reported while it loaded are over
        except Exception as exc:  # any failure of the probe counts against the engine
            engine.failures += 1
            engine.failed_at = time.monotonic()
            engine.last_error = f"health check failed: {type(exc).__name__}: {exc}"[:300]
            if engine.slot.healthy and engine.failures >= self.config.unhealthy_after:
                logger.warning("router: engine %s unhealthy: %s", engine_id, engine.last_error)
                engine.slot.healthy = False
                await self._notify()
            return
        engine.failures = 0
        await self._read_engine_stats(engine)
        # a failure reported while this probe ran is newer than its verdict (the answer may come
        # from an actor that died since): the circuit stays open until a later probe passes
        if not engine.slot.healthy and engine.failed_at < began:
            logger.info("router: engine %s healthy again", engine_id)
            engine.slot.healthy = True
            engine.last_error = ""
            await self._notify()

    async def _reload(self, engine_id: str, engine: EngineEntry) -> None:
        """Start a restarted engine's backend and load the latest weights; it gets no traffic
        until that is done (a request routed there meanwhile would find no model)."""
        logger.info("router: engine %s restarted; starting its backend", engine_id)
        engine.reloading = True
        try:
            if engine.slot.healthy:
                engine.slot.healthy = False
                engine.last_error = "restarted by Ray; its backend is loading"
                await self._notify()
            await self._load(engine.handle)
        finally:
            engine.reloading = False

    async def _load(self, handle: Any) -> EngineInfo:
        """Start an engine's backend (a restarted actor has none) with the latest weights."""
        info: EngineInfo = await bounded(_as_future(handle.start.remote()), self.config.health_timeout_s * 30)
        latest = self.latest_weights()
        if latest is not None:  # serve the current weights, not the checkpoint's
            chunks, version = latest
            index = self.version_index(version)
            await bounded(
                _as_future(handle.update_weights.remote(chunks, version, None, index)),
                self.config.health_timeout_s * 30,
            )
        return info

    async def _load_and_register(self, actor_name: str, handle: Any) -> None:
        try:
            info = await self._load(handle)
        except Exception:  # an engine that cannot load stays out
            logger.warning("router: could not start and re-register %s", actor_name, exc_info=True)
            return
        await self.register(info, handle)

    async def _read_engine_stats(self, engine: EngineEntry) -> None:
        """Queue length and KV-cache use as the engine reports them (used to break ties)."""
        stats_method = getattr(engine.handle, "stats", None)
        if stats_method is None:
            return
        try:
            st = await bounded(_as_future(stats_method.remote()), self.config.health_timeout_s)
        except Exception:  # stats are advisory: a failure here does not make the engine unhealthy
            logger.debug("router: stats of %s unavailable", engine.info.engine_id, exc_info=True)
            return
        engine.slot.queue_len = int(getattr(st, "queue_len", 0) or 0)
        engine.slot.kv_cache_usage = getattr(st, "kv_cache_usage", None)
        engine.prefix_cache_hit_rate = getattr(st, "prefix_cache_hit_rate", None)

    async def check_health(self) -> dict[str, bool]:
        """Probe every engine once now; returns engine_id -> healthy."""
        await asyncio.gather(*(self._probe(eid, e) for eid, e in list(self._engines.items())))
        return {eid: e.slot.healthy for eid, e in self._engines.items()}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_health()
                self._reap_expired_leases()
            except Exception:  # the loop must survive anything a probe does
                logger.exception("router: health loop iteration failed")
