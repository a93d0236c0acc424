"""Node loss on a multi-node cluster, with 200 multi-turn sessions running on fake engines:
a GPU worker (and its engine) lost mid-run, the router's node lost, a session store's node
lost, and a node that never comes back. Each test prints what it measured (run with -s).

Run: .venv/bin/python -m pytest -q -s tests/cluster/test_cluster_node_loss.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from cluster_helpers import LocalCluster, Workload, head_node_id, session_engines, until
from exactness import check_exact

import inferpool as ip
from inferpool.actors.placement import actor_place
from inferpool.config import PlacementConfig

NAMESPACE = "inferpool-cluster-tests"
SESSIONS = 200


@pytest.fixture(autouse=True)
def three_gpu_workers(cluster: LocalCluster) -> None:
    """Each test starts with three one-GPU workers, whatever the test before it left."""
    cluster.top_up_gpu_workers(3)


def start_pool(name: str, tokenizer: str, **config: Any) -> ip.Pool:
    return ip.Pool.start(
        ip.PoolConfig(
            name=name,
            namespace=NAMESPACE,
            engines=[session_engines(tokenizer, replicas=3, num_gpus=1)],
            router=ip.RouterConfig(health_interval_s=0.5, health_timeout_s=2.0, acquire_timeout_s=30),
            sessions=ip.SessionConfig(shards=2),
            **config,
        )
    )


def engine_nodes(pool: ip.Pool) -> dict[str, str]:
    return {eid: e["node_id"] for eid, e in pool.stats()["engines"].items()}


def failovers(pool: ip.Pool) -> float:
    snapshot = pool.metrics_snapshot()
    return sum(v for k, v in snapshot.items() if k.startswith("inferpool_routing_decisions_total") and "failover" in k)


async def store_dead(store: Any) -> bool:
    return actor_place(store).get("actor_state") == "DEAD"


async def not_alive(actor: Any) -> bool:
    return actor_place(actor).get("actor_state") != "ALIVE"


async def healthy(pool: ip.Pool, engine_id: str) -> bool:
    load = await pool.router.load.remote()
    return bool(load.get(engine_id, {}).get("healthy"))


async def lose_node_mid_run(
    cluster: LocalCluster,
    node_id: str,
    work: Workload,
    felt: Callable[[], Awaitable[bool]],
    ready: Callable[[], Awaitable[bool]] | None = None,
) -> list[Any]:
    """Run SESSIONS sessions; once a quarter of their turns are done (and ``ready``), remove
    ``node_id``; sessions keep taking turns (bounded) until ``felt`` says the loss reached the
    pool, then end; wait (bounded) for every one.

    Killing a node's raylet does not stop its actors at that instant: an engine there can
    answer for a moment, and sessions that stopped when the kill returned could all end
    before any call of theirs meets the loss (seen: no failover at all, 1 run in ~5)."""

    async def mid_run() -> bool:
        return work.done_turns >= SESSIONS * work.turns // 4 and (ready is None or await ready())

    work.until_loss = True  # however long the loss takes to show (a loaded machine), sessions are running
    tasks = [asyncio.ensure_future(work.session(i)) for i in range(SESSIONS)]
    try:
        await until(mid_run, "a quarter of the turns done", 120)
        await asyncio.to_thread(cluster.remove, cluster.node(node_id))
        work.loss_at = time.monotonic()
        await until(felt, "the loss seen by Ray and the pool", 60)
        work.loss_felt = True
        return list(await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 240))
    finally:
        for t in tasks:
            t.cancel()


def report(what: str, work: Workload, results: list[Any], **extra: Any) -> None:
    ok = sum(not isinstance(r, BaseException) for r in results)
    after = [s for t, s in work.turn_log if t >= work.loss_at]
    figures = {
        "sessions_ok": f"{ok}/{len(results)}",
        "loss_to_last_turn_s": round(max(t for t, _ in work.turn_log) - work.loss_at, 2),
        "slowest_turn_after_loss_s": round(max(after, default=0.0), 2),
        **extra,
    }
    print(f"\n[{what}] " + " ".join(f"{k}={v}" for k, v in figures.items()))


async def test_losing_a_gpu_worker_loses_no_session_and_a_joining_node_gets_the_engine_back(
    cluster: LocalCluster, tiny_tokenizer_path: str
) -> None:
    pool = start_pool("cl-loss", tiny_tokenizer_path)
    try:
        nodes = engine_nodes(pool)
        victim = "e1"
        work = Workload(pool)
        handle = pool.engine_handle(victim)

        async def victim_busy() -> bool:  # lose the node while its engine holds requests
            return bool((await handle.stats.remote()).in_flight)

        results = await lose_node_mid_run(cluster, nodes[victim], work, lambda: not_alive(handle), victim_busy)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for state, outs in results:
            check_exact(state, outs)
        assert failovers(pool) >= 1  # requests on the lost engine were retried on another one

        # the pool keeps serving on the surviving nodes; nothing waits on the lost one
        t0 = time.monotonic()
        stats = pool.stats()
        stats_s = time.monotonic() - t0
        assert stats["engines"][victim]["actor_state"] == "RESTARTING" and not stats["engines"][victim]["healthy"]
        served = await asyncio.gather(*(pool.generate([3, 4, 5], {"max_tokens": 2}) for _ in range(30)))
        assert {r.engine_id for r in served} == {"e0", "e2"}
        t0 = time.monotonic()  # calls to every engine skip the lost one instead of waiting for it
        update = await pool.update_weights({"w": np.ones((8, 8), np.float32)}, version="while-lost", timeout_s=60)
        await pool.pause()
        await pool.resume()
        broadcast_s = time.monotonic() - t0
        assert sorted(update["engines"]) == ["e0", "e2"] and broadcast_s < 30

        # a GPU node joins: Ray restarts the engine there, the router's probe starts it again
        t0 = time.monotonic()
        node = cluster.add_gpu_worker()  # Ray adds nodes from the main thread only
        await until(lambda: healthy(pool, victim), "the lost engine back on the new node", 90)
        back_s = time.monotonic() - t0
        assert engine_nodes(pool)[victim] == node.node_id
        assert pool.stats()["engines"][victim]["weight_version"] == "while-lost"  # the router's probe loaded it
        served = await asyncio.gather(*(pool.generate([3, 4, 6], {"max_tokens": 2}) for _ in range(30)))
        assert victim in {r.engine_id for r in served}
        report(
            "gpu worker lost",
            work,
            results,
            failovers=failovers(pool),
            stats_while_lost_s=round(stats_s, 2),
            update_pause_resume_while_lost_s=round(broadcast_s, 2),
            node_join_to_engine_serving_s=round(back_s, 2),
        )
    finally:
        pool.shutdown()


async def test_losing_the_routers_node_loses_no_session(cluster: LocalCluster, tiny_tokenizer_path: str) -> None:
    control = {"inferpool-test/role": "control"}
    ctl = cluster.add_cpu_worker(control)
    pool = start_pool("cl-router", tiny_tokenizer_path, placement=PlacementConfig(router=control))
    try:
        assert pool.stats()["router"]["node_id"] == ctl.node_id
        work = Workload(pool)

        async def router_restarted() -> bool:
            place = actor_place(pool.router)
            return place.get("restarts", 0) >= 1 or place.get("actor_state") != "ALIVE"

        results = await lose_node_mid_run(cluster, ctl.node_id, work, router_restarted)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for state, outs in results:
            check_exact(state, outs)
        router = pool.stats()["router"]
        assert router["restarts"] >= 1 and router["node_id"] != ctl.node_id  # restarted elsewhere
        assert sorted(pool.engine_ids()) == ["e0", "e1", "e2"]  # its registry rebuilt from the named actors
        served = await asyncio.gather(*(pool.generate([7, 8], {"max_tokens": 2}) for _ in range(30)))
        assert len({r.engine_id for r in served}) == 3
        report("router's node lost", work, results, router_restarted_on=router["node_id"][:8])
    finally:
        pool.shutdown()


async def test_losing_a_stores_node_fails_its_sessions_with_a_session_error(
    cluster: LocalCluster, tiny_tokenizer_path: str
) -> None:
    stores = {"inferpool-test/stores": "yes"}  # the head carries it too: shard 0 there, shard 1 on the worker
    node = cluster.add_cpu_worker(stores)
    pool = start_pool("cl-stores", tiny_tokenizer_path, placement=PlacementConfig(stores=stores))
    try:
        shards = pool.stats()["sessions"]
        assert [shards["shard0"]["node_id"], shards["shard1"]["node_id"]] == [head_node_id(), node.node_id]
        sessions = [pool.session() for _ in range(40)]
        msgs = [{"role": "user", "content": "before"}]
        firsts = await asyncio.gather(*(s.chat(msgs, max_tokens=4, seed=1) for s in sessions))
        on_lost = [pool.session_store(s.session_id) is pool.session_stores()[1] for s in sessions]
        assert any(on_lost) and not all(on_lost)
        store = pool.session_stores()[1]
        await asyncio.to_thread(cluster.remove, node)
        detected_s = await until(lambda: store_dead(store), "Ray marks the lost store dead", 60)

        t0 = time.monotonic()
        for s, first, lost in zip(sessions, firsts, on_lost, strict=True):
            reply = first.choices[0].message.model_dump(exclude_none=True)
            again = [*msgs, reply, {"role": "user", "content": "after"}]
            if lost:  # clear, typed, and at once
                with pytest.raises(ip.SessionError, match="session store shard 1 of pool 'cl-stores' is gone"):
                    await s.state()
                with pytest.raises(ip.SessionError, match="the session's state lived only there and is lost"):
                    await s.chat(again, max_tokens=4, seed=2)
                continue
            out = await s.chat(again, max_tokens=4, seed=2)  # the surviving shard's sessions go on, token-exact
            node0 = (await s.state()).nodes[0]
            assert node0.tokens == out.prompt_token_ids + out.choices[0].token_ids
            assert out.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
        error_s = time.monotonic() - t0
        assert error_s < 60
        lost_count = sum(on_lost)
        print(
            f"\n[store's node lost] sessions_failed_with_SessionError={lost_count}/{len(sessions)} "
            f"sessions_kept={len(sessions) - lost_count} node_death_seen_after_s={detected_s:.2f} "
            f"all_calls_after_loss_s={error_s:.2f}"
        )
    finally:
        pool.shutdown()


async def test_a_node_that_never_comes_back_hangs_no_call(cluster: LocalCluster, tiny_tokenizer_path: str) -> None:
    # gpu_wait_s: an engine that finds no free GPU waits (bounded) for a node to join, as on an autoscaling cluster
    pool = start_pool("cl-gone", tiny_tokenizer_path, placement=PlacementConfig(gpu_wait_s=60))
    try:
        nodes = engine_nodes(pool)
        lost = pool.engine_handle("e2")
        await asyncio.to_thread(cluster.remove, cluster.node(nodes["e2"]))
        await until(lambda: not_alive(lost), "Ray sees the engine's node gone", 60)
        t0 = time.monotonic()
        served = await asyncio.gather(*(pool.generate([9, 9], {"max_tokens": 2}) for _ in range(30)))
        assert {r.engine_id for r in served} <= {"e0", "e1"}
        async with pool.session() as s:
            await s.chat([{"role": "user", "content": "still here"}], max_tokens=3, seed=4)
        assert pool.stats()["engines"]["e2"]["actor_state"] == "RESTARTING"
        calls_s = time.monotonic() - t0
        t0 = time.monotonic()
        assert pool.scale(2) == ["e0", "e1"]  # the lost engine goes first, without a drain wait
        scale_down_s = time.monotonic() - t0
        assert sorted(pool.stats()["engines"]) == ["e0", "e1"]

        scaling = asyncio.ensure_future(asyncio.to_thread(pool.scale, 3))  # no free GPU: it waits
        await until(pending_placement_group, "the new engine's placement group waiting for a GPU", 30)
        assert not scaling.done()
        node = cluster.add_gpu_worker()  # Ray adds nodes from the main thread only
        ids = await asyncio.wait_for(scaling, 60)
        assert len(ids) == 3 and ids[:2] == ["e0", "e1"]
        assert engine_nodes(pool)[ids[2]] == node.node_id
        print(f"\n[node never back] calls_while_lost_s={calls_s:.2f} scale_down_lost_engine_s={scale_down_s:.2f}")
    finally:
        pool.shutdown()


async def pending_placement_group() -> bool:
    from ray.util import placement_group_table

    return any(pg["state"] == "PENDING" for pg in placement_group_table().values())
