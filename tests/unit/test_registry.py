"""One registry of backend and policy names: configs validate against it, and a name
registered only in the driver works in the engine and router actors.

Run: pytest tests/unit/test_registry.py
"""

from __future__ import annotations

import pytest

import inferpool as ip
from inferpool.registry import BACKENDS, POLICIES, register_backend, register_policy


def test_unknown_names_are_config_errors_naming_the_field() -> None:
    with pytest.raises(ip.ConfigError, match="unknown backend 'nope'") as err:
        ip.EngineConfig(backend="nope")
    assert err.value.field == "backend"
    with pytest.raises(ip.ConfigError, match="unknown policy") as err:
        ip.RouterConfig(policy="nope")
    assert err.value.field == "policy"
    with pytest.raises(ip.ConfigError, match=r"engines\.0\.backend|unknown backend"):
        ip.PoolConfig(engines=[{"backend": "nope"}])  # type: ignore[list-item]
    with pytest.raises(ip.ConfigError, match="base_url"):
        ip.EngineConfig(backend="vllm_http")


def test_registered_names_and_direct_targets_validate() -> None:
    register_backend("fake-twin", "inferpool.actors.backends.fake:FakeBackend")
    register_policy("least-loaded-twin", "inferpool.routing.policy:LeastLoaded")
    try:
        assert ip.EngineConfig(backend="fake-twin").backend_target() == BACKENDS["fake"].target
        assert ip.EngineConfig(backend="inferpool.actors.backends.fake:FakeBackend").backend == (
            "inferpool.actors.backends.fake:FakeBackend"
        )
        assert ip.RouterConfig(policy="least-loaded-twin").policy_target() == POLICIES["least_loaded"]
    finally:
        BACKENDS.pop("fake-twin")
        POLICIES.pop("least-loaded-twin")
    with pytest.raises(ip.ConfigError, match="target"):
        register_backend("bad", "not a target")


async def test_a_backend_and_policy_registered_in_the_driver_work_in_the_actors(ray_session: None) -> None:
    register_backend("driver-only-fake", "inferpool.actors.backends.fake:FakeBackend")
    register_policy("driver-only-policy", "inferpool.routing.policy:LeastLoaded")
    try:
        pool = ip.Pool.start(
            ip.PoolConfig(
                name="unit-registry",
                engines=[ip.EngineConfig(backend="driver-only-fake", engine_kwargs={"vocab_size": 64})],
                router=ip.RouterConfig(policy="driver-only-policy"),
                sessions=ip.SessionConfig(shards=1),
            )
        )
    finally:
        BACKENDS.pop("driver-only-fake")
        POLICIES.pop("driver-only-policy")
    try:  # the engine and router actors never saw the registrations: the configs carried the targets
        res = await pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=3))
        assert len(res.choices[0].token_ids) >= 1
        assert pool.stats()["router"]["policy"] == "driver-only-policy"
    finally:
        pool.shutdown()
