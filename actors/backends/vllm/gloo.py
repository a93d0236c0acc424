"""A vLLM weight transfer engine over Gloo: the ``gloo`` method on CPU engines.

vLLM ships ``nccl`` and ``ipc`` weight transfer engines (GPU only). This one speaks the
same worker-side protocol over torch's Gloo backend, so a CPU vLLM engine receives a
trainer's broadcast through vLLM's real ``init_weight_transfer_engine`` /
``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` path (layerwise
reload included). :func:`register` adds it to vLLM's registry under ``"gloo"``; the
worker extension calls it on import, so every vLLM worker process knows it before
its model loads. The trainer side is :class:`inferpool.weights.trainer.GlooTrainer`.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.weight_transfer.base import WeightTransferEngine

from inferpool.weights.groups import GlooInitInfo, TensorMeta, open_gloo_group, receive_gloo

NAME = "gloo"


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, TensorMeta]):  # type: ignore[misc,type-var]
    """Worker side: one Gloo rank per vLLM worker, tensors received one by one."""

    init_info_cls = GlooInitInfo
    update_info_cls = TensorMeta

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Any = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.group = open_gloo_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator afterwards; Gloo is synchronous and
        # a CPU worker has no accelerator to synchronise.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: TensorMeta) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        for name, tensor in receive_gloo(self.group, update_info):
            self.model.load_weights([(name, tensor)])  # type: ignore[operator]

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make ``WeightTransferConfig(backend="gloo")`` resolve to :class:`GlooWeightTransferEngine`."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(NAME, GlooWeightTransferEngine)
