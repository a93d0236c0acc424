"""``Pool.update_weights``: push a trainer's weights to every engine of a pool.

Two ways, chosen by ``WeightTransferConfig.method``:

- ``object_store``: the tensors are put into Ray's object store in chunks; every engine
  fetches and loads one chunk at a time (any backend, CPU or GPU).
- ``nccl`` / ``ipc`` / ``gloo``: this process broadcasts the tensors through vLLM's
  weight-transfer protocol (:mod:`inferpool.weights.trainer`); the group with the
  engines is formed on first use and again whenever the engine set changed.

Every update is labelled with a version the router records, so each sampled token can
name the weights that produced it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from inferpool.actors.backends.base import PauseMode
from inferpool.config import PoolConfig, WeightTransferMethod
from inferpool.errors import RequestError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref, get_ref
from inferpool.routing.shards import RouterSet
from inferpool.weights.groups import as_named_tensors, iter_named_tensors
from inferpool.weights.trainer import NativeSender, PoolWeightSyncClient

logger = logging.getLogger(__name__)

Broadcast = Callable[[str, Callable[[Any], Any], float], Awaitable[dict[str, Any]]]


def put_chunks(weights: Any, chunk_bytes: int) -> tuple[list[ray.ObjectRef], int]:
    """Tensors into the object store, at most ``chunk_bytes`` a chunk (one ``ray.put`` each)."""
    refs: list[ray.ObjectRef] = []
    chunk: list[tuple[str, Any]] = []
    size = total = 0
    for name, tensor in iter_named_tensors(weights):
        nb = int(getattr(tensor, "nbytes", 0))
        if chunk and size + nb > chunk_bytes:
            refs.append(ray.put(chunk))
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nb
        total += nb
    if chunk:
        refs.append(ray.put(chunk))
    return refs, total


class WeightPusher:
    """The pool side of weight updates (one per Pool object)."""

    def __init__(self, config: PoolConfig, routers: RouterSet, broadcast: Broadcast) -> None:
        self.config = config
        self.routers = routers
        self.router = routers.primary  # the weight-version ledger
        self._broadcast = broadcast
        self._sender: NativeSender | None = None  # native transfer: this process's end of the group
        self._lock = threading.Lock()

    async def push(
        self,
        weights: Any,
        version: int | str | None,
        *,
        chunk_bytes: int,
        pause_mode: PauseMode | None,
        timeout_s: float,
        method: WeightTransferMethod | None,
    ) -> dict[str, Any]:
        if chunk_bytes < 1:
            raise RequestError(f"chunk_bytes: must be >= 1, got {chunk_bytes}", field="chunk_bytes")
        if pause_mode is not None and pause_mode not in ("abort", "wait", "keep"):
            raise RequestError(f"pause_mode: must be abort, wait, keep or None, got {pause_mode!r}", field="pause_mode")
        t0 = time.perf_counter()
        configured = self.config.weight_transfer.method
        method = method or configured
        if method not in ("object_store", configured):
            raise RequestError(
                f"method: {method!r} needs a pool started with weight_transfer.method={method!r} "
                f"(this one has {configured!r}); 'object_store' always works",
                field="method",
            )
        if method != "object_store":
            if isinstance(weights, ray.ObjectRef):
                weights = await await_ref(weights, timeout_s, "weights")
            named = as_named_tensors(weights)
            label, index = await self._record_version(version)
            out = await asyncio.to_thread(self._send_native, named, label, pause_mode, timeout_s, index)
            await self.routers.agather("set_latest_weights", [], label, index)
            return {"version": label, "seconds": time.perf_counter() - t0, "method": method, **out}
        if isinstance(weights, ray.ObjectRef):
            refs, nbytes = [weights], 0
        else:
            refs, nbytes = put_chunks(weights, chunk_bytes)
        label, index = await self._record_version(version)
        per_engine = await self._broadcast(
            "update_weights", lambda h: h.update_weights.remote(refs, label, pause_mode, index), timeout_s
        )
        keep = refs if self.config.weight_transfer.keep_latest else []
        await self.routers.agather("set_latest_weights", keep, label, index)  # every shard restarts engines
        nbytes = nbytes or max((r["bytes"] for r in per_engine.values()), default=0)
        return {
            "version": label,
            "bytes": nbytes,
            "seconds": time.perf_counter() - t0,
            "method": method,
            "chunks": len(refs),
            "engines": per_engine,
        }

    async def _record_version(self, version: int | str | None) -> tuple[int | str, int | None]:
        """Register an update with the router: its label and its index in the pool's history."""
        label: int | str = await await_ref(self.router.record_version.remote(version), CONTROL_TIMEOUT_S, "router")
        index: int | None = await await_ref(self.router.version_index.remote(label), CONTROL_TIMEOUT_S, "router")
        return label, index

    def _send_native(
        self,
        named: list[tuple[str, Any]],
        label: int | str,
        pause_mode: PauseMode | None,
        timeout_s: float,
        version_index: int | None = None,
    ) -> dict[str, Any]:
        """One native update from this process (blocking; run off the event loop)."""
        with self._lock:
            sender = self._weight_sender(timeout_s)
            client = sender.client
            client.version, client.pause_mode, client.timeout_s = label, pause_mode, timeout_s
            client.version_index = version_index
            client.nbytes = sum(int(getattr(t, "nbytes", 0)) for _, t in named)
            try:
                sender.send(named)
            except BaseException:
                self.drop_sender()  # a failed round leaves the group unusable: form it again next time
                raise
            return {"bytes": client.nbytes, "chunks": 1, "engines": client.per_engine}

    def _weight_sender(self, timeout_s: float) -> NativeSender:
        """This process's end of the transfer group, formed (again) when the engines changed."""
        handles: dict[str, Any] = self.routers.engines()
        if self._sender is not None and self._sender.client.engine_ids == sorted(handles):
            joined = [
                get_ref(h.weight_transfer_joined.remote(), CONTROL_TIMEOUT_S, f"engine {eid}")
                for eid, h in self._sender.client.engines_by_id()
            ]
            if all(joined):
                return self._sender
        self.drop_sender()
        infos = {i.engine_id: i for i in self.routers.engine_infos()}
        engines = [(eid, handles[eid], infos[eid].transfer_ranks if eid in infos else 1) for eid in sorted(handles)]
        client = PoolWeightSyncClient(engines, "keep", timeout_s)
        self._sender = NativeSender.form(self.config.weight_transfer, client, self.config.engines[0].backend)
        logger.info("pool %r: weight transfer group formed with %d engines", self.config.name, len(engines))
        return self._sender

    def drop_sender(self) -> None:
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
