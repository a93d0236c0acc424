"""Build remote engine configs from a Slurm allocation or a Ray cluster's GPU nodes.

Both return ``list[EngineConfig]`` for servers someone else starts (``vllm serve``,
SGLang, TRL ...); put them in ``PoolConfig.engines``.

Slurm: the allocation's nodes come from ``SLURM_JOB_NODELIST`` expanded by
``scontrol show hostnames``. The first ``num_training_nodes`` nodes are left to the
trainer; every other node runs ``gpus_per_node // tensor_parallel`` servers, server ``i``
listening on ``base_port + i``, reached at ``http://{host}:{port}/v1``.

Ray: every alive node with GPUs runs ``int(GPU) // tensor_parallel`` servers the same
way, at the node's IP (``NodeManagerAddress``). :func:`engines_from_ray_cluster` calls
``ray.nodes()``, a blocking call; from async code use
:func:`engines_from_ray_cluster_async`, which runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from inferpool.config import EngineConfig
from inferpool.errors import ConfigError

logger = logging.getLogger(__name__)

NODELIST_VAR = "SLURM_JOB_NODELIST"
NUM_NODES_VAR = "SLURM_JOB_NUM_NODES"
_SCONTROL_TIMEOUT_S = 30.0


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (``node[01-03],gpu7``) with ``scontrol show hostnames``."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=_SCONTROL_TIMEOUT_S,
            check=True,
        )
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{NODELIST_VAR}: scontrol is not installed here, cannot expand {nodelist!r}", field=NODELIST_VAR
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"{NODELIST_VAR}: scontrol show hostnames timed out", field=NODELIST_VAR) from exc
    except subprocess.CalledProcessError as exc:
        raise ConfigError(
            f"{NODELIST_VAR}: scontrol cannot expand {nodelist!r}: {(exc.stderr or '').strip()}",
            field=NODELIST_VAR,
        ) from exc
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}", field=name)
    return value


def _servers_per_node(gpus: int, tensor_parallel: int, base_port: int) -> int:
    _check_int("tensor_parallel", tensor_parallel, 1)
    _check_int("base_port", base_port, 1)
    per_node = gpus // tensor_parallel
    if base_port + max(per_node, 1) - 1 > 65535:
        raise ConfigError(f"base_port: {base_port} + {per_node} servers passes port 65535", field="base_port")
    return per_node


def _configs(
    hosts: Sequence[str],
    per_node: Sequence[int],
    base_port: int,
    backend: str,
    engine_fields: Mapping[str, Any] | None,
) -> list[EngineConfig]:
    fields = dict(engine_fields or {})
    for reserved in ("backend", "base_url"):
        if reserved in fields:
            raise ConfigError(
                f"engine_fields.{reserved}: set by discovery, not allowed here", field=f"engine_fields.{reserved}"
            )
    return [
        EngineConfig(backend=backend, base_url=f"http://{host}:{base_port + i}/v1", **fields)  # type: ignore[arg-type]
        for host, count in zip(hosts, per_node, strict=True)
        for i in range(count)
    ]


def engines_from_slurm(
    num_training_nodes: int,
    gpus_per_node: int,
    tensor_parallel: int,
    base_port: int,
    backend: str = "vllm_http",
    env: Mapping[str, str] | None = None,
    hostnames: Callable[[str], list[str]] | None = None,
    engine_fields: Mapping[str, Any] | None = None,
) -> list[EngineConfig]:
    """Remote engines on the inference nodes of the current Slurm job.

    ``env`` defaults to ``os.environ`` and ``hostnames`` to :func:`scontrol_hostnames`
    (both injectable for tests). ``engine_fields`` are extra :class:`EngineConfig`
    fields for every engine (model, api_key, timeout, ...). A missing or malformed
    variable, or an allocation with no inference node, raises :class:`ConfigError`
    naming it.
    """
    _check_int("num_training_nodes", num_training_nodes, 0)
    _check_int("gpus_per_node", gpus_per_node, 1)
    per_node = _servers_per_node(gpus_per_node, tensor_parallel, base_port)
    if per_node == 0:
        raise ConfigError(
            f"tensor_parallel: {tensor_parallel} is more than gpus_per_node ({gpus_per_node}): no server fits",
            field="tensor_parallel",
        )
    environ = os.environ if env is None else env
    nodelist = (environ.get(NODELIST_VAR) or "").strip()
    if not nodelist:
        raise ConfigError(f"{NODELIST_VAR}: not set (not inside a Slurm allocation?)", field=NODELIST_VAR)
    hosts = (hostnames or scontrol_hostnames)(nodelist)
    if not hosts:
        raise ConfigError(f"{NODELIST_VAR}: {nodelist!r} names no node", field=NODELIST_VAR)
    declared = environ.get(NUM_NODES_VAR)
    if declared is not None:
        try:
            count = int(declared)
        except ValueError:
            raise ConfigError(f"{NUM_NODES_VAR}: not an integer: {declared!r}", field=NUM_NODES_VAR) from None
        if count != len(hosts):
            raise ConfigError(
                f"{NUM_NODES_VAR}: says {count} nodes but {NODELIST_VAR} expands to {len(hosts)}",
                field=NUM_NODES_VAR,
            )
    inference = hosts[num_training_nodes:]
    if not inference:
        raise ConfigError(
            f"num_training_nodes: {num_training_nodes} takes all {len(hosts)} nodes of {NODELIST_VAR}; "
            "none is left for inference",
            field="num_training_nodes",
        )
    logger.info(
        "slurm discovery: %d inference node(s) x %d server(s) from port %d", len(inference), per_node, base_port
    )
    return _configs(inference, [per_node] * len(inference), base_port, backend, engine_fields)


def engines_from_ray_cluster(
    base_port: int,
    tensor_parallel: int = 1,
    backend: str = "vllm_http",
    nodes: Sequence[Mapping[str, Any]] | None = None,
    exclude_node_ids: Collection[str] = (),
    gpu_resource: str = "GPU",
    engine_fields: Mapping[str, Any] | None = None,
) -> list[EngineConfig]:
    """Remote engines on the alive GPU nodes of the connected Ray cluster.

    Convention: a node with ``G`` units of ``gpu_resource`` runs ``G // tensor_parallel``
    servers on ports ``base_port + i`` of its ``NodeManagerAddress``. ``nodes`` defaults
    to ``ray.nodes()`` (blocking: see :func:`engines_from_ray_cluster_async`); nodes in
    ``exclude_node_ids`` (e.g. the trainer's) are skipped.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    hosts: list[str] = []
    counts: list[int] = []
    for node in nodes:
        if not node.get("Alive") or node.get("NodeID") in exclude_node_ids:
            continue
        gpus = int(float((node.get("Resources") or {}).get(gpu_resource, 0)))
        per_node = _servers_per_node(gpus, tensor_parallel, base_port)
        address = node.get("NodeManagerAddress")
        if per_node and address:
            hosts.append(str(address))
            counts.append(per_node)
    if not hosts:
        raise ConfigError(
            f"gpu_resource: no alive Ray node has {tensor_parallel} or more {gpu_resource!r}",
            field="gpu_resource",
        )
    return _configs(hosts, counts, base_port, backend, engine_fields)


async def engines_from_ray_cluster_async(
    base_port: int,
    tensor_parallel: int = 1,
    backend: str = "vllm_http",
    exclude_node_ids: Collection[str] = (),
    gpu_resource: str = "GPU",
    engine_fields: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> list[EngineConfig]:
    """:func:`engines_from_ray_cluster` in a worker thread (no blocking Ray call on the loop)."""
    return await asyncio.wait_for(
        asyncio.to_thread(
            engines_from_ray_cluster,
            base_port,
            tensor_parallel,
            backend,
            None,
            exclude_node_ids,
            gpu_resource,
            engine_fields,
        ),
        timeout_s,
    )
