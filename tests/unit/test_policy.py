"""The default selection policy and the train/eval capacity rule, without Ray.

Run: pytest tests/unit/test_policy.py
"""

from __future__ import annotations

from inferpool.routing.policy import EngineSlot, LeastLoaded, RouteRequest


def slots(*loads: int, capacity: int = 8, eval_quota: int = 2) -> list[EngineSlot]:
    return [
        EngineSlot(engine_id=f"e{i}", capacity=capacity, eval_quota=eval_quota, train_in_flight=load)
        for i, load in enumerate(loads)
    ]


def test_picks_engine_with_most_free_capacity() -> None:
    policy = LeastLoaded()
    assert policy.choose(slots(3, 1, 2), RouteRequest()).engine_id == "e1"


def test_ties_are_broken_round_robin() -> None:
    policy = LeastLoaded()
    engines = slots(0, 0, 0)
    picks = [policy.choose(engines, RouteRequest()).engine_id for _ in range(6)]
    assert picks == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_unhealthy_and_excluded_engines_are_skipped() -> None:
    policy = LeastLoaded()
    engines = slots(5, 0, 1)
    engines[1].healthy = False
    assert policy.choose(engines, RouteRequest()).engine_id == "e2"
    assert policy.choose(engines, RouteRequest(exclude=frozenset({"e2"}))).engine_id == "e0"


def test_none_when_everything_is_full_or_unhealthy() -> None:
    policy = LeastLoaded()
    assert policy.choose(slots(6, 6), RouteRequest()) is None  # 8 - 2 eval slots = 6 train slots
    engines = slots(0)
    engines[0].healthy = False
    assert policy.choose(engines, RouteRequest()) is None


def test_train_never_takes_the_eval_reservation() -> None:
    engine = EngineSlot("e0", capacity=8, eval_quota=2)
    for _ in range(6):
        assert engine.free("train") > 0
        engine.reserve("train")
    assert engine.free("train") == 0
    assert engine.free("eval") == 2  # eval still has its quota
    engine.reserve("eval")
    engine.reserve("eval")
    assert engine.free("eval") == 0
    engine.release("train")
    assert engine.free("train") == 1 and engine.free("eval") == 0


def test_eval_uses_only_its_quota() -> None:
    engine = EngineSlot("e0", capacity=8, eval_quota=2)
    engine.reserve("eval", 2)
    assert engine.free("eval") == 0
    assert engine.free("train") == 6


def test_zero_eval_quota_shares_the_train_slots() -> None:
    engine = EngineSlot("e0", capacity=4, eval_quota=0)
    engine.reserve("train", 3)
    assert engine.free("eval") == 1
    engine.reserve("eval")
    assert engine.free("train") == 0


def test_weight_scales_capacity_and_zero_parks_the_engine() -> None:
    engine = EngineSlot("e0", capacity=10, eval_quota=0, weight=0.5)
    assert engine.free("train") == 5
    engine.weight = 0.0
    assert engine.free("train") == 0
    assert LeastLoaded().choose([engine], RouteRequest()) is None


def test_engine_reported_pressure_breaks_ties_before_round_robin() -> None:
    policy = LeastLoaded()
    engines = slots(0, 0, 0)
    engines[0].queue_len = 5
    engines[2].kv_cache_usage = 0.9
    assert [policy.choose(engines, RouteRequest()).engine_id for _ in range(3)] == ["e1", "e1", "e1"]


def test_callers_send_prompts_to_the_router_only_for_policies_that_read_them() -> None:
    from inferpool.routing.policy import policy_reads_prompt

    assert policy_reads_prompt("prefix_aware") is True
    assert not any(policy_reads_prompt(p) for p in ("least_loaded", "session_affinity", "power_of_two"))
    assert policy_reads_prompt("no_such_module.anywhere:Policy") is True  # unknown here: send them
