"""The weight half of the SGLang backend: SGLang's update calls mapped onto the pool's protocols.

:class:`SGLangWeights` is the base class of :class:`~inferpool.actors.backends.sglang.backend.SGLangBackend`
and holds its weight methods (plain methods; the engine actor's weight-update API calls them):

* the chunked path (``load_weights`` per chunk, then ``set_weight_version``) and
  ``load_weights_from_tensor``: SGLang ``update_weights_from_tensor``;
* the native NCCL path that :class:`inferpool.weights.trainer.TorchGroupTrainer` drives
  (``init_weight_transfer`` / ``start_weight_update`` / ``receive_weights`` /
  ``finish_weight_update``): SGLang ``init_weights_update_group`` and
  ``update_weights_from_distributed``.

A weight version labels every token sampled after SGLang reports success.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from inferpool.actors.backends.base import BaseBackend
from inferpool.errors import BackendError


def update_ok(out: Any) -> tuple[bool, str]:
    """SGLang weight calls answer ``(success, message)`` or an object with ``success``."""
    if out is None:
        return True, ""
    if isinstance(out, tuple | list) and out:
        return bool(out[0]), str(out[1]) if len(out) > 1 else ""
    success = getattr(out, "success", True)
    return bool(success), str(getattr(out, "message", "") or "")


def _nbytes(tensor: Any) -> int:
    numel, size = getattr(tensor, "numel", None), getattr(tensor, "element_size", None)
    if callable(numel) and callable(size):
        return int(numel()) * int(size())
    return int(getattr(tensor, "nbytes", 0) or 0)


def _dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` or "torch.bfloat16" -> "bfloat16" (SGLang wants the bare name)."""
    return str(dtype).removeprefix("torch.")


class SGLangWeights(BaseBackend):
    """SGLang's weight-update calls; the backend subclass provides the engine and its loop."""

    engine_id: str
    weight_version: int | str | None
    _group_name: str  # the trainer group joined by init_weight_transfer

    def _require_engine(self) -> Any:
        """The started engine (handle); raises BackendError if there is none."""
        raise NotImplementedError

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the engine's loop and await it."""
        raise NotImplementedError

    def _next_version(self, version: int | str | None) -> int | str | None:
        if version is not None:
            return version
        return self.weight_version + 1 if isinstance(self.weight_version, int) else None

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """The engine actor's chunked update path: load one chunk, label it later."""
        current = self.weight_version
        out = await self.load_weights_from_tensor(named_tensors, flush_cache=False)
        self.weight_version = current  # set_weight_version labels the whole update
        return int(out["num_tensors"])

    async def set_weight_version(self, version: int | str) -> None:
        await self.reset_prefix_cache()
        self.weight_version = version

    async def load_weights_from_tensor(
        self,
        named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any],
        version: int | str | None = None,
        *,
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> dict[str, Any]:
        """Load ``(name, tensor)`` pairs (or a state dict) with SGLang ``update_weights_from_tensor``.

        Tensors may be on CPU or (cheaper: CUDA IPC handles) on this GPU. Sets
        ``weight_version`` to ``version`` (None: the previous integer version + 1) once
        SGLang reports success, so tokens sampled afterwards carry it. ``flush_cache``
        drops the prefix cache computed with the old weights (pass False for all but the
        last chunk of a chunked update). Returns ``weight_version``, ``num_tensors``,
        ``bytes`` and ``seconds``; raises BackendError if SGLang refuses.
        """
        engine = self._require_engine()
        tensors = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        start = time.perf_counter()
        out = await self._call(
            engine.update_weights_from_tensor, tensors, load_format=load_format, flush_cache=flush_cache
        )
        ok, message = update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: update_weights_from_tensor failed: {message}")
        self.weight_version = self._next_version(version)
        return {
            "weight_version": self.weight_version,
            "num_tensors": len(tensors),
            "bytes": sum(_nbytes(t) for _, t in tensors),
            "seconds": time.perf_counter() - start,
        }

    async def join_weight_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's process group for NCCL weight broadcasts (SGLang
        ``init_weights_update_group``): the trainer is rank 0, this engine's tensor-parallel
        ranks are ``rank_offset ..``; ``world_size`` counts all of them."""
        engine = self._require_engine()
        out = await self._call(
            engine.init_weights_update_group,
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        ok, message = update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: init_weights_update_group failed: {message}")

    # -- the pool's native-transfer protocol (inferpool.weights.trainer.TorchGroupTrainer drives it) --
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        if self.weight_transfer != "nccl":
            raise self._no_native()
        fields = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        await self.join_weight_update_group(**{k: init_info[k] for k in fields if k in init_info})
        self._group_name = str(init_info.get("group_name", "weight_update_group"))

    async def start_weight_update(self) -> None:
        """Nothing to prepare: SGLang loads each broadcast tensor as it arrives."""

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        info = update_info[0] if isinstance(update_info, list) else update_info
        current = self.weight_version
        out = await self.load_weights_from_distributed(
            info["names"], info["dtype_names"], info["shapes"], group_name=self._group_name, flush_cache=False
        )
        self.weight_version = current  # finish_weight_update labels the whole update
        return int(out["num_tensors"])

    async def finish_weight_update(self, version: int | str) -> None:
        await self.set_weight_version(version)

    async def load_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[Any],
        shapes: list[list[int]],
        version: int | str | None = None,
        *,
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
    ) -> dict[str, Any]:
        """Receive tensors the trainer broadcasts over the group of ``join_weight_update_group``
        (SGLang ``update_weights_from_distributed``; the trainer broadcasts them in this
        order while this call runs). Sets ``weight_version`` like ``load_weights``."""
        engine = self._require_engine()
        start = time.perf_counter()
        out = await self._call(
            engine.update_weights_from_distributed,
            names=list(names),
            dtypes=[_dtype_name(d) for d in dtypes],
            shapes=[list(s) for s in shapes],
            group_name=group_name,
            flush_cache=flush_cache,
        )
        ok, message = update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: update_weights_from_distributed failed: {message}")
        self.weight_version = self._next_version(version)
        return {
            "weight_version": self.weight_version,
            "num_tensors": len(names),
            "seconds": time.perf_counter() - start,
        }
