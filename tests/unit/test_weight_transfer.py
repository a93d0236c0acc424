"""Native weight transfer (the gloo method over real process groups), colocated placement in a
trainer's placement group, and the staleness 'requeue' policy — on fake engines.

Run: pytest tests/unit/test_weight_transfer.py
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

import inferpool as ip


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 16, generator=g),
        "layer0.weight": torch.randn(16, 16, generator=g, dtype=torch.float64),
        "layer0.bias": torch.arange(16, dtype=torch.int32),
        "scalar": torch.tensor(float(seed)),
    }


def digests(named: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in named.items()}


@pytest.fixture(scope="module")
def gloo_pool(ray_session: None) -> Iterator[ip.Pool]:
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-gloo",
            engines=[ip.EngineConfig(backend="fake", replicas=2, engine_kwargs={"vocab_size": 256})],
            weight_transfer=ip.WeightTransferConfig(method="gloo", timeout_s=60),
        )
    )
    yield pool
    pool.shutdown()


async def engine_digests(pool: ip.Pool) -> dict[str, dict[str, float]]:
    return {eid: await pool.engine_handle(eid).control.remote("weights_digest") for eid in sorted(pool.engine_ids())}


async def test_gloo_broadcast_reaches_every_engine_with_its_version(gloo_pool: ip.Pool) -> None:
    sent = state_dict(1)
    out = await gloo_pool.update_weights(sent, version="g1")
    assert out["method"] == "gloo" and out["version"] == "g1"
    assert out["bytes"] == sum(t.nbytes for t in sent.values())
    assert sorted(out["engines"]) == sorted(gloo_pool.engine_ids())
    assert all(e["tensors"] == len(sent) and e["version"] == "g1" for e in out["engines"].values())
    for digest in (await engine_digests(gloo_pool)).values():
        assert digest == pytest.approx(digests(sent))
    res = await gloo_pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=4, ignore_eos=True))
    assert set(res.choices[0].weight_versions) == {"g1"}
    stats = gloo_pool.stats()["engines"]
    assert all(s["last_update_bytes"] == out["bytes"] for s in stats.values())


async def test_the_group_is_reused_and_formed_again_after_scaling(gloo_pool: ip.Pool) -> None:
    await gloo_pool.update_weights(state_dict(2), version="g2")
    sender = gloo_pool._weights._sender
    await gloo_pool.update_weights(state_dict(3), version="g3")
    assert gloo_pool._weights._sender is sender  # same engines: no new rendezvous
    gloo_pool.scale(3)
    try:
        sent = state_dict(4)
        out = await gloo_pool.update_weights(sent, version="g4")
        assert gloo_pool._weights._sender is not sender
        assert len(out["engines"]) == 3
        for digest in (await engine_digests(gloo_pool)).values():  # the new engine got the weights too
            assert digest == pytest.approx(digests(sent))
    finally:
        gloo_pool.scale(2)


async def test_native_update_rejects_bad_weights(gloo_pool: ip.Pool) -> None:
    with pytest.raises(ip.RequestError) as err:
        await gloo_pool.update_weights([], version="bad")
    assert err.value.field == "weights"


def test_native_methods_are_checked_against_the_backends() -> None:
    with pytest.raises(ip.ConfigError, match=r"weight_transfer\.method 'nccl'"):
        ip.PoolConfig(engines=[ip.EngineConfig(backend="fake")], weight_transfer=ip.WeightTransferConfig(method="nccl"))
    with pytest.raises(ip.ConfigError) as err:
        ip.WeightTransferConfig(method="rdma")  # type: ignore[arg-type]
    assert err.value.field == "method"


# -- colocation in a trainer's placement group -------------------------------------------------
def test_placement_fields_are_validated() -> None:
    with pytest.raises(ip.ConfigError, match="bundle_indices needs placement_group"):
        ip.EngineConfig(backend="fake", bundle_indices=[0])
    with pytest.raises(ip.ConfigError, match="2 replicas"):
        ip.EngineConfig(backend="fake", replicas=2, placement_group="pg", bundle_indices=[0])
    with pytest.raises(ip.ConfigError, match="remote backend"):
        ip.EngineConfig(backend="openai", base_url="http://x", placement_group="pg")


def test_engines_start_in_the_given_bundles_and_leave_the_group_alone(ray_session: None) -> None:
    pg = placement_group([{"CPU": 0.1}] * 3, strategy="PACK", name="unit-trainer-pg")
    ray.get(pg.ready(), timeout=60)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-colocated",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    replicas=2,
                    num_cpus=0.05,
                    placement_group=pg,
                    bundle_indices=[2, 0],
                    engine_kwargs={"vocab_size": 64},
                )
            ],
        )
    )
    try:
        infos = {i.engine_id: i for i in pool.engine_infos()}
        assert {eid: i.bundle_index for eid, i in infos.items()} == {"e0": 2, "e1": 0}
        assert {i.placement_group_id for i in infos.values()} == {pg.id.hex()}
        with pytest.raises(ip.ConfigError) as err:  # both listed bundles are taken
            pool.scale(3)
        assert err.value.field == "bundle_indices"
        assert pool.scale(1) == ["e0"]
        assert pool.scale(2) == ["e0", "e1"]
        assert {i.engine_id: i.bundle_index for i in pool.engine_infos()} == {"e0": 2, "e1": 0}  # freed bundle reused
    finally:
        pool.shutdown()
    assert placement_group_table(pg)["state"] == "CREATED"  # the trainer's group survives the pool
    remove_placement_group(pg)


def test_a_placement_group_is_found_by_name(ray_session: None) -> None:
    pg = placement_group([{"CPU": 0.1}], name="unit-trainer-pg-named")
    ray.get(pg.ready(), timeout=60)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-colocated-named",
            engines=[ip.EngineConfig(backend="fake", num_cpus=0.05, placement_group="unit-trainer-pg-named")],
        )
    )
    try:
        (info,) = pool.engine_infos()
        assert info.placement_group_id == pg.id.hex() and info.bundle_index == 0
    finally:
        pool.shutdown()
        remove_placement_group(pg)
    with pytest.raises(ip.ConfigError) as err:
        ip.Pool.start(
            ip.PoolConfig(name="unit-no-pg", engines=[ip.EngineConfig(backend="fake", placement_group="missing")])
        )
    assert err.value.field == "placement_group"


# -- staleness: requeue ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def requeue_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-requeue",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    engine_kwargs={"vocab_size": len(tok), "eos_token_id": tok.eos_token_id},
                )
            ],
            router=ip.RouterConfig(max_staleness=1, staleness_policy="requeue"),
        )
    )
    yield pool
    pool.shutdown()


def sampled_versions(node: Any) -> list[Any]:
    return [v for v, t in zip(node.weight_versions, node.trainable, strict=True) if t]


async def test_requeue_runs_a_stale_turn_again_under_current_weights(requeue_pool: ip.Pool) -> None:
    small = {"w": torch.zeros(4)}
    async with requeue_pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "first"}]
        out = await s.chat(msgs, max_tokens=3)
        msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "second"}]
        await requeue_pool.update_weights(small, version="r1")
        await requeue_pool.update_weights(small, version="r2")  # the first turn is now 2 updates old
        out2 = await s.chat(msgs, max_tokens=3)
        assert out2.choices[0].message.content is not None
        state = await s.state()
    assert len(state.nodes) == 2  # the stale sequence is kept; the turn started a fresh one
    old, new = state.nodes
    assert set(sampled_versions(old)) == {0}
    assert set(sampled_versions(new)) == {"r2"}


# -- engines that join later load the latest weights ---------------------------------------
async def test_engines_added_or_restarted_later_load_the_latest_weights(ray_session: None) -> None:
    import asyncio
    import time

    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-latest",
            engines=[ip.EngineConfig(backend="fake", max_restarts=1, engine_kwargs={"vocab_size": 64})],
            router=ip.RouterConfig(health_interval_s=0.2),
        )
    )
    try:
        await pool.update_weights({"w": torch.ones(8)}, version="k1")
        pool.scale(2)
        assert {eid: s["weight_version"] for eid, s in pool.stats()["engines"].items()} == {"e0": "k1", "e1": "k1"}

        handle = pool.engine_handle("e1")
        killed_at = time.monotonic()
        ray.kill(handle, no_restart=False)  # Ray restarts the actor; the router's probe starts it again
        deadline = time.monotonic() + 60
        while True:
            try:
                st = await asyncio.wait_for(handle.stats.remote(), 5)
                if st.uptime_s < time.monotonic() - killed_at and st.weight_version == "k1":
                    break
            except (ray.exceptions.RayActorError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the restarted engine never loaded the latest weights"
            await asyncio.sleep(0.1)
        assert st.weight_updates == 1  # loaded once, by the router, after the restart
        snapshot = await handle.metrics_snapshot.remote()
        assert snapshot["inferpool_weight_version{engine=e1}"] == pool.stats()["versions"]["k1"] == 1
    finally:
        pool.shutdown()


# -- the torch.distributed trainer used for SGLang engines (here over Gloo, receiver in an actor) --
@ray.remote(num_cpus=0)
class GroupReceiver:
    """Joins like an SGLang engine's init_weights_update_group, receives like update_weights_from_distributed."""

    def join(self, info: dict[str, Any]) -> None:
        from inferpool.weights.groups import init_torch_group

        self.group = init_torch_group(
            info["backend"], info["master_address"], info["master_port"], info["rank_offset"],
            info["world_size"], info["group_name"], 60.0,
        )  # fmt: skip

    def receive(self, meta: dict[str, Any]) -> dict[str, float]:
        import torch.distributed as dist

        out = {}
        for name, dtype, shape in zip(meta["names"], meta["dtype_names"], meta["shapes"], strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(tensor, src=0, group=self.group)
            out[name] = float(tensor.double().sum())
        return out


class ReceiverClient:
    """The four-method client the trainer drives, over one receiving actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.calls: list[str] = []
        self.received: dict[str, float] = {}

    def init_weight_transfer_engine(self, info: dict[str, Any]) -> None:
        self.calls.append("init")
        ray.get(self.actor.join.remote(info), timeout=60)

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, meta: dict[str, Any]) -> None:
        self.calls.append("update")
        self.received = ray.get(self.actor.receive.remote(meta), timeout=60)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")


def test_torch_group_trainer_broadcasts_to_a_receiver_in_another_process(ray_session: None) -> None:
    from inferpool.weights.groups import free_port
    from inferpool.weights.trainer import TorchGroupTrainer

    client = ReceiverClient(GroupReceiver.remote())
    trainer = TorchGroupTrainer.trainer_init("gloo", "127.0.0.1", free_port(), 2, client, 60.0)
    try:
        sent = state_dict(7)
        trainer.send_weights(list(sent.items()))
        assert client.received == pytest.approx(digests(sent))
        assert client.calls == ["init", "start", "update", "finish"]
    finally:
        trainer.shutdown()
