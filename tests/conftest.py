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


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded tiny model, built in a temp dir (its tokenizer renders chat for fakes)."""
    from inferpool.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def session_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[object]:
    """Fake engines that sample from the tiny tokenizer's vocabulary (EOS = <|im_end|>)."""
    from transformers import AutoTokenizer

    import inferpool as ip

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    pool = ip.Pool.start(
        ip.PoolConfig(
            name="unit-sessions",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=tiny_tokenizer_path,
                    replicas=2,
                    engine_kwargs={
                        "vocab_size": len(tok),
                        "eos_token_id": tok.eos_token_id,
                        "eos_probability": 0.15,
                        "max_model_len": 512,
                    },
                )
            ],
            router=ip.RouterConfig(acquire_timeout_s=5.0, health_interval_s=0.5),
            sessions=ip.SessionConfig(shards=2),
        )
    )
    yield pool
    pool.shutdown()
