"""The vLLM backend: an ``AsyncLLM`` held in the engine actor's process.

Token ids in; sampled token ids, the engine's logprob of each sampled token and the
finish reason out. ``AsyncLLM`` always runs its engine core in a subprocess of the actor;
``EngineConfig.engine_core_subprocess`` (the actor sets ``VLLM_ENABLE_V1_MULTIPROCESSING``
before vLLM is imported) decides whether that core runs the model itself (off) or in a
worker process of its own (on).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from inferpool.actors.backends.base import (
    BaseBackend,
    PauseMode,
    build_prompt_logprobs,
    check_top_k,
    normalize_finish_reason,
)
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError, RequestError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs, SamplingParams

logger = logging.getLogger(__name__)

# On CPU: size the KV cache small, skip torch.compile (it costs 30-50 s per start on 2 cores
# for little gain on small models) and run the worker inside the engine core process.
# No chunked prefill on CPU: vLLM discards the token sampled for a request whose prefill was
# only partly scheduled in a step and rewinds that request's random generator, which a
# per-request seed creates and which a CPU generator cannot rewind ("CPU Generator does not
# use offset" kills the engine core). Unchunked, a prompt is scheduled whole or waits for the
# next step, so seeded requests stay reproducible. GPU engines keep chunked prefill.
_CPU_DEFAULTS: dict[str, Any] = {
    "gpu_memory_utilization": 0.1,
    "max_model_len": 4096,
    "enforce_eager": True,
    "distributed_executor_backend": "uni",
    "enable_chunked_prefill": False,
}
_WORKER_EXTENSION = "inferpool.actors.backends.vllm.worker.InferpoolWorkerExtension"


def colocated_defaults(num_gpus: float) -> dict[str, Any]:
    """vLLM settings for an engine holding a fraction of a GPU beside a trainer: use at most that
    share of the GPU's memory, and allocate so that ``sleep`` can hand it back to the trainer."""
    return {"gpu_memory_utilization": round(0.9 * num_gpus, 3), "enable_sleep_mode": True}


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def to_vllm_sampling(sp: SamplingParams, seed_offset: int = 0) -> Any:
    """Our SamplingParams as vLLM's (final output only, sampled-token logprobs always on).

    Token ids are the source of truth, so vLLM does not detokenize (its incremental
    detokenizer and the decoding of every logprob's token cost more CPU per token than the
    rest of the request) unless stop strings need the text. Logprobs come flat (a few lists
    per request instead of a dict and a ``Logprob`` per token) where vLLM offers it.
    """
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    flat: dict[str, Any] = (
        {"flat_logprobs": True} if "flat_logprobs" in getattr(VSamplingParams, "__struct_fields__", ()) else {}
    )
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
        detokenize=bool(sp.stop),
        **flat,
    )


def sampled_logprobs(
    token_ids: list[int], logprobs: Any, top_k: int
) -> tuple[list[float], list[dict[int, float]] | None]:
    """The logprob of each sampled token (and the top-k alternatives when asked for), from
    vLLM's flat logprobs or its list of one dict per position."""
    if logprobs is None:
        raise BackendError("vLLM returned no logprobs although they were requested")
    if hasattr(logprobs, "start_indices"):
        return _flat_sampled_logprobs(token_ids, logprobs, top_k)
    values: list[float] = []
    tops: list[dict[int, float]] | None = [] if top_k > 0 else None
    for tok, pos in zip(token_ids, logprobs, strict=True):
        if pos is None or tok not in pos:
            raise BackendError(f"vLLM returned no logprob for sampled token {tok}")
        values.append(float(pos[tok].logprob))
        if tops is not None:
            tops.append(_best(((t, lp.logprob) for t, lp in pos.items()), top_k))
    return values, tops


def _best(position: Any, top_k: int) -> dict[int, float]:
    """The ``top_k`` best of a position's (token id, logprob) pairs, best first."""
    ranked = sorted({int(t): float(lp) for t, lp in position}.items(), key=lambda kv: -kv[1])
    return dict(ranked[:top_k])


def _flat_sampled_logprobs(
    token_ids: list[int], flat: Any, top_k: int
) -> tuple[list[float], list[dict[int, float]] | None]:
    """``sampled_logprobs`` on a ``FlatLogprobs``: position i's entries are
    ``start_indices[i]:end_indices[i]`` of its lists, the sampled token's first."""
    starts, ends, ids, values = flat.start_indices, flat.end_indices, flat.token_ids, flat.logprobs
    if len(starts) != len(token_ids):
        raise BackendError(f"vLLM returned logprobs for {len(starts)} positions of {len(token_ids)} sampled tokens")
    out: list[float] = []
    tops: list[dict[int, float]] | None = [] if top_k > 0 else None
    for tok, start, end in zip(token_ids, starts, ends, strict=True):
        at = start if start < end and ids[start] == tok else next((j for j in range(start, end) if ids[j] == tok), -1)
        if at < 0:
            raise BackendError(f"vLLM returned no logprob for sampled token {tok}")
        out.append(float(values[at]))
        if tops is not None:
            tops.append(_best(((ids[j], values[j]) for j in range(start, end)), top_k))
    return out, tops


class VLLMBackend(BaseBackend):
    """vLLM ``AsyncLLM`` in-process."""

    name = "vllm"

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        self.config = config
        self.engine_id = engine_id
        self.engine: Any = None
        self.weight_version: int | str | None = 0
        self._initial_version: int | str | None = 0
        self._labels: dict[str, int | str] = {}
        self._pending_chunks = 0
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
            worker_extension_cls=_WORKER_EXTENSION,
        )
        if self.weight_transfer != "object_store":  # vLLM builds its transfer engine at model load
            kwargs["weight_transfer_config"] = {"backend": self.weight_transfer}
        if gpu and 0 < self.config.num_gpus < 1:  # colocated with a trainer on a shared GPU
            kwargs.update(colocated_defaults(self.config.num_gpus))
        kwargs.update(self.config.engine_kwargs)
        if not gpu and kwargs.get("enable_chunked_prefill"):
            logger.warning(
                "engine %s: chunked prefill on CPU crashes vLLM's engine core on requests with a seed "
                "(EngineConfig.engine_kwargs['enable_chunked_prefill'])",
                self.engine_id,
            )
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
            supports_prompt_logprobs=True,
            transfer_ranks=self._transfer_ranks(),
        )

    def _transfer_ranks(self) -> int:
        """Workers that receive a native weight broadcast: tensor x pipeline x data parallel."""
        try:
            pc = self.engine.vllm_config.parallel_config
            return max(1, int(pc.world_size) * int(getattr(pc, "data_parallel_size", 1) or 1))
        except AttributeError:
            return 1

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        from vllm.inputs import TokensPrompt

        sp = to_vllm_sampling(request.sampling, seed_offset=request.choice_offset)
        from vllm.exceptions import VLLMClientError

        final = None
        t0 = time.perf_counter()
        ttft: float | None = None
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)), sp, request.request_id
            ):
                final = out
                if ttft is None and any(c.token_ids for c in out.outputs):
                    ttft = time.perf_counter() - t0
        except VLLMClientError as exc:  # the request itself is invalid (e.g. n > 1 with greedy)
            raise RequestError(f"vLLM rejected the request: {exc}") from exc
        if final is None:
            raise BackendError(f"vLLM produced no output for {request.request_id}")
        version = self.weight_version
        choices = []
        for c in final.outputs:
            token_ids = list(c.token_ids)
            logprobs, tops = sampled_logprobs(token_ids, c.logprobs, request.sampling.logprobs)
            versions = self._token_versions(c, len(token_ids))
            choices.append(
                Choice(
                    index=request.choice_offset + c.index,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=normalize_finish_reason(c.finish_reason, default="abort"),
                    text=c.text if sp.detokenize else None,
                    stop_reason=c.stop_reason,
                    weight_version=versions[-1] if versions else version,
                    weight_versions=versions,
                    top_logprobs=tops,
                )
            )
        choices.sort(key=lambda ch: ch.index)
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(final.prompt_token_ids or request.prompt_token_ids),
            choices=choices,
            ttft_s=ttft,
            engine_id=self.engine_id,
        )

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position: ``SamplingParams(prompt_logprobs=k, max_tokens=1)``.

        vLLM reports k entries per position plus the actual prompt token when it is not
        among them; the top k by logprob are kept. Position 0 has empty lists.
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        sp = VSamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=top_k, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, f"score-{uuid.uuid4().hex}"):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise BackendError("vLLM returned no prompt logprobs although they were requested")
        positions = [
            None if pos is None else {int(t): float(lp.logprob) for t, lp in pos.items()}
            for pos in final.prompt_logprobs
        ]
        return build_prompt_logprobs(ids, positions, top_k, f"vLLM engine {self.engine_id}")

    def _token_versions(self, output: Any, n: int) -> list[int | str | None]:
        """Per-token weight versions from vLLM's version spans (exact across an update)."""
        spans = getattr(output, "weight_versions", None)
        if not spans:
            return [self.weight_version] * n
        versions: list[int | str | None] = [self.weight_version] * n
        for span in spans:
            label = self._labels.get(str(span.version), self._initial_version)
            for i in range(max(0, span.start), min(n, span.end)):
                versions[i] = label
        return versions

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Send a chunk to the workers; they reload in place when the version is set."""
        from inferpool.actors.backends.vllm.worker import pack_tensors

        counts = await self.engine.collective_rpc("inferpool_load_weights", args=(pack_tensors(named_tensors), False))
        self._pending_chunks += 1
        return len(named_tensors) if counts else 0

    async def set_weight_version(self, version: int | str) -> None:
        if self._pending_chunks:
            from inferpool.actors.backends.vllm.worker import pack_tensors

            await self.engine.collective_rpc("inferpool_load_weights", args=(pack_tensors([]), True))
            self._pending_chunks = 0
        self._labels[str(version)] = version
        await self.engine.reset_prefix_cache()
        await self.engine.update_weight_version(str(version))
        self.weight_version = version

    # -- native weight transfer: vLLM's own four-phase protocol -------------------------------
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        if self.weight_transfer == "object_store":
            raise self._no_native()
        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def start_weight_update(self) -> None:
        await self.engine.start_weight_update()

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        first = update_info[0] if isinstance(update_info, list) and update_info else update_info
        return len(first.get("names", ())) if isinstance(first, dict) else 0

    async def finish_weight_update(self, version: int | str) -> None:
        await self.engine.finish_weight_update(str(version))
        self._labels[str(version)] = version
        await self.engine.reset_prefix_cache()
        self.weight_version = version

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
