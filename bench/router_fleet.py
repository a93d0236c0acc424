"""The router at fleet scale: lease decisions per second through the router actors, from 4
driver processes on a multi-node test cluster, as the engine count grows, with one router
and with router shards (``RouterConfig.shards``).

A fresh ``ray.cluster_utils.Cluster`` (a head and 3 worker nodes, each worker with one
logical GPU) runs in a subprocess of its own, so a benchmark run's Ray is untouched. The
engines are registry entries without engine actors (health probes off): only the lease
path runs. Each driver is a Ray task spread over the worker nodes, holding ``in_flight``
leases at once through the pool's own :class:`~inferpool.routing.dispatch.Dispatcher`
(acquire, then give back; the dispatcher batches each event-loop turn's asks and
give-backs into one call per shard). Reported per engine count and shard count:
acquire+release decisions/s, the added latency of one lease (p50/p99), and the routers' CPU
milliseconds per decision (from /proc), from which ``per_router_capacity`` is what one
router actor holds with a core of its own. A real fleet needs tens of thousands per second
(1,000 engines x ~50 requests/s); on a machine with a few cores the drivers and the routers
share them, so the curve flattens where the machine does.

Run: python -m inferpool.bench.router_fleet [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from inferpool.bench.common import goal, result

FLEET_GOAL = 50_000.0  # decisions/s a 1,000-engine fleet at ~50 requests/s each needs
DRIVERS = 4
POLICIES = ("least_loaded", "power_of_two")  # least_loaded scans every engine; power_of_two draws two

# size -> (engine counts, shard counts, seconds per point, leases in flight per driver)
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], float, int]] = {
    "full": ((64, 128, 256), (1, 2, 4), 6.0, 256),
    "quick": ((256,), (1, 2), 2.0, 128),  # the curve over engine counts is the full run's
    "tiny": ((16,), (1, 2), 0.5, 8),
}


def _measure(engines: int, policy: str, shards: int, seconds: float, in_flight: int) -> dict[str, float]:
    """One point, run inside the cluster's driver: routers started, engines registered, drivers run."""
    import ray

    from inferpool.bench.process_cpu import ProcessCpu
    from inferpool.config import EngineConfig, PoolConfig, RouterConfig
    from inferpool.routing.router import RouterActor
    from inferpool.routing.shards import engine_shard
    from inferpool.types import EngineInfo

    router_config = RouterConfig(
        policy=policy, shards=shards, health_interval_s=1e6, max_requests_per_engine=1024, eval_requests_per_engine=0
    )
    config = PoolConfig(name=f"fleet-{engines}-{shards}", engines=[EngineConfig(backend="fake")], router=router_config)
    routers = [
        RouterActor.options(max_concurrency=100_000, num_cpus=0).remote(router_config, config, k) for k in range(shards)
    ]
    infos = [
        EngineInfo(engine_id=f"e{i}", backend="fake", model="bench", vocab_size=1024, max_model_len=4096)
        for i in range(engines)
    ]
    ray.get([routers[engine_shard(i.engine_id, shards)].register.remote(i, None) for i in infos], timeout=120)
    drive = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_drive)
    with ProcessCpu(("Router",)) as cpu:
        outs = ray.get([drive.remote(routers, config, seconds, in_flight) for _ in range(DRIVERS)], timeout=600)
    for router in routers:
        ray.kill(router)
    decisions = sum(o["decisions"] for o in outs)
    p50 = max(o["p50_ms"] for o in outs)
    p99 = max(o["p99_ms"] for o in outs)
    router_ms = 1000 * cpu.seconds["Router"] / max(decisions, 1)
    return {
        "decisions_per_s": decisions / seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "router_cpu_us_per_decision": 1000 * router_ms,
        "nodes": float(len({o["node"] for o in outs})),
    }


def _drive(routers: list[Any], config: Any, seconds: float, in_flight: int) -> dict[str, Any]:
    """A driver process: ``in_flight`` coroutines each leasing and giving back, for ``seconds``."""
    import asyncio
    import time

    import ray

    from inferpool.routing.dispatch import Dispatcher
    from inferpool.routing.leases import LeaseAsk

    dispatcher = Dispatcher(routers, config)
    latencies: list[float] = []
    start = time.monotonic() + min(1.0, seconds / 2)  # a warm-up first: not counted
    end = start + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            async with dispatcher.lease(LeaseAsk(ticket=dispatcher._ticket())):
                pass
            if t0 >= start:
                latencies.append(time.perf_counter() - t0)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(in_flight)))

    asyncio.run(main())
    latencies.sort()
    n = len(latencies)
    return {
        "decisions": n,
        "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
        "node": ray.get_runtime_context().get_node_id(),
    }


def _cluster_main(size: str) -> None:
    """The subprocess: a head and 3 worker nodes (one logical GPU each), every point, JSON out."""
    import ray
    from ray.cluster_utils import Cluster

    engine_counts, shard_counts, seconds, in_flight = SIZES[size]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(3):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        points = {
            f"{engines}x{policy}x{shards}": _measure(engines, policy, shards, seconds, in_flight)
            for engines in engine_counts
            for policy in POLICIES
            for shards in shard_counts
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(points), flush=True)


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    size = "tiny" if tiny else "quick" if quick else "full"
    engine_counts, shard_counts, seconds, in_flight = SIZES[size]
    proc = subprocess.run(
        [sys.executable, "-m", "inferpool.bench.router_fleet", "--cluster", size],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the cluster subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    points: dict[str, dict[str, float]] = json.loads(line[len("RESULT ") :])
    figures: dict[str, float] = {}
    for key, point in points.items():
        engines, policy, shards = key.split("x")
        for name, value in point.items():
            figures[f"{name}@{engines}engines_{policy}_{shards}shards"] = value
    largest = engine_counts[-1]
    for policy in POLICIES:
        cpu_us = points[f"{largest}x{policy}x1"]["router_cpu_us_per_decision"]
        figures[f"per_router_capacity_per_s_{policy}@{largest}engines"] = 1e6 / cpu_us if cpu_us > 0 else float("nan")
        figures[f"shards_gain_{policy}@{largest}engines"] = points[f"{largest}x{policy}x{shard_counts[-1]}"][
            "decisions_per_s"
        ] / max(points[f"{largest}x{policy}x1"]["decisions_per_s"], 1e-9)
    best = max(p["decisions_per_s"] for p in points.values())
    goals = [goal("decisions/s, best point", best, ">=", FLEET_GOAL)]
    params = {
        "nodes": "head + 3 workers (1 logical GPU each), one machine",
        "drivers": DRIVERS,
        "in_flight_per_driver": in_flight,
        "seconds_per_point": seconds,
        "engine_counts": list(engine_counts),
        "shard_counts": list(shard_counts),
        "policies": list(POLICIES),
    }
    notes = [
        "engines are registry entries without actors; only the lease path (dispatcher + routers) runs",
        "per_router_capacity_per_s_*: 1 / the router's CPU per decision at one shard (what one router holds "
        "with a core of its own); the machine's cores are shared by the drivers and the routers",
        "shards_gain_*: decisions/s at the most shards over at one (each shard needs a core of its own)",
    ]
    return result("router_fleet", params, figures, goals, notes)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cluster":
        _cluster_main(sys.argv[2])
    else:
        from inferpool.bench.runner import main as _main

        raise SystemExit(_main(["--only", "router_fleet", *sys.argv[1:]]))
