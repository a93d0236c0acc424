"""The request path keeps its promises on every path: no lease is ever lost (cancelled
before, during or after the router call, in the batcher, on the engine, timed out), a
session handle stays usable whatever its first call did, the staleness bound is checked
under the session's lock, and bad input is refused before an engine sees it.

Run: pytest tests/unit/test_soundness.py
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from waiting import wait_engines_idle, wait_in_flight

import inferpool as ip

CAPACITY = 8  # one engine, 8 train slots: a handful of leaked leases starves it


@pytest.fixture(scope="module", params=[True, False], ids=["batched", "per_call"])
def tight_pool(request: pytest.FixtureRequest, ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    """One fake engine with little capacity and a few ms per token, so calls are in flight
    when they are cancelled, and a lost lease shows at once; engine calls batched per loop
    turn (the default) and one actor call per request."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name=f"unit-soundness-{request.param_index}",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    engine_kwargs={
                        "vocab_size": len(tok),
                        "eos_token_id": tok.eos_token_id,
                        "decode_latency_per_token_s": 0.002,
                        "max_model_len": 1024,
                    },
                )
            ],
            router=ip.RouterConfig(
                max_requests_per_engine=CAPACITY,
                eval_requests_per_engine=0,
                acquire_timeout_s=5.0,
                max_staleness=0,
                batch_engine_calls=request.param,
            ),
            sessions=ip.SessionConfig(shards=1),
        )
    )
    yield pool
    pool.shutdown()


async def router_in_flight(pool: ip.Pool) -> int:
    """Leases the router holds plus the slots it counts as taken (both must reach 0)."""
    leases = await pool.router.num_leases.remote()
    load = await pool.router.load.remote()
    return int(leases) + sum(e["train_in_flight"] + e["eval_in_flight"] for e in load.values())


async def settle(pool: ip.Pool, deadline_s: float = 10.0) -> None:
    """Wait (bounded) until nothing is leased or in flight; fail with what is left."""
    end = time.monotonic() + deadline_s
    left = -1
    while time.monotonic() < end:
        left = await router_in_flight(pool)
        if left == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{left} leases still held {deadline_s}s after every call ended")


async def served_at_once(pool: ip.Pool) -> None:
    """The next request gets a slot without waiting for any reaper."""
    res = await asyncio.wait_for(pool.generate([5, 6, 7], ip.SamplingParams(max_tokens=2)), 5.0)
    assert res.choices[0].token_ids


async def cancel_after(coro: Any, delay_s: float) -> None:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(delay_s)
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, ip.InferpoolError):
        pass


# -- leases -------------------------------------------------------------------------------------
async def test_generate_cancelled_1ms_in_leaks_nothing(tight_pool: ip.Pool) -> None:
    sp = ip.SamplingParams(max_tokens=8)
    await asyncio.gather(*(cancel_after(tight_pool.generate([1, 2, 3], sp), 0.001) for _ in range(10)))
    await settle(tight_pool)
    await served_at_once(tight_pool)


async def test_generate_batch_cancelled_2ms_in_leaks_nothing(tight_pool: ip.Pool) -> None:
    prompts = [[i + 1, i + 2] for i in range(40)]  # more prompts than slots: some wait in the router
    await cancel_after(tight_pool.generate_batch(prompts, ip.SamplingParams(max_tokens=8)), 0.002)
    await settle(tight_pool)
    await served_at_once(tight_pool)


async def test_wait_for_timeouts_leak_nothing(tight_pool: ip.Pool) -> None:
    for _ in range(20):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tight_pool.generate([3, 4], ip.SamplingParams(max_tokens=16)), 0.003)
    await settle(tight_pool)
    await served_at_once(tight_pool)


async def test_session_chat_cut_by_wait_for_leaks_nothing(tight_pool: ip.Pool) -> None:
    s = tight_pool.session()
    for _ in range(10):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.chat([{"role": "user", "content": "hi"}], max_tokens=32), 0.005)
    await settle(tight_pool)
    await served_at_once(tight_pool)


async def test_give_backs_deferred_to_the_end_of_a_block_are_confirmed_there(tight_pool: ip.Pool) -> None:
    """A session turn confirms its lease give-back together with its record: inside
    ``confirm_releases_at_end`` the wait moves to the block's end, where it happens."""
    from inferpool.routing.lease_client import _DEFERRED_CONFIRMS

    async with tight_pool.dispatcher.confirm_releases_at_end():
        await asyncio.gather(*(tight_pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=2)) for _ in range(3)))
        pending = list(_DEFERRED_CONFIRMS.get() or [])
        assert len(pending) == 3  # one give-back per call, not yet waited for
    assert all(done.done() and not done.cancelled() and done.exception() is None for _, done in pending)
    assert _DEFERRED_CONFIRMS.get() is None
    assert await router_in_flight(tight_pool) == 0  # confirmed: nothing left to settle
    async with tight_pool.session() as s:
        for _ in range(3):
            await s.chat([{"role": "user", "content": "hi"}], max_tokens=4)
            assert await router_in_flight(tight_pool) == 0


async def test_a_deferred_give_back_is_waited_for_only_until_confirmed_and_a_failed_one_is_reported(
    tight_pool: ip.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """At the end of a ``confirm_releases_at_end`` block, give-backs the router already
    confirmed are not waited for again; one whose confirmation failed is still reported."""
    from inferpool.routing.lease_client import _DEFERRED_CONFIRMS

    loop = asyncio.get_running_loop()
    confirmed, failed, later = loop.create_future(), loop.create_future(), loop.create_future()
    confirmed.set_result(None)
    failed.set_exception(RuntimeError("router shard lost"))
    dispatcher = tight_pool.dispatcher
    # DEBUG too: the warning is throttled per shard, and an earlier test may have warned for shard 0
    with caplog.at_level("DEBUG", logger="inferpool.routing.lease_client"):
        async with dispatcher.confirm_releases_at_end():
            pending = _DEFERRED_CONFIRMS.get()
            assert pending is not None
            pending += [(0, confirmed), (0, failed)]
        assert "router shard lost" in caplog.text  # the failed one is reported, not skipped
        block = asyncio.ensure_future(_end_with(dispatcher, later))
        for _ in range(20):  # loop turns enough for a block with nothing to wait for to end
            await asyncio.sleep(0)
        assert not block.done()  # an unconfirmed give-back is waited for
        later.set_result(None)
        await asyncio.wait_for(block, 10)


async def _end_with(dispatcher: Any, done: asyncio.Future[Any]) -> None:
    from inferpool.routing.lease_client import _DEFERRED_CONFIRMS

    async with dispatcher.confirm_releases_at_end():
        pending = _DEFERRED_CONFIRMS.get()
        assert pending is not None
        pending.append((0, done))


async def test_thousands_of_random_cancellations_leave_the_pool_idle_and_serving(tight_pool: ip.Pool) -> None:
    """Generate, generate_batch and session chat calls, cancelled at random moments (before,
    during and after the router call, in the batcher, on the engine): afterwards the router
    holds nothing and the pool serves at once."""
    rng = random.Random(1234)
    sessions = [tight_pool.session() for _ in range(8)]
    sp = ip.SamplingParams(max_tokens=4)

    def call() -> Any:
        kind = rng.random()
        if kind < 0.6:
            return tight_pool.generate([rng.randrange(1, 200) for _ in range(4)], sp)
        if kind < 0.8:
            return tight_pool.generate_batch([[rng.randrange(1, 200)] for _ in range(rng.randrange(1, 12))], sp)
        return rng.choice(sessions).chat([{"role": "user", "content": "q"}], max_tokens=4)

    total = 0
    for _wave in range(20):
        calls = [cancel_after(call(), rng.uniform(0.0, 0.012)) for _ in range(100)]
        await asyncio.gather(*calls)
        total += len(calls)
    assert total == 2000
    await settle(tight_pool)
    await wait_engines_idle(tight_pool)
    await served_at_once(tight_pool)
    counts = await tight_pool.router.lease_counts.remote()
    assert counts["leases"] == 0 and counts["tickets"] == 0


async def test_a_turn_renders_while_its_lease_ask_is_at_the_router(tight_pool: ip.Pool) -> None:
    """The render a turn hands the dispatcher runs once, after its lease ask has left (the two
    overlap), and the engine gets exactly what it rendered."""
    dispatcher = tight_pool.dispatcher
    seen: list[int] = []

    def render() -> list[int]:
        seen.append(len(dispatcher._lease_calls[0].get()._pending))  # asks still queued here
        return [7, 8, 9]

    results = await asyncio.gather(*(dispatcher.submit(render, ip.SamplingParams(max_tokens=2)) for _ in range(5)))
    assert seen == [0] * 5  # every ask had left when its render ran
    assert all(list(r.prompt_token_ids) == [7, 8, 9] and r.choices[0].token_ids for r in results)
    assert await router_in_flight(tight_pool) == 0


async def test_a_render_that_fails_while_its_ask_is_in_flight_leaks_nothing(tight_pool: ip.Pool) -> None:
    """A failing render (a bug in the caller's own code, or a prompt no engine takes) raises to
    the caller; the grant its ask got is given back by its ticket."""
    dispatcher = tight_pool.dispatcher

    def broken() -> list[int]:
        raise ip.RequestError("messages: cannot be rendered", field="messages")

    for _ in range(CAPACITY + 2):  # more than the slots: a lost grant would starve the engine
        with pytest.raises(ip.RequestError, match="cannot be rendered"):
            await dispatcher.submit(broken, ip.SamplingParams(max_tokens=2))
        with pytest.raises(ip.RequestError) as err:
            await dispatcher.submit(lambda: [10**7], ip.SamplingParams(max_tokens=2))
        assert err.value.field == "prompt_token_ids"
    await settle(tight_pool)
    s = tight_pool.session()
    with pytest.raises(ip.RequestError, match=r"max_model_len|context"):
        await s.chat([{"role": "user", "content": "word " * 2000}], max_tokens=2)
    assert (await s.state()).nodes == []
    await settle(tight_pool)
    await served_at_once(tight_pool)


# -- sessions -----------------------------------------------------------------------------------
async def test_a_session_handle_whose_first_call_failed_stays_usable(tight_pool: ip.Pool) -> None:
    s = tight_pool.session()  # no context manager
    with pytest.raises(ip.RequestError):
        await s.chat([{"role": "nobody", "content": "x"}], max_tokens=2)
    assert (await s.state()).nodes == []
    await s.reset()
    out = await s.chat([{"role": "user", "content": "again"}], max_tokens=2)
    assert out.choices[0].token_ids
    assert len((await s.state()).nodes) == 1
    await s.close()


async def test_concurrent_first_calls_create_one_session(tight_pool: ip.Pool) -> None:
    s = tight_pool.session()
    first, second = await asyncio.gather(s.state(), s.state())
    assert first.session_id == second.session_id == s.session_id
    s2 = tight_pool.session()
    chat = asyncio.ensure_future(s2.chat([{"role": "user", "content": "hi"}], max_tokens=8))
    ref = s2.state_ref()  # during the first chat, before anything was created
    state = await ref
    assert state.session_id == s2.session_id
    await chat
    assert len((await s2.state()).nodes) == 1


@pytest.fixture(scope="module")
def store_turns_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    """Like tight_pool, but session turns run in the store (SessionConfig.turns_in_caller=False)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-soundness-store",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    engine_kwargs={"vocab_size": len(tok), "decode_latency_per_token_s": 0.002},
                )
            ],
            router=ip.RouterConfig(max_requests_per_engine=CAPACITY, eval_requests_per_engine=0, max_staleness=0),
            sessions=ip.SessionConfig(shards=1, turns_in_caller=False),
        )
    )
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("where", ["caller", "store"])
async def test_staleness_is_checked_under_the_session_lock(
    where: str, tight_pool: ip.Pool, store_turns_pool: ip.Pool
) -> None:
    """A turn queued behind another while the weights change is checked against the versions
    it will extend when it runs (max_staleness=0: one update is already too old)."""
    pool = tight_pool if where == "caller" else store_turns_pool
    s = pool.session(track_tree=True)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "first"}]
    out = await s.chat(msgs, max_tokens=2)
    base = [*msgs, out.choices[0].message.model_dump(exclude_none=True)]
    long_turn = asyncio.ensure_future(s.chat([*base, {"role": "user", "content": "long"}], max_tokens=200))
    await wait_in_flight(pool, 1)
    queued = asyncio.ensure_future(s.chat([*base, {"role": "user", "content": "queued"}], max_tokens=2))
    store = pool.session_store(s.session_id)

    async def waiting_turns() -> int:
        if where == "caller":
            return s.busy
        rows = [r for r in await store.list_sessions.remote() if r["session_id"] == s.session_id]
        return int(rows[0]["busy"]) if rows else 0

    end = time.monotonic() + 10
    while time.monotonic() < end:  # until the second turn waits for the lock
        if await waiting_turns() >= 2:
            break
        await asyncio.sleep(0.002)
    assert await waiting_turns() == 2 and not long_turn.done()
    rng = np.random.default_rng(0)
    version = f"lock-{where}-{time.monotonic_ns()}"  # new for each pool this test runs on
    await pool.update_weights({"w": rng.standard_normal((4, 4)).astype(np.float32)}, version=version)
    await long_turn  # checked before the update: accepted
    with pytest.raises(ip.StaleSessionError, match="max_staleness"):
        await queued
    await s.close()


# -- bad input ----------------------------------------------------------------------------------
async def test_stop_token_ids_outside_the_vocabulary_never_reach_an_engine(tight_pool: ip.Pool) -> None:
    handle = tight_pool.engine_handle(tight_pool.engine_ids()[0])
    before = (await handle.stats.remote()).served + (await handle.stats.remote()).failed
    with pytest.raises(ip.RequestError) as err:
        await tight_pool.generate([1, 2], ip.SamplingParams(max_tokens=2, stop_token_ids=[10**7]))
    assert err.value.field == "sampling.stop_token_ids"
    after = (await handle.stats.remote()).served + (await handle.stats.remote()).failed
    assert after == before


async def test_generate_batch_names_the_bad_prompt(tight_pool: ip.Pool) -> None:
    prompts: list[Any] = [[1], [2], [3], [10**7], [5]]
    with pytest.raises(ip.RequestError, match=r"prompts\[3\]\.prompt_token_ids") as err:
        await tight_pool.generate_batch(prompts, ip.SamplingParams(max_tokens=1))
    assert err.value.field == "prompts[3].prompt_token_ids"
    await settle(tight_pool)


def test_a_model_that_is_nowhere_is_a_config_error_naming_the_field(
    ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ip.ConfigError, match=r"engines\[0\]\.model"):
        ip.Pool.start(ip.PoolConfig(name="nowhere", engines=[ip.EngineConfig(backend="vllm", model="no/such-model")]))


async def test_chat_on_a_fake_pool_named_after_no_model_fails_fast(ray_session: None) -> None:
    pool = ip.Pool.start(ip.PoolConfig(name="unit-fake-model", engines=[ip.EngineConfig(backend="fake", model="fake")]))
    try:
        async with pool.session() as s:  # a ConfigError, not a BackendError after hub download retries
            with pytest.raises(ip.ConfigError, match=r"EngineConfig\.model") as err:
                await s.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.field == "model"
    finally:
        pool.shutdown()


async def test_a_cancellation_is_never_swallowed_by_an_answer_that_lands_at_the_same_moment() -> None:
    """asyncio.wait_for on Python 3.11 returns the answer instead of raising when the caller is
    cancelled just as the answer arrives; every bounded wait of the request path must raise."""
    from inferpool.ray_utils import bounded

    loop = asyncio.get_running_loop()
    for _ in range(100):
        answer: asyncio.Future[int] = loop.create_future()
        waiter = asyncio.ensure_future(bounded(answer, 5.0))
        await asyncio.sleep(0)  # the waiter is waiting now
        answer.set_result(1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter


async def test_an_engine_leaves_out_the_prompt_it_was_sent_only_when_asked() -> None:
    """The per-request path (batch_engine_calls=False) does not carry a turn's prompt back:
    the engine leaves out ids equal to those sent and the caller puts its own back."""
    from inferpool.actors.engine import EngineActor
    from inferpool.types import GenerateRequest, GenerateResult

    engine = EngineActor(ip.EngineConfig(backend="fake"), "e-echo", gc_freeze=False)
    await engine.start()
    try:
        sampling = ip.SamplingParams(max_tokens=2)
        echoed = await engine.generate(GenerateRequest("r1", [7, 8, 9], sampling))
        assert echoed.prompt_token_ids == [7, 8, 9]
        bare = await engine.generate(GenerateRequest("r2", [7, 8, 9], sampling), echo_prompt=False)
        assert bare.prompt_token_ids == [] and bare.choices[0].token_ids
        assert bare.with_sent_prompt([7, 8, 9]).prompt_token_ids == [7, 8, 9]
    finally:
        await engine.shutdown()
    other = GenerateResult("r3", [1, 2], [])  # an engine that received other ids reports them
    assert other.without_sent_prompt([1]).prompt_token_ids == [1, 2]
    assert other.with_sent_prompt([1]).prompt_token_ids == [1, 2]
