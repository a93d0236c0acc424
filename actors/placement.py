"""Where a pool's actors go on a multi-node cluster (read from Ray's live node table).

* Control actors (the router, the session-store shards) follow
  :class:`~inferpool.config.PlacementConfig`: ``cpu_nodes`` (the head when it has no GPU,
  else the nodes without GPUs), node labels, Ray's ``SPREAD`` or Ray's default. A chosen
  node is a preference: when it is gone by the time Ray (re)starts the actor, the actor
  goes to another node (one with the rule's labels first), never waits for a lost node.
* Engines reserve their CPUs and GPUs in placement groups (see :mod:`.fleet`); before any
  is created, :func:`gpu_shortage` compares what the new engines ask for with the GPUs the
  cluster has, so a start that cannot be placed fails at once with both numbers instead of
  waiting for a placement group (or, with ``PlacementConfig.gpu_wait_s``, waits that long).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from inferpool.config import ControlPlacement, PoolConfig
from inferpool.errors import ConfigError

logger = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"
NODE_ID_LABEL = "ray.io/node-id"  # every node carries it
_FREE_GRACE_S = 10.0  # how long existing but busy GPUs may take to free up (resource views lag)
_EPS = 1e-9


def alive_nodes() -> list[dict[str, Any]]:
    """Ray's node table, alive nodes only."""
    return [n for n in ray.nodes() if n.get("Alive")]


def node_gpus(node: dict[str, Any]) -> float:
    return float(node.get("Resources", {}).get("GPU", 0.0))


def _preferred(nodes: Sequence[dict[str, Any]]) -> list[str]:
    """Node ids, the head first, then by id (a stable order for round-robin)."""
    ordered = sorted(nodes, key=lambda n: (HEAD_RESOURCE not in n.get("Resources", {}), n["NodeID"]))
    return [n["NodeID"] for n in ordered]


def control_nodes(rule: ControlPlacement | dict[str, str], nodes: Sequence[dict[str, Any]]) -> list[str] | None:
    """Candidate node ids of a control-actor rule in preference order (None: Ray decides)."""
    if isinstance(rule, dict):
        return _preferred([n for n in nodes if all(n.get("Labels", {}).get(k) == v for k, v in rule.items())])
    if rule == "cpu_nodes":  # the head alone when it has no GPU: control actors then share the cluster's fate
        cpu = _preferred([n for n in nodes if node_gpus(n) == 0])
        heads = [n["NodeID"] for n in nodes if HEAD_RESOURCE in n.get("Resources", {})]
        return cpu[:1] if cpu and heads and cpu[0] == heads[0] else cpu
    return None


def control_options(rule: ControlPlacement | dict[str, str], index: int, what: str) -> dict[str, Any]:
    """Ray actor options placing control actor number ``index`` (the router: 0, store shard i: i).

    A chosen node is pinned by its ``ray.io/node-id`` label, with fallbacks Ray takes when that
    node is gone (at creation or at a restart): another node with the rule's labels, then any
    other node. (``NodeAffinitySchedulingStrategy(soft=True)`` would be simpler, but Ray treats it
    as a weak preference that it often overrides, even for actors that reserve nothing.)
    """
    if rule == "spread":
        return {"scheduling_strategy": "SPREAD"}
    if rule == "any":
        return {}
    candidates = control_nodes(rule, alive_nodes())
    if not candidates:  # no node fits the rule now: Ray places it
        if isinstance(rule, dict):
            logger.warning("no alive node carries the labels %s for the %s; Ray places it", rule, what)
        return {}
    chosen = candidates[index % len(candidates)]
    if not _label_scheduling():  # an older Ray: its soft node affinity is the nearest thing
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(chosen, soft=True)}
    fallbacks = [{"label_selector": dict(rule)}] if isinstance(rule, dict) else []
    fallbacks.append({"label_selector": {NODE_ID_LABEL: f"!{chosen}"}})
    return {"label_selector": {NODE_ID_LABEL: chosen}, "fallback_strategy": fallbacks}


@functools.cache
def _label_scheduling() -> bool:
    """Whether this Ray takes ``label_selector`` and ``fallback_strategy`` actor options."""
    try:
        from ray._common.ray_option_utils import actor_options
    except ImportError:
        return False
    return "label_selector" in actor_options and "fallback_strategy" in actor_options


def actor_place(handle: Any) -> dict[str, Any]:
    """Where an actor runs, from Ray's actor table: ``node_id``, ``actor_state`` (ALIVE,
    RESTARTING while Ray waits for room to restart it after its node was lost, DEAD) and
    ``restarts``; empty when the table cannot be read."""
    try:
        from ray._private import state

        row = state.actors(actor_id=handle._actor_id.hex())
    except Exception:  # a handle without an actor id, or no GCS to ask
        logger.debug("actor table unavailable", exc_info=True)
        return {}
    if not row:
        return {}
    return {
        "node_id": (row.get("Address") or {}).get("NodeID", ""),
        "actor_state": row.get("State", ""),
        "restarts": int(row.get("NumRestarts", 0) or 0),
    }


def engine_gpus(config: PoolConfig, groups: Sequence[int]) -> float:
    """GPUs that engines of these group indices reserve through placement groups of their own
    (engines in a trainer's placement group use GPUs the trainer already holds)."""
    return sum(config.engines[g].num_gpus for g in groups if config.engines[g].placement_group is None)


def gpu_shortage(
    config: PoolConfig, new_groups: Sequence[int], held_groups: Sequence[int] = (), grace_s: float | None = None
) -> ConfigError | None:
    """The error new engines (one group index each) fail with when the cluster has too few GPUs
    for them now, or None when they fit.

    ``held_groups``: the groups of the pool's running engines (their GPUs are taken). More GPUs
    than the cluster has, or more on one engine than any node has, is a shortage at once; GPUs
    that exist but are held by others now get ``grace_s`` (default ``_FREE_GRACE_S``) to free up
    (resource views lag behind a pool that was just shut down).
    """
    asked = engine_gpus(config, new_groups)
    if asked <= 0:
        return None
    held = engine_gpus(config, held_groups)
    grace = _FREE_GRACE_S if grace_s is None else grace_s
    start = time.monotonic()
    while True:
        problem, busy = _gpu_problem(config, new_groups, asked, held)
        if problem is None or not busy or time.monotonic() - start >= grace:
            return problem
        time.sleep(0.25)


def _gpu_problem(
    config: PoolConfig, new_groups: Sequence[int], asked: float, held: float
) -> tuple[ConfigError | None, bool]:
    """(the error to raise now, whether it is only that other holders keep GPUs busy)."""
    nodes = alive_nodes()
    total = sum(node_gpus(n) for n in nodes)
    largest = max((node_gpus(n) for n in nodes), default=0.0)
    with_gpus = sum(1 for n in nodes if node_gpus(n) > 0)
    wait_s = config.placement.gpu_wait_s
    hint = (
        f" (waited {wait_s:g}s for GPU nodes to join: PoolConfig.placement.gpu_wait_s)"
        if wait_s
        else "; on an autoscaling cluster set PoolConfig.placement.gpu_wait_s to wait for GPU nodes"
    )
    for g in sorted(set(new_groups)):
        group = config.engines[g]
        if group.placement_group is None and group.num_gpus > largest:
            return ConfigError(
                f"PoolConfig.engines[{g}].num_gpus: one engine asks for {group.num_gpus:g} GPUs on one node, "
                f"but the largest node of the cluster has {largest:g}{hint}",
                field="num_gpus",
            ), False
    free = float(ray.available_resources().get("GPU", 0.0))
    if asked <= total - held + _EPS and asked <= free + _EPS:
        return None, False
    parts = []
    for g in sorted(set(new_groups)):
        count, gpus = list(new_groups).count(g), config.engines[g].num_gpus
        if gpus and config.engines[g].placement_group is None:
            parts.append(f"engines[{g}]: {count} x num_gpus={gpus:g}")
    first = next(g for g in new_groups if config.engines[g].num_gpus and config.engines[g].placement_group is None)
    has = f"the cluster has {total:g} GPUs on {with_gpus} nodes"
    if held:
        has += f", {held:g} of them held by this pool's engines"
    busy = asked <= total - held + _EPS
    if busy:
        has += f", {free:g} free now (the others are held by other actors or placement groups)"
    return ConfigError(
        f"PoolConfig.engines[{first}].replicas: the new engines ask for {asked:g} GPUs ({'; '.join(parts)}) but "
        f"{has}; lower replicas or num_gpus, or add GPU nodes{hint}",
        field="replicas",
    ), busy
