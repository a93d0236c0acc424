"""Integration fixtures: real Ray, real vLLM (CPU build), the tiny model built in a temp dir.

One pool with two vLLM engines serves the whole test session.
Run: pytest tests/integration
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="integration tests need vLLM (make test installs the CPU build)")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from inferpool.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(Path(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path: str) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def vllm_pool(ray_session: None, tiny_model_path: str) -> Iterator[object]:
    import inferpool as ip

    pool = ip.Pool.start(
        ip.PoolConfig(
            name="it-vllm",
            engines=[
                ip.EngineConfig(
                    backend="vllm",
                    model=tiny_model_path,
                    replicas=2,
                    engine_kwargs={"max_model_len": 2048, "enable_prefix_caching": True},
                )
            ],
            # update_weights broadcasts over Gloo through vLLM's weight-transfer protocol by default;
            # tests pass method="object_store" for the object-store path
            weight_transfer=ip.WeightTransferConfig(method="gloo", timeout_s=300),
        )
    )
    yield pool
    pool.shutdown()
