"""``openai`` backend: any OpenAI-compatible chat/completions API, hosted ones included.

Text in, text out, with the official request and response shapes:

* ``chat(body)`` POSTs ``{base_url}/chat/completions``; ``completion(body)`` POSTs
  ``{base_url}/completions``. The server's JSON comes back as a dict, with every
  ``choices[i].finish_reason`` normalised to a string (stop, length, tool_calls, ...).
* ``base_url`` is the API root that precedes ``/chat/completions`` (for example
  ``https://api.openai.com/v1`` or ``http://host:8000/v1``).
* Reasoning: a chat body may carry ``reasoning`` (a dict of
  :class:`~inferpool.reasoning.ReasoningConfig` fields); it is written in the format of
  the provider (``EngineConfig.provider``, else detected from ``base_url``) and the
  ``reasoning`` key itself is not forwarded. ``skip_reasoning`` (never forwarded) leaves
  reasoning out.
* Health: ``GET {base_url}/models`` (no completion is ever paid for).

There are no token ids over this API, so ``generate`` raises a :class:`RequestError` and
the engine reports ``supports_tokens=False`` (sessions need placeholder mode).
"""

from __future__ import annotations

import logging
from typing import Any

from inferpool.actors.backends.base import normalize_finish_reason
from inferpool.actors.backends.remote.http import DEFAULT_MAX_MODEL_LEN, DEFAULT_VOCAB_SIZE, RemoteBackend
from inferpool.config import EngineConfig
from inferpool.errors import RequestError
from inferpool.reasoning import ReasoningConfig, apply_reasoning, detect_provider, strip_control_fields
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult

logger = logging.getLogger(__name__)


def models_info(body: Any) -> tuple[str | None, int | None]:
    """The first model id and its ``max_model_len`` (vLLM reports it) from a /models body."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return None, None
    first = data[0]
    max_len = first.get("max_model_len")
    return (str(first["id"]) if first.get("id") is not None else None), (
        int(max_len) if isinstance(max_len, int) else None
    )


def normalize_choices(body: Any) -> Any:
    """``body`` with each choice's finish reason as a string (in place; returns body)."""
    if isinstance(body, dict):
        for choice in body.get("choices") or []:
            if isinstance(choice, dict):
                choice["finish_reason"] = normalize_finish_reason(choice.get("finish_reason"))
    return body


class OpenAIBackend(RemoteBackend):
    """Text-level OpenAI-compatible API (no token ids)."""

    name = "openai"

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        super().__init__(config, engine_id)
        self.model: str | None = config.model
        self.provider = detect_provider(config.provider, config.base_url)

    async def start(self) -> EngineInfo:
        body = await self.get(self.base_url + "/models")
        served, max_len = models_info(body)
        if self.model is None:
            self.model = served
        logger.info(
            "openai engine %s: %s model %s (provider %s)", self.engine_id, self.base_url, self.model, self.provider
        )
        return EngineInfo(
            engine_id=self.engine_id,
            backend=self.name,
            model=self.model or "",
            vocab_size=self.options.vocab_size or DEFAULT_VOCAB_SIZE,
            max_model_len=self.options.max_model_len or max_len or DEFAULT_MAX_MODEL_LEN,
            supports_tokens=False,
            supports_prompt_logprobs=False,
        )

    async def health(self) -> None:
        await self.get(self.base_url + "/models", attempts=1, timeout=self.options.health_timeout_s)

    def _body(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The request to send: a copy without control fields, with model and reasoning."""
        clean, skip = strip_control_fields(body)
        reasoning = clean.pop("reasoning", None)
        if clean.get("model") is None and self.model is not None:
            clean["model"] = self.model
        if reasoning is None or skip:
            return clean
        if not chat:
            logger.debug("openai engine %s: reasoning applies to chat calls only; dropped", self.engine_id)
            return clean
        if isinstance(reasoning, dict):
            reasoning = ReasoningConfig(**reasoning)
        if not isinstance(reasoning, ReasoningConfig):
            raise RequestError(
                f"reasoning: expected a dict of ReasoningConfig fields, got {type(reasoning).__name__}",
                field="reasoning",
            )
        return apply_reasoning(clean, reasoning, self.provider, model=clean.get("model"))

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/completions; the ChatCompletion JSON with string finish reasons."""
        out = await self.post(self.base_url + "/chat/completions", self._body(body, chat=True))
        return dict(normalize_choices(out))

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /completions; the Completion JSON with string finish reasons."""
        out = await self.post(self.base_url + "/completions", self._body(body, chat=False))
        return dict(normalize_choices(out))

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        raise RequestError(
            f"the openai backend (engine {self.engine_id}) has no token ids: the OpenAI API takes and "
            "returns text. Use chat()/completion(), or a vllm_http/sglang_http engine for token ids.",
            field="backend",
        )
