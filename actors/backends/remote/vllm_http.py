"""``vllm_http`` backend: token ids in and out through vLLM's OpenAI-compatible server.

``base_url`` is the server (``http://host:port`` or ``http://host:port/v1``).

Generation: ``POST /v1/completions`` with ``prompt`` = the token id list and the sampling
fields (n, max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids,
ignore_eos, min_tokens, repetition/presence/frequency penalties), ``logprobs`` = k (0 still
returns the sampled token's own logprob), ``return_tokens_as_token_ids: true`` (so
``logprobs.tokens`` and the ``top_logprobs`` keys read ``"token_id:123"``) and
``return_token_ids: true``. Fields read per choice: ``index``, ``token_ids`` (when the
server supports ``return_token_ids``; detected on the first response, after which it is
no longer sent to servers that ignore it, and ids are parsed from ``logprobs.tokens``),
``logprobs.token_logprobs``, ``logprobs.top_logprobs``, ``finish_reason``,
``stop_reason``, ``text`` and ``prompt_token_ids``.

Prompt scoring: ``POST /v1/completions`` with ``prompt_logprobs`` = k and
``max_tokens: 1``; read ``choices[0].prompt_logprobs`` (one ``{id: {"logprob": ...}}``
dict per position, null at 0). A server without that field is asked once more with
``echo: true, logprobs: k`` and ``choices[0].logprobs.top_logprobs`` is read instead
(and used from then on).

Start-up: ``GET /v1/models`` (model id, ``max_model_len``). Health: ``GET /health``.
vLLM does not report the vocabulary size; see :class:`RemoteOptions.vocab_size`.
"""

from __future__ import annotations

import logging
from typing import Any

from inferpool.actors.backends.base import build_prompt_logprobs, check_top_k, normalize_finish_reason
from inferpool.actors.backends.remote.http import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_VOCAB_SIZE,
    RemoteBackend,
    RemoteHTTPError,
)
from inferpool.actors.backends.remote.openai_api import models_info
from inferpool.config import EngineConfig
from inferpool.errors import BackendError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)

_TOKEN_PREFIX = "token_id:"


def parse_token_id(token: Any) -> int:
    """``"token_id:123"`` -> 123 (vLLM's ``return_tokens_as_token_ids`` spelling)."""
    if isinstance(token, str) and token.startswith(_TOKEN_PREFIX):
        return int(token[len(_TOKEN_PREFIX) :])
    raise BackendError(f"vllm_http: expected a 'token_id:N' token, got {token!r}")


def _top_dict(entry: Any, k: int | None = None) -> dict[int, float]:
    """An OpenAI ``top_logprobs`` position ({"token_id:N": lp}) as {N: lp}, top k kept."""
    pairs = [(parse_token_id(t), float(lp)) for t, lp in (entry or {}).items()]
    pairs.sort(key=lambda kv: (-kv[1], kv[0]))
    return dict(pairs if k is None else pairs[:k])


class VLLMHTTPBackend(RemoteBackend):
    """vLLM's OpenAI-compatible server, token ids in and out."""

    name = "vllm_http"
    health_path = "/health"

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        super().__init__(config, engine_id)
        self.api = self.root + "/v1"
        self.model: str | None = config.model
        self.return_token_ids: bool | None = None  # None: not known yet
        self.prompt_logprobs_echo = False  # True: server lacks choices[].prompt_logprobs

    async def start(self) -> EngineInfo:
        served, max_len = models_info(await self.get(self.api + "/models"))
        if self.model is None:
            self.model = served
        try:
            version = (await self.get(self.root + "/version", attempts=1)).get("version")
        except (RemoteHTTPError, AttributeError):
            version = None
        logger.info("vllm_http engine %s: %s serves %s (vLLM %s)", self.engine_id, self.root, self.model, version)
        return EngineInfo(
            engine_id=self.engine_id,
            backend=self.name,
            model=self.model or "",
            vocab_size=self.options.vocab_size or DEFAULT_VOCAB_SIZE,
            max_model_len=self.options.max_model_len or max_len or DEFAULT_MAX_MODEL_LEN,
            supports_tokens=True,
            supports_prompt_logprobs=True,
        )

    def payload(self, request: GenerateRequest) -> dict[str, Any]:
        """The /v1/completions body of a request."""
        sp = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(request.prompt_token_ids),
            "n": sp.n,
            "max_tokens": sp.max_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "min_p": sp.min_p,
            "ignore_eos": sp.ignore_eos,
            "min_tokens": sp.min_tokens,
            "repetition_penalty": sp.repetition_penalty,
            "presence_penalty": sp.presence_penalty,
            "frequency_penalty": sp.frequency_penalty,
            "logprobs": sp.logprobs,
            "return_tokens_as_token_ids": True,
        }
        if self.return_token_ids is not False:
            body["return_token_ids"] = True
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            body["stop_token_ids"] = list(sp.stop_token_ids)
        return body

    async def generate_once(self, request: GenerateRequest) -> GenerateResult:
        out = await self.post(self.api + "/completions", self.payload(request))
        raw = out.get("choices") if isinstance(out, dict) else None
        if not isinstance(raw, list) or not raw:
            raise BackendError(f"vllm_http engine {self.engine_id}: response has no choices: {str(out)[:200]}")
        if self.return_token_ids is None:
            self.return_token_ids = all(c.get("token_ids") is not None for c in raw)
            if not self.return_token_ids:
                logger.info("vllm_http engine %s: no return_token_ids; reading 'token_id:N' tokens", self.engine_id)
        choices = [self._choice(c, request) for c in raw]
        choices.sort(key=lambda c: c.index)
        prompt_ids = raw[0].get("prompt_token_ids") or list(request.prompt_token_ids)
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=[int(t) for t in prompt_ids],
            choices=choices,
            engine_id=self.engine_id,
        )

    def _choice(self, c: dict[str, Any], request: GenerateRequest) -> Choice:
        lp = c.get("logprobs") or {}
        token_logprobs = lp.get("token_logprobs")
        ids = c.get("token_ids")
        if ids is None:
            ids = [parse_token_id(t) for t in lp.get("tokens") or []]
        if token_logprobs is None or len(token_logprobs) != len(ids) or None in token_logprobs:
            raise BackendError(
                f"vllm_http engine {self.engine_id}: choice {c.get('index')} lacks a logprob per sampled token"
            )
        k = request.sampling.logprobs
        tops = [_top_dict(pos, k) for pos in lp.get("top_logprobs") or []] if k > 0 else None
        return Choice(
            index=request.choice_offset + int(c.get("index", 0)),
            token_ids=[int(t) for t in ids],
            logprobs=[float(x) for x in token_logprobs],
            finish_reason=normalize_finish_reason(c.get("finish_reason"), default="abort"),
            text=c.get("text"),
            stop_reason=c.get("stop_reason"),
            top_logprobs=tops,
        )

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position (position 0: empty lists)."""
        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_tokens_as_token_ids": True,
        }
        if not self.prompt_logprobs_echo:
            choice = await self._first_choice({**body, "prompt_logprobs": top_k})
            positions = choice.get("prompt_logprobs")
            if positions is not None:
                return build_prompt_logprobs(
                    ids,
                    [None if p is None else {int(t): float(v["logprob"]) for t, v in p.items()} for p in positions],
                    top_k,
                    f"vllm_http engine {self.engine_id}",
                )
            logger.info("vllm_http engine %s: no prompt_logprobs field; using echo", self.engine_id)
            self.prompt_logprobs_echo = True
        choice = await self._first_choice({**body, "echo": True, "logprobs": top_k})
        tops = ((choice.get("logprobs") or {}).get("top_logprobs") or [])[: len(ids)]
        return build_prompt_logprobs(
            ids, [None if p is None else _top_dict(p) for p in tops], top_k, f"vllm_http engine {self.engine_id}"
        )

    async def _first_choice(self, body: dict[str, Any]) -> dict[str, Any]:
        out = await self.post(self.api + "/completions", body)
        choices = out.get("choices") if isinstance(out, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise BackendError(f"vllm_http engine {self.engine_id}: response has no choices")
        return dict(choices[0])
