"""SGLang backend: an ``sgl.Engine`` held in the engine actor's process.

Token ids in, sampled token ids, the engine's logprob of each sampled token and the
finish reason out: the same :class:`GenerateResult` as the vLLM backend.

Threading
---------
``sgl.Engine`` binds its tokenizer manager (the coroutine that receives results from the
scheduler process) to the event loop it first runs on, and its synchronous control
methods (``flush_cache``, ``release_memory_occupation``, ``update_weights_from_tensor``,
...) are ``self.loop.run_until_complete(...)`` on that same loop. They cannot be called
while that loop runs, and ``asyncio.to_thread`` does not help: the call would drive the
loop from a second thread while the tokenizer manager's futures belong to the first. So
the backend gives the engine an event loop of its own in a dedicated daemon thread:

* ``sgl.Engine(...)`` is built on that loop, so the minutes-long model load never blocks
  the actor's loop;
* every engine call (``async_generate`` and the control calls) is submitted to it with
  ``asyncio.run_coroutine_threadsafe`` and awaited from the actor's loop (cancelling the
  awaiting task cancels the call on the engine loop);
* the synchronous ``sgl.Engine`` control methods are never called: :class:`SGLangEngineHandle`
  awaits the tokenizer manager's coroutines instead, exactly what those methods wrap.

Blocking work that therefore runs on the engine thread, never on the actor's loop:
``sgl.Engine(...)`` (model load), ``Engine.shutdown()`` (kills the scheduler and
detokenizer processes) and the tensor serialisation of ``update_weights_from_tensor``.
``asyncio.to_thread`` is used only to read the model's Hugging Face config (a fallback in
``start``) and to join the engine thread when it stops.

SGLang surface relied on
------------------------
* ``sgl.Engine(model_path=, random_seed=, dtype=, skip_tokenizer_init=False,
  mem_fraction_static=, enable_memory_saver=, **EngineConfig.engine_kwargs)``.
* ``await engine.async_generate(input_ids=, sampling_params=, return_logprob=True,
  top_logprobs_num=, logprob_start_len=, rid=)``: a dict, or a list of dicts when
  ``sampling_params["n"] > 1`` (one per sample, in order). Per item: ``text``,
  ``output_ids`` (absent in older versions: then the ids of
  ``meta_info.output_token_logprobs`` are used; when both are present they must agree),
  ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]`` triples (text may be
  null), ``meta_info.output_top_logprobs`` (a list of triples per position),
  ``meta_info.finish_reason`` (``{"type": "stop", "matched": id_or_str}``,
  ``{"type": "length", "length": n}``, ``{"type": "abort", "message": ...}``, or null while
  unfinished, reported as "abort"), ``meta_info.id`` (the ``rid``; the backend sets rids
  itself: the request id, and ``<request id>_<i>`` for sample ``i`` when ``n > 1``, which
  is also how SGLang expands a string rid for parallel sampling).
* Sampling params: ``max_new_tokens``, ``min_new_tokens``, ``temperature`` (0: greedy),
  ``top_p``, ``top_k`` (-1: whole vocabulary), ``min_p``, ``n``, ``stop``,
  ``stop_token_ids``, ``ignore_eos``, ``repetition_penalty``, ``presence_penalty``,
  ``frequency_penalty`` and the per-request seed ``sampling_seed`` (recent SGLang; it
  belongs to SGLang's deterministic inference, ``enable_deterministic_inference=True`` in
  ``engine_kwargs``, and may have no effect without it: unverified here). A request with
  a seed and ``n > 1`` is sent as ``n`` single-sample requests with seeds
  ``seed + choice_offset + i``, so samples differ and a request split across engines
  draws the same seeds as the unsplit one. ``SGLangBackend(seed_field=None)`` never sends
  seeds (older SGLang rejects unknown sampling params).
* Prompt scoring: ``return_logprob=True, logprob_start_len=0, top_logprobs_num=k,
  max_new_tokens=1`` and ``meta_info.input_top_logprobs`` (null at position 0; some
  versions leave position 0 out).
* Engine facts: ``engine.tokenizer_manager.model_config.vocab_size`` and
  ``tokenizer_manager.context_len`` (else ``model_config.context_len``; else the model's
  Hugging Face ``config.json``), EOS from ``tokenizer_manager.tokenizer.eos_token_id``.
* Tokenizer-manager coroutines behind :class:`SGLangEngineHandle`: ``abort_request(rid=)``,
  ``pause_generation(PauseGenerationReqInput(mode=))`` / ``continue_generation(...)`` (modes
  ``abort``, ``in_place``, ``retract``; SGLang <= 0.5.5 takes no argument and only aborts),
  ``flush_cache()``, ``release_memory_occupation`` / ``resume_memory_occupation``
  (need ``enable_memory_saver=True``), ``update_weights_from_tensor``,
  ``init_weights_update_group``, ``update_weights_from_distributed`` — the request classes
  come from ``sglang.srt.managers.io_struct``.

Colocation
----------
With a fractional GPU (``0 < EngineConfig.num_gpus < 1``: the engine shares the GPU with a
trainer) the defaults are ``mem_fraction_static = 0.85 * num_gpus`` (SGLang's own default
takes most of the GPU for weights and KV cache) and ``enable_memory_saver=True`` (so
``sleep``/``wake`` can release and re-acquire the memory). ``engine_kwargs`` overrides both.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from inferpool.actors.backends.base import BaseBackend, PauseMode
from inferpool.actors.backends.vllm import build_prompt_logprobs, check_top_k
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError
from inferpool.types import (
    Choice,
    EngineInfo,
    GenerateRequest,
    GenerateResult,
    PromptLogprobs,
    SamplingParams,
)

logger = logging.getLogger(__name__)

COLOCATED_MEM_FRACTION = 0.85
"""``mem_fraction_static`` per GPU share when colocated: 0.85 * num_gpus."""

SEED_FIELD = "sampling_seed"
"""SGLang's per-request seed in ``sampling_params``."""

# Our pause modes as SGLang's: "wait" (drain) has no SGLang counterpart and is done here.
_PAUSE_MODES = {"abort": "abort", "keep": "in_place"}

_FINISH_TYPES = {"stop": "stop", "length": "length", "abort": "abort"}


def to_sglang_sampling(sp: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as SGLang's ``sampling_params`` dict (without the seed)."""
    params: dict[str, Any] = {
        "max_new_tokens": sp.max_tokens,
        "min_new_tokens": sp.min_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "min_p": sp.min_p,
        "n": sp.n,
        "ignore_eos": sp.ignore_eos,
        "repetition_penalty": sp.repetition_penalty,
        "presence_penalty": sp.presence_penalty,
        "frequency_penalty": sp.frequency_penalty,
    }
    if sp.stop:
        params["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    return params


def normalize_finish(value: Any) -> tuple[str, int | str | None]:
    """SGLang's ``finish_reason`` as (reason, stop_reason).

    ``{"type": "stop", "matched": 2}`` -> ("stop", 2); ``{"type": "length", ...}`` ->
    ("length", None); ``{"type": "abort", ...}`` and null (unfinished) -> ("abort", None).
    """
    if value is None:
        return "abort", None
    if isinstance(value, Mapping):
        kind = str(value.get("type") or "abort").lower()
        matched = value.get("matched")
        stop_reason = matched if isinstance(matched, int | str) and not isinstance(matched, bool) else None
        return _FINISH_TYPES.get(kind, kind), stop_reason
    kind = str(value).lower()
    return _FINISH_TYPES.get(kind, kind), None


def _pairs(value: Any, what: str) -> list[tuple[float | None, int]]:
    """``[[logprob, token_id, text], ...]`` as (logprob, token id) pairs."""
    if not isinstance(value, list | tuple):
        raise BackendError(f"SGLang: {what} missing or not a list")
    out: list[tuple[float | None, int]] = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise BackendError(f"SGLang: {what} entry {entry!r} is not a [logprob, token_id, text] triple")
        out.append((None if entry[0] is None else float(entry[0]), int(entry[1])))
    return out


def _top(position: Any, k: int | None = None) -> dict[int, float] | None:
    """One position of ``*_top_logprobs`` as {token id: logprob}, best first (top ``k``)."""
    if not position:
        return None
    ranked = sorted(
        ((tok, lp) for lp, tok in _pairs(position, "top logprobs") if lp is not None), key=lambda kv: (-kv[1], kv[0])
    )
    return dict(ranked if k is None else ranked[:k])


def _update_ok(out: Any) -> tuple[bool, str]:
    """SGLang weight calls answer ``(success, message)`` or an object with ``success``."""
    if out is None:
        return True, ""
    if isinstance(out, tuple | list) and out:
        return bool(out[0]), str(out[1]) if len(out) > 1 else ""
    success = getattr(out, "success", True)
    return bool(success), str(getattr(out, "message", "") or "")


def _nbytes(tensor: Any) -> int:
    numel, size = getattr(tensor, "numel", None), getattr(tensor, "element_size", None)
    if callable(numel) and callable(size):
        return int(numel()) * int(size())
    return int(getattr(tensor, "nbytes", 0) or 0)


def _dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` or "torch.bfloat16" -> "bfloat16" (SGLang wants the bare name)."""
    return str(dtype).removeprefix("torch.")


def _positional_params(fn: Callable[..., Any]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds)


class SGLangEngineHandle:
    """An ``sgl.Engine`` behind the calls the backend makes, all safe on the engine's loop.

    ``async_generate`` is the Engine's own; the control calls await the tokenizer
    manager's coroutines (the Engine's synchronous methods would ``run_until_complete``
    a loop that is already running). A fake engine for tests implements these same
    methods. ``io`` is ``sglang.srt.managers.io_struct`` (injectable for tests).
    """

    def __init__(self, engine: Any, *, io: Any = None, children: Iterable[Any] = ()) -> None:
        self.engine = engine
        self._io = io
        self._children = list(children)

    @property
    def tokenizer_manager(self) -> Any:
        return self.engine.tokenizer_manager

    @property
    def io(self) -> Any:
        if self._io is None:
            self._io = importlib.import_module("sglang.srt.managers.io_struct")
        return self._io

    async def async_generate(self, **kwargs: Any) -> Any:
        return await self.engine.async_generate(**kwargs)

    def check_health(self) -> None:
        """Raise if a scheduler or detokenizer process the engine started has exited."""
        for proc in self._children:
            if not proc.is_alive():
                raise BackendError(
                    f"SGLang subprocess {getattr(proc, 'name', '?')} (pid {getattr(proc, 'pid', '?')}) "
                    f"exited with code {getattr(proc, 'exitcode', None)}"
                )

    def abort_request(self, rid: str) -> None:
        self.tokenizer_manager.abort_request(rid=rid)

    async def pause_generation(self, mode: str) -> None:
        fn = getattr(self.tokenizer_manager, "pause_generation", None)
        if fn is None:
            raise NotImplementedError("this SGLang version has no pause_generation")
        if _positional_params(fn) == 0:  # SGLang <= 0.5.5: no modes; it aborts everything
            if mode != "abort":
                raise NotImplementedError(f"this SGLang version pauses only by aborting (asked for {mode!r})")
            await fn()
            return
        await fn(self.io.PauseGenerationReqInput(mode=mode))

    async def continue_generation(self) -> None:
        fn = getattr(self.tokenizer_manager, "continue_generation", None)
        if fn is None:
            raise NotImplementedError("this SGLang version has no continue_generation")
        if _positional_params(fn) == 0:
            await fn()
        else:
            await fn(self.io.ContinueGenerationReqInput())

    async def flush_cache(self) -> Any:
        return await self.tokenizer_manager.flush_cache()

    async def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        cls = self.io.ReleaseMemoryOccupationReqInput
        obj = cls() if tags is None else cls(tags=list(tags))
        return await self.tokenizer_manager.release_memory_occupation(obj, None)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        cls = self.io.ResumeMemoryOccupationReqInput
        obj = cls() if tags is None else cls(tags=list(tags))
        return await self.tokenizer_manager.resume_memory_occupation(obj, None)

    def _serialize(self, named_tensors: list[tuple[str, Any]], load_format: str | None) -> list[Any]:
        """One payload per tensor-parallel rank, as ``Engine.update_weights_from_tensor`` builds it."""
        per_rank = getattr(self.engine, "_serialize_tensors_per_rank", None)
        if callable(per_rank):
            return list(per_rank(named_tensors, load_format))
        serializer = importlib.import_module("sglang.srt.utils").MultiprocessingSerializer
        tp_size = int(getattr(getattr(self.engine, "server_args", None), "tp_size", 1) or 1)
        return [serializer.serialize(named_tensors) for _ in range(tp_size)]

    async def update_weights_from_tensor(
        self, named_tensors: list[tuple[str, Any]], load_format: str | None = None, flush_cache: bool = True
    ) -> Any:
        obj = self.io.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=self._serialize(named_tensors, load_format),
            load_format=load_format,
            flush_cache=flush_cache,
        )
        return await self.tokenizer_manager.update_weights_from_tensor(obj, None)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> Any:
        obj = self.io.InitWeightsUpdateGroupReqInput(
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        return await self.tokenizer_manager.init_weights_update_group(obj, None)

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        flush_cache: bool = True,
    ) -> Any:
        obj = self.io.UpdateWeightsFromDistributedReqInput(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=flush_cache
        )
        return await self.tokenizer_manager.update_weights_from_distributed(obj, None)

    def shutdown(self) -> None:
        self.engine.shutdown()


class SGLangEngineFactory:
    """Builds the real engine: imports ``sglang`` (``importer`` is injectable for tests)."""

    def __init__(self, importer: Callable[[str], Any] = importlib.import_module) -> None:
        self.importer = importer

    def __call__(self, **engine_kwargs: Any) -> SGLangEngineHandle:
        try:
            sgl = self.importer("sglang")
        except ImportError as exc:
            if getattr(exc, "name", None) in (None, "sglang"):
                raise ConfigError(
                    "EngineConfig.backend: 'sglang' needs SGLang in the engine's Python environment "
                    f"({exc}); install it with pip install 'inferpool[sglang]' (CUDA GPU only), "
                    "or use backend='sglang_http' against a running SGLang server",
                    field="backend",
                ) from exc
            raise ConfigError(f"EngineConfig.backend: SGLang failed to import: {exc}", field="backend") from exc
        before = set(multiprocessing.active_children())
        try:
            engine = sgl.Engine(**engine_kwargs)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise ConfigError(
                    f"EngineConfig.engine_kwargs: not accepted by sgl.Engine: {exc}", field="engine_kwargs"
                ) from exc
            raise
        children = [p for p in multiprocessing.active_children() if p not in before]
        return SGLangEngineHandle(engine, children=children)


class _EngineLoop:
    """An event loop running in its own daemon thread: the SGLang engine lives on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on the engine loop (awaiting it if it returns an awaitable)."""
        if not self.alive:
            raise BackendError("SGLang engine loop is not running")

        async def call() -> Any:
            out = fn(*args, **kwargs)
            if inspect.isawaitable(out):
                out = await out
            return out

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


class SGLangBackend(BaseBackend):
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
        self._loop: _EngineLoop | None = None
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
        loop = _EngineLoop(f"sglang-{self.engine_id}")
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
        extra: dict[str, Any] = {"return_logprob": True}
        if sp.logprobs > 0:
            extra["top_logprobs_num"] = sp.logprobs
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
        where = f"SGLang engine {self.engine_id}, request {request.request_id}, output {i}"
        meta = item.get("meta_info") if isinstance(item, Mapping) else None
        if not isinstance(meta, Mapping):
            raise BackendError(f"{where}: no meta_info")
        pairs = _pairs(meta.get("output_token_logprobs"), "meta_info.output_token_logprobs")
        logprob_ids = [tok for _, tok in pairs]
        output_ids = item.get("output_ids")
        if output_ids is None:
            token_ids = logprob_ids
        else:
            token_ids = [int(t) for t in output_ids]
            if token_ids != logprob_ids:
                raise BackendError(
                    f"{where}: output_ids ({len(token_ids)} tokens) and the ids of "
                    f"meta_info.output_token_logprobs ({len(logprob_ids)}) disagree"
                )
        if any(lp is None for lp, _ in pairs):
            raise BackendError(f"{where}: a sampled token has no logprob")
        finish, stop_reason = normalize_finish(meta.get("finish_reason"))
        k = request.sampling.logprobs
        tops = None
        if k > 0:
            positions = meta.get("output_top_logprobs") or []
            tops = [_top(pos, k) or {} for pos in positions]
            if len(tops) != len(token_ids):
                raise BackendError(f"{where}: top logprobs for {len(tops)} of {len(token_ids)} positions")
        return Choice(
            index=request.choice_offset + i,
            token_ids=token_ids,
            logprobs=[float(lp) for lp, _ in pairs if lp is not None],
            finish_reason=finish,
            text=item.get("text"),
            weight_version=version,
            weight_versions=[version] * len(token_ids),
            stop_reason=stop_reason,
            top_logprobs=tops,
        )

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position (``logprob_start_len=0``); position 0 empty."""
        check_top_k(prompt_token_ids, top_k)
        ids = [int(t) for t in prompt_token_ids]
        engine = await self._admit()
        rid = f"score-{uuid.uuid4().hex}"
        self._track(rid, 1)
        try:
            out = await self._call(
                engine.async_generate,
                input_ids=ids,
                sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=top_k,
                rid=rid,
            )
        finally:
            self._untrack(rid)
        item = out[0] if isinstance(out, list) and out else out
        meta = item.get("meta_info") if isinstance(item, Mapping) else None
        positions = meta.get("input_top_logprobs") if isinstance(meta, Mapping) else None
        if not isinstance(positions, list):
            raise BackendError(f"SGLang engine {self.engine_id}: no meta_info.input_top_logprobs")
        tops = [_top(p) for p in positions]
        if len(tops) == len(ids) - 1:  # some versions leave position 0 out
            tops.insert(0, None)
        return build_prompt_logprobs(ids, tops, top_k, f"SGLang engine {self.engine_id}")

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
        ok, message = _update_ok(out)
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

    # -- weights (plain methods; the engine actor's weight-update API calls these) -----------
    def _next_version(self, version: int | str | None) -> int | str | None:
        if version is not None:
            return version
        return self.weight_version + 1 if isinstance(self.weight_version, int) else None

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """The engine actor's chunked update path: load one chunk, label it later."""
        current = self.weight_version
        out = await self.load_weights_from_tensor(named_tensors, flush_cache=False)
        self.weight_version = current  # set_weight_version labels the whole update
        return int(out["num_tensors"])

    async def set_weight_version(self, version: int | str) -> None:
        await self.reset_prefix_cache()
        self.weight_version = version

    async def load_weights_from_tensor(
        self,
        named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any],
        version: int | str | None = None,
        *,
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> dict[str, Any]:
        """Load ``(name, tensor)`` pairs (or a state dict) with SGLang ``update_weights_from_tensor``.

        Tensors may be on CPU or (cheaper: CUDA IPC handles) on this GPU. Sets
        ``weight_version`` to ``version`` (None: the previous integer version + 1) once
        SGLang reports success, so tokens sampled afterwards carry it. ``flush_cache``
        drops the prefix cache computed with the old weights (pass False for all but the
        last chunk of a chunked update). Returns ``weight_version``, ``num_tensors``,
        ``bytes`` and ``seconds``; raises BackendError if SGLang refuses.
        """
        engine = self._require_engine()
        tensors = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        start = time.perf_counter()
        out = await self._call(
            engine.update_weights_from_tensor, tensors, load_format=load_format, flush_cache=flush_cache
        )
        ok, message = _update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: update_weights_from_tensor failed: {message}")
        self.weight_version = self._next_version(version)
        return {
            "weight_version": self.weight_version,
            "num_tensors": len(tensors),
            "bytes": sum(_nbytes(t) for _, t in tensors),
            "seconds": time.perf_counter() - start,
        }

    async def join_weight_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's process group for NCCL weight broadcasts (SGLang
        ``init_weights_update_group``): the trainer is rank 0, this engine's tensor-parallel
        ranks are ``rank_offset ..``; ``world_size`` counts all of them."""
        engine = self._require_engine()
        out = await self._call(
            engine.init_weights_update_group,
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        ok, message = _update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: init_weights_update_group failed: {message}")

    # -- the pool's native-transfer protocol (inferpool.weights.trainer.TorchGroupTrainer drives it) --
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        if self.weight_transfer != "nccl":
            raise self._no_native()
        fields = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        await self.join_weight_update_group(**{k: init_info[k] for k in fields if k in init_info})
        self._group_name = str(init_info.get("group_name", "weight_update_group"))

    async def start_weight_update(self) -> None:
        """Nothing to prepare: SGLang loads each broadcast tensor as it arrives."""

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        info = update_info[0] if isinstance(update_info, list) else update_info
        current = self.weight_version
        out = await self.load_weights_from_distributed(
            info["names"], info["dtype_names"], info["shapes"], group_name=self._group_name, flush_cache=False
        )
        self.weight_version = current  # finish_weight_update labels the whole update
        return int(out["num_tensors"])

    async def finish_weight_update(self, version: int | str) -> None:
        await self.set_weight_version(version)

    async def load_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[Any],
        shapes: list[list[int]],
        version: int | str | None = None,
        *,
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
    ) -> dict[str, Any]:
        """Receive tensors the trainer broadcasts over the group of ``join_weight_update_group``
        (SGLang ``update_weights_from_distributed``; the trainer broadcasts them in this
        order while this call runs). Sets ``weight_version`` like ``load_weights``."""
        engine = self._require_engine()
        start = time.perf_counter()
        out = await self._call(
            engine.update_weights_from_distributed,
            names=list(names),
            dtypes=[_dtype_name(d) for d in dtypes],
            shapes=[list(s) for s in shapes],
            group_name=group_name,
            flush_cache=flush_cache,
        )
        ok, message = _update_ok(out)
        if not ok:
            raise BackendError(f"SGLang engine {self.engine_id}: update_weights_from_distributed failed: {message}")
        self.weight_version = self._next_version(version)
        return {
            "weight_version": self.weight_version,
            "num_tensors": len(names),
            "seconds": time.perf_counter() - start,
        }
