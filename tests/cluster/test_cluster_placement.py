"""A pool on a multi-node cluster (a head without GPUs, three one-GPU workers): engines one per
GPU node, the router and the session stores off the GPU nodes, use from other nodes and from
several driver processes, and the errors of a pool that is not there or does not fit.

Run: .venv/bin/python -m pytest -q tests/cluster/test_cluster_placement.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from cluster_helpers import LocalCluster, gpu_node_ids, head_node_id, session_engines
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import inferpool as ip
from inferpool.actors.fleet import find_router
from inferpool.config import PlacementConfig

DRIVER = Path(__file__).resolve().parent / "driver.py"
NAMESPACE = "inferpool-cluster-tests"


@pytest.fixture(scope="module")
def pool(cluster: LocalCluster, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="cl-place",
            namespace=NAMESPACE,
            engines=[session_engines(tiny_tokenizer_path, replicas=3, num_gpus=1)],
            router=ip.RouterConfig(health_interval_s=0.5, acquire_timeout_s=20),
            sessions=ip.SessionConfig(shards=2),
        )
    )
    yield pool
    pool.shutdown()


def test_engines_land_one_per_gpu_node_and_control_actors_off_them(pool: ip.Pool) -> None:
    stats = pool.stats()
    nodes = [e["node_id"] for e in stats["engines"].values()]
    assert sorted(nodes) == sorted(gpu_node_ids())  # every GPU node once
    assert all(e["actor_state"] == "ALIVE" and e["healthy"] for e in stats["engines"].values())
    head = head_node_id()
    assert stats["router"]["node_id"] == head  # PlacementConfig: cpu_nodes (the head has no GPU)
    assert [s["node_id"] for s in stats["sessions"].values()] == [head, head]


def test_status_shows_the_node_of_every_engine(pool: ip.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    from inferpool.cli import main

    assert main(["status", "--name", pool.name, "--namespace", pool.namespace]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"router on node {head_node_id()}" in lines[0]
    for eid, entry in pool.stats()["engines"].items():
        line = next(ln for ln in lines if ln.strip().startswith(f"{eid}:"))
        assert f"healthy on node {entry['node_id']}" in line
    assert sum(ln.strip().startswith("sessions[shard") for ln in lines) == 2


@ray.remote(num_cpus=0)
def _on_another_node(name: str, namespace: str, refs: list[ray.ObjectRef]) -> dict[str, Any]:
    """Connect by name from a task, generate, and fetch a session's state by reference."""
    pool = ip.Pool.connect(name, namespace=namespace)
    result = asyncio.run(pool.generate([5, 6, 7], ip.SamplingParams(max_tokens=4, seed=2)))
    state = ray.get(refs[0], timeout=60)
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "token_ids": result.choices[0].token_ids,
        "engine_id": result.engine_id,
        "nodes": [(n.tokens, n.masked_tokens, n.logprobs) for n in state.nodes],
    }


async def test_connect_and_state_ref_from_a_task_on_another_node(pool: ip.Pool) -> None:
    s = pool.session()
    await s.chat([{"role": "user", "content": "from the head"}], n=2, max_tokens=5, seed=1)
    state = await s.state()
    worker = sorted(gpu_node_ids())[0]
    task = _on_another_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False))
    out = await asyncio.wait_for(task.remote(pool.name, pool.namespace, [s.state_ref()]), 120)
    assert out["node_id"] == worker != ray.get_runtime_context().get_node_id()
    here = await pool.generate([5, 6, 7], ip.SamplingParams(max_tokens=4, seed=2))
    assert out["token_ids"] == here.choices[0].token_ids  # the same deterministic engines, reached from there
    assert out["engine_id"] in pool.engine_ids()
    assert out["nodes"] == [(n.tokens, n.masked_tokens, n.logprobs) for n in state.nodes]
    assert len(state.nodes) == 2
    await s.close()


async def test_generate_batch_from_several_driver_processes_at_once(cluster: LocalCluster, pool: ip.Pool) -> None:
    count = 48
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(DRIVER),
            pool.name,
            pool.namespace,
            str(k * count),
            str(count),
            env=cluster.driver_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for k in range(3)
    ]
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 180)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    prompts = [[1 + i % 200, 7, 9] for i in range(3 * count)]
    expected = await pool.generate_batch(prompts, ip.SamplingParams(max_tokens=5, seed=3))
    got = [row for r in results for row in r["results"]]
    assert [tokens for _, tokens in got] == [r.choices[0].token_ids for r in expected]
    assert len({engine for engine, _ in got}) == 3  # the drivers' requests spread over every engine
    assert {r["node_id"] for r in results} == {head_node_id()}  # drivers run where they were started


def test_connect_to_a_pool_that_exists_on_no_node_is_a_config_error(pool: ip.Pool) -> None:
    with pytest.raises(ip.ConfigError, match="no pool named 'nowhere' in namespace") as info:
        ip.Pool.connect("nowhere", namespace=pool.namespace)
    assert info.value.field == "name"


def test_too_few_gpus_fail_at_start_with_what_was_asked_and_what_the_cluster_has(
    pool: ip.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inferpool.actors.placement as placement

    def start(replicas: int, num_gpus: float, gpu_wait_s: float = 0.0) -> ip.ConfigError:
        t0 = time.monotonic()
        config = ip.PoolConfig(
            name="cl-too-big",
            namespace=NAMESPACE,
            engines=[ip.EngineConfig(backend="fake", replicas=replicas, num_gpus=num_gpus)],
            placement=PlacementConfig(gpu_wait_s=gpu_wait_s),
        )
        with pytest.raises(ip.ConfigError) as info:
            ip.Pool.start(config)
        assert time.monotonic() - t0 < 20  # no wait for a placement that cannot happen
        assert find_router("cl-too-big", NAMESPACE) is None  # nothing left behind: the name is free
        return info.value

    err = start(4, 1.0)  # more GPUs than the cluster has
    assert err.field == "replicas"
    assert "ask for 4 GPUs (engines[0]: 4 x num_gpus=1)" in str(err)
    assert "the cluster has 3 GPUs on 3 nodes" in str(err)
    err = start(1, 2.0)  # more GPUs than any one node has
    assert err.field == "num_gpus"
    assert "asks for 2 GPUs on one node, but the largest node of the cluster has 1" in str(err)
    monkeypatch.setattr(placement, "_FREE_GRACE_S", 0.5)
    err = start(1, 1.0)  # GPUs exist, but the module's pool holds them all
    assert err.field == "replicas" and "0 free now" in str(err)
    err = start(1, 1.0, gpu_wait_s=1.0)  # waits (its placement group pending) for a GPU node that never joins
    assert "0 free now" in str(err) and "waited 1s for GPU nodes to join" in str(err)
    from ray.util import placement_group_table

    assert not [pg for pg in placement_group_table().values() if pg["state"] == "PENDING"]  # removed again
    assert len(pool.engine_infos()) == 3  # the running pool is untouched


def test_the_control_actor_rule_on_other_cluster_shapes() -> None:
    from inferpool.actors.placement import HEAD_RESOURCE, control_nodes

    def node(node_id: str, gpus: int = 0, head: bool = False, **labels: str) -> dict[str, Any]:
        resources = {"CPU": 4.0, **({"GPU": float(gpus)} if gpus else {}), **({HEAD_RESOURCE: 1.0} if head else {})}
        return {"NodeID": node_id, "Resources": resources, "Labels": labels}

    cpu_head, gpu_head = node("h", head=True), node("h", gpus=8, head=True)
    c1, c2, g1 = node("c1", role="ctl"), node("c2"), node("g1", gpus=1, role="ctl")
    assert control_nodes("cpu_nodes", [g1, c1, cpu_head]) == ["h"]  # a CPU head takes them all
    assert control_nodes("cpu_nodes", [gpu_head, c2, g1, c1]) == ["c1", "c2"]  # else the CPU nodes, in turn
    assert control_nodes("cpu_nodes", [gpu_head, g1]) == []  # none: Ray places them
    assert control_nodes({"role": "ctl"}, [cpu_head, g1, c1, c2]) == ["c1", "g1"]
    assert control_nodes("spread", [cpu_head]) is None and control_nodes("any", [cpu_head]) is None
    with pytest.raises(ip.ConfigError, match=r"PlacementConfig\.stores") as info:
        PlacementConfig(stores="gpu_nodes")
    assert info.value.field == "stores"
