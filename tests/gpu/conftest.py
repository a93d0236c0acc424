"""GPU tests: skipped where there is no CUDA GPU.

Tests here (and any test marked ``gpu`` elsewhere) skip unless ``torch.cuda.is_available()``.
A module opts in with ``pytestmark = pytest.mark.gpu``; a single test can take the
``requires_gpu`` fixture instead.

Run: .venv/bin/pytest tests/gpu -q
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def cuda_available() -> bool:
    """True when torch imports and sees a CUDA device."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


NO_GPU_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"

requires_gpu_marker = pytest.mark.skipif(not cuda_available(), reason=NO_GPU_REASON)
"""A skip marker for modules that import this file directly."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu``-marked test when no CUDA GPU is present."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason=NO_GPU_REASON)
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def requires_gpu() -> None:
    """Skip the test that takes this fixture unless a CUDA GPU is present."""
    if not cuda_available():
        pytest.skip(NO_GPU_REASON)
