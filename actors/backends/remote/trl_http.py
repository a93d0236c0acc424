"""``trl_http`` backend: TRL's vLLM server (``trl vllm-serve``), token ids out.

``base_url`` is the server root (``http://host:8000``).

Request: ``POST /generate/`` with ``prompts`` (a one-element list), ``n``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``max_tokens``, ``repetition_penalty``
and ``generation_kwargs`` (seed, stop, stop_token_ids, ignore_eos, min_tokens,
presence/frequency penalties, only those set; servers that predate
``generation_kwargs`` ignore it).

The server takes text prompts, so by default (``prompt_format="text"``) the prompt ids
are decoded with the model's tokenizer (``tokenizer`` option, else
``EngineConfig.model``) and the server re-tokenizes them; the ids the server actually
used come back in ``prompt_ids`` and are what the result reports (a warning is logged
when they differ from the ids given). ``prompt_format="token_ids"`` sends the id list
itself, for servers that accept it.

Response fields read: ``completion_ids`` (one id list per choice, ``n`` per prompt),
``prompt_ids`` (optional), ``logprobs`` (one list per choice; an entry may be a float
or a list whose first value is the sampled token's logprob). Servers without
``logprobs`` fail with a clear error unless ``allow_missing_logprobs`` (then NaN).
TRL reports no finish reason: a choice of ``max_tokens`` tokens is "length", a shorter
one "stop". Health: ``GET /health/``. No prompt scoring (not in TRL's API).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Literal

from pydantic import Field

from inferpool.actors.backends.remote.http import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_VOCAB_SIZE,
    RemoteBackend,
    RemoteOptions,
)
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult

logger = logging.getLogger(__name__)


class TRLHTTPOptions(RemoteOptions):
    """Options of the ``trl_http`` backend (``EngineConfig.engine_kwargs``)."""

    prompt_format: Literal["text", "token_ids"] = Field(
        "text", description="Send prompts as decoded text (TRL's API) or as token id lists."
    )
    tokenizer: str | None = Field(None, description="Tokenizer to decode prompts with; None: EngineConfig.model.")
    allow_missing_logprobs: bool = Field(
        False, description="Accept servers that return no logprobs (recorded as NaN) instead of failing."
    )


def _logprob(value: Any) -> float:
    if isinstance(value, list):
        value = value[0] if value else None
    return math.nan if value is None else float(value)


class TRLHTTPBackend(RemoteBackend):
    """TRL's ``vllm-serve`` server."""

    name = "trl_http"
    options_cls = TRLHTTPOptions
    health_path = "/health/"
    options: TRLHTTPOptions

    def __init__(self, config: EngineConfig, engine_id: str, tokenizer: Any = None) -> None:
        super().__init__(config, engine_id)
        self.tokenizer = tokenizer
        self._warned_retokenized = False

    async def start(self) -> EngineInfo:
        if self.options.prompt_format == "text" and self.tokenizer is None:
            source = self.options.tokenizer or self.config.model
            if not source:
                raise ConfigError(
                    "EngineConfig.model: trl_http sends text prompts and needs a tokenizer to decode ids "
                    "(set model, engine_kwargs.tokenizer, or engine_kwargs.prompt_format='token_ids')",
                    field="model",
                )
            from transformers import AutoTokenizer

            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, source)
        await self.get(self.root + self.health_path)
        return EngineInfo(
            engine_id=self.engine_id,
            backend=self.name,
            model=self.config.model or "",
            vocab_size=self.options.vocab_size or DEFAULT_VOCAB_SIZE,
            max_model_len=self.options.max_model_len or DEFAULT_MAX_MODEL_LEN,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            supports_tokens=True,
            supports_prompt_logprobs=False,
        )

    def payload(self, request: GenerateRequest) -> dict[str, Any]:
        """The /generate/ body of a request."""
        sp = request.sampling
        ids = list(request.prompt_token_ids)
        prompt: Any = ids
        if self.options.prompt_format == "text":
            prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        extra: dict[str, Any] = {}
        if sp.seed is not None:
            extra["seed"] = sp.seed
        if sp.stop:
            extra["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            extra["stop_token_ids"] = list(sp.stop_token_ids)
        if sp.ignore_eos:
            extra["ignore_eos"] = True
        if sp.min_tokens:
            extra["min_tokens"] = sp.min_tokens
        if sp.presence_penalty:
            extra["presence_penalty"] = sp.presence_penalty
        if sp.frequency_penalty:
            extra["frequency_penalty"] = sp.frequency_penalty
        return {
            "prompts": [prompt],
            "n": sp.n,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "min_p": sp.min_p,
            "max_tokens": sp.max_tokens,
            "repetition_penalty": sp.repetition_penalty,
            "generation_kwargs": extra,
        }

    async def generate_once(self, request: GenerateRequest) -> GenerateResult:
        out = await self.post(self.root + "/generate/", self.payload(request))
        completions = out.get("completion_ids") if isinstance(out, dict) else None
        if not isinstance(completions, list) or not completions:
            raise BackendError(f"trl_http engine {self.engine_id}: response has no completion_ids")
        logprobs = out.get("logprobs")
        if logprobs is None and not self.options.allow_missing_logprobs:
            raise BackendError(
                f"trl_http engine {self.engine_id}: the server returns no logprobs (TRL too old?); "
                "set engine_kwargs.allow_missing_logprobs=True to accept NaN logprobs"
            )
        max_tokens = request.sampling.max_tokens
        choices = []
        for i, ids in enumerate(completions):
            lps = [math.nan] * len(ids) if logprobs is None else [_logprob(v) for v in logprobs[i]]
            if len(lps) != len(ids):
                raise BackendError(
                    f"trl_http engine {self.engine_id}: choice {i} has {len(lps)} logprobs for {len(ids)} tokens"
                )
            choices.append(
                Choice(
                    index=request.choice_offset + i,
                    token_ids=[int(t) for t in ids],
                    logprobs=lps,
                    finish_reason="length" if len(ids) >= max_tokens else "stop",
                )
            )
        prompt_ids = list(request.prompt_token_ids)
        served = out.get("prompt_ids")
        if isinstance(served, list) and served and isinstance(served[0], list):
            if served[0] != prompt_ids and not self._warned_retokenized:
                self._warned_retokenized = True
                logger.warning(
                    "trl_http engine %s: the server re-tokenized the prompt differently; "
                    "results report the server's prompt ids",
                    self.engine_id,
                )
            prompt_ids = [int(t) for t in served[0]]
        return GenerateResult(
            request_id=request.request_id, prompt_token_ids=prompt_ids, choices=choices, engine_id=self.engine_id
        )
