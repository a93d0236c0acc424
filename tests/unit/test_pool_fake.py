"""The Pool on real Ray with fake engines: generate, n-split, batch, errors, leases.

Run: pytest tests/unit/test_pool_fake.py
"""

from __future__ import annotations

import asyncio

import pytest
import ray

import inferpool as ip


def leases(pool: ip.Pool) -> int:
    return ray.get(pool._router.num_leases.remote(), timeout=30)


async def test_generate_returns_choices_with_aligned_logprobs(fake_pool: ip.Pool) -> None:
    res = await fake_pool.generate([1, 2, 3], ip.SamplingParams(n=3, max_tokens=7, seed=5))
    assert res.prompt_token_ids == [1, 2, 3]
    assert [c.index for c in res.choices] == [0, 1, 2]
    for c in res.choices:
        assert len(c.token_ids) == len(c.logprobs) == 7
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == "length"
    assert res.engine_id in fake_pool.engine_ids()
    assert leases(fake_pool) == 0


async def test_same_seed_same_tokens(fake_pool: ip.Pool) -> None:
    sp = ip.SamplingParams(n=2, max_tokens=6, seed=11)
    a = await fake_pool.generate([4, 5], sp)
    b = await fake_pool.generate([4, 5], sp)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]


async def test_large_n_is_split_and_merged_with_consecutive_indices(fake_pool: ip.Pool) -> None:
    sp = ip.SamplingParams(n=20, max_tokens=4, seed=3)
    res = await fake_pool.generate([7, 8, 9], sp)
    assert [c.index for c in res.choices] == list(range(20))
    assert len(res.engine_ids) == 3  # 8 + 8 + 4
    # the split is invisible: choice i is the same sample a single engine gives as index i
    small = await fake_pool.generate([7, 8, 9], ip.SamplingParams(n=8, max_tokens=4, seed=3))
    assert [c.token_ids for c in res.choices[:8]] == [c.token_ids for c in small.choices]
    assert len({tuple(c.token_ids) for c in res.choices}) == 20
    assert leases(fake_pool) == 0


async def test_both_engines_receive_load(fake_pool: ip.Pool) -> None:
    results = await asyncio.gather(*(fake_pool.generate([1, 2], ip.SamplingParams(max_tokens=2)) for _ in range(20)))
    assert {r.engine_id for r in results} == set(fake_pool.engine_ids())


async def test_generate_batch_keeps_order_and_releases(fake_pool: ip.Pool) -> None:
    prompts = [[i + 1, i + 2] for i in range(300)]
    results = await fake_pool.generate_batch(prompts, ip.SamplingParams(max_tokens=3, seed=1), chunk_size=32)
    assert [r.prompt_token_ids for r in results] == prompts
    assert {r.engine_id for r in results} == set(fake_pool.engine_ids())
    assert leases(fake_pool) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, 99999]}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, -1]}, "prompt_token_ids"),
        ({"prompt_token_ids": "hello"}, "prompt_token_ids"),
        ({"prompt_token_ids": [1], "split": "test"}, "split"),
        ({"prompt_token_ids": [1], "sampling": {"n": 0}}, "n"),
        ({"prompt_token_ids": [1], "sampling": {"max_tokens": -5}}, "max_tokens"),
    ],
)
async def test_bad_input_raises_typed_error_naming_the_field(fake_pool: ip.Pool, kwargs: dict, field: str) -> None:
    with pytest.raises(ip.RequestError) as info:
        await fake_pool.generate(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ip.ConfigError, match="backend"):
        ip.EngineConfig(backend="nope")
    with pytest.raises(ip.ConfigError) as info:
        ip.EngineConfig(backend="fake", replicas=0)
    assert info.value.field == "replicas"
    with pytest.raises(ip.RequestError, match="max_tokens"):
        ip.SamplingParams(max_tokens=-1)  # request models raise RequestError
    assert issubclass(ip.RequestError, ip.InferpoolError)


async def test_engine_error_reaches_caller_typed_and_releases_lease(fake_pool: ip.Pool) -> None:
    for eid in fake_pool.engine_ids():
        ray.get(fake_pool.engine_handle(eid).control.remote("inject_fault", {"fault": "raise", "count": 1}))
    try:
        with pytest.raises(ip.BackendError, match="injected fault"):
            await fake_pool.generate([1, 2], ip.SamplingParams(max_tokens=2))
    finally:
        for eid in fake_pool.engine_ids():
            ray.get(fake_pool.engine_handle(eid).control.remote("inject_fault", {"fault": "none"}))
    assert leases(fake_pool) == 0


async def test_cancelled_request_releases_its_lease(fake_pool: ip.Pool) -> None:
    handles = [fake_pool.engine_handle(e) for e in fake_pool.engine_ids()]
    for h in handles:
        ray.get(h.control.remote("inject_fault", {"fault": "hang", "count": 1}))
    task = asyncio.ensure_future(fake_pool.generate([1, 2], ip.SamplingParams(max_tokens=2)))
    # wait until the request holds a lease, then cancel it
    for _ in range(500):
        if leases(fake_pool) == 1:
            break
        await asyncio.sleep(0.01)
    assert leases(fake_pool) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3000):  # bounded (~30 s): on a loaded machine the release takes a while to reach the router
        if leases(fake_pool) == 0:
            break
        await asyncio.sleep(0.01)
    assert leases(fake_pool) == 0
    for h in handles:
        ray.get(h.control.remote("inject_fault", {"fault": "none"}))


async def test_timeout_is_typed_and_retried_elsewhere(fake_pool: ip.Pool) -> None:
    first, second = fake_pool.engine_ids()
    ray.get(fake_pool.engine_handle(first).control.remote("inject_fault", {"fault": "hang", "count": 1}))
    ray.get(fake_pool.engine_handle(second).control.remote("inject_fault", {"fault": "hang", "count": 1}))
    with pytest.raises(ip.EngineTimeoutError):
        # two attempts max here would both hang: use one engine's worth of attempts via timeout
        await fake_pool.generate([1], ip.SamplingParams(max_tokens=1), timeout_s=0.5)
    ray.get(fake_pool._router.check_health.remote(), timeout=30)  # probes close the circuits again
    res = await fake_pool.generate([1], ip.SamplingParams(max_tokens=1), timeout_s=5)
    assert res.choices[0].token_ids
    for _ in range(3000):  # bounded (~30 s): the timed-out attempts' releases are confirmed in the background
        if leases(fake_pool) == 0:
            break
        await asyncio.sleep(0.01)
    assert leases(fake_pool) == 0


def test_connect_from_a_ray_task(fake_pool: ip.Pool) -> None:
    @ray.remote(num_cpus=0)
    def worker(name: str, namespace: str) -> list[int]:
        pool = ip.Pool.connect(name, namespace=namespace)
        res = asyncio.run(pool.generate([3, 4, 5], ip.SamplingParams(max_tokens=4, seed=9)))
        return res.choices[0].token_ids

    got = ray.get(worker.remote(fake_pool.name, fake_pool.namespace), timeout=60)
    want = asyncio.run(fake_pool.generate([3, 4, 5], ip.SamplingParams(max_tokens=4, seed=9)))
    assert got == want.choices[0].token_ids


def test_stats_counts_served_requests(fake_pool: ip.Pool) -> None:
    before = sum(e["served"] for e in fake_pool.stats()["engines"].values())
    asyncio.run(fake_pool.generate([1, 2], ip.SamplingParams(max_tokens=2)))
    after = fake_pool.stats()["engines"]
    assert sum(e["served"] for e in after.values()) == before + 1
    assert all(e["healthy"] for e in after.values())


def test_start_twice_with_same_name_is_a_config_error(fake_pool: ip.Pool) -> None:
    with pytest.raises(ip.ConfigError, match="already running"):
        ip.Pool.start(ip.PoolConfig(name=fake_pool.name, engines=[ip.EngineConfig(backend="fake")]))


async def test_scoring_on_a_backend_without_prompt_logprobs_is_a_clear_error(fake_pool: ip.Pool) -> None:
    with pytest.raises(ip.RequestError, match="prompt logprobs"):
        await fake_pool.get_logprobs(input_ids=[1, 2, 3], top_k=2)
    with pytest.raises(ip.RequestError, match="exactly one"):
        await fake_pool.get_logprobs(input_ids=[1], prompt="x")
