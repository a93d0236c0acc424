"""The one async interface every engine backend implements, and what backends share.

``generate`` is the only call a backend must provide; lifecycle calls have safe
defaults here (a log line where the backend cannot do it), so a backend states what
it supports by overriding them.

Shared by the backends: finish-reason normalisation (:func:`normalize_finish_reason`,
:func:`normalize_finish`: the one place engine and provider spellings become
stop/length/abort/tool_calls), prompt-scoring input checks (:func:`check_top_k`) and the
assembly of scored prompt positions (:func:`build_prompt_logprobs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from inferpool.errors import BackendError, RequestError
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)

PauseMode = Literal["abort", "wait", "keep"]

# Engine and provider spellings of a finish reason -> ours (stop, length, abort, tool_calls).
_FINISH_ALIASES = {"eos": "stop", "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}
_FINISH_ALIASES.update({"function_call": "tool_calls", "tool_use": "tool_calls", "cancelled": "abort"})


def normalize_finish_reason(value: Any, default: str = "stop") -> str:
    """A finish reason as a plain string: SGLang dicts (``{"type": "length", ...}``) and
    provider spellings (``end_turn``, ``max_tokens``) map to stop/length/abort/tool_calls.

    ``default`` stands in for a missing reason (null, or a dict without ``type``): engines
    that report null for an unfinished request pass "abort".
    """
    if isinstance(value, Mapping):
        value = value.get("type") or None
    if value is None:
        return default
    text = str(value).lower()
    return _FINISH_ALIASES.get(text, text)


def normalize_finish(value: Any, default: str = "abort") -> tuple[str, int | str | None]:
    """A finish reason as (reason, stop_reason): ``stop_reason`` is SGLang's ``matched``
    (the stop token id or string) when the reason is a dict that carries one.

    ``{"type": "stop", "matched": 2}`` -> ("stop", 2); ``{"type": "length", ...}`` ->
    ("length", None); ``{"type": "abort", ...}`` and null (unfinished) -> ("abort", None).
    """
    matched = value.get("matched") if isinstance(value, Mapping) else None
    stop_reason = matched if isinstance(matched, int | str) and not isinstance(matched, bool) else None
    return normalize_finish_reason(value, default), stop_reason


def check_top_k(prompt_token_ids: list[int], top_k: int) -> None:
    """Reject bad scoring input before any engine or HTTP call (RequestError, not retried)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RequestError(f"top_k: must be an integer >= 1, got {top_k!r}", field="top_k")
    if not prompt_token_ids:
        raise RequestError("prompt_token_ids: the prompt is empty", field="prompt_token_ids")


def build_prompt_logprobs(
    prompt: list[int], positions: list[dict[int, float] | None], k: int, source: str
) -> PromptLogprobs:
    """Exactly ``k`` (token id, logprob) pairs per prompt position ``i >= 1``, best first.

    ``positions[i]`` maps candidate ids to logprobs; it may hold ``k + 1`` entries (the
    actual prompt token when it is outside the top k): the top ``k`` by logprob are kept.
    Position 0 (nothing precedes it) gets empty lists.
    """
    if len(positions) != len(prompt):
        raise BackendError(f"{source}: prompt logprobs for {len(positions)} positions, prompt has {len(prompt)}")
    top_ids: list[list[int]] = [[]]
    top_lps: list[list[float]] = [[]]
    for i in range(1, len(prompt)):
        pos = positions[i] or {}
        if len(pos) < k:
            raise BackendError(f"{source}: prompt position {i} has {len(pos)} logprobs, expected {k}")
        ranked = sorted(pos.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        top_ids.append([int(t) for t, _ in ranked])
        top_lps.append([float(lp) for _, lp in ranked])
    return PromptLogprobs(prompt_tokens=list(prompt), prompt_topk_token_ids=top_ids, prompt_topk_logprobs=top_lps)


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
