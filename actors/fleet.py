"""The fleet of one pool: its router, engine actors and session stores, placed, started,
scaled and stopped (the control plane; blocking calls with bounded waits).

Placement: each engine gets a placement group of its own (its CPUs and GPUs, STRICT_PACK),
or a bundle of a trainer's placement group when ``EngineConfig.placement_group`` is given
(colocation: the pool never removes that group). The router and the session stores
reserve no resources.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from inferpool.actors.engine import engine_actor_class, engine_actor_options
from inferpool.config import EngineConfig, PoolConfig
from inferpool.errors import ConfigError, InferpoolError, RequestError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref, get_ref
from inferpool.routing.router import RouterActor
from inferpool.types import EngineInfo

logger = logging.getLogger(__name__)



def router_name(name: str) -> str:
    return f"{name}:router"


def engine_name(name: str, engine_id: str) -> str:
    return f"{name}:engine:{engine_id}"


def store_name(name: str, shard: int) -> str:
    return f"{name}:sessions:{shard}"


def pg_name(namespace: str, name: str, engine_id: str) -> str:
    return f"{namespace}:{name}:pg:{engine_id}"


def find_router(name: str, namespace: str) -> Any:
    """The router actor of a running pool, or None."""
    try:
        return ray.get_actor(router_name(name), namespace=namespace)
    except ValueError:
        return None


class Fleet:
    """Placement and lifetime of one pool's actors."""

    def __init__(self, config: PoolConfig, router: Any) -> None:
        self.config = config
        self.router = router

    @classmethod
    def start_router(cls, config: PoolConfig) -> Fleet:
        """Create the pool's router actor (named, restarted by Ray when it dies) and start it."""
        router = RouterActor.options(
            name=router_name(config.name),
            namespace=config.namespace,
            lifetime="detached" if config.detached else None,
            max_concurrency=100_000,
        ).remote(config.router, config)
        fleet = cls(config, router)
        get_ref(router.start.remote(), CONTROL_TIMEOUT_S, "router start")
        return fleet

    # -- engines ------------------------------------------------------------------------
    def handles(self) -> dict[str, Any]:
        """engine_id -> actor handle, from the router."""
        out: dict[str, Any] = get_ref(self.router.engines.remote(), CONTROL_TIMEOUT_S, "router")
        return out

    def engine_handle(self, engine_id: str) -> Any:
        handles = self.handles()
        if engine_id not in handles:
            raise RequestError(f"engine_id: no engine {engine_id!r} in pool {self.config.name!r}", field="engine_id")
        return handles[engine_id]

    def start_engines(self, specs: list[tuple[str, int]]) -> dict[str, EngineInfo]:
        """Create, start and register engines ``(engine_id, group index)`` in parallel, each
        bounded by its group's start timeout; returns their infos."""
        actor_cls = engine_actor_class()
        started: list[tuple[str, int, EngineConfig, Any, ray.ObjectRef]] = []
        free_bundles: dict[int, list[int]] = {}
        for engine_id, g in specs:
            group = self.config.engines[g]
            options = engine_actor_options(
                group, engine_name(self.config.name, engine_id), self.config.namespace, self.config.detached
            )
            bundle_index: int | None = None
            if group.placement_group is not None:  # colocated: the trainer's placement group
                if g not in free_bundles:
                    free_bundles[g] = self._free_bundles(g, group)
                if not free_bundles[g]:
                    raise ConfigError(
                        f"EngineConfig.bundle_indices: every bundle of engine group {g} is taken "
                        f"({group.resolved_bundle_indices()}); list more bundles to scale further",
                        field="bundle_indices",
                    )
                bundle_index = free_bundles[g].pop(0)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=_given_placement_group(group),
                    placement_group_bundle_index=bundle_index,
                    placement_group_capture_child_tasks=True,
                )
            elif bundle := {k: v for k, v in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"])) if v}:
                pg = placement_group(
                    [bundle],
                    strategy="STRICT_PACK",
                    name=pg_name(self.config.namespace, self.config.name, engine_id),
                    lifetime="detached" if self.config.detached else None,
                )
                get_ref(pg.ready(), group.start_timeout_s, f"placement group for engine {engine_id}")
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                )
            handle = actor_cls.options(**options).remote(
                group, engine_id, None, self.config.weight_transfer.method, bundle_index
            )
            started.append((engine_id, g, group, handle, handle.start.remote()))
        latest = get_ref(self.router.latest_weights.remote(), CONTROL_TIMEOUT_S, "router") if started else None
        infos: dict[str, EngineInfo] = {}
        for engine_id, g, group, handle, ref in started:
            info = get_ref(ref, group.start_timeout_s, f"engine {engine_id} start")
            if latest is not None:  # a pool that already pushed weights: load them before serving
                chunks, version = latest
                index = get_ref(self.router.version_index.remote(version), CONTROL_TIMEOUT_S, "router")
                get_ref(handle.update_weights.remote(chunks, version, None, index), group.start_timeout_s, "weights")
            register = self.router.register.remote(
                info, handle, group.max_requests_per_engine, group.eval_requests_per_engine, g
            )
            get_ref(register, CONTROL_TIMEOUT_S, "router register")
            info.group = g
            infos[engine_id] = info
        return infos

    def _free_bundles(self, g: int, group: EngineConfig) -> list[int]:
        """Bundles of ``group``'s placement group not held by its running engines (a list may
        repeat a bundle that several engines share through fractional GPUs)."""
        infos = get_ref(self.router.engine_infos.remote(), CONTROL_TIMEOUT_S, "router")
        free = group.resolved_bundle_indices()
        for info in infos:
            if info.group == g and info.bundle_index in free:
                free.remove(info.bundle_index)
        return free

    def scale(self, replicas: int, group: int = 0, drain_timeout_s: float = 60.0) -> list[str]:
        """Set the replica count of an engine group; returns the engine ids now in the group."""
        if replicas < 1:
            raise RequestError(f"replicas: must be >= 1, got {replicas}", field="replicas")
        if not 0 <= group < len(self.config.engines):
            raise RequestError(f"group: no engine group {group}", field="group")
        groups = get_ref(self.router.engine_groups.remote(), CONTROL_TIMEOUT_S, "router")
        own = {eid: g for eid, g in groups.items() if eid[:1] == "e" and eid[1:].isdigit()}  # not Serve's
        mine = sorted((eid for eid, g in own.items() if g == group), key=lambda e: int(e[1:]))
        if replicas > len(mine):
            next_index = 1 + max((int(e[1:]) for e in own), default=-1)
            new = [(f"e{next_index + k}", group) for k in range(replicas - len(mine))]
            self.start_engines(new)
            return mine + [eid for eid, _ in new]
        for eid in mine[replicas:]:
            self.stop_engine(eid, drain_timeout_s)
        return mine[:replicas]

    def stop_engine(self, engine_id: str, drain_timeout_s: float) -> None:
        """Take an engine out of routing, let its requests drain (bounded), then stop it."""
        handle = self.engine_handle(engine_id)
        get_ref(self.router.deregister.remote(engine_id), CONTROL_TIMEOUT_S, "router")
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            try:
                st = get_ref(handle.stats.remote(), 10.0, "engine stats")
            except InferpoolError:
                break
            if st.in_flight == 0:
                break
            time.sleep(0.1)
        self.kill_engine(engine_id, handle)

    def kill_engine(self, engine_id: str, handle: Any) -> None:
        try:
            get_ref(handle.shutdown.remote(), 30.0, "engine shutdown")
        except Exception:
            logger.debug("engine %s did not shut down cleanly", engine_id, exc_info=True)
        ray.kill(handle)
        try:
            remove_placement_group(get_placement_group(pg_name(self.config.namespace, self.config.name, engine_id)))
        except Exception:  # no placement group (zero-resource engine) or already gone
            pass

    async def broadcast(self, what: str, call: Callable[[Any], Any], timeout_s: float) -> dict[str, Any]:
        """``call(handle)`` on every engine at once; engine_id -> result."""
        handles = await await_ref(self.router.engines.remote(), CONTROL_TIMEOUT_S, "router")
        outs = await asyncio.gather(
            *(await_ref(call(h), timeout_s, f"engine {eid} {what}") for eid, h in handles.items())
        )
        return dict(zip(handles, outs, strict=True))

    # -- session stores -----------------------------------------------------------------
    def start_stores(self) -> list[Any]:
        """Start the SessionStore shards (no CPUs reserved) and tell the router about them."""
        from inferpool.actors.session_store import SessionStoreActor

        stores = [
            SessionStoreActor.options(
                name=store_name(self.config.name, i),
                namespace=self.config.namespace,
                lifetime="detached" if self.config.detached else None,
                max_concurrency=100_000,
            ).remote(self.config, self.router, i)
            for i in range(self.config.sessions.shards)
        ]
        for store in stores:
            get_ref(store.start.remote(), CONTROL_TIMEOUT_S, "session store start")
        get_ref(self.router.set_stores.remote(stores), CONTROL_TIMEOUT_S, "router")
        return stores

    # -- the end ------------------------------------------------------------------------
    def shutdown(self, stores: list[Any], known: dict[str, Any]) -> None:
        """Stop every engine, the session stores and the router (the name can be reused)."""
        try:
            handles = self.handles()
        except Exception:
            handles = dict(known)
        try:
            self.router.shutdown.remote()
        except Exception:
            logger.debug("router already gone", exc_info=True)
        for store in stores:
            try:
                ray.kill(store)
            except Exception:
                logger.debug("session store already gone", exc_info=True)
        for eid, handle in handles.items():
            self.kill_engine(eid, handle)
        try:
            ray.kill(self.router)
        except Exception:
            logger.debug("router already gone", exc_info=True)


def _given_placement_group(group: EngineConfig) -> Any:
    """The trainer's placement group of ``group`` (looked up by name when given one), ready."""
    pg = group.placement_group
    if isinstance(pg, str):
        try:
            pg = get_placement_group(pg)
        except ValueError:
            raise ConfigError(
                f"EngineConfig.placement_group: no placement group named {group.placement_group!r}",
                field="placement_group",
            ) from None
    if not hasattr(pg, "bundle_count"):
        raise ConfigError(
            f"EngineConfig.placement_group: expected a Ray PlacementGroup or its name, got {type(pg).__name__}",
            field="placement_group",
        )
    bad = [i for i in group.resolved_bundle_indices() if i >= pg.bundle_count]
    if bad:
        raise ConfigError(
            f"EngineConfig.bundle_indices: {bad} out of range; the placement group has {pg.bundle_count} bundles",
            field="bundle_indices",
        )
    get_ref(pg.ready(), group.start_timeout_s, "the given placement group")
    return pg
