"""The trainer side of a native weight transfer: the trainer broadcasts, every engine receives.

The native methods follow vLLM's four-phase weight-sync protocol
(``init_weight_transfer_engine`` once, then per update ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``) driven from the trainer's process:

- :class:`PoolWeightSyncClient` is the inference side of that protocol for a whole pool,
  seen from the trainer: vLLM's own trainer engines (``nccl``, ``ipc``) drive every engine
  through it; it gives each engine its own rank offset, pauses generation for the update
  (so every token's version is exact) and labels the weights with the update's version.
- :class:`GlooTrainer`: the ``gloo`` method's trainer (a CPU process group).
- :class:`TorchGroupTrainer`: the trainer for SGLang engines (``nccl`` through a
  torch.distributed group and ``update_weights_from_distributed``).
- :class:`NativeSender`: this process's end of a pool's group, formed once and reused.

The engine side is :class:`inferpool.actors.weights.WeightReceiver`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from inferpool.errors import EngineError, RequestError
from inferpool.ray_utils import get_ref
from inferpool.weights.groups import (
    GLOO_GROUP_PREFIX,
    GlooInitInfo,
    free_port,
    gloo_broadcast,
    init_torch_group,
    node_address,
    open_gloo_group,
    tensor_meta,
)

logger = logging.getLogger(__name__)


def send_round(client: Any, named: list[tuple[str, Any]], broadcast: Callable[[Any], None]) -> None:
    """One update round trip from the trainer: start, let every engine receive (on a side
    thread) while ``broadcast`` sends each tensor in order, then finish."""
    client.start_weight_update()
    exe = ThreadPoolExecutor(max_workers=1)
    try:
        received = exe.submit(client.update_weights, asdict(tensor_meta(named)))
        for _, tensor in named:
            broadcast(tensor)
        received.result()
    finally:
        exe.shutdown(wait=False)  # a failed broadcast leaves receivers blocked; do not join them
    client.finish_weight_update()


# -- the trainer side of "gloo" ----------------------------------------------------------------
class GlooTrainer:
    """Trainer side of the ``gloo`` method: rank 0 of a Gloo group with every receiving rank.

    Mirrors vLLM's trainer engines: :meth:`trainer_init` rendezvouses (the receiving side
    joins through ``client.init_weight_transfer_engine`` on a side thread while this
    process opens rank 0), :meth:`send_weights` runs one update round trip.
    """

    def __init__(self, client: Any, group: Any) -> None:
        self.client = client
        self.group = group

    @classmethod
    def trainer_init(
        cls, master_address: str, master_port: int, world_size: int, client: Any, timeout_s: float
    ) -> GlooTrainer:
        info = GlooInitInfo(master_address, master_port, 1, world_size, timeout_s)
        with ThreadPoolExecutor(max_workers=1) as exe:
            joined = exe.submit(client.init_weight_transfer_engine, asdict(info))
            group = open_gloo_group(master_address, master_port, 0, world_size, timeout_s)
            joined.result()
        return cls(client, group)

    def send_weights(self, named: list[tuple[str, Any]]) -> None:
        def send(tensor: Any) -> None:
            gloo_broadcast(self.group, tensor.detach().contiguous().cpu())

        send_round(self.client, named, send)

    def shutdown(self) -> None:
        self.group = None


class TorchGroupTrainer:
    """Trainer side for SGLang engines (``nccl``): rank 0 of a torch.distributed group the
    engines join through SGLang's ``init_weights_update_group``; tensors go out with
    ``torch.distributed.broadcast`` while the engines run ``update_weights_from_distributed``."""

    def __init__(self, client: Any, group: Any) -> None:
        self.client = client
        self.group = group

    @classmethod
    def trainer_init(
        cls,
        backend: str,
        master_address: str,
        master_port: int,
        world_size: int,
        client: Any,
        timeout_s: float,
        group_name: str = GLOO_GROUP_PREFIX,
    ) -> TorchGroupTrainer:
        info = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": 1,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        with ThreadPoolExecutor(max_workers=1) as exe:
            joined = exe.submit(client.init_weight_transfer_engine, info)
            group = init_torch_group(backend, master_address, master_port, 0, world_size, group_name, timeout_s)
            joined.result()
        return cls(client, group)

    def send_weights(self, named: list[tuple[str, Any]]) -> None:
        import torch.distributed as dist

        send_round(self.client, named, lambda t: dist.broadcast(t.detach().contiguous(), src=0, group=self.group))

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # already torn down
                logger.debug("could not destroy the weight update group", exc_info=True)
            self.group = None


# -- the inference side, fanned out over the pool ---------------------------------------------
class PoolWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol for every engine of a pool (synchronous).

    ``engines``: ``[(engine_id, actor handle, ranks)]`` fixed when the group is formed
    (``ranks``: how many receiving workers the engine has: tensor x pipeline x data
    parallel size). Engine ``k`` joins at rank offset ``offset + sum(ranks before k)``
    where ``offset`` is what the trainer engine asks for (1: after the trainer's rank 0).
    Calls block (run them off the event loop); each has ``timeout_s``.
    """

    def __init__(self, engines: list[tuple[str, Any, int]], pause_mode: str | None, timeout_s: float) -> None:
        if not engines:
            raise EngineError("no engines to transfer weights to")
        self.engines = engines
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s
        self.version: int | str | None = None
        self.version_index: int | None = None
        self.nbytes = 0
        self.per_engine: dict[str, Any] = {}

    @property
    def world_size(self) -> int:
        """Trainer rank 0 plus every receiving rank of every engine."""
        return 1 + sum(r for _, _, r in self.engines)

    @property
    def engine_ids(self) -> list[str]:
        return [eid for eid, _, _ in self.engines]

    def engines_by_id(self) -> list[tuple[str, Any]]:
        return [(eid, h) for eid, h, _ in self.engines]

    def _all(self, what: str, call: Callable[[Any, int], Any]) -> list[Any]:
        refs = [(eid, call(h, k)) for k, (eid, h, _) in enumerate(self.engines)]
        deadline = time.monotonic() + self.timeout_s
        return [get_ref(ref, max(0.1, deadline - time.monotonic()), f"engine {eid} {what}") for eid, ref in refs]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        base = int(init_info.get("rank_offset", 1))
        offsets, acc = [], 0
        for _, _, ranks in self.engines:
            offsets.append(base + acc)
            acc += ranks
        self._all(
            "init_weight_transfer",
            lambda h, k: h.init_weight_transfer.remote({**init_info, "rank_offset": offsets[k]}),
        )

    def start_weight_update(self) -> None:
        self._all("start_weight_update", lambda h, k: h.start_weight_update.remote(self.pause_mode))

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Every engine receives concurrently (the trainer broadcasts meanwhile). A list is
        indexed by global worker rank across the pool: each engine gets its own slice."""
        if isinstance(update_info, list):
            starts = [sum(r for _, _, r in self.engines[:k]) for k in range(len(self.engines))]
            self._all(
                "update_weights",
                lambda h, k: h.receive_weights.remote(update_info[starts[k] : starts[k] + self.engines[k][2]]),
            )
            return
        self._all("update_weights", lambda h, k: h.receive_weights.remote(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if self.version is not None else weight_version
        if version is None:
            raise RequestError("version: a native weight update needs a version label", field="version")
        outs = self._all(
            "finish_weight_update",
            lambda h, k: h.finish_weight_update.remote(version, self.nbytes, self.version_index),
        )
        self.per_engine = dict(zip(self.engine_ids, outs, strict=True))


class NativeSender:
    """The trainer's end of a pool's transfer group: :meth:`form` it once, :meth:`send` per update.

    ``nccl`` / ``ipc`` use vLLM's own trainer engines (``WeightTransferTrainerFactory``)
    driving the pool through :class:`PoolWeightSyncClient`; ``gloo`` uses
    :class:`GlooTrainer`.
    """

    def __init__(self, client: PoolWeightSyncClient, trainer: Any, source: Any = None) -> None:
        self.client = client
        self.trainer = trainer
        self.source = source

    @classmethod
    def form(cls, config: Any, client: PoolWeightSyncClient, engine_backend: str = "vllm") -> NativeSender:
        """Rendezvous with every engine of ``client`` by ``config`` (a WeightTransferConfig);
        ``engine_backend`` is the pool's engine kind (SGLang engines take a torch.distributed group)."""
        method = config.method
        address = config.master_address or node_address()
        port = config.master_port or free_port()
        client.timeout_s = config.timeout_s
        if method == "gloo":
            gloo = GlooTrainer.trainer_init(address, port, client.world_size, client, config.timeout_s)
            return cls(client, gloo)
        if engine_backend == "sglang":
            group = TorchGroupTrainer.trainer_init(method, address, port, client.world_size, client, config.timeout_s)
            return cls(client, group)
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        info: Any
        trainer: Any
        if method == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(
                master_address=address, master_port=port, world_size=client.world_size, packed=config.packed, rank=0
            )
        elif method == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(packed=config.packed, rank=0)
        else:
            raise RequestError(f"weight_transfer.method: {method!r} is not a native method", field="method")
        source = SwapSource.create()
        trainer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)  # type: ignore[arg-type]
        return cls(client, trainer, source)

    def send(self, named: list[tuple[str, Any]]) -> None:
        if isinstance(self.trainer, GlooTrainer | TorchGroupTrainer):
            self.trainer.send_weights(named)
            return
        self.source.named = named
        try:
            self.trainer.send_weights()
        finally:
            self.source.named = []

    def shutdown(self) -> None:
        try:
            self.trainer.shutdown()
        except Exception:  # a half-formed group: nothing more to release
            logger.debug("weight transfer trainer shutdown failed", exc_info=True)


class SwapSource:
    """A vLLM ``WeightSource`` whose pairs are replaced before every send (built lazily
    so this module imports without vLLM)."""

    @staticmethod
    def create() -> Any:
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

        class _Source(WeightSource):  # type: ignore[misc]
            def __init__(self) -> None:
                self.named: list[tuple[str, Any]] = []

            def metadata(self) -> list[Any]:
                return [ParamMeta(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in self.named]

            def __iter__(self) -> Iterator[tuple[str, Any]]:
                return iter(self.named)

        return _Source()
