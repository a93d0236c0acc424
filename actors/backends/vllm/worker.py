"""The vLLM worker extension: load weights handed over as raw tensor bytes.

vLLM mixes this class into its worker (``worker_extension_cls``), so
``collective_rpc("inferpool_load_weights", args=(packed,))`` runs the model's own
``load_weights`` in every worker process. Tensors travel as (dtype, shape, bytes):
vLLM's RPC encoding keeps plain bytes intact, not untyped tensors. Importing this module
registers the ``gloo`` weight transfer engine (:mod:`inferpool.actors.backends.vllm.gloo`).
"""

from __future__ import annotations

from typing import Any

try:  # every vLLM worker process imports this module before its model loads
    from inferpool.actors.backends.vllm.gloo import register as _register_gloo

    _register_gloo()
except ImportError:  # vLLM not installed: the pack/unpack helpers still import
    pass


def pack_tensors(named: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    """(name, tensor) pairs as a msgpack-friendly dict of names, dtypes, shapes and bytes."""
    import torch

    out: dict[str, list[Any]] = {"names": [], "dtypes": [], "shapes": [], "data": []}
    for name, t in named:
        tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        tensor = tensor.detach().contiguous().cpu()
        out["names"].append(name)
        out["dtypes"].append(str(tensor.dtype).removeprefix("torch."))
        out["shapes"].append(list(tensor.shape))
        out["data"].append(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return out


def unpack_tensors(packed: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    """The inverse of :func:`pack_tensors`."""
    import torch

    named = []
    for name, dtype, shape, data in zip(
        packed["names"], packed["dtypes"], packed["shapes"], packed["data"], strict=True
    ):
        dt = getattr(torch, dtype)
        flat = torch.frombuffer(bytearray(data), dtype=dt) if data else torch.empty(0, dtype=dt)
        named.append((name, flat.reshape(shape)))
    return named


class InferpoolWorkerExtension:
    """Methods vLLM adds to its worker class."""

    model_runner: Any
    _inferpool_pending: list[tuple[str, Any]]

    def inferpool_load_weights(self, packed: dict[str, list[Any]], final: bool = True) -> int:
        """Receive a chunk of weights; on the final chunk reload them all in place.

        vLLM's in-place reload re-runs post-load processing (fused q/k/v, CPU weight
        repacking) and needs the whole set in one call, so chunks are held in this worker
        until the last one arrives. Returns how many tensors were received so far.
        """
        pending = getattr(self, "_inferpool_pending", None) or []
        pending.extend(unpack_tensors(packed))
        self._inferpool_pending = pending
        if not final:
            return len(pending)
        self._inferpool_pending = []
        self.reload_weights(weights_iterator=iter(pending), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(pending)
