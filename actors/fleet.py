"""The fleet of one pool: its router, engine actors and session stores, placed, started,
scaled and stopped (the control plane; blocking calls with bounded waits).

Placement: each engine gets a placement group of its own (its CPUs and GPUs, STRICT_PACK),
or a bundle of a trainer's placement group when ``EngineConfig.placement_group`` is given
(colocation: the pool never removes that group); new engines the cluster has too few GPUs
for are refused before any placement group is made. The router and the session stores
reserve no resources and go where ``PoolConfig.placement`` says (by default on nodes
without GPUs): see :mod:`.placement`.

Node loss: an engine on a lost node is restarted by Ray (``EngineConfig.max_restarts``)
once its placement group fits again, i.e. when a node with a free GPU joins; the router's
health probe then starts its backend and routes to it again (meanwhile calls to every
engine skip it). A router restarts on another node (its node choice is a preference);
session stores are not restarted.
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
from inferpool.actors.placement import actor_place, control_options, gpu_shortage
from inferpool.config import EngineConfig, PoolConfig
from inferpool.errors import ConfigError, EngineTimeoutError, InferpoolError, RequestError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref, get_ref
from inferpool.routing.router import RouterActor
from inferpool.routing.shards import RouterSet, router_name
from inferpool.types import EngineInfo

logger = logging.getLogger(__name__)

_SHUTDOWN_GRACE_S = 30.0  # how long stopping engines may take to shut their backends down, all together


def engine_name(name: str, engine_id: str) -> str:
    return f"{name}:engine:{engine_id}"


def store_name(name: str, shard: int) -> str:
    return f"{name}:sessions:{shard}"


def pg_name(namespace: str, name: str, engine_id: str) -> str:
    return f"{namespace}:{name}:pg:{engine_id}"


def find_router(name: str, namespace: str, shard: int = 0) -> Any:
    """A router shard of a running pool (the primary by default), or None."""
    try:
        return ray.get_actor(router_name(name, shard), namespace=namespace)
    except ValueError:
        return None


def find_routers(config: PoolConfig) -> RouterSet:
    """Every router shard of a running pool whose config is ``config`` (from its primary)."""
    routers = [find_router(config.name, config.namespace, i) for i in range(config.router.shards)]
    missing = [i for i, r in enumerate(routers) if r is None]
    if missing:
        raise ConfigError(
            f"name: pool {config.name!r} has no router shard(s) {missing} of its {config.router.shards}", field="name"
        )
    return RouterSet(routers)


class Fleet:
    """Placement and lifetime of one pool's actors."""

    def __init__(self, config: PoolConfig, routers: Any) -> None:
        """``routers``: the pool's router shards (a :class:`RouterSet`, a list, or the one router)."""
        self.config = config
        self.routers = RouterSet.of(routers)
        self.router = self.routers.primary  # the pool's ledger: config, stores, weight versions

    @classmethod
    def start_router(cls, config: PoolConfig) -> Fleet:
        """Create the pool's router shards (named, restarted by Ray when they die) and start them."""
        routers = [
            RouterActor.options(
                name=router_name(config.name, i),
                namespace=config.namespace,
                lifetime="detached" if config.detached else None,
                max_concurrency=100_000,
                **control_options(config.placement.router, i, f"router shard {i}"),
            ).remote(config.router, config, i)
            for i in range(config.router.shards)
        ]
        fleet = cls(config, RouterSet(routers))
        refs = [r.start.remote() for r in routers]
        for i, ref in enumerate(refs):
            get_ref(ref, CONTROL_TIMEOUT_S, f"router shard {i} start")
        return fleet

    # -- engines ------------------------------------------------------------------------
    def handles(self) -> dict[str, Any]:
        """engine_id -> actor handle, from every router shard."""
        return self.routers.engines()

    def engine_handle(self, engine_id: str) -> Any:
        handles = self.handles()
        if engine_id not in handles:
            raise RequestError(f"engine_id: no engine {engine_id!r} in pool {self.config.name!r}", field="engine_id")
        return handles[engine_id]

    def start_engines(self, specs: list[tuple[str, int]]) -> dict[str, EngineInfo]:
        """Create, start and register engines ``(engine_id, group index)`` in parallel, each
        bounded by its group's start timeout; returns their infos. Refused at once when the
        cluster has too few GPUs for them; on any failure the engines made here are removed."""
        held = list(self._groups().values()) if specs else []
        wait_s = self.config.placement.gpu_wait_s
        short = gpu_shortage(self.config, [g for _, g in specs], held, grace_s=0.0 if wait_s else None)
        if short is not None and not wait_s:
            raise short
        # short of GPUs but told to wait: the placement groups show the autoscaler what is missing
        waiting = (short, time.monotonic() + wait_s) if short is not None else None
        made: dict[str, Any] = {}
        try:
            return self._start_engines(specs, made, waiting)
        except BaseException:
            self._discard(made, [eid for eid, _ in specs])
            raise

    def _start_engines(
        self, specs: list[tuple[str, int]], made: dict[str, Any], waiting: tuple[ConfigError, float] | None = None
    ) -> dict[str, EngineInfo]:
        """``waiting``: (the GPU shortage, the deadline by which the placement groups must be ready)."""
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
                wait = group.start_timeout_s if waiting is None else max(0.1, waiting[1] - time.monotonic())
                try:
                    get_ref(pg.ready(), wait, f"placement group for engine {engine_id}")
                except EngineTimeoutError as exc:
                    if waiting is None:
                        raise
                    raise ConfigError(waiting[0].message, field=waiting[0].field) from exc
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
                )
            handle = actor_cls.options(**options).remote(
                group, engine_id, None, self.config.weight_transfer.method, bundle_index,
                gc_freeze=self.config.gc_freeze != "off",
            )  # fmt: skip
            made[engine_id] = handle
            started.append((engine_id, g, group, handle, handle.start.remote()))
        latest = get_ref(self.router.latest_weights.remote(), CONTROL_TIMEOUT_S, "router") if started else None
        infos: dict[str, EngineInfo] = {}
        for engine_id, g, group, handle, ref in started:
            info = get_ref(ref, group.start_timeout_s, f"engine {engine_id} start")
            if latest is not None:  # a pool that already pushed weights: load them before serving
                chunks, version = latest
                index = get_ref(self.router.version_index.remote(version), CONTROL_TIMEOUT_S, "router")
                get_ref(handle.update_weights.remote(chunks, version, None, index), group.start_timeout_s, "weights")
            register = self.routers.owner(engine_id).register.remote(
                info, handle, group.max_requests_per_engine, group.eval_requests_per_engine, g
            )
            get_ref(register, CONTROL_TIMEOUT_S, "router register")
            info.group = g
            infos[engine_id] = info
        return infos

    def _discard(self, made: dict[str, Any], engine_ids: list[str]) -> None:
        """Undo a failed start: out of the router, actors killed, placement groups removed."""
        for engine_id in engine_ids:
            try:
                self.routers.owner(engine_id).deregister.remote(engine_id)
            except Exception:
                logger.debug("router gone while discarding %s", engine_id, exc_info=True)
        self.kill_engines(made, grace_s=0.0)
        for engine_id in engine_ids:
            if engine_id not in made:
                self._remove_pg(engine_id)

    def _free_bundles(self, g: int, group: EngineConfig) -> list[int]:
        """Bundles of ``group``'s placement group not held by its running engines (a list may
        repeat a bundle that several engines share through fractional GPUs)."""
        infos = self.routers.engine_infos()
        free = group.resolved_bundle_indices()
        for info in infos:
            if info.group == g and info.bundle_index in free:
                free.remove(info.bundle_index)
        return free

    def _groups(self) -> dict[str, int]:
        """engine_id -> group index of every engine the router holds."""
        return self.routers.engine_groups()

    def scale(self, replicas: int, group: int = 0, drain_timeout_s: float = 60.0) -> list[str]:
        """Set the replica count of an engine group; returns the engine ids now in the group.
        Engines on a lost node count as members (Ray restarts them when a node with room joins);
        scaling down removes unhealthy engines first."""
        if replicas < 1:
            raise RequestError(f"replicas: must be >= 1, got {replicas}", field="replicas")
        if not 0 <= group < len(self.config.engines):
            raise RequestError(f"group: no engine group {group}", field="group")
        groups = self._groups()
        own = {eid: g for eid, g in groups.items() if eid[:1] == "e" and eid[1:].isdigit()}  # not Serve's
        mine = sorted((eid for eid, g in own.items() if g == group), key=lambda e: int(e[1:]))
        if replicas > len(mine):
            next_index = 1 + max((int(e[1:]) for e in own), default=-1)
            new = [(f"e{next_index + k}", group) for k in range(replicas - len(mine))]
            self.start_engines(new)
            return mine + [eid for eid, _ in new]
        load = self.routers.load()
        # unhealthy engines go first (e.g. one whose node was lost), then the newest
        order = sorted(mine, key=lambda e: (bool(load.get(e, {}).get("healthy", True)), -int(e[1:])))
        drop = order[: len(mine) - replicas]
        for eid in drop:
            self.stop_engine(eid, drain_timeout_s)
        return [eid for eid in mine if eid not in drop]

    def stop_engine(self, engine_id: str, drain_timeout_s: float) -> None:
        """Take an engine out of routing, let its requests drain (bounded), then stop it. An
        engine that does not answer (its node was lost) is killed without waiting."""
        handle = self.engine_handle(engine_id)
        get_ref(self.routers.owner(engine_id).deregister.remote(engine_id), CONTROL_TIMEOUT_S, "router")
        deadline = time.monotonic() + drain_timeout_s
        reachable = actor_place(handle).get("actor_state", "ALIVE") == "ALIVE"
        while reachable and time.monotonic() < deadline:
            try:
                st = get_ref(handle.stats.remote(), 10.0, "engine stats")
            except InferpoolError:
                reachable = False
                break
            if st.in_flight == 0:
                break
            time.sleep(0.1)
        self.kill_engines({engine_id: handle}, grace_s=_SHUTDOWN_GRACE_S if reachable else 0.0)

    def kill_engine(self, engine_id: str, handle: Any) -> None:
        self.kill_engines({engine_id: handle})

    def kill_engines(self, handles: dict[str, Any], grace_s: float = _SHUTDOWN_GRACE_S) -> None:
        """Shut the engines' backends down (all at once, ``grace_s`` in all), kill the actors and
        remove their placement groups."""
        refs = []
        for engine_id, handle in handles.items():
            if grace_s > 0 and actor_place(handle).get("actor_state", "ALIVE") != "ALIVE":
                continue  # restarting after its node was lost, or dead: nothing to shut down
            try:
                refs.append(handle.shutdown.remote())
            except Exception:
                logger.debug("engine %s: no shutdown call", engine_id, exc_info=True)
        if refs and grace_s > 0:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
            if len(ready) < len(refs):
                logger.debug("%d engines did not shut down within %.0fs", len(refs) - len(ready), grace_s)
        for engine_id, handle in handles.items():
            try:
                ray.kill(handle)
            except Exception:
                logger.debug("engine %s already gone", engine_id, exc_info=True)
            self._remove_pg(engine_id)

    def _remove_pg(self, engine_id: str) -> None:
        try:
            remove_placement_group(get_placement_group(pg_name(self.config.namespace, self.config.name, engine_id)))
        except Exception:  # no placement group (zero-resource engine) or already gone
            pass

    async def broadcast(self, what: str, call: Callable[[Any], Any], timeout_s: float) -> dict[str, Any]:
        """``call(handle)`` on every live engine at once; engine_id -> result. An engine whose actor
        is not alive (Ray restarts it once its node's loss is made good) is skipped, not waited for:
        when it is back, the router's probe loads the latest object-store weights before it serves."""
        handles = await self.routers.aengines()
        places = await asyncio.to_thread(lambda: {eid: actor_place(h) for eid, h in handles.items()})
        down = sorted(eid for eid, place in places.items() if place.get("actor_state", "ALIVE") != "ALIVE")
        if down:
            logger.warning("%s: skipping engines that are not alive: %s", what, down)
            handles = {eid: h for eid, h in handles.items() if eid not in down}
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
                **control_options(self.config.placement.stores, i, f"session store {i}"),
            ).remote(self.config, self.routers.routers, i)
            for i in range(self.config.sessions.shards)
        ]
        for store in stores:
            get_ref(store.start.remote(), CONTROL_TIMEOUT_S, "session store start")
        get_ref(self.router.set_stores.remote(stores), CONTROL_TIMEOUT_S, "router")  # the primary holds them
        return stores

    # -- the end ------------------------------------------------------------------------
    def shutdown(self, stores: list[Any], known: dict[str, Any]) -> None:
        """Stop every engine, the session stores and the router (the name can be reused)."""
        try:
            handles = self.handles()
        except Exception:
            handles = dict(known)
        for router in self.routers.routers:
            try:
                router.shutdown.remote()
            except Exception:
                logger.debug("router already gone", exc_info=True)
        for store in stores:
            try:
                ray.kill(store)
            except Exception:
                logger.debug("session store already gone", exc_info=True)
        self.kill_engines(handles)
        for router in self.routers.routers:
            try:
                ray.kill(router)
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
