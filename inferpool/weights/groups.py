"""Process groups and tensor framing shared by the trainer side and the engine side of a
native weight transfer, and the checked iteration over a trainer's weights.

- :func:`open_gloo_group` / :func:`gloo_broadcast`: the ``gloo`` method's CPU process group
  (joined by the trainer, the vLLM worker extension and the fake engine).
- :class:`TensorMeta`: what one update broadcasts, in order; :func:`receive_gloo` receives it.
- :func:`init_torch_group`: a torch.distributed group as SGLang's ``init_weights_update_group``
  forms the engines' side.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from inferpool.errors import RequestError

GLOO_GROUP_PREFIX = "inferpool-weights"


def free_port() -> int:
    """A TCP port free on this host right now (for the group's rendezvous store)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_address() -> str:
    """This node's address as other Ray nodes reach it (127.0.0.1 outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # not in a Ray worker or driver
        pass
    return "127.0.0.1"


def open_gloo_group(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """Join (rank 0: host) a Gloo process group without touching torch's default group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(GLOO_GROUP_PREFIX, store), rank, world_size, timeout)


def gloo_broadcast(group: Any, tensor: Any) -> None:
    """Broadcast ``tensor`` in place from rank 0 over ``group`` (blocks until done)."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


@dataclass
class GlooInitInfo:
    """Receiving side's init info for the ``gloo`` method (one rank per receiving worker)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0


@dataclass
class TensorMeta:
    """Per-update info: what the trainer broadcasts, in order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def tensor_meta(named: list[tuple[str, Any]]) -> TensorMeta:
    return TensorMeta(
        names=[n for n, _ in named],
        dtype_names=[str(t.dtype).removeprefix("torch.") for _, t in named],
        shapes=[list(t.shape) for _, t in named],
    )


def receive_gloo(group: Any, meta: TensorMeta, device: Any = "cpu") -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` as each broadcast of ``meta`` arrives (the receiving side)."""
    import torch

    for name, dtype_name, shape in zip(meta.names, meta.dtype_names, meta.shapes, strict=True):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype_name), device=device)
        gloo_broadcast(group, tensor)
        yield name, tensor


def init_torch_group(
    backend: str, master_address: str, master_port: int, rank: int, world_size: int, group_name: str, timeout_s: float
) -> Any:
    """A torch.distributed process group beside the default one, formed as SGLang's
    ``init_weights_update_group`` forms the engines' side: a ``tcp://`` rendezvous and a store
    prefixed with the group name. SGLang's own helper is used when it is installed."""
    timeout = datetime.timedelta(seconds=timeout_s)
    init_method = f"tcp://{master_address}:{master_port}"
    try:
        from sglang.srt.utils import init_custom_process_group
    except ImportError:
        pass
    else:
        return init_custom_process_group(
            backend=backend,
            init_method=init_method,
            timeout=timeout,
            world_size=world_size,
            rank=rank,
            group_name=group_name,
        )
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    made = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        backend,
        c10d.PrefixStore(group_name, store),
        group_name=group_name,  # type: ignore[arg-type]
        timeout=timeout,
    )
    group = made[0] if isinstance(made, tuple) else made
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def iter_named_tensors(weights: Any) -> Iterator[tuple[str, Any]]:
    """A state dict or ``(name, tensor)`` pairs, checked one at a time (a generator stays lazy,
    so a trainer gathering one tensor at a time never holds them all)."""
    items: Iterable[Any] = weights.items() if hasattr(weights, "items") else weights
    count = 0
    for pair in items:
        try:
            name, tensor = pair
        except (TypeError, ValueError):
            raise RequestError("weights: expected a state dict or (name, tensor) pairs", field="weights") from None
        count += 1
        yield str(name), tensor
    if not count:
        raise RequestError("weights: no tensors given", field="weights")


def as_named_tensors(weights: Any) -> list[tuple[str, Any]]:
    """:func:`iter_named_tensors` as a list."""
    return list(iter_named_tensors(weights))
