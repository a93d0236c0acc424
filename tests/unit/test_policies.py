"""The routing policies beyond least-loaded, without Ray: session affinity, prefix-aware,
power of two choices, and engine weights.

Run: pytest tests/unit/test_policies.py
"""

from __future__ import annotations

import pytest

from inferpool.errors import ConfigError
from inferpool.routing.affinity import SessionAffinity, is_imbalanced, split_load
from inferpool.routing.p2c import PowerOfTwo
from inferpool.routing.policy import (
    POLICIES,
    EngineSlot,
    LeastLoaded,
    Policy,
    RouteRequest,
    make_policy,
)
from inferpool.routing.prefix import PrefixAware, block_hashes

# 512 slots, 64 reserved for eval: 448 train slots per engine.


def slots(*loads: int, capacity: int = 512, eval_quota: int = 64) -> list[EngineSlot]:
    return [
        EngineSlot(f"e{i}", capacity=capacity, eval_quota=eval_quota, train_in_flight=load)
        for i, load in enumerate(loads)
    ]


def by_id(engines: list[EngineSlot], eid: str) -> EngineSlot:
    return next(e for e in engines if e.engine_id == eid)


def route(policy: Policy, engines: list[EngineSlot], request: RouteRequest) -> str | None:
    """What the router does: choose, reserve in the same step, then on_served."""
    choice = policy.choose(engines, request)
    if choice is None:
        return None
    choice.reserve(request.split)
    policy.on_served(choice.engine_id, request)
    return choice.engine_id


def set_load(engines: list[EngineSlot], **loads: int) -> None:
    for eid, load in loads.items():
        by_id(engines, eid).train_in_flight = load


# -- the imbalance rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("preferred", "least", "expected"),
    [
        (10, 0, False),  # gap 10 <= 32
        (32, 0, False),  # gap 32 is not > 32
        (33, 0, True),  # gap 33 > 32 and 33 >= 1.5 * 0
        (200, 160, False),  # gap 40 > 32 but 200 < 1.5 * 160 = 240: only the absolute test
        (30, 1, False),  # 30 >= 1.5 but gap 29 <= 32: only the relative test
        (105, 70, True),  # gap 35, 105 >= 105: both, at the relative boundary
        (104, 70, False),  # gap 34, 104 < 105
        (0, 0, False),
        (5, 10, False),
    ],
)
def test_imbalance_rule(preferred: int, least: int, expected: bool) -> None:
    assert is_imbalanced(preferred, least, 32, 0.5) is expected


def test_equal_loads_are_never_imbalanced_even_with_zero_thresholds() -> None:
    assert not is_imbalanced(7, 7, 0, 0.0)
    assert is_imbalanced(8, 7, 0, 0.0)


def test_split_load_counts_the_slots_the_split_uses() -> None:
    e = EngineSlot("e", capacity=10, eval_quota=2, train_in_flight=3, eval_in_flight=1)
    assert split_load(e, "train") == 3
    assert split_load(e, "eval") == 1
    shared = EngineSlot("e", capacity=10, eval_quota=0, train_in_flight=3, eval_in_flight=1)
    assert split_load(shared, "train") == 4
    assert split_load(shared, "eval") == 4


# -- session affinity -----------------------------------------------------------------


def test_affinity_first_turn_is_least_loaded_and_becomes_home() -> None:
    policy = SessionAffinity()
    engines = slots(5, 0, 3)
    assert route(policy, engines, RouteRequest(session_id="s")) == "e1"
    assert policy.last_outcome() == "new"
    assert policy.home("s") == "e1"
    assert policy.new_sessions == 1


def test_affinity_stays_home_under_small_imbalance() -> None:
    policy = SessionAffinity()
    engines = slots(0, 0)
    home = route(policy, engines, RouteRequest(session_id="s"))
    assert home is not None
    other = "e1" if home == "e0" else "e0"
    set_load(engines, **{home: 30, other: 0})  # gap 30 <= 32
    for _ in range(3):
        assert route(policy, engines, RouteRequest(session_id="s")) == home
        assert policy.last_outcome() == "hit"
    assert policy.hits == 3 and policy.fallbacks == 0


def test_affinity_moves_when_both_thresholds_are_passed() -> None:
    policy = SessionAffinity()
    engines = slots(0, 0)
    route(policy, engines, RouteRequest(session_id="s"))
    home = policy.home("s")
    assert home is not None
    other = "e1" if home == "e0" else "e0"
    set_load(engines, **{home: 100, other: 10})  # gap 90 > 32, 100 >= 15
    assert route(policy, engines, RouteRequest(session_id="s")) == other
    assert policy.last_outcome() == "fallback"
    assert policy.fallback_reasons == {"imbalanced": 1}
    assert policy.home("s") == other  # the new engine is the home now
    assert route(policy, engines, RouteRequest(session_id="s")) == other
    assert policy.last_outcome() == "hit"


@pytest.mark.parametrize(
    ("home_load", "other_load"),
    [(200, 160), (30, 0)],  # only the absolute / only the relative threshold passed
    ids=["only-absolute", "only-relative"],
)
def test_affinity_stays_when_only_one_threshold_is_passed(home_load: int, other_load: int) -> None:
    policy = SessionAffinity()
    engines = slots(home_load, other_load)
    policy.on_served("e0", RouteRequest(session_id="s"))
    assert route(policy, engines, RouteRequest(session_id="s")) == "e0"
    assert policy.last_outcome() == "hit"


def test_affinity_thresholds_are_options() -> None:
    policy = SessionAffinity(abs_threshold=4, rel_threshold=0.0)
    engines = slots(10, 5)
    policy.on_served("e0", RouteRequest(session_id="s"))
    assert route(policy, engines, RouteRequest(session_id="s")) == "e1"  # gap 5 > 4


@pytest.mark.parametrize("why", ["unhealthy", "excluded", "full", "gone"])
def test_affinity_moves_when_home_cannot_take_the_request(why: str) -> None:
    policy = SessionAffinity()
    engines = slots(0, 5, 9)
    policy.on_served("e0", RouteRequest(session_id="s"))
    exclude: frozenset[str] = frozenset()
    if why == "unhealthy":
        engines[0].healthy = False
    elif why == "excluded":
        exclude = frozenset({"e0"})
    elif why == "full":
        engines[0].train_in_flight = 448
    else:
        engines = engines[1:]  # deregistered
    assert route(policy, engines, RouteRequest(session_id="s", exclude=exclude)) == "e1"
    assert policy.last_outcome() == "fallback"
    assert policy.fallback_reasons == {why: 1}
    assert policy.home("s") == "e1"


def test_affinity_without_session_is_least_loaded() -> None:
    policy = SessionAffinity()
    engines = slots(0, 0)
    picks = [str(route(policy, engines, RouteRequest())) for _ in range(4)]
    assert sorted(picks) == ["e0", "e0", "e1", "e1"]  # least-loaded spreads them
    assert policy.last_outcome() == "none"
    assert policy.num_sessions == 0
    assert policy.unsessioned == 4


def test_affinity_none_when_no_engine_can_take_it() -> None:
    policy = SessionAffinity()
    engines = slots(448, 448)
    policy.on_served("e0", RouteRequest(session_id="s"))
    assert policy.choose(engines, RouteRequest(session_id="s")) is None
    assert policy.last_outcome() is None
    assert policy.hits == policy.fallbacks == 0


def test_affinity_home_map_is_bounded_lru() -> None:
    policy = SessionAffinity(max_sessions=3)
    engines = slots(0, 0)
    for sid in ["a", "b", "c"]:
        route(policy, engines, RouteRequest(session_id=sid))
    route(policy, engines, RouteRequest(session_id="a"))  # refresh "a"
    route(policy, engines, RouteRequest(session_id="d"))  # evicts "b", the least recent
    assert policy.num_sessions == 3
    assert policy.home("b") is None
    assert all(policy.home(s) is not None for s in ["a", "c", "d"])
    for i in range(10_000):
        policy.on_served("e0", RouteRequest(session_id=f"x{i}"))
    assert policy.num_sessions == 3
    route(policy, engines, RouteRequest(session_id="a"))
    assert policy.last_outcome() == "new"  # forgotten: routed like a new session


def test_affinity_forget_session_and_stats() -> None:
    policy = SessionAffinity()
    engines = slots(0, 0)
    route(policy, engines, RouteRequest(session_id="s"))
    route(policy, engines, RouteRequest(session_id="s"))
    policy.forget_session("s")
    assert policy.home("s") is None
    stats = policy.stats()
    assert stats["hits"] == 1 and stats["new_sessions"] == 1 and stats["sessions"] == 0


def test_affinity_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="abs_threshold"):
        SessionAffinity(abs_threshold=-1)
    with pytest.raises(ValueError, match="rel_threshold"):
        SessionAffinity(rel_threshold=float("nan"))
    with pytest.raises(ValueError, match="max_sessions"):
        SessionAffinity(max_sessions=0)


# -- prefix-aware ---------------------------------------------------------------------


def prompt(tag: int, blocks: int = 4, shared: list[int] | None = None) -> list[int]:
    """``shared`` + distinct tokens up to ``blocks`` blocks of 16."""
    head = list(shared or [])
    return head + [1000 * (tag + 1) + i for i in range(16 * blocks - len(head))]


def test_block_hashes_are_chained_full_blocks() -> None:
    a = prompt(0, blocks=3)
    assert len(block_hashes(a, 16)) == 3
    assert len(block_hashes([*a, 1, 2, 3], 16)) == 3  # the partial block does not count
    assert block_hashes(a[:15], 16) == [] and block_hashes(None, 16) == []
    b = a[:16] + [7] * 16 + a[32:]
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert ha[0] == hb[0] and ha[1] != hb[1]
    assert ha[2] != hb[2]  # same block content, different prefix: different hash


def test_prefix_picks_the_engine_that_saw_the_prefix() -> None:
    policy = PrefixAware()
    engines = slots(0, 0, 0)
    p = prompt(0)
    first = route(policy, engines, RouteRequest(prompt_token_ids=p))
    assert policy.last_outcome() == "miss"
    assert first is not None
    set_load(engines, **{first: 10})  # more loaded, but within the thresholds
    assert route(policy, engines, RouteRequest(prompt_token_ids=p)) == first
    assert policy.last_outcome() == "hit"
    assert policy.match_rate(first, p) == 1.0
    # a prompt sharing the first two of four blocks: match rate 0.5 >= 0.5
    q = prompt(1, shared=p[:32])
    assert route(policy, engines, RouteRequest(prompt_token_ids=q)) == first
    assert policy.last_outcome() == "hit"
    assert policy.hits == 2 and policy.misses == 1


def test_prefix_below_threshold_is_least_loaded() -> None:
    policy = PrefixAware()
    engines = slots(5, 0, 3)
    p = prompt(0)
    policy.on_served("e0", RouteRequest(prompt_token_ids=p))
    q = prompt(1, shared=p[:16])  # 1 of 4 blocks: 0.25 < 0.5
    assert route(policy, engines, RouteRequest(prompt_token_ids=q)) == "e1"
    assert policy.last_outcome() == "miss"
    loose = PrefixAware(match_threshold=0.25)
    loose.on_served("e0", RouteRequest(prompt_token_ids=p))
    assert route(loose, engines, RouteRequest(prompt_token_ids=q)) == "e0"
    assert loose.last_outcome() == "hit"


def test_prefix_falls_back_to_least_loaded_under_imbalance() -> None:
    policy = PrefixAware()
    engines = slots(100, 10, 20)  # e0: gap 90 > 32 and 100 >= 15
    p = prompt(0)
    policy.on_served("e0", RouteRequest(prompt_token_ids=p))
    assert route(policy, engines, RouteRequest(prompt_token_ids=p)) == "e1"
    assert policy.last_outcome() == "fallback"
    assert policy.fallbacks == 1
    # only one threshold passed: stays with the prefix
    policy2 = PrefixAware()
    engines2 = slots(200, 160)
    policy2.on_served("e0", RouteRequest(prompt_token_ids=p))
    assert route(policy2, engines2, RouteRequest(prompt_token_ids=p)) == "e0"


def test_prefix_tries_the_next_best_match_when_the_best_is_imbalanced() -> None:
    policy = PrefixAware()
    engines = slots(100, 20, 0)
    p = prompt(0)
    policy.on_served("e0", RouteRequest(prompt_token_ids=p))  # full match, overloaded
    policy.on_served("e1", RouteRequest(prompt_token_ids=p[:48]))  # 3 of 4 blocks
    assert route(policy, engines, RouteRequest(prompt_token_ids=p)) == "e1"
    assert policy.last_outcome() == "hit"


def test_prefix_skips_engines_that_cannot_take_the_request() -> None:
    policy = PrefixAware()
    engines = slots(0, 0)
    p = prompt(0)
    policy.on_served("e0", RouteRequest(prompt_token_ids=p))
    assert route(policy, engines, RouteRequest(prompt_token_ids=p, exclude=frozenset({"e0"}))) == "e1"
    assert policy.last_outcome() == "miss"
    engines[0].healthy = False
    assert route(policy, engines, RouteRequest(prompt_token_ids=p)) == "e1"


@pytest.mark.parametrize("ids", [None, [], list(range(15))])
def test_prefix_short_or_missing_prompt_is_least_loaded(ids: list[int] | None) -> None:
    policy = PrefixAware()
    engines = slots(3, 1, 2)
    assert route(policy, engines, RouteRequest(prompt_token_ids=ids)) == "e1"
    assert policy.last_outcome() == "none"
    assert policy.num_blocks() == 0


def test_prefix_index_is_bounded() -> None:
    policy = PrefixAware(max_blocks_per_engine=100)
    engines = slots(0)
    for i in range(2_000):
        route(policy, engines, RouteRequest(prompt_token_ids=prompt(i)))
        engines[0].train_in_flight = 0
    assert policy.num_blocks("e0") == 100
    assert policy.num_blocks() == 100
    assert policy.match_rate("e0", prompt(1_999)) == 1.0  # recent prompts still match
    assert policy.match_rate("e0", prompt(0)) == 0.0  # old ones were evicted


def test_prefix_eviction_drops_deepest_blocks_first() -> None:
    policy = PrefixAware(max_blocks_per_engine=6)
    a, b = prompt(0), prompt(1)
    policy.on_served("e0", RouteRequest(prompt_token_ids=a))
    policy.on_served("e0", RouteRequest(prompt_token_ids=b))  # evicts 2 of a's blocks
    assert policy.num_blocks("e0") == 6
    assert policy.match_rate("e0", a) == 0.5  # a's leading blocks survived
    assert policy.match_rate("e0", b) == 1.0


def test_prefix_drops_index_of_engines_no_longer_registered() -> None:
    policy = PrefixAware()
    p = prompt(0)
    for eid in ["e0", "e1", "old"]:
        policy.on_served(eid, RouteRequest(prompt_token_ids=p))
    route(policy, slots(0, 0), RouteRequest(prompt_token_ids=p))
    assert policy.num_blocks("old") == 0
    assert policy.num_blocks("e0") == 4
    policy.forget_engine("e0")
    assert policy.num_blocks("e0") == 0


def test_prefix_rejects_bad_options() -> None:
    for kwargs in (
        {"block_size": 0},
        {"max_blocks_per_engine": 0},
        {"match_threshold": 1.5},
        {"abs_threshold": -1},
    ):
        with pytest.raises(ValueError):
            PrefixAware(**kwargs)  # type: ignore[arg-type]


# -- power of two choices -------------------------------------------------------------


def test_p2c_never_picks_an_engine_without_free_slots() -> None:
    policy = PowerOfTwo(seed=0)
    engines = slots(448, 10, 448, 10, 448)  # ties go to either
    picks = {policy.choose(engines, RouteRequest()).engine_id for _ in range(500)}  # type: ignore[union-attr]
    assert picks == {"e1", "e3"}


def test_p2c_picks_the_less_loaded_of_the_two() -> None:
    policy = PowerOfTwo(seed=1)
    engines = slots(0, 3, 6)
    picks = [policy.choose(engines, RouteRequest()).engine_id for _ in range(600)]  # type: ignore[union-attr]
    assert "e2" not in picks  # loses to whichever engine it is paired with
    assert picks.count("e0") == pytest.approx(400, abs=60)  # wins 2 of the 3 pairs
    two = slots(7, 2)
    assert {policy.choose(two, RouteRequest()).engine_id for _ in range(50)} == {"e1"}  # type: ignore[union-attr]


def test_p2c_one_or_no_candidate() -> None:
    policy = PowerOfTwo(seed=0)
    engines = slots(448, 5)
    assert policy.choose(engines, RouteRequest()).engine_id == "e1"  # type: ignore[union-attr]
    assert policy.choose(slots(448, 448), RouteRequest()) is None
    assert policy.choose([], RouteRequest()) is None


def test_p2c_is_reproducible_with_a_seed() -> None:
    engines = slots(0, 0, 0, 0)

    def run(seed: int) -> list[str]:
        p = PowerOfTwo(seed=seed)
        return [p.choose(engines, RouteRequest()).engine_id for _ in range(50)]  # type: ignore[union-attr]

    assert run(3) == run(3)


# -- weights --------------------------------------------------------------------------


def weighted(*weights: float, eval_quota: int = 64) -> list[EngineSlot]:
    return [EngineSlot(f"e{i}", capacity=512, eval_quota=eval_quota, weight=w) for i, w in enumerate(weights)]


def all_policies() -> list[Policy]:
    return [LeastLoaded(), SessionAffinity(), PrefixAware(), PowerOfTwo(seed=0)]


@pytest.mark.parametrize("eval_quota", [64, 0])
def test_weight_zero_engine_is_never_a_candidate(eval_quota: int) -> None:
    engines = weighted(0.0, 1.0, 0.0, eval_quota=eval_quota)
    for e in engines[::2]:
        assert e.free("train") <= 0 and e.free("eval") <= 0
    p = prompt(0)
    for policy in all_policies():
        # the zero-weight engine is the session's home and holds the prefix
        policy.on_served("e0", RouteRequest(session_id="s", prompt_token_ids=p))
        for split in ("train", "eval"):
            for _ in range(20):
                request = RouteRequest(split=split, session_id="s", prompt_token_ids=p)
                choice = policy.choose(engines, request)
                assert choice is not None and choice.engine_id == "e1", type(policy).__name__


def test_all_weights_zero_gives_none_without_error() -> None:
    engines = weighted(0.0, 0.0, 0.0)
    for policy in all_policies():
        policy.on_served("e0", RouteRequest(session_id="s", prompt_token_ids=prompt(0)))
        request = RouteRequest(session_id="s", prompt_token_ids=prompt(0))
        assert policy.choose(engines, request) is None
        assert policy.choose(engines, RouteRequest(split="eval")) is None


def test_weight_zero_home_falls_back_as_full() -> None:
    policy = SessionAffinity()
    engines = weighted(1.0, 1.0)
    policy.on_served("e0", RouteRequest(session_id="s"))
    engines[0].weight = 0.0  # drained
    assert route(policy, engines, RouteRequest(session_id="s")) == "e1"
    assert policy.fallback_reasons == {"full": 1}
    assert policy.home("s") == "e1"


# -- registry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("least_loaded", LeastLoaded),
        ("session_affinity", SessionAffinity),
        ("prefix_aware", PrefixAware),
        ("power_of_two", PowerOfTwo),
    ],
)
def test_make_policy_returns_the_right_class(name: str, cls: type) -> None:
    policy = make_policy(name)
    assert policy.name == name
    assert type(policy) is cls
    assert name in POLICIES


def test_make_policy_passes_options() -> None:
    affinity = make_policy("session_affinity", abs_threshold=4, rel_threshold=0.25, max_sessions=7)
    assert isinstance(affinity, SessionAffinity)
    assert (affinity.abs_threshold, affinity.rel_threshold, affinity.max_sessions) == (4, 0.25, 7)
    prefix = make_policy("prefix_aware", block_size=8, match_threshold=0.75)
    assert isinstance(prefix, PrefixAware)
    assert (prefix.block_size, prefix.match_threshold) == (8, 0.75)
    p2c = make_policy("power_of_two", seed=5)
    assert isinstance(p2c, PowerOfTwo) and p2c.seed == 5


def test_make_policy_rejects_bad_names_and_options() -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("round_robin")
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("session_affinity", no_such_option=1)
    with pytest.raises(ConfigError, match="max_sessions"):
        make_policy("session_affinity", max_sessions=0)
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("least_loaded", seed=1)


def test_p2c_on_a_fleet_samples_only_engines_that_can_take_the_request() -> None:
    policy = PowerOfTwo(seed=2)
    engines = [EngineSlot(f"e{i}", capacity=512, eval_quota=64, healthy=i % 2 == 1) for i in range(64)]
    engines[5].train_in_flight = 448  # full
    picks = {policy.choose(engines, RouteRequest(exclude=frozenset({"e7"}))).engine_id for _ in range(4000)}  # type: ignore[union-attr]
    allowed = {f"e{i}" for i in range(1, 64, 2)} - {"e5", "e7"}
    assert picks == allowed  # every engine that can take it is drawn, no other ever


def test_p2c_on_a_fleet_falls_back_to_a_scan_when_few_can_take_it() -> None:
    policy = PowerOfTwo(seed=0)
    engines = [EngineSlot(f"e{i}", capacity=512, eval_quota=64, train_in_flight=448) for i in range(100)]
    engines[42].train_in_flight = 0
    assert policy.choose(engines, RouteRequest()).engine_id == "e42"  # type: ignore[union-attr]
    engines[42].train_in_flight = 448
    assert policy.choose(engines, RouteRequest()) is None
