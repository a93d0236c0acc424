"""Shared fixtures: one Ray instance and one fake-engine pool per test session.

Run everything with ``make test``; only the unit tests with ``pytest tests/unit``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            namespace="inferpool-tests",
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def fake_pool(ray_session: None) -> Iterator[object]:
    """Two fake engines behind a router (small capacity so capacity tests are quick)."""
    import inferpool as ip

    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-fake",
            engines=[ip.EngineConfig(backend="fake", replicas=2, engine_kwargs={"vocab_size": 512})],
            router=ip.RouterConfig(acquire_timeout_s=5.0, health_interval_s=0.5),
        )
    )
    yield pool
    pool.shutdown()
