"""``sglang_http`` backend: SGLang's native ``/generate`` endpoint, token ids in and out.

``base_url`` is the server root (``http://host:30000``; a trailing ``/v1`` is dropped).

Request: ``POST /generate`` with ``input_ids``, ``sampling_params`` (max_new_tokens,
min_new_tokens, temperature, top_p, top_k (-1: off), min_p, n, stop, stop_token_ids,
ignore_eos, repetition/presence/frequency penalties, and the seed under the name
``seed_field``, ``sampling_seed`` by default), ``return_logprob: true`` and, when top-k
alternatives are asked for, ``top_logprobs_num``.

Response: one object, or a list of them for ``n > 1`` (one per choice, in order).
Fields read: ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]``
triples (text may be null) — the sampled ids and their logprobs;
``meta_info.output_top_logprobs`` (a list of triples per position);
``meta_info.finish_reason`` — a dict such as ``{"type": "length", "length": 16}`` or
``{"type": "stop", "matched": 2}``, normalised to "length"/"stop"/"abort" (``matched``
becomes ``stop_reason``; null means unfinished: "abort"); ``text``.

Prompt scoring: ``logprob_start_len: 0``, ``top_logprobs_num: k``, ``max_new_tokens: 1``;
reads ``meta_info.input_top_logprobs`` (null or ``[]`` at position 0).

Start-up: ``GET /get_model_info`` (``model_path``; optional). Health: ``GET /health``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from inferpool.actors.backends.http import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_VOCAB_SIZE,
    RemoteBackend,
    RemoteHTTPError,
    RemoteOptions,
    normalize_finish_reason,
)
from inferpool.actors.backends.sglang import to_sglang_sampling
from inferpool.actors.backends.vllm import build_prompt_logprobs, check_top_k
from inferpool.config import EngineConfig
from inferpool.errors import BackendError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)


class SGLangHTTPOptions(RemoteOptions):
    """Options of the ``sglang_http`` backend (``EngineConfig.engine_kwargs``)."""

    seed_field: str | None = Field(
        "sampling_seed", description="sampling_params key carrying the seed; None: seeds are not sent."
    )


def _triples(value: Any, what: str) -> list[tuple[float | None, int]]:
    """``[[logprob, token_id, text], ...]`` as (logprob, id) pairs."""
    if not isinstance(value, list):
        raise BackendError(f"sglang_http: {what} missing or not a list")
    return [(None if t[0] is None else float(t[0]), int(t[1])) for t in value]


def _top(position: Any, k: int | None = None) -> dict[int, float] | None:
    if not position:
        return None
    pairs = sorted(
        ((tok, lp) for lp, tok in _triples(position, "top logprobs") if lp is not None), key=lambda kv: (-kv[1], kv[0])
    )
    return dict(pairs if k is None else pairs[:k])


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
        body: dict[str, Any] = {
            "input_ids": list(request.prompt_token_ids),
            "sampling_params": params,
            "return_logprob": True,
        }
        if sp.logprobs > 0:
            body["top_logprobs_num"] = sp.logprobs
        return body

    async def generate_once(self, request: GenerateRequest) -> GenerateResult:
        out = await self.post(self.root + "/generate", self.payload(request))
        items = out if isinstance(out, list) else [out]
        choices = [self._choice(item, i, request) for i, item in enumerate(items)]
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            choices=choices,
            engine_id=self.engine_id,
        )

    def _choice(self, item: Any, i: int, request: GenerateRequest) -> Choice:
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise BackendError(f"sglang_http engine {self.engine_id}: response item {i} has no meta_info")
        pairs = _triples(meta.get("output_token_logprobs"), "meta_info.output_token_logprobs")
        if any(lp is None for lp, _ in pairs):
            raise BackendError(f"sglang_http engine {self.engine_id}: a sampled token has no logprob")
        finish = meta.get("finish_reason")
        k = request.sampling.logprobs
        tops = None
        if k > 0:
            tops = [_top(pos, k) or {} for pos in meta.get("output_top_logprobs") or []]
        return Choice(
            index=request.choice_offset + i,
            token_ids=[tok for _, tok in pairs],
            logprobs=[float(lp) for lp, _ in pairs if lp is not None],
            finish_reason=normalize_finish_reason(finish, default="abort"),
            text=item.get("text"),
            stop_reason=finish.get("matched") if isinstance(finish, dict) else None,
            top_logprobs=tops,
        )

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position (position 0: empty lists)."""
        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": top_k,
        }
        out = await self.post(self.root + "/generate", body)
        item = out[0] if isinstance(out, list) and out else out
        meta = item.get("meta_info") if isinstance(item, dict) else None
        positions = meta.get("input_top_logprobs") if isinstance(meta, dict) else None
        if not isinstance(positions, list):
            raise BackendError(f"sglang_http engine {self.engine_id}: no meta_info.input_top_logprobs")
        tops = [_top(p) for p in positions]
        if len(tops) == len(ids) - 1:  # some versions leave position 0 out
            tops.insert(0, None)
        return build_prompt_logprobs(ids, tops, top_k, f"sglang_http engine {self.engine_id}")
