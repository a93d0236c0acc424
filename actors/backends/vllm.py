"""vLLM backend: an ``AsyncLLM`` held in the engine actor's process.

Token ids in; sampled token ids, the engine's logprob of each sampled token and the
finish reason out. The engine core runs in vLLM's own subprocess or in this process
(``EngineConfig.engine_core_subprocess``; the actor sets
``VLLM_ENABLE_V1_MULTIPROCESSING`` before vLLM is imported).
"""

from __future__ import annotations

import logging
from typing import Any

from inferpool.actors.backends.base import BaseBackend, PauseMode
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, SamplingParams

logger = logging.getLogger(__name__)

_CPU_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.1, "max_model_len": 4096}


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def to_vllm_sampling(sp: SamplingParams, seed_offset: int = 0) -> Any:
    """Our SamplingParams as vLLM's (final output only, sampled-token logprobs always on)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VSamplingParams(
        n=sp.n,
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1 if sp.top_k < 0 else 0,
        min_p=sp.min_p,
        seed=None if sp.seed is None else sp.seed + seed_offset,
        stop=list(sp.stop) or None,
        stop_token_ids=list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_tokens,
        repetition_penalty=sp.repetition_penalty,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        logprobs=sp.logprobs,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def sampled_logprobs(
    token_ids: list[int], logprobs: Any, top_k: int
) -> tuple[list[float], list[dict[int, float]] | None]:
    """The logprob of each sampled token (and the top-k alternatives when asked for)."""
    if logprobs is None:
        raise BackendError("vLLM returned no logprobs although they were requested")
    values: list[float] = []
    tops: list[dict[int, float]] | None = [] if top_k > 0 else None
    for tok, pos in zip(token_ids, logprobs, strict=True):
        if pos is None or tok not in pos:
            raise BackendError(f"vLLM returned no logprob for sampled token {tok}")
        values.append(float(pos[tok].logprob))
        if tops is not None:
            ranked = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:top_k]
            tops.append({int(t): float(lp.logprob) for t, lp in ranked})
    return values, tops


class VLLMBackend(BaseBackend):
    """vLLM ``AsyncLLM`` in-process."""

    name = "vllm"

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        self.config = config
        self.engine_id = engine_id
        self.engine: Any = None
        self.weight_version: int | str | None = 0
        self._model = ""

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        model = self.config.model
        if model is None:
            from inferpool.tiny_model import tiny_model

            model = tiny_model()
        self._model = model
        gpu = _has_gpu()
        kwargs: dict[str, Any] = {} if gpu else dict(_CPU_DEFAULTS)
        kwargs.update(
            model=model,
            seed=self.config.seed,
            dtype=self.config.dtype or ("auto" if gpu else "float32"),
            disable_log_stats=True,
        )
        kwargs.update(self.config.engine_kwargs)
        try:
            return AsyncEngineArgs(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"EngineConfig.engine_kwargs: not accepted by vLLM: {exc}", field="engine_kwargs"
            ) from exc

    async def start(self) -> EngineInfo:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        self.engine = AsyncLLM.from_engine_args(args)
        model_config = self.engine.model_config
        tokenizer = self.engine.get_tokenizer()
        eos = getattr(tokenizer, "eos_token_id", None)
        return EngineInfo(
            engine_id=self.engine_id,
            backend="vllm",
            model=self._model,
            vocab_size=int(model_config.get_vocab_size()),
            max_model_len=int(model_config.max_model_len),
            eos_token_id=eos,
        )

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        from vllm.inputs import TokensPrompt

        sp = to_vllm_sampling(request.sampling, seed_offset=request.choice_offset)
        final = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), sp, request.request_id
        ):
            final = out
        if final is None:
            raise BackendError(f"vLLM produced no output for {request.request_id}")
        version = self.weight_version
        choices = []
        for c in final.outputs:
            token_ids = list(c.token_ids)
            logprobs, tops = sampled_logprobs(token_ids, c.logprobs, request.sampling.logprobs)
            choices.append(
                Choice(
                    index=request.choice_offset + c.index,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason or "abort",
                    text=c.text,
                    stop_reason=c.stop_reason,
                    weight_version=version,
                    weight_versions=[version] * len(token_ids),
                    top_logprobs=tops,
                )
            )
        choices.sort(key=lambda ch: ch.index)
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(final.prompt_token_ids or request.prompt_token_ids),
            choices=choices,
            engine_id=self.engine_id,
        )

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)

    async def health(self) -> None:
        if self.engine is None:
            raise BackendError("vLLM engine not started")
        await self.engine.check_health()

    async def backend_stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return {
            "queue_len": self.engine.get_num_unfinished_requests(),
            "weight_version": self.weight_version,
        }

    async def pause(self, mode: PauseMode) -> None:
        await self.engine.pause_generation(mode=mode, clear_cache=False)

    async def resume(self) -> None:
        await self.engine.resume_generation()

    async def sleep(self, level: int) -> None:
        if not _has_gpu():
            logger.info("vLLM engine %s on CPU: sleep(level=%s) is a no-op", self.engine_id, level)
            return
        await self.engine.sleep(level)

    async def wake(self, tags: list[str] | None) -> None:
        if not _has_gpu():
            logger.info("vLLM engine %s on CPU: wake is a no-op", self.engine_id)
            return
        await self.engine.wake_up(tags)

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
