"""Router capacity: acquire+release decisions per second and the latency an acquire adds.

In process (the goal figures): the plain :class:`~inferpool.routing.router.Router` with
8 registered engines (registry entries without engine actors, and health probes off, so
only the decision path runs) on one asyncio loop, the calling thread pinned to one core,
1,000 leases held throughout. Each step acquires one lease and releases the oldest,
so the load stays at 1,000 in flight. Decisions/s counts acquire+release pairs
(goal >= 20,000/s); the added latency is the time one ``acquire`` takes in that state
(goal p99 <= 1 ms). The router actor serves calls one at a time on its loop, so this
service time is what it adds to a request until its loop is saturated.

Through Ray (reference): the same router as the Ray actor the pool starts, fed from
this driver: one acquire round trip at a time (latency), many single acquires in
flight at once (what the per-request pool path does), and ``acquire_many`` /
``release_many`` batches (what ``generate_batch`` does).

Run: python -m inferpool.bench.router_capacity [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, goal, percentile, pinned_to_one_core, ratio, result

ENGINES = 8
IN_FLIGHT = 1_000
DECISIONS_GOAL = 20_000.0
P99_GOAL_MS = 1.0
HEALTH_INTERVAL_S = 1e6  # longer than any run: the registered engines are never probed

# size -> (throughput steps, latency steps, actor round trips, pipelined acquires, batch size, batches)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "full": (200_000, 100_000, 2_000, 1_000, 64, 300),
    "quick": (12_000, 3_000, 200, 300, 64, 20),
    "tiny": (2_000, 1_000, 20, 100, 16, 5),
}


def _router_config() -> Any:
    from inferpool.config import RouterConfig

    # Default capacity (512 per engine, 64 reserved for eval): 8 engines hold 3,584 train leases.
    # The engines are registered without actors (handle None): no health probe may run while the
    # router is measured, or it would mark them all unhealthy (and share the router's loop).
    return RouterConfig(health_interval_s=HEALTH_INTERVAL_S)


def _info(i: int) -> Any:
    from inferpool.types import EngineInfo

    return EngineInfo(engine_id=f"e{i}", backend="fake", model="bench", vocab_size=1024, max_model_len=4096)


async def _in_process(steps: int, latency_steps: int) -> dict[str, float]:
    """Decisions/s and acquire latency of the plain Router at IN_FLIGHT leases held."""
    from inferpool.routing.router import Router

    router = Router(_router_config())
    for i in range(ENGINES):
        await router.register(_info(i), None)
    held: collections.deque[int] = collections.deque()
    for _ in range(IN_FLIGHT):
        held.append((await router.acquire()).lease_id)

    async def churn(n: int) -> None:
        for _ in range(n):
            held.append((await router.acquire()).lease_id)
            await router.release(held.popleft())

    await churn(min(steps, 2_000))  # warm-up
    with Stopwatch() as sw:
        await churn(steps)
    latencies: list[float] = []
    clock = time.perf_counter
    for _ in range(latency_steps):
        t0 = clock()
        lease = await router.acquire()
        latencies.append(clock() - t0)
        held.append(lease.lease_id)
        await router.release(held.popleft())
    assert router.num_leases() == IN_FLIGHT
    return {
        "in_process_decisions_per_s": steps / sw.seconds,
        "in_process_acquire_p50_ms": percentile(latencies, 50) * 1e3,
        "in_process_acquire_p99_ms": percentile(latencies, 99) * 1e3,
        "in_process_acquire_max_ms": max(latencies) * 1e3,
    }


def _through_actor(round_trips: int, pipelined: int, batch: int, batches: int) -> dict[str, float]:
    """The same router as a Ray actor, driven from this (synchronous) driver."""
    import ray

    from inferpool.routing.router import RouterActor

    ensure_ray()
    actor = RouterActor.options(max_concurrency=100_000).remote(_router_config())
    try:
        ray.get([actor.register.remote(_info(i), None) for i in range(ENGINES)])
        held = collections.deque(lease.lease_id for lease in ray.get(actor.acquire_many.remote(IN_FLIGHT)))
        # One round trip at a time: the latency a caller sees.
        latencies: list[float] = []
        for k in range(round_trips + 10):
            t0 = time.perf_counter()
            lease = ray.get(actor.acquire.remote())
            if k >= 10:  # the first calls warm the actor's call path
                latencies.append(time.perf_counter() - t0)
            held.append(lease.lease_id)
            ray.get(actor.release.remote(held.popleft()))
        # Many single acquires in flight, then as many single releases.
        with Stopwatch() as sw_single:
            leases = ray.get([actor.acquire.remote() for _ in range(pipelined)])
            ray.get([actor.release.remote(lease.lease_id) for lease in leases])
        # Batches: one acquire_many and one release_many round trip per batch.
        with Stopwatch() as sw_batch:
            for _ in range(batches):
                leases = ray.get(actor.acquire_many.remote(batch))
                ray.get(actor.release_many.remote([lease.lease_id for lease in leases]))
        remaining = ray.get(actor.num_leases.remote())
    finally:
        ray.kill(actor)
    if remaining != IN_FLIGHT:
        raise RuntimeError(f"router actor holds {remaining} leases, expected {IN_FLIGHT}")
    return {
        "actor_acquire_round_trip_p50_ms": percentile(latencies, 50) * 1e3,
        "actor_acquire_round_trip_p99_ms": percentile(latencies, 99) * 1e3,
        "actor_single_calls_decisions_per_s": pipelined / sw_single.seconds,
        "actor_batched_decisions_per_s": batch * batches / sw_batch.seconds,
    }


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Measure the router in process (goals) and through its Ray actor (reference)."""
    size = "tiny" if tiny else "quick" if quick else "full"
    steps, latency_steps, round_trips, pipelined, batch, batches = SIZES[size]
    with pinned_to_one_core() as core:
        figures = asyncio.run(_in_process(steps, latency_steps))
    figures.update(_through_actor(round_trips, pipelined, batch, batches))
    goals = [
        goal(
            "in-process decisions/s (acquire+release, one core)",
            figures["in_process_decisions_per_s"],
            ">=",
            DECISIONS_GOAL,
            "/s",
        ),
        goal(
            f"in-process acquire p99 at {IN_FLIGHT} in flight",
            figures["in_process_acquire_p99_ms"],
            "<=",
            P99_GOAL_MS,
            "ms",
        ),
    ]
    notes = [
        f"in process: thread pinned to core {core}" if core is not None else "in process: affinity not set",
        "through the actor: "
        f"batched/single-call decisions = "
        f"{ratio(figures['actor_batched_decisions_per_s'], figures['actor_single_calls_decisions_per_s']):.1f}x; "
        f"actor/in-process decisions = "
        f"{ratio(figures['actor_batched_decisions_per_s'], figures['in_process_decisions_per_s']):.2f}",
    ]
    params = {
        "engines": ENGINES,
        "policy": "least_loaded",
        "in_flight": IN_FLIGHT,
        "steps": steps,
        "latency_steps": latency_steps,
        "actor_round_trips": round_trips,
        "actor_pipelined_acquires": pipelined,
        "actor_batch": batch,
        "actor_batches": batches,
    }
    return result("router_capacity", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "router_capacity", *sys.argv[1:]]))
