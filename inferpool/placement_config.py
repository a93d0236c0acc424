"""Where a pool's control actors run (part of the configuration: ``PoolConfig.placement``
holds one; re-exported by :mod:`inferpool.config`). The placement itself is
:mod:`inferpool.actors.placement`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from inferpool.validation import ConfigModel

ControlPlacement = Literal["cpu_nodes", "spread", "any"]


def _check_placement(value: Any) -> Any:
    """A placement rule's name, or node labels (keys and values as `ray start --labels` takes them)."""
    if isinstance(value, str):
        if value not in ("cpu_nodes", "spread", "any"):
            raise ValueError("must be 'cpu_nodes', 'spread', 'any' or a dict of node labels")
        return value
    if not isinstance(value, dict) or not value:
        raise ValueError("must be 'cpu_nodes', 'spread', 'any' or a non-empty dict of node labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("node labels map strings to strings")
    try:
        from ray._private.label_utils import validate_node_label_syntax
    except ImportError:  # another Ray: it checks the labels when it schedules
        return value
    validate_node_label_syntax(value)
    return value


class PlacementConfig(ConfigModel):
    """Where a pool's control actors run: the router and the session-store shards. Engines go
    where their placement groups fit (each reserves its own CPUs and GPUs), so engines with
    ``num_gpus=1`` land one per GPU, one per node on one-GPU nodes."""

    router: ControlPlacement | dict[str, str] = Field(
        "cpu_nodes",
        description="Node of the router actor (with RouterConfig.shards > 1: of each shard, round-robin "
        "over the matching nodes). 'cpu_nodes': the head node when it has no GPU (it holds "
        "the cluster's control plane, so a pool's control actors there share the cluster's fate), else "
        "a node without GPUs, else Ray's default placement. 'spread': Ray's SPREAD strategy. 'any': Ray's "
        "default placement. A dict of node labels (e.g. {'inferpool/role': 'control'} for nodes started "
        "with `ray start --labels`): a node carrying all of them. A chosen node is a preference: if it is "
        "gone when Ray (re)starts the actor, the actor goes to another node (one with the labels first), "
        "never waits for it.",
    )
    stores: ControlPlacement | dict[str, str] = Field(
        "cpu_nodes",
        description="Nodes of the session-store shards, as for router; shards go round-robin over the "
        "matching nodes (with 'cpu_nodes' and a head without GPUs: all on the head). Stores are not "
        "restarted and hold their sessions' state only in memory: sessions of a store whose node is lost "
        "fail with a SessionError naming the shard, so keep stores on nodes that stay (the default: "
        "losing a worker node never loses session state).",
    )
    gpu_wait_s: float = Field(
        0.0,
        ge=0.0,
        description="When the cluster has fewer GPUs than new engines ask for: 0 fails Pool.start / "
        "Pool.scale at once with a ConfigError saying how many were asked for and how many the cluster "
        "has (fixed clusters); more creates the engines' placement groups anyway (demand the Ray "
        "autoscaler sees) and waits that long for GPU nodes to join, then fails the same way.",
    )

    @field_validator("router", "stores", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return _check_placement(v)
