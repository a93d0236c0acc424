"""The router: the single authority over which engine serves a request.

It keeps the engine registry, per-engine in-flight counts, health, and leases. It is
not on the payload path: a caller acquires a lease (an engine id with a reserved
slot), calls the engine actor itself, and releases the lease. Choosing and reserving
happen in one event-loop step, so there is no check-then-act race.

:class:`Router` is a plain class (testable without Ray); :data:`RouterActor` is the
same class as a Ray actor.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray

from inferpool.config import PoolConfig, RouterConfig
from inferpool.errors import EngineOverloadedError, InferpoolError, NoHealthyEngineError, RequestError
from inferpool.log import setup_logging
from inferpool.metrics import MetricsRegistry
from inferpool.routing.health import EngineEntry, HealthChecks
from inferpool.routing.leases import Lease, LeaseAsk, LeaseBook, LeaseReturn
from inferpool.routing.policy import EngineSlot, Policy, RouteRequest, make_policy, policy_options
from inferpool.routing.stats import RequestTimings
from inferpool.types import EngineInfo, Split

logger = logging.getLogger(__name__)


class Router(HealthChecks):
    """Engine registry + selection policy + leases (health checks:
    :class:`~inferpool.routing.health.HealthChecks`, itself a
    :class:`~inferpool.routing.weight_ledger.WeightLedger` of weight versions)."""

    def __init__(self, config: RouterConfig, pool_config: PoolConfig | None = None, shard: int = 0) -> None:
        setup_logging()
        self.config = config
        self.pool_config = pool_config
        self.shard = shard  # of RouterConfig.shards (routing/shards.py); 0 also holds the pool's ledger
        self.policy: Policy = make_policy(config.policy_target(), **policy_options(config))
        self.timings = RequestTimings()
        self.metrics = MetricsRegistry()
        self._workload_weights: dict[str, float] = {}
        self._workload_in_flight: dict[str, int] = {}
        self._engines: dict[str, EngineEntry] = {}
        self._slot_list: list[EngineSlot] | None = None
        # tombstones outlive any ask that may still arrive: its wait in the router plus transit
        self.book = LeaseBook(tombstone_ttl_s=2 * config.acquire_timeout_s + 60.0)
        self._leases = self.book.leases  # lease_id -> Lease
        self._ids = itertools.count(1)
        self._changed: asyncio.Condition | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._loading: set[asyncio.Task[None]] = set()
        self._stores: list[Any] = []
        self._init_ledger()
        self.decisions = 0

    # -- registry ---------------------------------------------------------------------
    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        cond = self._cond()
        async with cond:
            cond.notify_all()

    async def register(
        self,
        info: EngineInfo,
        handle: Any,
        capacity: int | None = None,
        eval_quota: int | None = None,
        group: int = 0,
    ) -> None:
        """Add (or replace) an engine; it becomes routable at once."""
        slot = EngineSlot(
            engine_id=info.engine_id,
            capacity=capacity or self.config.max_requests_per_engine,
            eval_quota=self.config.eval_requests_per_engine if eval_quota is None else eval_quota,
        )
        old = self._engines.get(info.engine_id)
        if old is not None:  # keep counts of leases still out on it
            slot.train_in_flight = old.slot.train_in_flight
            slot.eval_in_flight = old.slot.eval_in_flight
        info.group = group
        self._engines[info.engine_id] = EngineEntry(slot=slot, handle=handle, info=info, group=group)
        self._slot_list = None
        logger.info("router: engine %s registered (%s, %s)", info.engine_id, info.backend, info.model)
        await self._notify()

    async def deregister(self, engine_id: str) -> None:
        self._engines.pop(engine_id, None)
        self._slot_list = None
        await self._notify()

    async def engines(self) -> dict[str, Any]:
        """engine_id -> actor handle."""
        await self._ensure_started()
        return {eid: e.handle for eid, e in self._engines.items()}

    def engine_groups(self) -> dict[str, int]:
        """engine_id -> index of its group in PoolConfig.engines."""
        return {eid: e.group for eid, e in self._engines.items()}

    async def engine_infos(self) -> list[EngineInfo]:
        await self._ensure_started()
        return [e.info for e in self._engines.values()]

    def get_pool_config(self) -> PoolConfig | None:
        return self.pool_config

    def set_stores(self, stores: list[Any]) -> None:
        """Remember the pool's SessionStore actor handles (shard order)."""
        self._stores = list(stores)

    async def stores(self) -> list[Any]:
        await self._ensure_started()
        return self._stores

    def _slots(self) -> list[EngineSlot]:
        """Every engine's slot (kept while the registry does not change)."""
        if self._slot_list is None:
            self._slot_list = [e.slot for e in self._engines.values()]
        return self._slot_list

    # -- leases -----------------------------------------------------------------------
    def _workload_full(self, workload: str | None, split: Split) -> bool:
        if workload is None or workload not in self._workload_weights:
            return False
        share = self._workload_weights[workload] * sum(
            e.slot.limit(split) for e in self._engines.values() if e.slot.healthy
        )
        return self._workload_in_flight.get(workload, 0) >= int(share)

    def _try_reserve(self, request: RouteRequest, workload: str | None = None, ticket: str = "") -> Lease | None:
        if self._workload_full(workload, request.split):
            return None
        choice = self.policy.choose(self._slots(), request)
        if choice is None:
            return None
        choice.reserve(request.split)
        outcome_of = getattr(self.policy, "last_outcome", None)
        outcome = outcome_of() if callable(outcome_of) else None
        self.metrics.inc("inferpool_routing_decisions_total", policy=self.policy.name, outcome=outcome or "chosen")
        if workload is not None:
            self._workload_in_flight[workload] = self._workload_in_flight.get(workload, 0) + 1
        self.policy.on_served(choice.engine_id, request)
        self.decisions += 1
        lease = Lease(
            lease_id=next(self._ids),
            engine_id=choice.engine_id,
            split=request.split,
            deadline=time.monotonic() + self.config.lease_timeout_s,
            workload=workload,
            started=time.monotonic(),
            ticket=ticket,
        )
        self.book.add(lease)
        return lease

    def _no_slot_error(self, request: RouteRequest, waited: float) -> Exception:
        healthy = [e for e in self._engines.values() if e.slot.healthy and e.slot.engine_id not in request.exclude]
        if not healthy:
            states = (
                ", ".join(
                    f"{eid}: {'excluded' if eid in request.exclude else e.last_error or 'unhealthy'}"
                    for eid, e in self._engines.items()
                )
                or "no engines registered"
            )
            return NoHealthyEngineError(f"no healthy engine after waiting {waited:.1f}s ({states})")
        return EngineOverloadedError(
            f"all {len(healthy)} healthy engines stayed at capacity for {request.split!r} requests "
            f"for {waited:.1f}s (RouterConfig.acquire_timeout_s)"
        )

    async def acquire(
        self,
        split: Split = "train",
        session_id: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        timeout_s: float | None = None,
        workload: str | None = None,
    ) -> Lease:
        """Reserve a slot on the engine the policy picks; wait (bounded) for one."""
        leases = await self.acquire_many(1, split, session_id, prompt_token_ids, exclude, timeout_s, workload)
        return leases[0]

    async def acquire_many(
        self,
        count: int,
        split: Split = "train",
        session_id: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        exclude: Sequence[str] = (),
        timeout_s: float | None = None,
        workload: str | None = None,
        ticket: str = "",
    ) -> list[Lease]:
        """Reserve up to ``count`` slots (at least one), spread by the policy; wait (bounded) for
        one. With a ``ticket`` the leases can be given back by it (:meth:`exchange`)."""
        await self._ensure_started()
        if split not in ("train", "eval"):
            raise RequestError(f"split: must be 'train' or 'eval', got {split!r}", field="split")
        if count < 1:
            raise RequestError(f"count: must be >= 1, got {count}", field="count")
        request = RouteRequest(split, session_id, prompt_token_ids, frozenset(exclude))
        timeout = self.config.acquire_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        cond = self._cond()
        while True:
            if self.book.refused(ticket):
                raise RequestError(f"ticket: {ticket!r} was given back before a slot was granted", field="ticket")
            leases: list[Lease] = []
            while len(leases) < count:
                lease = self._try_reserve(request, workload, ticket)
                if lease is None:
                    break
                leases.append(lease)
            if leases:
                return leases
            if self._engines and all(eid in request.exclude for eid in self._engines):
                raise self._no_slot_error(request, time.monotonic() - start)  # waiting cannot help
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0:
                if self._workload_full(workload, request.split):
                    raise EngineOverloadedError(
                        f"workload {workload!r} stayed at its capacity share "
                        f"(weight {self._workload_weights.get(workload or '', 1.0)}) for {timeout:.1f}s"
                    )
                raise self._no_slot_error(request, time.monotonic() - start)
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait(), timeout=min(remaining, 1.0))
                except asyncio.TimeoutError:
                    pass

    async def acquire_batch(self, requests: list[tuple[Any, ...]]) -> list[Lease | None]:
        """Try many leases at once without waiting: a lease, or None where no slot is free now
        (that caller then waits with :meth:`acquire`). Arguments as :meth:`acquire`'s."""
        await self._ensure_started()
        out: list[Lease | None] = []
        for split, session_id, prompt_token_ids, exclude, _timeout, workload in requests:
            request = RouteRequest(split, session_id, prompt_token_ids, frozenset(exclude))
            out.append(self._try_reserve(request, workload))
        return out

    async def exchange(self, items: list[LeaseAsk | LeaseReturn]) -> list[list[Lease] | InferpoolError | None]:
        """One caller's leases of one event-loop turn in one call: every give-back first (it
        frees slots), then every ask without waiting — its leases (up to its count), an empty
        list where no slot is free now (that caller then waits with :meth:`lease_wait`), or the
        error that refuses it. A give-back answers None."""
        await self._ensure_started()
        freed = False
        for item in items:
            if isinstance(item, LeaseReturn):
                for lease in self.book.give_back(item):
                    self._settle(lease, item.ok, item.attempts)
                    freed = True
        out = [None if isinstance(item, LeaseReturn) else self._grant(item) for item in items]
        if freed:
            await self._notify()
        return out

    def _grant(self, ask: LeaseAsk) -> list[Lease] | InferpoolError:
        if ask.split not in ("train", "eval"):
            return RequestError(f"split: must be 'train' or 'eval', got {ask.split!r}", field="split")
        leases: list[Lease] = []
        if not self.book.refused(ask.ticket):
            request = RouteRequest(ask.split, ask.session_id, ask.prompt_token_ids, frozenset(ask.exclude))
            while len(leases) < ask.count:
                lease = self._try_reserve(request, ask.workload, ask.ticket)
                if lease is None:
                    break
                leases.append(lease)
        return leases

    async def lease_wait(self, ask: LeaseAsk, timeout_s: float | None = None) -> list[Lease]:
        """Wait (bounded by ``RouterConfig.acquire_timeout_s``) for at least one slot for ``ask``."""
        return await self.acquire_many(
            ask.count, ask.split, ask.session_id, ask.prompt_token_ids, ask.exclude, timeout_s, ask.workload, ask.ticket
        )

    async def release_batch(self, releases: list[tuple[int, bool, int]]) -> list[None]:
        """Many ``release(lease_id, ok, attempts)`` in one actor call."""
        if any([self._release_one(*r) for r in releases]):
            await self._notify()
        return [None] * len(releases)

    def _release_one(self, lease_id: int, ok: bool = False, attempts: int = 1) -> bool:
        lease = self.book.pop(lease_id)
        if lease is None:
            return False  # already released (idempotent)
        self._settle(lease, ok, attempts)
        return True

    def _settle(self, lease: Lease, ok: bool, attempts: int) -> None:
        """Free the slot a lease held (the lease has left the book)."""
        engine = self._engines.get(lease.engine_id)
        if engine is not None:
            engine.slot.release(lease.split)
        if lease.workload is not None:
            self._workload_in_flight[lease.workload] = max(0, self._workload_in_flight.get(lease.workload, 0) - 1)
        if ok:
            self.timings.record(lease.engine_id, time.monotonic() - lease.started, lease.split, attempts)

    async def release(self, lease_id: int, ok: bool = False, attempts: int = 1) -> None:
        """Give the slot back (idempotent); ``ok`` records the request's time and attempts."""
        if self._release_one(lease_id, ok, attempts):
            await self._notify()

    async def release_many(self, lease_ids: Sequence[int], ok: bool = False) -> None:
        if any([self._release_one(lid, ok) for lid in lease_ids]):
            await self._notify()

    # -- weights ----------------------------------------------------------------------
    async def set_engine_weight(self, engine_id: str, weight: float) -> None:
        """Scale an engine's usable capacity (0..1); 0 parks it without dropping in-flight work."""
        if not 0.0 <= weight <= 1.0:
            raise RequestError(f"weight: must be within [0, 1], got {weight}", field="weight")
        engine = self._engines.get(engine_id)
        if engine is None:
            raise RequestError(f"engine_id: no engine {engine_id!r}", field="engine_id")
        engine.slot.weight = weight
        await self._notify()

    async def set_workload_weight(self, workload: str, weight: float) -> None:
        """Cap a workload's share (0..1) of the pool's capacity; 0 parks it (its callers wait,
        bounded, while every other workload keeps running)."""
        if not 0.0 <= weight <= 1.0:
            raise RequestError(f"weight: must be within [0, 1], got {weight}", field="weight")
        self._workload_weights[workload] = weight
        await self._notify()

    def timing_summary(self) -> dict[str, Any]:
        return self.timings.summary()

    def metrics_snapshot(self) -> dict[str, float]:
        return self.metrics.snapshot()

    async def report_failure(self, engine_id: str, error: str) -> None:
        """A caller saw this engine die or hang: stop routing to it until a probe passes."""
        engine = self._engines.get(engine_id)
        self.metrics.inc("inferpool_routing_decisions_total", policy=self.policy.name, outcome="failover")
        if engine is not None:
            engine.failed_at = time.monotonic()  # a probe already under way cannot close the circuit
        if engine is not None and engine.slot.healthy:
            logger.warning("router: engine %s marked unhealthy: %s", engine_id, error)
            engine.slot.healthy = False
            engine.last_error = error
            await self._notify()

    def _reap_expired_leases(self) -> None:
        now = time.monotonic()
        for lid in self.book.expired(now):
            logger.warning("router: reclaiming lease %s (not released in time)", lid)
            self._release_one(lid)
        self.book.forget_tombstones(now)

    # -- views ------------------------------------------------------------------------
    def load(self) -> dict[str, dict[str, Any]]:
        """Per-engine router view: healthy, in flight per split, capacity, leases."""
        return {
            eid: {
                "healthy": e.slot.healthy,
                "train_in_flight": e.slot.train_in_flight,
                "eval_in_flight": e.slot.eval_in_flight,
                "capacity": e.slot.capacity,
                "eval_quota": e.slot.eval_quota,
                "weight": e.slot.weight,
                "queue_len": e.slot.queue_len,
                "kv_cache_usage": e.slot.kv_cache_usage,
                "prefix_cache_hit_rate": e.prefix_cache_hit_rate,
                "last_error": e.last_error,
            }
            for eid, e in self._engines.items()
        }

    def num_leases(self) -> int:
        return len(self.book)

    def lease_counts(self) -> dict[str, int]:
        """Leases out, open tickets and tombstones (tickets given back before their ask arrived)."""
        return self.book.counts()

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for task in list(self._loading):
            task.cancel()


RouterActor = ray.remote(num_cpus=0, max_restarts=-1)(Router)
