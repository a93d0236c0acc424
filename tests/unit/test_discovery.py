"""Engine discovery from a Slurm allocation and from a Ray cluster's GPU nodes (no Slurm, no Ray).

Run: pytest tests/unit/test_discovery.py
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from inferpool.discovery import (
    engines_from_ray_cluster,
    engines_from_ray_cluster_async,
    engines_from_slurm,
    scontrol_hostnames,
)
from inferpool.errors import ConfigError


def fake_hostnames(nodelist: str) -> list[str]:
    assert nodelist == "node[01-04]"
    return ["node01", "node02", "node03", "node04"]


ENV = {"SLURM_JOB_NODELIST": "node[01-04]", "SLURM_JOB_NUM_NODES": "4"}


def test_slurm_leaves_training_nodes_and_spreads_servers() -> None:
    engines = engines_from_slurm(
        num_training_nodes=2, gpus_per_node=8, tensor_parallel=2, base_port=8000, env=ENV, hostnames=fake_hostnames
    )
    urls = [e.base_url for e in engines]
    assert len(engines) == 8  # 2 inference nodes x 8 // 2 servers
    assert urls[:4] == [f"http://node03:{8000 + i}/v1" for i in range(4)]
    assert urls[4:] == [f"http://node04:{8000 + i}/v1" for i in range(4)]
    assert {e.backend for e in engines} == {"vllm_http"}


def test_slurm_engine_fields_and_backend() -> None:
    engines = engines_from_slurm(
        0,
        4,
        4,
        9000,
        backend="sglang_http",
        env={"SLURM_JOB_NODELIST": "node[01-04]"},
        hostnames=fake_hostnames,
        engine_fields={"model": "org/m", "api_key": "k"},
    )
    assert [e.base_url for e in engines] == [f"http://node0{i}:9000/v1" for i in range(1, 5)]
    assert all(e.model == "org/m" and e.api_key == "k" and e.backend == "sglang_http" for e in engines)
    with pytest.raises(ConfigError, match=r"engine_fields\.base_url"):
        engines_from_slurm(0, 4, 4, 9000, env=ENV, hostnames=fake_hostnames, engine_fields={"base_url": "x"})


@pytest.mark.parametrize(
    ("kwargs", "env", "field"),
    [
        ({}, {}, "SLURM_JOB_NODELIST"),
        ({}, {"SLURM_JOB_NODELIST": "  "}, "SLURM_JOB_NODELIST"),
        ({}, {"SLURM_JOB_NODELIST": "node[01-04]", "SLURM_JOB_NUM_NODES": "four"}, "SLURM_JOB_NUM_NODES"),
        ({}, {"SLURM_JOB_NODELIST": "node[01-04]", "SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES"),
        ({"num_training_nodes": 4}, ENV, "num_training_nodes"),
        ({"num_training_nodes": -1}, ENV, "num_training_nodes"),
        ({"tensor_parallel": 16}, ENV, "tensor_parallel"),
        ({"gpus_per_node": 0}, ENV, "gpus_per_node"),
        ({"base_port": 65534}, ENV, "base_port"),
    ],
)
def test_slurm_errors_name_the_variable(kwargs: dict[str, Any], env: dict[str, str], field: str) -> None:
    args: dict[str, Any] = {"num_training_nodes": 1, "gpus_per_node": 8, "tensor_parallel": 1, "base_port": 8000}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field) as err:
        engines_from_slurm(**args, env=env, hostnames=fake_hostnames)
    assert err.value.field == field


def test_slurm_empty_expansion_is_an_error() -> None:
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        engines_from_slurm(0, 1, 1, 8000, env={"SLURM_JOB_NODELIST": "x"}, hostnames=lambda _: [])


def test_scontrol_failures_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("scontrol")

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise subprocess.CalledProcessError(1, "scontrol", stderr="Invalid hostlist")

    def ok(*args: Any, **kwargs: Any) -> Any:
        assert args[0] == ["scontrol", "show", "hostnames", "n[1-2]"] and kwargs["timeout"] > 0
        return subprocess.CompletedProcess(args[0], 0, stdout="n1\nn2\n", stderr="")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(ConfigError, match="scontrol is not installed"):
        scontrol_hostnames("n[1-2]")
    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(ConfigError, match="Invalid hostlist"):
        scontrol_hostnames("n[1-2]")
    monkeypatch.setattr(subprocess, "run", ok)
    assert scontrol_hostnames("n[1-2]") == ["n1", "n2"]


NODES = [
    {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}},
    {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"GPU": 4.0}},
    {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"GPU": 8.0}},
    {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.4", "Resources": {"GPU": 2.0}},
]


def test_ray_cluster_alive_gpu_nodes() -> None:
    engines = engines_from_ray_cluster(8000, tensor_parallel=2, nodes=NODES)
    assert [e.base_url for e in engines] == [
        "http://10.0.0.2:8000/v1",
        "http://10.0.0.2:8001/v1",
        "http://10.0.0.4:8000/v1",
    ]
    only_a = engines_from_ray_cluster(7000, nodes=NODES, exclude_node_ids={"c"})
    assert [e.base_url for e in only_a] == [f"http://10.0.0.2:{7000 + i}/v1" for i in range(4)]
    with pytest.raises(ConfigError, match="gpu_resource"):
        engines_from_ray_cluster(8000, tensor_parallel=4, nodes=NODES, exclude_node_ids={"a"})


async def test_ray_cluster_async_runs_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: NODES)
    engines = await engines_from_ray_cluster_async(8000, gpu_resource="GPU", timeout_s=10)
    assert len(engines) == 6
