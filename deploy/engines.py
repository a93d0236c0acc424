"""Engines whose number Ray Serve's autoscaler controls.

Each replica of :class:`EngineReplica` owns one engine actor: the constructor creates it
(``engine_actor_class().options(...)``, owned by the replica, so it dies with it),
starts it and registers it with the pool's router under the id ``serve-<replica id>``.
From then on the pool routes to it like to any other engine; the payload path does
not pass through Serve. The replica reports the engine's in-flight requests as the
custom autoscaling metric (see :mod:`inferpool.deploy.autoscaling`).

When Serve stops a replica (scale-down, redeploy, shutdown) it calls the replica's
``__del__``: the engine is deregistered first (no new requests), in-flight requests
drain for up to ``drain_timeout_s``, then the engine is shut down and killed. A request
still running then fails with a retryable fault and the pool retries it on another
engine. Sessions are never on an engine: they live in the SessionStore actors, and a
session's next turn re-prefills its stored tokens on whichever engine it is routed to.

Serve's replica health check probes the engine; an engine that fails it makes Serve
replace the whole replica (and so the engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve

from inferpool.actors.engine import engine_actor_class, engine_actor_options
from inferpool.config import EngineConfig
from inferpool.log import setup_logging
from inferpool.ray_utils import await_ref
from inferpool.routing.shards import engine_shard, router_name
from inferpool.types import EngineInfo

from .autoscaling import METRIC, engine_autoscaling_config

logger = logging.getLogger(__name__)

_CONTROL_TIMEOUT_S = 30.0
DEPLOYMENT_NAME = "InferpoolEngine"


@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 0},
    autoscaling_config=engine_autoscaling_config(),
    graceful_shutdown_timeout_s=90,
    graceful_shutdown_wait_loop_s=0.5,
    health_check_period_s=10,
    health_check_timeout_s=60,
    max_ongoing_requests=64,
)
class EngineReplica:
    """One Serve replica = one engine actor registered with the pool's router."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        pool_name: str = "default",
        namespace: str = "inferpool",
        engine: dict[str, Any] | EngineConfig | None = None,
        group: int = 0,
        drain_timeout_s: float = 60.0,
    ) -> None:
        setup_logging()
        self.pool_name = pool_name
        self.namespace = namespace
        self.group = group
        self.drain_timeout_s = drain_timeout_s
        self._stopped = False
        self._engine: Any = None
        self.config: EngineConfig
        try:
            primary = ray.get_actor(router_name(pool_name), namespace=namespace)
        except ValueError:
            raise RuntimeError(f"no pool named {pool_name!r} in namespace {namespace!r}") from None
        pool_config = await await_ref(primary.get_pool_config.remote(), _CONTROL_TIMEOUT_S, "router")
        if engine is None:  # the pool's own description of this engine group
            self.config = pool_config.engines[group]
        else:
            self.config = engine if isinstance(engine, EngineConfig) else EngineConfig(**engine)
        self.engine_id: str = f"serve-{serve.get_replica_context().replica_id.unique_id}"
        self._gc_freeze: bool = pool_config.gc_freeze != "off"
        shard = engine_shard(self.engine_id, pool_config.router.shards)  # the router shard that owns it
        self._router: Any = primary if shard == 0 else ray.get_actor(router_name(pool_name, shard), namespace=namespace)
        self.info: EngineInfo = await self._start_engine()

    async def _start_engine(self) -> EngineInfo:
        cfg = self.config
        options = engine_actor_options(cfg, f"{self.pool_name}:engine:{self.engine_id}", self.namespace, False)
        self._engine = engine_actor_class().options(**options).remote(cfg, self.engine_id, gc_freeze=self._gc_freeze)
        try:
            info: EngineInfo = await await_ref(
                self._engine.start.remote(), cfg.start_timeout_s, f"engine {self.engine_id} start"
            )
            await await_ref(
                self._router.register.remote(
                    info, self._engine, cfg.max_requests_per_engine, cfg.eval_requests_per_engine, self.group
                ),
                _CONTROL_TIMEOUT_S,
                "router register",
            )
        except BaseException:
            ray.kill(self._engine)
            raise
        logger.info("serve replica registered engine %s with pool %r", self.engine_id, self.pool_name)
        return info

    # -- Serve hooks ---------------------------------------------------------------------
    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The custom autoscaling metric: requests in flight on this replica's engine."""
        stats = await await_ref(self._engine.stats.remote(), 5.0, f"engine {self.engine_id} stats")
        return {METRIC: float(stats.in_flight)}

    async def check_health(self) -> None:
        """Serve's replica health check: the engine must answer its cheap health probe."""
        await await_ref(self._engine.health.remote(), 30.0, f"engine {self.engine_id} health")

    async def __del__(self) -> None:
        """Deregister, drain (bounded), shut the engine down."""
        if self._stopped or self._engine is None:
            return
        self._stopped = True
        try:
            await await_ref(self._router.deregister.remote(self.engine_id), _CONTROL_TIMEOUT_S, "router deregister")
        except Exception:
            logger.warning("engine %s: deregister failed (router gone?)", self.engine_id, exc_info=True)
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            try:
                stats = await await_ref(self._engine.stats.remote(), 5.0, "engine stats")
            except Exception:
                break
            if stats.in_flight == 0:
                break
            await asyncio.sleep(0.1)
        try:
            await await_ref(self._engine.shutdown.remote(), 20.0, "engine shutdown")
        except Exception:
            logger.debug("engine %s did not shut down cleanly", self.engine_id, exc_info=True)
        ray.kill(self._engine)
        logger.info("serve replica stopped engine %s", self.engine_id)

    # -- introspection (through the deployment handle) ------------------------------------
    async def engine_info(self) -> dict[str, Any]:
        return {"engine_id": self.engine_id, "model": self.info.model, "backend": self.info.backend}


def engine_deployment_options(engine: EngineConfig, autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options for ``EngineReplica.options(...)``: the autoscaling config and, when the
    engine needs CPUs or GPUs, a placement group that reserves them with the replica,
    so Serve (and the cluster autoscaler) see what a new replica needs."""
    options: dict[str, Any] = {}
    if autoscaling is not None:
        options["autoscaling_config"] = engine_autoscaling_config(**autoscaling)
    cpus, gpus = engine.resolved_num_cpus(), engine.num_gpus
    if cpus or gpus:
        bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options
