"""The SGLang backend: :class:`SGLangBackend`, an ``sgl.Engine`` in the engine actor's process.

The adapter between the pool's backend interface and the engine: start (engine built on
its own loop thread, :mod:`~inferpool.actors.backends.sglang.loop`), generation and prompt
scoring (SGLang's format read by :mod:`~inferpool.actors.backends.sglang.wire`), abort,
health, pause/resume, sleep/wake and shutdown. The weight methods come from its base class
:class:`~inferpool.actors.backends.sglang.weights.SGLangWeights`. The SGLang surface relied
on is listed in :mod:`inferpool.actors.backends.sglang`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from inferpool.actors.backends.base import PauseMode, check_top_k
from inferpool.actors.backends.sglang.loop import EngineLoop, SGLangEngineFactory
from inferpool.actors.backends.sglang.weights import SGLangWeights, update_ok
from inferpool.actors.backends.sglang.wire import (
    decode_choice,
    decode_prompt_logprobs,
    logprob_args,
    scoring_args,
    to_sglang_sampling,
)
from inferpool.config import EngineConfig
from inferpool.errors import BackendError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)

COLOCATED_MEM_FRACTION = 0.85
"""``mem_fraction_static`` per GPU share when colocated: 0.85 * num_gpus."""

SEED_FIELD = "sampling_seed"
"""SGLang's per-request seed in ``sampling_params``."""

# Our pause modes as SGLang's: "wait" (drain) has no SGLang counterpart and is done here.
_PAUSE_MODES = {"abort": "abort", "keep": "in_place"}


class SGLangBackend(SGLangWeights):
    """SGLang ``sgl.Engine`` in-process, on its own event-loop thread."""

    name = "sglang"

    def __init__(
        self,
        config: EngineConfig,
        engine_id: str,
        engine_factory: Callable[..., Any] | None = None,
        *,
        seed_field: str | None = SEED_FIELD,
    ) -> None:
        self.config = config
        self.engine_id = engine_id
        self.engine_factory: Callable[..., Any] = engine_factory or SGLangEngineFactory()
        self.seed_field = seed_field
        self.engine: Any = None
        self.weight_version: int | str | None = 0
        self._group_name = "weight_update_group"  # the trainer group joined by init_weight_transfer
        self._loop: EngineLoop | None = None
        self._model = ""
        self._memory_saver = False
        self._engine_paused = False
        self._asleep = False
        self._in_flight: dict[str, int] = {}  # request id -> number of SGLang requests (rids)
        self._idle = asyncio.Event()
        self._idle.set()
        self._resumed = asyncio.Event()
        self._resumed.set()

    # -- start -------------------------------------------------------------------------
    def engine_kwargs(self) -> dict[str, Any]:
        """The ``sgl.Engine`` keyword arguments this config asks for."""
        model = self.config.model
        if model is None:
            from inferpool.tiny_model import tiny_model

            model = tiny_model()
        kwargs: dict[str, Any] = {
            "model_path": model,
            "random_seed": self.config.seed,
            "dtype": self.config.dtype or "auto",
            "skip_tokenizer_init": False,
        }
        if 0 < self.config.num_gpus < 1:  # colocated with a trainer on a GPU share
            kwargs["mem_fraction_static"] = round(COLOCATED_MEM_FRACTION * self.config.num_gpus, 4)
            kwargs["enable_memory_saver"] = True
        kwargs.update(self.config.engine_kwargs)
        return kwargs

    def _build(self) -> Any:
        """Runs on the engine thread: the tiny-model build and the engine's construction."""
        kwargs = self.engine_kwargs()
        self._model = str(kwargs["model_path"])
        self._memory_saver = bool(kwargs.get("enable_memory_saver", False))
        return self.engine_factory(**kwargs)

    async def start(self) -> EngineInfo:
        if self.engine is not None:
            raise BackendError(f"SGLang engine {self.engine_id} is already started")
        loop = EngineLoop(f"sglang-{self.engine_id}")
        self._loop = loop
        try:
            self.engine = await loop.run(self._build)
            info = await self._engine_info()
        except BaseException:
            engine, self.engine, self._loop = self.engine, None, None
            if engine is not None and hasattr(engine, "shutdown"):
                try:
                    await loop.run(engine.shutdown)
                except Exception:
                    logger.exception("SGLang engine %s: shutdown after a failed start failed", self.engine_id)
            await asyncio.to_thread(loop.stop)
            raise
        logger.info("SGLang engine %s serves %s", self.engine_id, self._model)
        return info

    async def _engine_info(self) -> EngineInfo:
        tm = getattr(self.engine, "tokenizer_manager", None)
        model_config = getattr(tm, "model_config", None)
        vocab = getattr(model_config, "vocab_size", None)
        context = getattr(tm, "context_len", None) or getattr(model_config, "context_len", None)
        if vocab is None or context is None:
            hf_vocab, hf_context = await asyncio.to_thread(self._hf_facts)
            vocab = vocab if vocab is not None else hf_vocab
            context = context if context is not None else hf_context
        eos = getattr(getattr(tm, "tokenizer", None), "eos_token_id", None)
        return EngineInfo(
            engine_id=self.engine_id,
            backend=self.name,
            model=self._model,
            vocab_size=int(vocab),
            max_model_len=int(context),
            eos_token_id=None if eos is None else int(eos),
            supports_prompt_logprobs=True,
        )

    def _hf_facts(self) -> tuple[int, int]:
        """Vocab size and context length from the model's Hugging Face config (fallback)."""
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(
                self._model, trust_remote_code=bool(self.config.engine_kwargs.get("trust_remote_code", False))
            )
            hf = getattr(hf, "get_text_config", lambda: hf)()
            return int(hf.vocab_size), int(hf.max_position_embeddings)
        except Exception as exc:
            raise BackendError(
                f"SGLang engine {self.engine_id}: cannot tell vocab size and context length: {exc}"
            ) from exc

    # -- calls on the engine loop ----------------------------------------------------------
    def _require_engine(self) -> Any:
        if self.engine is None or self._loop is None:
            raise BackendError(f"SGLang engine {self.engine_id} is not started")
        return self.engine

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if self._loop is None:
            raise BackendError(f"SGLang engine {self.engine_id} is not started")
        return await self._loop.run(fn, *args, **kwargs)

    async def _admit(self) -> Any:
        """Wait while paused (new requests queue until resume); then the engine."""
        self._require_engine()
        while not self._resumed.is_set():  # re-check: a pause may follow a resume at once
            await self._resumed.wait()
        return self._require_engine()

    def _track(self, request_id: str, rids: int) -> None:
        self._in_flight[request_id] = rids
        self._idle.clear()

    def _untrack(self, request_id: str) -> None:
        self._in_flight.pop(request_id, None)
        if not self._in_flight:
            self._idle.set()

    # -- generation ------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        engine = await self._admit()
        sp = request.sampling
        self._track(request.request_id, sp.n)
        try:
            items = await self._sample(engine, request)
        finally:
            self._untrack(request.request_id)
        version = self.weight_version
        choices = [self._choice(item, i, request, version) for i, item in enumerate(items)]
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            choices=choices,
            engine_id=self.engine_id,
        )

    async def _sample(self, engine: Any, request: GenerateRequest) -> list[Any]:
        sp = request.sampling
        params = to_sglang_sampling(sp)
        extra = logprob_args(sp.logprobs)
        ids = [int(t) for t in request.prompt_token_ids]
        seed_field = self.seed_field
        if sp.seed is None or seed_field is None or sp.n == 1:
            if sp.seed is not None and seed_field is not None:
                params[seed_field] = sp.seed + request.choice_offset
            out = await self._call(
                engine.async_generate, input_ids=ids, sampling_params=params, rid=request.request_id, **extra
            )
            items = out if isinstance(out, list) else [out]
        else:  # distinct seeds per sample: n single-sample requests
            calls = []
            for i in range(sp.n):
                one = {**params, "n": 1, seed_field: sp.seed + request.choice_offset + i}
                calls.append(
                    self._call(
                        engine.async_generate,
                        input_ids=ids,
                        sampling_params=one,
                        rid=f"{request.request_id}_{i}",
                        **extra,
                    )
                )
            outs = await asyncio.gather(*calls)
            items = [o[0] if isinstance(o, list) and len(o) == 1 else o for o in outs]
        if len(items) != sp.n:
            raise BackendError(
                f"SGLang engine {self.engine_id}: {len(items)} outputs for n={sp.n} ({request.request_id})"
            )
        return items

    def _choice(self, item: Any, i: int, request: GenerateRequest, version: int | str | None) -> Choice:
        """Output ``i`` decoded (:func:`~inferpool.actors.backends.sglang.wire.decode_choice`),
        every token labelled ``version``."""
        choice = decode_choice(item, i, request, f"SGLang engine {self.engine_id}")
        choice.weight_version = version
        choice.weight_versions = [version] * len(choice.token_ids)
        return choice

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position (``logprob_start_len=0``); position 0 empty."""
        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        engine = await self._admit()
        rid = f"score-{uuid.uuid4().hex}"
        self._track(rid, 1)
        try:
            out = await self._call(engine.async_generate, **scoring_args(ids, top_k), rid=rid)
        finally:
            self._untrack(rid)
        return decode_prompt_logprobs(out, ids, top_k, f"SGLang engine {self.engine_id}")

    async def abort(self, request_id: str) -> None:
        """Abort one request (all its samples): ``tokenizer_manager.abort_request(rid=)``."""
        if self.engine is None or self._loop is None:
            return
        n = self._in_flight.get(request_id, 1)
        rids = [request_id] + ([f"{request_id}_{i}" for i in range(n)] if n > 1 else [])
        for rid in rids:  # unknown rids are ignored by SGLang
            await self._call(self.engine.abort_request, rid)

    # -- health and stats -----------------------------------------------------------------
    async def health(self) -> None:
        """Cheap: the engine thread runs and SGLang's subprocesses are alive. Never generates."""
        engine = self._require_engine()
        if self._loop is None or not self._loop.alive:
            raise BackendError(f"SGLang engine {self.engine_id}: the engine thread has stopped")
        check = getattr(engine, "check_health", None)
        if check is not None:
            await self._call(check)

    async def backend_stats(self) -> dict[str, Any]:
        return {
            "weight_version": self.weight_version,
            "paused": not self._resumed.is_set(),
            "asleep": self._asleep,
        }

    # -- lifecycle --------------------------------------------------------------------------
    async def pause(self, mode: PauseMode) -> None:
        """New requests wait until ``resume``. In-flight ones: ``abort`` ends them with finish
        reason "abort" (SGLang ``pause_generation(mode="abort")``), ``keep`` freezes them with
        their KV cache (``mode="in_place"``), ``wait`` lets them finish (drained here)."""
        engine = self._require_engine()
        self._resumed.clear()
        if mode == "wait":
            await self._idle.wait()
            return
        try:
            await self._call(engine.pause_generation, _PAUSE_MODES[mode])
            self._engine_paused = True
        except NotImplementedError as exc:
            logger.info("SGLang engine %s: %s; pause(%s) only holds new requests", self.engine_id, exc, mode)
            if mode == "abort":
                for request_id in list(self._in_flight):
                    await self.abort(request_id)

    async def resume(self) -> None:
        """``continue_generation`` (frozen requests continue), then admit new requests."""
        try:
            if self._engine_paused and self.engine is not None:
                await self._call(self.engine.continue_generation)
                self._engine_paused = False
        finally:
            self._resumed.set()

    async def sleep(self, level: int) -> None:
        """``release_memory_occupation()``: frees weights, KV cache and CUDA graphs for every level.

        Weights survive only with SGLang's ``enable_weights_cpu_backup=True``; otherwise push
        weights (``load_weights``) after ``wake``. Needs ``enable_memory_saver=True`` (the
        colocation default); without it this is a no-op with a log line.
        """
        engine = self._require_engine()
        if not self._memory_saver:
            logger.info(
                "SGLang engine %s: enable_memory_saver is off; sleep(level=%s) is a no-op", self.engine_id, level
            )
            return
        await self._call(engine.release_memory_occupation, None)
        self._asleep = True

    async def wake(self, tags: list[str] | None) -> None:
        """``resume_memory_occupation(tags)``; tags as SGLang's ("weights", "kv_cache", ...); None: all."""
        engine = self._require_engine()
        if not self._memory_saver:
            logger.info("SGLang engine %s: enable_memory_saver is off; wake is a no-op", self.engine_id)
            return
        await self._call(engine.resume_memory_occupation, None if tags is None else list(tags))
        self._asleep = False

    async def reset_prefix_cache(self) -> None:
        """``flush_cache()``. SGLang refuses while requests run; that is logged, not raised."""
        engine = self._require_engine()
        out = await self._call(engine.flush_cache)
        ok, message = update_ok(out)
        if not ok:
            logger.warning("SGLang engine %s: flush_cache refused: %s", self.engine_id, message or "requests in flight")

    async def shutdown(self) -> None:
        engine, loop = self.engine, self._loop
        self.engine, self._loop = None, None
        self._resumed.set()  # waiters wake up and find the engine gone
        try:
            if engine is not None and loop is not None and hasattr(engine, "shutdown"):
                await loop.run(engine.shutdown)
        except Exception:
            logger.exception("SGLang engine %s: shutdown failed", self.engine_id)
        finally:
            if loop is not None:
                await asyncio.to_thread(loop.stop)
