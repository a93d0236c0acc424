"""Engine and router failures during many concurrent multi-turn sessions (fake engines).

Run: pytest tests/unit/test_failover.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from exactness import check_exact

import inferpool as ip


@pytest.fixture(scope="module")
def failover_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-failover",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    replicas=3,
                    request_timeout_s=20,
                    engine_kwargs={
                        "vocab_size": len(tok),
                        "eos_token_id": tok.eos_token_id,
                        "decode_latency_per_token_s": 0.002,
                    },
                )
            ],
            router=ip.RouterConfig(health_interval_s=0.2, acquire_timeout_s=20),
            sessions=ip.SessionConfig(shards=2),
        )
    )
    yield pool
    pool.shutdown()


async def session(pool: ip.Pool, i: int) -> tuple[ip.SessionState, list[Any]]:
    outs = []
    async with pool.session() as s:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"session {i}"}]
        for turn in range(3):
            out = await s.chat(msgs, max_tokens=6, seed=i * 10 + turn)
            outs.append(out)
            msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": f"t{turn}"}]
        return await s.state(), outs


async def wait_until(pred: Any, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_killing_an_engine_loses_no_session(failover_pool: ip.Pool) -> None:
    victim = failover_pool.engine_ids()[1]
    handle = failover_pool.engine_handle(victim)
    await handle.control.remote("inject_fault", {"fault": "die", "count": 1, "after": 40})
    results = await asyncio.gather(*(session(failover_pool, i) for i in range(200)))
    for state, outs in results:
        check_exact(state, outs)
    assert len({outs[0].session_id for _, outs in results}) == 200  # every session finished

    async def victim_back() -> bool:
        load = await failover_pool._router.load.remote()
        return bool(load[victim]["healthy"])

    await wait_until(victim_back)  # Ray restarted it; the router's probe started its backend
    results2 = await asyncio.gather(
        *(failover_pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=2)) for _ in range(30))
    )
    assert victim in {r.engine_id for r in results2}


async def test_dead_engine_gets_no_traffic_while_its_circuit_is_open(failover_pool: ip.Pool) -> None:
    victim = failover_pool.engine_ids()[0]
    await failover_pool._router.report_failure.remote(victim, "test: circuit open")
    results = await asyncio.gather(
        *(failover_pool.generate([4, 5], ip.SamplingParams(max_tokens=2)) for _ in range(40))
    )
    load = await failover_pool._router.load.remote()
    if not load[victim]["healthy"]:  # no probe closed it meanwhile: nothing may have gone there
        assert victim not in {r.engine_id for r in results}


async def test_router_killed_mid_run_sessions_continue(failover_pool: ip.Pool) -> None:
    tasks = [asyncio.ensure_future(session(failover_pool, 1000 + i)) for i in range(40)]
    await asyncio.sleep(0)  # let them start
    ray.kill(failover_pool._router, no_restart=False)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for state, outs in results:
        check_exact(state, outs)
    res = await failover_pool.generate([1, 2], ip.SamplingParams(max_tokens=2))
    assert res.engine_id in failover_pool.engine_ids()
    assert len(await failover_pool._router.engine_infos.remote()) == 3


async def test_a_restarted_engine_sends_requests_elsewhere_until_loaded() -> None:
    """Ray restarted the actor, its backend is not loaded yet: a request that reaches it fails
    with a retryable error, so the dispatcher tries another engine instead of failing the turn."""
    from inferpool.actors.engine import EngineActor
    from inferpool.errors import EngineDeadError
    from inferpool.types import GenerateRequest

    engine = EngineActor(ip.EngineConfig(backend="fake"), "e9")
    request = GenerateRequest("r0", [1, 2, 3], ip.SamplingParams(max_tokens=2))
    calls = (engine.generate(request), engine.submit("caller", [request]), engine.prompt_logprobs([1, 2], 1))
    for call in calls:
        with pytest.raises(EngineDeadError, match="e9 is not started") as raised:
            await call
        assert raised.value.retryable
    await engine.start()
    assert (await engine.generate(request)).engine_id == "e9"


@ray.remote(num_cpus=0)
def _fails_with(error: Exception) -> None:
    raise error


async def test_engine_calls_other_than_generate_fail_over_on_retryable_faults(failover_pool: ip.Pool) -> None:
    """Prompt scoring and text-level calls take the same bounded failover as generate: a
    retryable fault moves the call to another engine, any other fault reaches the caller."""
    from inferpool.errors import EngineDeadError, RequestError

    handles: list[Any] = []

    def dies_once(handle: Any) -> Any:
        handles.append(handle)
        return _fails_with.remote(EngineDeadError("test: engine died")) if len(handles) == 1 else handle.health.remote()

    assert await failover_pool.dispatcher.call("eval", dies_once) is True
    assert len(handles) == 2 and handles[0] is not handles[1]

    refused: list[Any] = []

    def refuses(handle: Any) -> Any:
        refused.append(handle)
        return _fails_with.remote(RequestError("test: bad input", field="prompt"))

    with pytest.raises(RequestError, match="bad input"):
        await failover_pool.dispatcher.call("eval", refuses)
    assert len(refused) == 1
