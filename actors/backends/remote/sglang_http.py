"""``sglang_http`` backend: SGLang's native ``/generate`` endpoint, token ids in and out.

``base_url`` is the server root (``http://host:30000``; a trailing ``/v1`` is dropped).

Request: ``POST /generate`` with ``input_ids``, ``sampling_params`` (max_new_tokens,
min_new_tokens, temperature, top_p, top_k (-1: off), min_p, n, stop, stop_token_ids,
ignore_eos, repetition/presence/frequency penalties, and the seed under the name
``seed_field``, ``sampling_seed`` by default), ``return_logprob: true`` and, when top-k
alternatives are asked for, ``top_logprobs_num``.

Response: one object, or a list of them for ``n > 1`` (one per choice, in order), in the
format the in-process engine answers too: it is read by the same code,
:mod:`inferpool.actors.backends.sglang.wire` (``meta_info.output_token_logprobs`` triples,
``output_ids``, ``meta_info.output_top_logprobs``, ``meta_info.finish_reason`` dicts
normalised to "length"/"stop"/"abort" with ``matched`` as ``stop_reason``, ``text``).

Prompt scoring: ``logprob_start_len: 0``, ``top_logprobs_num: k``, ``max_new_tokens: 1``;
reads ``meta_info.input_top_logprobs`` (null or ``[]`` at position 0).

Start-up: ``GET /get_model_info`` (``model_path``; optional). Health: ``GET /health``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from inferpool.actors.backends.base import check_top_k
from inferpool.actors.backends.remote.http import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_VOCAB_SIZE,
    RemoteBackend,
    RemoteHTTPError,
    RemoteOptions,
)
from inferpool.actors.backends.sglang.wire import (
    decode_choice,
    decode_prompt_logprobs,
    logprob_args,
    scoring_args,
    to_sglang_sampling,
)
from inferpool.config import EngineConfig
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)


class SGLangHTTPOptions(RemoteOptions):
    """Options of the ``sglang_http`` backend (``EngineConfig.engine_kwargs``)."""

    seed_field: str | None = Field(
        "sampling_seed", description="sampling_params key carrying the seed; None: seeds are not sent."
    )


class SGLangHTTPBackend(RemoteBackend):
    """SGLang server, native API."""

    name = "sglang_http"
    options_cls = SGLangHTTPOptions
    health_path = "/health"
    options: SGLangHTTPOptions

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        super().__init__(config, engine_id)
        self.model: str | None = config.model

    async def start(self) -> EngineInfo:
        try:
            info = await self.get(self.root + "/get_model_info", attempts=1)
            served = info.get("model_path") if isinstance(info, dict) else None
        except RemoteHTTPError as exc:
            if exc.status is None:
                raise
            served = None
            await self.health()
        if self.model is None and served:
            self.model = str(served)
        logger.info("sglang_http engine %s: %s serves %s", self.engine_id, self.root, self.model)
        return EngineInfo(
            engine_id=self.engine_id,
            backend=self.name,
            model=self.model or "",
            vocab_size=self.options.vocab_size or DEFAULT_VOCAB_SIZE,
            max_model_len=self.options.max_model_len or DEFAULT_MAX_MODEL_LEN,
            supports_tokens=True,
            supports_prompt_logprobs=True,
        )

    def payload(self, request: GenerateRequest) -> dict[str, Any]:
        """The /generate body of a request."""
        sp = request.sampling
        params = to_sglang_sampling(sp)
        if sp.seed is not None and self.options.seed_field:
            params[self.options.seed_field] = sp.seed
        return {"input_ids": list(request.prompt_token_ids), "sampling_params": params, **logprob_args(sp.logprobs)}

    async def generate_once(self, request: GenerateRequest) -> GenerateResult:
        out = await self.post(self.root + "/generate", self.payload(request))
        items = out if isinstance(out, list) else [out]
        source = f"sglang_http engine {self.engine_id}"
        choices = [decode_choice(item, i, request, source) for i, item in enumerate(items)]
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            choices=choices,
            engine_id=self.engine_id,
        )

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position (position 0: empty lists)."""
        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        out = await self.post(self.root + "/generate", scoring_args(ids, top_k))
        return decode_prompt_logprobs(out, ids, top_k, f"sglang_http engine {self.engine_id}")
