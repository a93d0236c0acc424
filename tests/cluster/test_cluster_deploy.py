"""Deploying on a cluster: ``deploy/cluster.yaml`` against Ray's own cluster-config schema,
``deploy/serve.yaml`` deployed the way ``serve deploy`` does it on the multi-node test cluster
(the ingress answers; the Serve-managed engines spread one per GPU node), and real vLLM CPU
engines, one per node, serving token-exact sessions.

Run: .venv/bin/python -m pytest -q tests/cluster/test_cluster_deploy.py
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cluster_helpers import LocalCluster, gpu_node_ids
from exactness import check_exact

import inferpool as ip

DEPLOY = Path(ip.__file__).resolve().parent.parent / "deploy"
NAMESPACE = "inferpool-cluster-tests"


def _commands(cluster: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    return [cmd for key in keys for cmd in cluster.get(key, [])]


def test_cluster_yaml_validates_against_rays_schema_and_only_installs() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    config = prepare_config(raw)  # Ray's defaults filled in, as `ray up` does
    validate_config(config)  # ray/autoscaler/ray-schema.json, plus Ray's own consistency checks
    assert config["head_node_type"] in config["available_node_types"]
    head = config["available_node_types"][config["head_node_type"]]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0 and workers  # a CPU head: the pool's control actors go there

    # setup installs this project from the synced repository, and starts nothing by hand
    synced = {remote for remote, local in raw["file_mounts"].items() if local == "."}
    installs = [cmd for cmd in raw["setup_commands"] if re.search(r"pip install .*-e", cmd)]
    assert installs and all(any(path.replace("~", "$HOME") in cmd for path in synced) for cmd in installs)
    for cmd in _commands(raw):
        assert not re.search(
            r"\b(serve|inferpool)\s+(run|deploy|serve|rollout)\b|Pool\.start|python.*-m inferpool", cmd
        )
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert re.match(r"^(ray stop|(ulimit [^;]+; )?ray start )", cmd), cmd  # only Ray itself starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_deploy_of_serve_yaml_spreads_the_engines_over_the_gpu_nodes(
    cluster: LocalCluster, tiny_tokenizer_path: str
) -> None:
    """What `serve deploy deploy/serve.yaml` does (the dashboard's handler: start Serve with the
    file's options, then apply the config), with the file's args pointed at fake engines."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    raw = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    port = _free_port()
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    raw["proxy_location"] = "HeadOnly"  # one HTTP proxy is enough here (the file: EveryNode)
    app = raw["applications"][0]
    app["args"].update(
        pool_name="cl-serve",
        namespace=NAMESPACE,
        backend="fake",
        model=tiny_tokenizer_path,  # the fake engine renders chat with this tokenizer
        engine={"num_gpus": 1, "engine_kwargs": {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id}},
    )
    gpus = len(gpu_node_ids())
    for dep in app["deployments"]:
        if dep["name"] == "InferpoolEngine":  # as many engine replicas as GPU nodes, from the start
            dep["autoscaling_config"].update(min_replicas=gpus, max_replicas=gpus, initial_replicas=gpus)
        if dep["name"] == "InferpoolIngress":
            dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    config = ServeDeploySchema.model_validate(raw)
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    try:
        client.deploy_apps(config)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:  # bounded: the app builds, the pool starts, replicas register
            try:
                health = httpx.get(f"{url}/health", timeout=10).json()
            except (httpx.HTTPError, ValueError):
                health = {}
            if health.get("healthy_engines") == gpus:
                break
            time.sleep(0.5)
        assert health.get("healthy_engines") == gpus, health
        out = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=60,
        )
        assert out.status_code == 200, out.text
        pool = ip.Pool.connect("cl-serve", namespace=NAMESPACE)
        nodes = [e["node_id"] for eid, e in pool.stats()["engines"].items() if eid.startswith("serve-")]
        assert sorted(nodes) == sorted(gpu_node_ids())  # one Serve engine replica per GPU node
    finally:
        serve.shutdown()
        try:
            ip.Pool.connect("cl-serve", namespace=NAMESPACE).shutdown()  # the builder started it detached
        except ip.ConfigError:
            pass


async def test_real_vllm_engines_one_per_node_keep_sessions_token_exact(
    cluster: LocalCluster, tiny_tokenizer_path: str
) -> None:
    pytest.importorskip("vllm", reason="needs vLLM (make test installs the CPU build)")
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="cl-vllm",
            namespace=NAMESPACE,
            engines=[
                ip.EngineConfig(
                    backend="vllm",
                    model=tiny_tokenizer_path,  # the embedded tiny model, weights and tokenizer
                    replicas=2,
                    num_gpus=1,  # a logical GPU: one engine per worker node
                    engine_core_subprocess=False,  # still the CPU build: in-process, float32
                    dtype="float32",
                    engine_kwargs={"max_model_len": 1024},
                )
            ],
            sessions=ip.SessionConfig(shards=1),
        )
    )
    try:
        nodes = [e["node_id"] for e in pool.stats()["engines"].values()]
        assert len(set(nodes)) == 2 and set(nodes) <= gpu_node_ids()

        async def session(i: int) -> tuple[ip.SessionState, list[Any]]:
            outs = []
            async with pool.session() as s:
                msgs: list[dict[str, Any]] = [{"role": "user", "content": f"node test {i}"}]
                for turn in range(2):
                    out = await s.chat(msgs, max_tokens=8, seed=i * 10 + turn, temperature=1.0)
                    outs.append(out)
                    msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
                return await s.state(), outs

        results = await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(4))), 240)
        for state, outs in results:
            check_exact(state, outs)
        served = {e: s["served"] for e, s in pool.stats()["engines"].items()}
        assert all(count > 0 for count in served.values()), served  # both nodes' engines served turns
    finally:
        pool.shutdown()
