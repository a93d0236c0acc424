"""Engine backends, grouped by engine, loaded lazily by name from :mod:`inferpool.registry`.

* :mod:`.base`: the :class:`EngineBackend` interface, :class:`BaseBackend` defaults and the
  helpers every backend shares (finish-reason normalisation, prompt-logprob assembly).
* :mod:`.vllm`: vLLM in-process (backend, worker extension, Gloo weight transfer engine).
* :mod:`.sglang`: SGLang in-process (backend, weight updates, engine loop, wire format).
* :mod:`.remote`: servers someone else runs, over HTTP (``openai``, ``vllm_http``,
  ``sglang_http``, ``trl_http`` on a shared retrying client).
* :mod:`.fake`: a deterministic fake engine (its prefix-cache model in :mod:`.fake_cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferpool.registry import load

if TYPE_CHECKING:
    from inferpool.actors.backends.base import EngineBackend
    from inferpool.config import EngineConfig


def create_backend(config: EngineConfig, engine_id: str) -> EngineBackend:
    """Instantiate (without starting) the backend a config names."""
    backend: EngineBackend = load(config.backend_target())(config, engine_id)
    return backend
