"""The router class without Ray: leases, atomic reservation, bounded waits, health.

Run: pytest tests/unit/test_router.py
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferpool.config import RouterConfig
from inferpool.errors import EngineOverloadedError, NoHealthyEngineError
from inferpool.routing.router import Router
from inferpool.types import EngineInfo


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeHandle:
    """Stands in for an engine actor handle: ``health.remote()`` returns a coroutine."""

    def __init__(self, eid: str = "e0") -> None:
        self.eid = eid
        self.alive = True
        self.queue_len = 0
        self.started = True  # False: Ray restarted the actor and its backend is not loaded
        self.loading = asyncio.Event()  # set when a start() begins
        self.may_finish = asyncio.Event()  # start() returns once this is set
        self.answer: asyncio.Event | None = None  # health() answers only once this is set
        self.asked = asyncio.Event()  # set when a health() call arrives
        self.health = _Method(self._health)
        self.stats = _Method(self._stats)
        self.start = _Method(self._start)
        self.get_info = _Method(self._get_info)

    async def _start(self) -> EngineInfo:
        self.loading.set()
        await self.may_finish.wait()
        self.started = True
        return info(self.eid)

    async def _get_info(self) -> EngineInfo | None:
        return info(self.eid) if self.started else None

    async def _stats(self) -> Any:
        from inferpool.types import EngineStats

        return EngineStats(engine_id="x", queue_len=self.queue_len, kv_cache_usage=0.5)

    async def _health(self) -> bool:
        alive = self.alive  # the verdict as of the moment the call reached the engine
        self.asked.set()
        if self.answer is not None:
            await self.answer.wait()
        if not alive:
            raise RuntimeError("engine died")
        return self.started


def info(eid: str) -> EngineInfo:
    return EngineInfo(engine_id=eid, backend="fake", model="m", vocab_size=10, max_model_len=100)


async def make_router(n: int = 2, **cfg: Any) -> tuple[Router, dict[str, FakeHandle]]:
    config = RouterConfig(max_requests_per_engine=4, eval_requests_per_engine=1, acquire_timeout_s=0.3, **cfg)
    router = Router(config)
    handles = {f"e{i}": FakeHandle(f"e{i}") for i in range(n)}
    for eid, h in handles.items():
        await router.register(info(eid), h)
    return router, handles


async def test_acquire_reserves_and_release_frees() -> None:
    router, _ = await make_router(1)
    leases = [await router.acquire() for _ in range(3)]  # 4 - 1 eval = 3 train slots
    assert router.load()["e0"]["train_in_flight"] == 3
    with pytest.raises(EngineOverloadedError, match="capacity"):
        await router.acquire()
    await router.release(leases[0].lease_id)
    await router.release(leases[0].lease_id)  # idempotent
    assert router.load()["e0"]["train_in_flight"] == 2
    assert router.num_leases() == 2


async def test_concurrent_acquires_never_oversubscribe() -> None:
    router, _ = await make_router(2)
    results = await asyncio.gather(*(router.acquire(timeout_s=0.2) for _ in range(10)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 6
    load = router.load()
    assert all(v["train_in_flight"] == 3 for v in load.values())


async def test_waiter_gets_slot_when_released() -> None:
    router, _ = await make_router(1)
    leases = [await router.acquire() for _ in range(3)]
    waiter = asyncio.create_task(router.acquire(timeout_s=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await router.release(leases[1].lease_id)
    lease = await asyncio.wait_for(waiter, 5)
    assert lease.engine_id == "e0"


async def test_eval_has_its_own_quota_when_train_is_full() -> None:
    router, _ = await make_router(1)
    for _ in range(3):
        await router.acquire("train")
    lease = await router.acquire("eval")
    assert lease.split == "eval"
    with pytest.raises(EngineOverloadedError):
        await router.acquire("eval")


async def test_acquire_many_spreads_and_caps() -> None:
    router, _ = await make_router(2)
    leases = await router.acquire_many(10)
    assert len(leases) == 6
    assert {lease.engine_id for lease in leases} == {"e0", "e1"}


async def test_unhealthy_engine_is_skipped_then_reprobed() -> None:
    router, handles = await make_router(2)
    handles["e1"].alive = False
    assert await router.check_health() == {"e0": True, "e1": False}
    for _ in range(3):
        assert (await router.acquire()).engine_id == "e0"
    handles["e1"].alive = True
    assert await router.check_health() == {"e0": True, "e1": True}
    assert (await router.acquire()).engine_id == "e1"


async def test_restarted_engine_gets_no_traffic_while_its_backend_loads() -> None:
    router, handles = await make_router(2)
    handles["e1"].started = False  # as after Ray restarted the actor
    probing = asyncio.ensure_future(router.check_health())
    await asyncio.wait_for(handles["e1"].loading.wait(), 5)
    assert router.load()["e1"]["healthy"] is False
    assert await router.check_health() == {"e0": True, "e1": False}  # no second start meanwhile
    leases = [await router.acquire() for _ in range(3)]
    assert {lease.engine_id for lease in leases} == {"e0"}
    handles["e1"].may_finish.set()
    assert await asyncio.wait_for(probing, 5) == {"e0": True, "e1": True}
    assert (await router.acquire()).engine_id == "e1"


async def test_a_probe_verdict_older_than_a_failure_report_does_not_close_the_circuit() -> None:
    """The engine answered the probe, then died and a caller reported it before the answer
    arrived: that answer is older than the report and must not put the engine back."""
    router, handles = await make_router(2)
    await router.report_failure("e1", "died earlier")
    handles["e1"].answer = asyncio.Event()
    probing = asyncio.ensure_future(router.check_health())
    await asyncio.wait_for(handles["e1"].asked.wait(), 5)  # the probe's health call is out
    await router.report_failure("e1", "died again while the probe was out")
    handles["e1"].answer.set()
    assert await asyncio.wait_for(probing, 5) == {"e0": True, "e1": False}
    handles["e1"].answer = None
    assert await router.check_health() == {"e0": True, "e1": True}  # a later probe passes


async def test_a_restarted_router_loads_and_registers_an_engine_nobody_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray restarted an engine and the router together: the engine the new router finds with
    no backend is started, then registered, instead of being left out for good."""
    from inferpool.config import PoolConfig
    from inferpool.routing import health

    handles = {eid: FakeHandle(eid) for eid in ("e0", "e1")}
    handles["e1"].started = False
    handles["e1"].may_finish.set()
    named = [{"namespace": "ns", "name": f"p:engine:{eid}"} for eid in handles]
    monkeypatch.setattr(health.ray.util, "list_named_actors", lambda all_namespaces=False: named)
    monkeypatch.setattr(health.ray, "get_actor", lambda name, namespace=None: handles[name.rsplit(":", 1)[1]])
    router = Router(RouterConfig(health_interval_s=60), PoolConfig(name="p", namespace="ns"))
    await router.start()
    await asyncio.wait_for(asyncio.gather(*router._loading), 5)
    assert sorted(router.load()) == ["e0", "e1"] and handles["e1"].started
    await router.shutdown()


async def test_no_healthy_engine_is_a_clear_error_after_bounded_wait() -> None:
    router, handles = await make_router(1)
    handles["e0"].alive = False
    await router.check_health()
    with pytest.raises(NoHealthyEngineError, match="no healthy engine"):
        await router.acquire(timeout_s=0.1)


async def test_report_failure_opens_circuit() -> None:
    router, _ = await make_router(2)
    await router.report_failure("e0", "died")
    for _ in range(3):
        assert (await router.acquire()).engine_id == "e1"


async def test_expired_leases_are_reclaimed() -> None:
    router, _ = await make_router(1)
    lease = await router.acquire()
    router._leases[lease.lease_id].deadline = 0.0  # as if lease_timeout_s had passed
    router._reap_expired_leases()
    assert router.num_leases() == 0
    assert router.load()["e0"]["train_in_flight"] == 0


async def test_acquire_batch_never_waits_and_marks_what_is_full() -> None:
    router, _ = await make_router(1)
    args = ("train", None, None, (), None, None)
    out = await router.acquire_batch([args] * 5)
    assert [lease is not None for lease in out] == [True, True, True, False, False]
    await router.release_batch([(lease.lease_id, True, 1) for lease in out if lease is not None])
    assert router.num_leases() == 0
    assert router.timing_summary()["e0"]["train"]["count"] == 3


async def test_probes_read_engine_reported_queue_and_kv_usage() -> None:
    router, handles = await make_router(2)
    handles["e0"].queue_len = 7
    await router.check_health()
    load = router.load()
    assert load["e0"]["queue_len"] == 7 and load["e0"]["kv_cache_usage"] == 0.5
    assert (await router.acquire()).engine_id == "e1"  # equally free: the less busy engine wins
