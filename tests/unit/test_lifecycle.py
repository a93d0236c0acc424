"""RL lifecycle on fake engines: weight updates with versions, pause modes, staleness.

Run: pytest tests/unit/test_lifecycle.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from waiting import wait_in_flight

import inferpool as ip


@pytest.fixture(scope="module")
def slow_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    """One fake engine sampling slowly (20 ms per token), so requests stay in flight."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-lifecycle",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    engine_kwargs={
                        "vocab_size": len(tok),
                        "eos_token_id": tok.eos_token_id,
                        "decode_latency_per_token_s": 0.02,
                    },
                )
            ],
            router=ip.RouterConfig(acquire_timeout_s=10, max_staleness=1, staleness_policy="reject"),
        )
    )
    yield pool
    pool.shutdown()


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal((64, 64)).astype(np.float32) for i in range(6)}


async def test_update_weights_through_object_store_in_chunks(slow_pool: ip.Pool) -> None:
    w = weights(0)
    out = await slow_pool.update_weights(w, version="step-1", chunk_bytes=64 * 64 * 4 * 2)
    assert out["version"] == "step-1"
    assert out["chunks"] == 3
    assert out["bytes"] == sum(a.nbytes for a in w.values())
    engine = slow_pool.stats()["engines"][slow_pool.engine_ids()[0]]
    assert engine["weight_version"] == "step-1"
    assert engine["weight_updates"] >= 1 and engine["last_update_bytes"] == out["bytes"]
    res = await slow_pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=2))
    assert res.choices[0].weight_versions == ["step-1", "step-1"]


async def test_update_from_an_object_ref(slow_pool: ip.Pool) -> None:
    ref = ray.put(list(weights(1).items()))
    out = await slow_pool.update_weights(ref, version="step-ref")
    assert out["engines"][slow_pool.engine_ids()[0]]["tensors"] == 6


async def test_bad_weights_are_a_request_error(slow_pool: ip.Pool) -> None:
    with pytest.raises(ip.RequestError, match="weights"):
        await slow_pool.update_weights([1, 2, 3])
    with pytest.raises(ip.RequestError, match="weights"):
        await slow_pool.update_weights({})


async def test_request_spanning_an_update_reports_the_mix(slow_pool: ip.Pool) -> None:
    await slow_pool.update_weights(weights(2), version="before")
    handle = slow_pool.engine_handle(slow_pool.engine_ids()[0])
    start = await handle.control.remote("progress")
    task = asyncio.ensure_future(slow_pool.generate([5, 6], ip.SamplingParams(max_tokens=40)))
    for _ in range(2000):  # poll (bounded) until a few tokens were sampled
        if await handle.control.remote("progress") >= start + 3:
            break
        await asyncio.sleep(0.005)
    await slow_pool.update_weights(weights(3), version="after")
    res = await task
    versions = res.choices[0].weight_versions
    assert versions[0] == "before" and versions[-1] == "after"
    cut = versions.index("after")
    assert set(versions[:cut]) == {"before"} and set(versions[cut:]) == {"after"}
    assert res.choices[0].weight_version == "after"


async def test_pause_abort_ends_in_flight_requests_with_abort(slow_pool: ip.Pool) -> None:
    task = asyncio.ensure_future(slow_pool.generate([7, 8], ip.SamplingParams(max_tokens=200)))
    await wait_in_flight(slow_pool)
    await slow_pool.pause("abort")
    res = await asyncio.wait_for(task, 10)
    assert res.choices[0].finish_reason == "abort"
    await slow_pool.resume()
    after = await slow_pool.generate([7, 8], ip.SamplingParams(max_tokens=3))
    assert after.choices[0].finish_reason == "length"


async def wait_decoded(pool: ip.Pool, steps: int, deadline_s: float = 10.0) -> None:
    """Poll the fake engine's decode-step counter until it advanced ``steps`` (bounded)."""
    handle = pool.engine_handle(pool.engine_ids()[0])
    start = await handle.control.remote("progress")
    end = time.monotonic() + deadline_s
    while await handle.control.remote("progress") < start + steps:
        assert time.monotonic() < end, "the engine never decoded"
        await asyncio.sleep(0.005)


async def test_session_abort_ends_its_running_turn_and_the_session_goes_on(slow_pool: ip.Pool) -> None:
    async with slow_pool.session() as s:
        assert await s.abort() == 0  # nothing running
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "long answer please"}]
        turn = asyncio.ensure_future(s.chat(msgs, max_tokens=200, ignore_eos=True))
        await wait_in_flight(slow_pool)
        await wait_decoded(slow_pool, 3)
        assert await s.abort() == 1
        out = await asyncio.wait_for(turn, 10)
        assert out.choices[0].finish_reason == "abort"
        state = await s.state()
        sampled = [t for t, m in zip(state.nodes[0].tokens, state.nodes[0].trainable, strict=True) if m]
        assert 0 < len(sampled) < 200  # what was sampled before the abort is recorded
        msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "short"}]
        again = await s.chat(msgs, max_tokens=2)
        assert again.choices[0].finish_reason in ("length", "stop")


async def test_abort_session_reaches_direct_generate_calls(slow_pool: ip.Pool) -> None:
    task = asyncio.ensure_future(
        slow_pool.generate([5, 6], ip.SamplingParams(max_tokens=200, n=2), session_id="direct-abort")
    )
    await wait_in_flight(slow_pool)
    assert await slow_pool.abort_session("direct-abort") == 1
    res = await asyncio.wait_for(task, 10)
    assert [c.finish_reason for c in res.choices] == ["abort", "abort"]
    assert await slow_pool.abort_session("direct-abort") == 0


@pytest.mark.parametrize("how", ["pool.abort_session", "a handle on the session"])
async def test_abort_session_from_another_process_reaches_turns_run_in_the_caller(slow_pool: ip.Pool, how: str) -> None:
    """A rollout worker runs a session's turns in its own process; the trainer aborts the
    session by id from another: the running turn ends with 'abort' and what it sampled."""

    @ray.remote(num_cpus=0)
    class Rollout:
        def __init__(self, pool: ip.Pool) -> None:
            self.session = pool.session()
            pool.renderer()  # a rollout worker loads its chat template once, before its first turn
            self.turn: asyncio.Future[Any] | None = None

        async def start(self) -> str:
            msgs = [{"role": "user", "content": "long answer please"}]
            self.turn = asyncio.ensure_future(self.session.chat(msgs, max_tokens=200, ignore_eos=True))
            return self.session.session_id

        async def finish(self) -> tuple[str, int]:
            assert self.turn is not None
            out = await self.turn
            state = await self.session.state()
            return out.choices[0].finish_reason, int(sum(state.nodes[0].trainable))

    worker = Rollout.remote(slow_pool)  # type: ignore[attr-defined]
    try:
        session_id = await worker.start.remote()
        await wait_in_flight(slow_pool, deadline_s=30)  # a fresh worker process on a loaded machine
        await wait_decoded(slow_pool, 3)
        assert not slow_pool.dispatcher.runs_session(session_id)  # the turn runs in the worker
        if how == "pool.abort_session":
            assert await slow_pool.abort_session(session_id) == 1
        else:
            assert await slow_pool.session(session_id=session_id, existing=True).abort() == 1
        reason, sampled = await asyncio.wait_for(worker.finish.remote(), 30)
        assert reason == "abort" and 0 < sampled < 200  # recorded as usual
        assert await slow_pool.abort_session(session_id) == 0
    finally:
        ray.kill(worker)


async def test_pause_wait_drains_and_holds_new_requests(slow_pool: ip.Pool) -> None:
    task = asyncio.ensure_future(slow_pool.generate([9], ip.SamplingParams(max_tokens=10)))
    await wait_in_flight(slow_pool)
    await slow_pool.pause("wait")
    handle = slow_pool.engine_handle(slow_pool.engine_ids()[0])
    assert (await handle.stats.remote()).in_flight == 0  # drained before pause returned
    assert (await asyncio.wait_for(task, 10)).choices[0].finish_reason == "length"
    held = asyncio.ensure_future(slow_pool.generate([9], ip.SamplingParams(max_tokens=2)))
    done, _ = await asyncio.wait({held}, timeout=0.3)
    assert not done  # new requests wait while paused
    await slow_pool.resume()
    assert (await asyncio.wait_for(held, 10)).choices[0].finish_reason == "length"


async def test_pause_wait_does_not_wait_for_requests_sent_during_the_pause(slow_pool: ip.Pool) -> None:
    first = asyncio.ensure_future(slow_pool.generate([9], ip.SamplingParams(max_tokens=10)))
    await wait_in_flight(slow_pool)
    handle = slow_pool.engine_handle(slow_pool.engine_ids()[0])
    pausing = asyncio.ensure_future(slow_pool.pause("wait"))
    end = time.monotonic() + 10
    while await handle.control.remote("paused") != "wait":  # ``later`` is sent once the engine is pausing
        assert time.monotonic() < end, "the engine never paused"
        await asyncio.sleep(0.005)
    later = asyncio.ensure_future(slow_pool.generate([9], ip.SamplingParams(max_tokens=2)))
    try:
        await asyncio.wait_for(pausing, 10)  # drains ``first`` only; ``later`` waits for resume
        assert (await asyncio.wait_for(first, 10)).choices[0].finish_reason == "length"
        assert not later.done()
    finally:
        await slow_pool.resume()
    assert (await asyncio.wait_for(later, 10)).choices[0].finish_reason == "length"


async def test_pause_keep_freezes_and_resume_continues(slow_pool: ip.Pool) -> None:
    task = asyncio.ensure_future(slow_pool.generate([10], ip.SamplingParams(max_tokens=15)))
    await wait_in_flight(slow_pool)
    await slow_pool.pause("keep")
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done  # frozen, not aborted
    await slow_pool.resume()
    res = await asyncio.wait_for(task, 10)
    assert res.choices[0].finish_reason == "length" and len(res.choices[0].token_ids) == 15


async def test_sleep_and_wake_reach_the_engines(slow_pool: ip.Pool) -> None:
    await slow_pool.sleep(level=1)
    assert all(e["error"] if "error" in e else True for e in slow_pool.stats()["engines"].values())
    await slow_pool.wake()
    await slow_pool.reset_prefix_cache()


async def test_staleness_bound_rejects_old_sessions(slow_pool: ip.Pool) -> None:
    async with slow_pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": "stale?"}]
        out = await s.chat(msgs, max_tokens=3)
        msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "next"}]
        await slow_pool.update_weights(weights(4), version="s1")
        out2 = await s.chat(msgs, max_tokens=3)  # one update old: within max_staleness=1
        msgs += [out2.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "z"}]
        await slow_pool.update_weights(weights(5), version="s2")
        await slow_pool.update_weights(weights(6), version="s3")
        with pytest.raises(ip.StaleSessionError, match="max_staleness"):
            await s.chat(msgs, max_tokens=3)
        state = await s.state()
        first = state.nodes[0]
        sampled_versions = [v for v, t in zip(first.weight_versions, first.trainable, strict=True) if t]
        assert sampled_versions[0] != sampled_versions[-1]  # the node holds both versions
