"""Engine backends, one file each, loaded lazily by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inferpool.errors import ConfigError

if TYPE_CHECKING:
    from inferpool.actors.backends.base import EngineBackend
    from inferpool.config import EngineConfig

# backend name -> (module, factory function)
_REGISTRY: dict[str, tuple[str, str]] = {
    "fake": ("inferpool.actors.backends.fake", "FakeBackend"),
    "vllm": ("inferpool.actors.backends.vllm", "VLLMBackend"),
    "sglang": ("inferpool.actors.backends.sglang", "SGLangBackend"),
    "openai": ("inferpool.actors.backends.openai_api", "OpenAIBackend"),
    "vllm_http": ("inferpool.actors.backends.vllm_http", "VLLMHTTPBackend"),
    "sglang_http": ("inferpool.actors.backends.sglang_http", "SGLangHTTPBackend"),
    "trl_http": ("inferpool.actors.backends.trl_http", "TRLHTTPBackend"),
}


def register_backend(name: str, module: str, attr: str) -> None:
    """Make ``EngineConfig(backend=name)`` load ``module.attr(config, engine_id)``."""
    _REGISTRY[name] = (module, attr)


def create_backend(config: EngineConfig, engine_id: str) -> EngineBackend:
    """Instantiate (without starting) the backend a config names."""
    try:
        module_name, attr = _REGISTRY[config.backend]
    except KeyError:
        raise ConfigError(
            f"EngineConfig.backend: no backend {config.backend!r} is available (known: {sorted(_REGISTRY)})",
            field="backend",
        ) from None
    factory = getattr(importlib.import_module(module_name), attr)
    backend: EngineBackend = factory(config, engine_id)
    return backend
