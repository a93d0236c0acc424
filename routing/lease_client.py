"""The caller side of leases: :class:`LeaseClient`, mixed into the
:class:`~inferpool.routing.dispatch.Dispatcher`.

A lease is held for the body of :meth:`LeaseClient.lease`, a construct that cannot be
skipped: cancellation, timeouts, engine death and router restarts all pass through its
``finally``, which gives the lease back by its ask's ticket (see ``routing/leases.py``).
Every ask and give-back of one event-loop turn travels in one call per router shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from inferpool.config import PoolConfig
from inferpool.errors import EngineDeadError
from inferpool.log import Throttle
from inferpool.ray_utils import await_ref, bounded
from inferpool.routing.batching import CallBatcher, LoopLocal
from inferpool.routing.leases import Lease, LeaseAsk, LeaseReturn
from inferpool.routing.shards import RouterSet, engine_shard

logger = logging.getLogger(__name__)

_ROUTER_RESTART_S = 30.0  # how long callers wait for a restarted router
_RELEASE_CONFIRM_S = 10.0  # how long a finished call waits to see its lease given back
_WARN_EVERY_S = 5.0  # at most one failover warning per engine (release warning per shard) this often
# give-backs whose confirmation the enclosing confirm_releases_at_end block waits for
_DEFERRED_CONFIRMS: contextvars.ContextVar[list[tuple[int, asyncio.Future[Any]]] | None] = contextvars.ContextVar(
    "inferpool_deferred_release_confirms", default=None
)


Prepare = Callable[[], Awaitable[None]]  # a caller's own work, run while its lease ask is in flight


@dataclasses.dataclass
class Held:
    """The leases of one ask while they are held; the holder sets ``ok`` when its call succeeded."""

    ticket: str
    leases: list[Lease] = dataclasses.field(default_factory=list)
    ok: bool = False
    attempts: int = 1
    shard: int | None = None  # the router shard that granted the leases
    asking: int | None = None  # the shard an unanswered ask is at (the caller may be cancelled meanwhile)

    @property
    def engine_id(self) -> str:
        return self.leases[0].engine_id


def _confirmed_ok(done: asyncio.Future[Any]) -> bool:
    """Whether a give-back's confirmation already came back, and without an error."""
    return done.done() and not done.cancelled() and done.exception() is None


class LeaseClient:
    """Leases of one process from a pool's router shards."""

    def __init__(self, routers: RouterSet, config: PoolConfig) -> None:
        self.routers = routers
        self.config = config
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        # every lease asked for and given back in one event-loop turn travels in one call per shard
        acquire_timeout = config.router.acquire_timeout_s + 10
        self._lease_calls: list[LoopLocal[CallBatcher]] = [
            LoopLocal(lambda r=r: CallBatcher(r.exchange.remote, acquire_timeout, "router lease exchange"))
            for r in self.routers.routers
        ]
        # a lost engine fails all it held at once, a lost router leaves every release unconfirmed
        self._warnings = Throttle(_WARN_EVERY_S)

    def _ticket(self) -> str:
        return f"{self._prefix}:t{next(self._ids)}"

    def _first_shard(self, session_id: str | None) -> int:
        """The shard a request asks first: its session's (affinity), else this process's own
        (callers spread over the shards; one caller's asks batch into one call per loop turn)."""
        shards = len(self.routers)
        if shards == 1:
            return 0
        return engine_shard(session_id if session_id is not None else self._prefix, shards)

    @contextlib.asynccontextmanager
    async def lease(self, ask: LeaseAsk, prepare: Prepare | None = None) -> AsyncIterator[Held]:
        """Hold the leases of ``ask`` for the body; they are given back on every way out.

        ``prepare`` (the request's own work that the router does not need, e.g. rendering its
        prompt) runs once while the ask is at the router, so the two overlap; if it raises,
        the ask's grant is given back as on any other way out.

        The give-back is queued synchronously in ``finally`` (so a cancelled caller still
        sends it) and names the ask's ticket, so it also covers a grant the caller never
        saw. Unless the caller was cancelled, it waits (bounded) until the router confirmed
        it, so capacity is exact when the call returns; inside :meth:`confirm_releases_at_end`
        that wait moves to the end of the enclosing block.
        """
        held = Held(ask.ticket)
        cancelled = False
        try:
            await self._acquire(ask, held, prepare)
            yield held
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            shard = held.shard if held.shard is not None else held.asking
            if shard is not None:  # else every shard asked answered: nothing granted, nothing to close
                done = self._lease_calls[shard].get().enqueue(LeaseReturn(ask.ticket, None, held.ok, held.attempts))
                deferred = _DEFERRED_CONFIRMS.get()
                if cancelled:
                    pass
                elif deferred is not None:
                    deferred.append((shard, done))
                else:
                    await self._confirmed(shard, done)

    @contextlib.asynccontextmanager
    async def confirm_releases_at_end(self) -> AsyncIterator[None]:
        """Lease give-backs queued in the block are confirmed when it ends, not each on its own:
        a caller with more to send after its engine call (a session turn's record) waits for
        both at once. A cancelled block does not wait, as a cancelled call does not."""
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        token = _DEFERRED_CONFIRMS.set(pending)
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            _DEFERRED_CONFIRMS.reset(token)
            waits = [] if cancelled else [(shard, done) for shard, done in pending if not _confirmed_ok(done)]
            if len(waits) == 1:  # the usual turn: one give-back, not confirmed yet (no task for it)
                await self._confirmed(*waits[0])
            elif waits:
                await asyncio.gather(*(self._confirmed(shard, done) for shard, done in waits))

    async def _confirmed(self, shard: int, done: asyncio.Future[Any]) -> None:
        """Wait (bounded) until router ``shard`` confirmed a give-back; warn if it does not."""
        if _confirmed_ok(done):
            return
        try:
            await bounded(asyncio.shield(done), _RELEASE_CONFIRM_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the router is gone or slow: it reaps expired leases itself
            self._warnings.warn(
                logger,
                f"shard {shard}",
                "lease release at router shard %d was not confirmed (%s: %s); the router reclaims "
                "expired leases itself",
                *(shard, type(exc).__name__, exc),
            )

    async def _acquire(self, ask: LeaseAsk, held: Held, prepare: Prepare | None = None) -> None:
        """Lease slots for ``held``: at once from the first shard, else at once from the others,
        else a bounded wait at the first; if a router actor died, wait (bounded) for Ray to
        restart it. ``prepare`` runs once, after the first ask has left."""
        first = self._first_shard(ask.session_id)
        order = [(first + k) % len(self.routers) for k in range(len(self.routers))]
        deadline = time.monotonic() + _ROUTER_RESTART_S
        delay = 0.05
        while True:
            try:
                for shard in order:
                    held.asking = shard
                    answer = self._lease_calls[shard].get().enqueue(ask)
                    if prepare is not None:
                        await asyncio.sleep(0)  # the batch of asks leaves before this caller's own work
                        run, prepare = prepare, None
                        await run()
                    leases: list[Lease] = await answer
                    if leases:
                        held.leases, held.shard, held.asking = leases, shard, None
                        return
                held.asking = first
                held.leases = await await_ref(
                    self.routers.routers[first].lease_wait.remote(ask),
                    self.config.router.acquire_timeout_s + 10,
                    "router acquire",
                )
                held.shard, held.asking = first, None
                return
            except EngineDeadError:
                if time.monotonic() > deadline:
                    raise
                logger.warning("router unavailable; retrying acquire in %.2fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
