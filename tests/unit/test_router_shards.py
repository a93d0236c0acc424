"""Router shards (RouterConfig.shards): each router actor is the authority over its own
engines, callers ask the shard their session hashes to (else their own) and move on to the
others when it is full; the pool's views cover every shard.

Run: pytest tests/unit/test_router_shards.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import ray

import inferpool as ip
from inferpool.routing.shards import engine_shard, router_name


@pytest.fixture(scope="module")
def sharded(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-shards",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    replicas=6,
                    engine_kwargs={"vocab_size": len(tok), "eos_token_id": tok.eos_token_id},
                )
            ],
            router=ip.RouterConfig(shards=2, max_requests_per_engine=8, eval_requests_per_engine=0),
            sessions=ip.SessionConfig(shards=1),
        )
    )
    yield pool
    pool.shutdown()


def test_each_engine_is_registered_with_its_own_shard(sharded: ip.Pool) -> None:
    per_shard = [set(ray.get(r.engines.remote(), timeout=30)) for r in sharded.routers.routers]
    assert len(per_shard) == 2
    assert per_shard[0].isdisjoint(per_shard[1])
    assert per_shard[0] | per_shard[1] == set(sharded.engine_ids())
    for k, ids in enumerate(per_shard):
        assert all(engine_shard(eid, 2) == k for eid in ids)
    assert set(sharded.stats()["engines"]) == set(sharded.engine_ids())  # the views cover every shard


async def test_requests_fill_every_shard_and_give_every_lease_back(sharded: ip.Pool) -> None:
    sp = ip.SamplingParams(max_tokens=4)
    results = await asyncio.gather(*(sharded.generate([1, 2, i % 50 + 3], sp) for i in range(120)))
    assert {r.engine_id for r in results} == set(sharded.engine_ids())  # more than one shard's capacity
    assert sharded.routers.num_leases() == 0
    batch = await sharded.generate_batch([[i + 1] for i in range(100)], sp)
    assert len(batch) == 100 and sharded.routers.num_leases() == 0


async def test_a_full_shard_sends_its_callers_to_the_others(sharded: ip.Pool) -> None:
    home = sharded.dispatcher._first_shard(None)
    mine = [eid for eid in sharded.engine_ids() if engine_shard(eid, 2) == home]
    for eid in mine:
        sharded.set_engine_weight(eid, 0.0)  # the home shard has no capacity left
    try:
        results = await asyncio.gather(*(sharded.generate([4, 5], ip.SamplingParams(max_tokens=2)) for _ in range(10)))
        assert all(engine_shard(r.engine_id, 2) != home for r in results)
    finally:
        for eid in mine:
            sharded.set_engine_weight(eid, 1.0)


async def test_sessions_and_connect_work_across_shards(sharded: ip.Pool) -> None:
    async with sharded.session() as s:
        msgs = [{"role": "user", "content": "shards?"}]
        out = await s.chat(msgs, max_tokens=4)
        msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "again"}]
        out2 = await s.chat(msgs, max_tokens=4)
        state = await s.state()
    assert state.nodes[0].tokens == out2.prompt_token_ids + out2.choices[0].token_ids

    @ray.remote(num_cpus=0)
    def elsewhere(name: str) -> tuple[int, int]:
        pool = ip.Pool.connect(name)
        res = asyncio.run(pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=2)))
        return len(pool.routers), len(res.choices[0].token_ids)

    assert ray.get(elsewhere.remote("unit-shards"), timeout=120) == (2, 2)
    assert ray.get_actor(router_name("unit-shards", 1), namespace="inferpool") is not None


def test_status_shows_every_router_shard(sharded: ip.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    from inferpool.cli import main

    assert main(["status", "--name", "unit-shards"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "2 router shards on node" in first and "0 leases" in first
    assert len(sharded.stats()["router"]["shards"]) == 2
