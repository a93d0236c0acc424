"""Router shards: ``RouterConfig.shards`` router actors, each the authority over its own
engines (registry, health, leases), so lease decisions scale past what one actor holds.

An engine belongs to shard ``crc32(engine_id) % shards`` (:func:`engine_shard`): stable
for any engine id, whoever registers it (the fleet, a Serve replica, a restarted router
rediscovering its engines). Shard 0 is the primary: it also holds what belongs to the
whole pool (its config, the session stores, the weight-version ledger). A caller asks the
shard its session hashes to (else the next in turn) and moves on to the others when that
one has no free slot (see :class:`~inferpool.routing.dispatch.Dispatcher`).

:class:`RouterSet` gives the pool's views over every shard (engines, load, leases,
timings, health) and sends per-engine calls to the engine's own shard.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref, get_ref
from inferpool.types import EngineInfo


def router_name(pool: str, shard: int = 0) -> str:
    """The named actor of a router shard (shard 0 keeps the historical name)."""
    return f"{pool}:router" if shard == 0 else f"{pool}:router:{shard}"


def engine_shard(engine_id: str, shards: int) -> int:
    """The shard that owns an engine."""
    return zlib.crc32(engine_id.encode()) % shards if shards > 1 else 0


class RouterSet:
    """The router shards of one pool, in shard order (index 0: the primary)."""

    def __init__(self, routers: Sequence[Any]) -> None:
        if not routers:
            raise ValueError("a pool has at least one router")
        self.routers = list(routers)

    @classmethod
    def of(cls, routers: Any) -> RouterSet:
        """A RouterSet from what callers hold: a RouterSet, a list of shards, or the one router."""
        if isinstance(routers, RouterSet):
            return routers
        return cls(list(routers) if isinstance(routers, list | tuple) else [routers])

    def __len__(self) -> int:
        return len(self.routers)

    @property
    def primary(self) -> Any:
        return self.routers[0]

    def owner(self, engine_id: str) -> Any:
        return self.routers[engine_shard(engine_id, len(self.routers))]

    # -- blocking views (control plane, sync callers) ------------------------------------
    def gather(self, method: str, *args: Any, timeout_s: float = CONTROL_TIMEOUT_S) -> list[Any]:
        """``method(*args)`` on every shard; their answers in shard order."""
        refs = [getattr(r, method).remote(*args) for r in self.routers]
        return [get_ref(ref, timeout_s, f"router shard {i}") for i, ref in enumerate(refs)]

    def engines(self) -> dict[str, Any]:
        """engine_id -> actor handle, over every shard."""
        return {eid: h for part in self.gather("engines") for eid, h in part.items()}

    def engine_infos(self) -> list[EngineInfo]:
        return [info for part in self.gather("engine_infos") for info in part]

    def engine_groups(self) -> dict[str, int]:
        return {eid: g for part in self.gather("engine_groups") for eid, g in part.items()}

    def load(self) -> dict[str, dict[str, Any]]:
        return {eid: v for part in self.gather("load") for eid, v in part.items()}

    def num_leases(self) -> int:
        return sum(self.gather("num_leases"))

    def frozen_objects(self) -> list[int]:
        """Objects each shard froze out of its garbage collection, in shard order."""
        return self.gather("frozen_objects")

    def timing_summary(self) -> dict[str, Any]:
        return {eid: v for part in self.gather("timing_summary") for eid, v in part.items()}

    def metrics_snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in self.gather("metrics_snapshot"):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + value if key.endswith("_total") else value
        return out

    # -- async views (data plane callers) -------------------------------------------------
    async def agather(self, method: str, *args: Any, timeout_s: float = CONTROL_TIMEOUT_S) -> list[Any]:
        return list(
            await asyncio.gather(
                *(
                    await_ref(getattr(r, method).remote(*args), timeout_s, f"router shard {i}")
                    for i, r in enumerate(self.routers)
                )
            )
        )

    async def aengines(self) -> dict[str, Any]:
        return {eid: h for part in await self.agather("engines") for eid, h in part.items()}

    async def aengine_infos(self) -> list[EngineInfo]:
        return [info for part in await self.agather("engine_infos") for info in part]
