"""The one async interface every engine backend implements.

``generate`` is the only call a backend must provide; lifecycle calls have safe
defaults here (a log line where the backend cannot do it), so a backend states what
it supports by overriding them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol, runtime_checkable

from inferpool.errors import RequestError
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)

PauseMode = Literal["abort", "wait", "keep"]


@runtime_checkable
class EngineBackend(Protocol):
    """What the engine actor needs from a backend."""

    async def start(self) -> EngineInfo: ...
    async def generate(self, request: GenerateRequest) -> GenerateResult: ...
    async def abort(self, request_id: str) -> None: ...
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def completion(self, body: dict[str, Any]) -> dict[str, Any]: ...
    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs: ...
    async def health(self) -> None: ...
    async def backend_stats(self) -> dict[str, Any]: ...
    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int: ...
    async def set_weight_version(self, version: int | str) -> None: ...
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None: ...
    async def start_weight_update(self) -> None: ...
    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int: ...
    async def finish_weight_update(self, version: int | str) -> None: ...
    async def pause(self, mode: PauseMode) -> None: ...
    async def resume(self) -> None: ...
    async def sleep(self, level: int) -> None: ...
    async def wake(self, tags: list[str] | None) -> None: ...
    async def reset_prefix_cache(self) -> None: ...
    async def shutdown(self) -> None: ...


class BaseBackend:
    """Safe defaults for the optional lifecycle calls."""

    name = "base"

    async def start(self) -> EngineInfo:
        raise NotImplementedError

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        raise NotImplementedError

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Text-level OpenAI chat completion (text-only backends). Token backends render instead."""
        raise RequestError(f"the {self.name} backend serves token ids; it has no text-level chat call")

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """Text-level OpenAI completion (text-only backends)."""
        raise RequestError(f"the {self.name} backend serves token ids; it has no text-level completion call")

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Score a prompt: top-k logprobs at every position. Not retryable when unsupported."""
        raise RequestError(f"the {self.name} backend cannot return prompt logprobs", field="backend")

    async def abort(self, request_id: str) -> None:
        logger.info("%s backend cannot abort; request %s runs to completion", self.name, request_id)

    async def health(self) -> None:
        """Raise if the backend cannot serve; must not generate."""

    async def backend_stats(self) -> dict[str, Any]:
        return {}

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load a chunk of (name, tensor) weights in place; returns how many were loaded."""
        raise RequestError(f"the {self.name} backend cannot load weights from tensors", field="backend")

    async def set_weight_version(self, version: int | str) -> None:
        """Label the weights now loaded; every token sampled from here on carries it."""
        self.weight_version = version

    weight_version: int | str | None = 0
    weight_transfer: str = "object_store"
    """How this engine receives weights (PoolConfig.weight_transfer.method); the engine
    actor sets it before ``start`` so backends that need it at start (vLLM) see it."""

    # Native weight transfer (vLLM's four-phase protocol; see inferpool.weights.trainer).
    def _no_native(self) -> RequestError:
        return RequestError(
            f"weight_transfer.method: the {self.name} backend has no native weight transfer "
            f"{self.weight_transfer!r}; use 'object_store'",
            field="weight_transfer.method",
        )

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's transfer group (once, before the first native update)."""
        raise self._no_native()

    async def start_weight_update(self) -> None:
        raise self._no_native()

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Receive the tensors ``update_info`` names while the trainer sends them; returns how many."""
        raise self._no_native()

    async def finish_weight_update(self, version: int | str) -> None:
        """Finalise the received weights and label them ``version``."""
        raise self._no_native()

    async def pause(self, mode: PauseMode) -> None:
        logger.info("%s backend has no native pause (mode=%s)", self.name, mode)

    async def resume(self) -> None:
        logger.info("%s backend has no native resume", self.name)

    async def sleep(self, level: int) -> None:
        logger.info("%s backend cannot release accelerator memory (sleep level=%s): no-op", self.name, level)

    async def wake(self, tags: list[str] | None) -> None:
        logger.info("%s backend cannot sleep, so wake is a no-op", self.name)

    async def reset_prefix_cache(self) -> None:
        logger.info("%s backend has no prefix cache to reset", self.name)

    async def shutdown(self) -> None:
        return None
