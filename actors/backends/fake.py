"""A deterministic fake engine for tests and simulations.

It implements the whole backend interface. Tokens are drawn from a seeded RNG
(the same seed, prompt and choice index always give the same tokens), latency is
configurable per prompt token, per sampled token and per request, and faults can be
injected from the config or at run time: ``raise`` (a BackendError), ``hang`` (never
answers, so the caller's timeout fires) and ``die`` (the actor process exits).

An optional prefix cache (``prefix_cache_blocks > 0``) models an engine's block-hash
prefix cache (:mod:`inferpool.actors.backends.fake_cache`): a request is charged
``prefill_latency_per_token_s`` only for its prompt tokens beyond the longest cached
prefix of full blocks, so cache reuse (and routing that preserves it) matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import time
from typing import Any, Literal

from pydantic import Field

from inferpool.actors.backends.base import BaseBackend, PauseMode
from inferpool.actors.backends.fake_cache import PrefixCache
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, RequestError
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult
from inferpool.validation import ConfigModel

logger = logging.getLogger(__name__)

FaultMode = Literal["none", "raise", "hang", "die"]


class FakeEngineOptions(ConfigModel):
    """Options of the fake engine, given as ``EngineConfig.engine_kwargs``."""

    vocab_size: int = Field(1024, ge=2, description="Token ids are drawn from [0, vocab_size).")
    eos_token_id: int | None = Field(None, description="EOS id; None: vocab_size - 1.")
    eos_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance per sampled token of ending with EOS (finish 'stop')."
    )
    max_model_len: int = Field(8192, ge=1, description="Context length the fake reports.")
    base_latency_s: float = Field(0.0, ge=0.0, description="Fixed service time per request.")
    prefill_latency_per_token_s: float = Field(0.0, ge=0.0, description="Service time per prompt token.")
    decode_latency_per_token_s: float = Field(0.0, ge=0.0, description="Service time per sampled token.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests served at once (an engine's batch); others queue."
    )
    ignore_n: bool = Field(False, description="Answer one choice whatever n is (like some servers).")
    fault: FaultMode = Field("none", description="Fault injected into requests.")
    fault_after: int = Field(0, ge=0, description="Requests served normally before faults start.")
    fault_count: int = Field(-1, ge=-1, description="How many requests get the fault; -1: all after.")
    start_latency_s: float = Field(0.0, ge=0.0, description="Time start() takes.")
    prefix_cache_blocks: int = Field(
        0,
        ge=0,
        description="Prefix cache size in blocks (LRU of chained block hashes of the sequences served); "
        "prefill is charged only for prompt tokens beyond the longest cached prefix. 0: off.",
    )
    prefix_block_size: int = Field(16, ge=1, description="Tokens per prefix-cache block.")
    text_only: bool = Field(
        False, description="Behave like a hosted API: no token ids, only text-level chat/completion calls."
    )


def _token_rng(seed: int, prompt: list[int], index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{index}:{len(prompt)}:{prompt[-64:]}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class FakeBackend(BaseBackend):
    """Deterministic fake engine."""

    name = "fake"
    control_methods = frozenset({"inject_fault", "set_latency", "progress", "paused", "weights_digest"})

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        self.config = config
        self.engine_id = engine_id
        self.options = FakeEngineOptions.parse(config.engine_kwargs)
        self.eos_token_id = (
            self.options.eos_token_id if self.options.eos_token_id is not None else self.options.vocab_size - 1
        )
        self._rng = random.Random(config.seed)
        self._served = 0
        self._faults_left = self.options.fault_count
        self._fault: FaultMode = self.options.fault
        self._fault_after = self.options.fault_after
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._aborted: set[str] = set()
        self._decoded: dict[str, tuple[list[Choice], int]] = {}  # request -> (its choices, steps decoded)
        self._first_token: dict[str, float] = {}  # request -> perf_counter when its first token was out
        self._admit = asyncio.Event()  # cleared while paused: new requests wait
        self._admit.set()
        self._running = asyncio.Event()  # cleared in pause(mode="keep"): in-flight requests freeze
        self._running.set()
        self._pause_mode: PauseMode | None = None
        self._sem: asyncio.Semaphore | None = None
        self.weight_version: int | str | None = 0
        self.sleeping = False
        self.loaded_bytes = 0
        self.loaded_tensors = 0
        self.decode_steps = 0
        self._gloo: Any = None
        self._digest: dict[str, float] = {}
        self._prefix_cache: PrefixCache | None = None
        if self.options.prefix_cache_blocks:
            self._prefix_cache = PrefixCache(self.options.prefix_cache_blocks, self.options.prefix_block_size)

    async def start(self) -> EngineInfo:
        if self.options.max_concurrency:
            self._sem = asyncio.Semaphore(self.options.max_concurrency)
        if self.options.start_latency_s:
            await asyncio.sleep(self.options.start_latency_s)
        return EngineInfo(
            engine_id=self.engine_id,
            backend="fake",
            model=self.config.model or "fake",
            vocab_size=self.options.vocab_size,
            max_model_len=self.options.max_model_len,
            eos_token_id=self.eos_token_id,
            supports_tokens=not self.options.text_only,
        )

    # -- faults ---------------------------------------------------------------------
    def inject_fault(self, fault: FaultMode, count: int = -1, after: int = 0) -> None:
        """Make the next requests (after ``after`` more good ones) fail with ``fault``."""
        self._fault = fault
        self._faults_left = count
        self._fault_after = self._served + after

    def set_latency(self, base_latency_s: float = 0.0, decode_latency_per_token_s: float = 0.0) -> None:
        self.options = self.options.model_copy(
            update={
                "base_latency_s": base_latency_s,
                "decode_latency_per_token_s": decode_latency_per_token_s,
            }
        )

    def progress(self) -> int:
        """Decode steps taken so far (tests wait on it instead of sleeping)."""
        return self.decode_steps

    def paused(self) -> PauseMode | None:
        """The pause mode in force, None when running (tests wait on it instead of sleeping)."""
        return self._pause_mode

    def _take_fault(self) -> FaultMode:
        if self._fault == "none" or self._served < self._fault_after or self._faults_left == 0:
            return "none"
        if self._faults_left > 0:
            self._faults_left -= 1
        return self._fault

    # -- generation -----------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        fault = self._take_fault()
        self._served += 1
        if fault == "raise":
            raise BackendError(f"fake engine {self.engine_id}: injected fault on {request.request_id}")
        if fault == "die":
            logger.warning("fake engine %s: injected death", self.engine_id)
            os._exit(1)
        if fault == "hang":
            await asyncio.Event().wait()
        await self._admit.wait()
        task = asyncio.current_task()
        assert task is not None
        self._tasks[request.request_id] = task
        start = time.perf_counter()
        try:
            if self._sem is not None:
                async with self._sem:
                    choices = await self._sample(request)
            else:
                choices = await self._sample(request)
        except asyncio.CancelledError:
            if self._pause_mode == "abort" or request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                choices = self._aborted_choices(request)
            else:
                raise
        finally:
            self._tasks.pop(request.request_id, None)
            self._decoded.pop(request.request_id, None)
            first = self._first_token.pop(request.request_id, None)
        return GenerateResult(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            choices=choices,
            engine_id=self.engine_id,
            elapsed_s=time.perf_counter() - start,
            ttft_s=first - start if first is not None else None,
        )

    def _num_choices(self, request: GenerateRequest) -> int:
        return 1 if self.options.ignore_n else request.sampling.n

    async def _sample(self, request: GenerateRequest) -> list[Choice]:
        sp = request.sampling
        opts = self.options
        prompt_hashes: list[int] = []
        uncached = len(request.prompt_token_ids)
        cache = self._prefix_cache
        if cache is not None:
            prompt_hashes, cached = cache.lookup(request.prompt_token_ids)
            uncached -= cached
        prefill = opts.base_latency_s + opts.prefill_latency_per_token_s * uncached
        if prefill:
            await asyncio.sleep(prefill)
        if cache is not None:
            cache.insert(prompt_hashes)  # computed now: later prompts may reuse these blocks
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        choices = []
        stops = set(sp.stop_token_ids)
        for i in range(self._num_choices(request)):
            rng = _token_rng(seed, request.prompt_token_ids, request.choice_offset + i)
            tokens: list[int] = []
            logprobs: list[float] = []
            finish = "length"
            stop_reason: int | None = None
            for step in range(sp.max_tokens):
                eos = (
                    not sp.ignore_eos
                    and step >= sp.min_tokens
                    and opts.eos_probability > 0
                    and rng.random() < opts.eos_probability
                )
                tok = self.eos_token_id if eos else rng.randrange(opts.vocab_size - 1)
                tokens.append(tok)
                logprobs.append(math.log(0.05 + 0.9 * rng.random()))
                if eos:
                    finish = "stop"
                    break
                if tok in stops and step >= sp.min_tokens:
                    finish, stop_reason = "stop", tok
                    break
            choices.append(
                Choice(
                    index=request.choice_offset + i,
                    token_ids=tokens,
                    logprobs=logprobs,
                    finish_reason=finish,
                    stop_reason=stop_reason,
                    weight_version=self.weight_version,
                    weight_versions=[self.weight_version] * len(tokens),
                )
            )
        decode_steps = max((len(c.token_ids) for c in choices), default=0)
        if decode_steps and not opts.decode_latency_per_token_s:  # every token is out after the prefill
            self._first_token[request.request_id] = time.perf_counter()
        if opts.decode_latency_per_token_s and decode_steps:
            for step in range(decode_steps):
                self._decoded[request.request_id] = (choices, step)
                await self._running.wait()
                await asyncio.sleep(opts.decode_latency_per_token_s)
                self.decode_steps += 1
                self._first_token.setdefault(request.request_id, time.perf_counter())
                for c in choices:  # the token at this step comes from the weights loaded now
                    if step < len(c.weight_versions):
                        c.weight_versions[step] = self.weight_version
            for c in choices:
                c.weight_version = c.weight_versions[-1] if c.weight_versions else self.weight_version
        if cache is not None:  # the sampled tokens' full blocks are cached too (as engines do)
            cache.insert_continuations(request.prompt_token_ids, prompt_hashes, [c.token_ids for c in choices])
        return choices

    def _aborted_choices(self, request: GenerateRequest) -> list[Choice]:
        """An aborted request's choices: the tokens decoded so far (as vLLM returns them), finish 'abort'."""
        sampled, steps = self._decoded.get(request.request_id, ([], 0))
        out = []
        for i in range(self._num_choices(request)):
            c = sampled[i] if i < len(sampled) else None
            versions = c.weight_versions[:steps] if c is not None else []
            out.append(
                Choice(
                    index=request.choice_offset + i,
                    token_ids=c.token_ids[:steps] if c is not None else [],
                    logprobs=c.logprobs[:steps] if c is not None else [],
                    finish_reason="abort",
                    weight_version=versions[-1] if versions else self.weight_version,
                    weight_versions=versions,
                )
            )
        return out

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A text-level OpenAI chat answer (``text_only`` mode), deterministic in the messages."""
        if not self.options.text_only:
            return await super().chat(body)
        seed = hashlib.blake2b(repr(body.get("messages")).encode(), digest_size=4).hexdigest()
        n = int(body.get("n", 1))
        return {
            "id": f"chatcmpl-fake-{seed}",
            "object": "chat.completion",
            "model": self.config.model or "fake",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": f"reply {seed} #{i}"}, "finish_reason": "stop"}
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    async def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            self._aborted.add(request_id)
            task.cancel()

    async def backend_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queue_len": 0,
            "weight_version": self.weight_version,
            "sleeping": self.sleeping,
            "loaded_bytes": self.loaded_bytes,
            "loaded_tensors": self.loaded_tensors,
        }
        if self._prefix_cache is not None:
            out["prefix_cache_hit_rate"] = self._prefix_cache.hit_rate()
            out["prefix_cache_blocks"] = len(self._prefix_cache.blocks)
        return out

    # -- lifecycle --------------------------------------------------------------------
    async def pause(self, mode: PauseMode) -> None:
        self._pause_mode = mode
        self._admit.clear()
        if mode == "abort":
            for task in list(self._tasks.values()):
                task.cancel()
        elif mode == "wait" and self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        elif mode == "keep":
            self._running.clear()

    async def resume(self) -> None:
        self._pause_mode = None
        self._running.set()
        self._admit.set()

    async def sleep(self, level: int) -> None:
        self.sleeping = True

    async def wake(self, tags: list[str] | None) -> None:
        self.sleeping = False

    async def reset_prefix_cache(self) -> None:
        if self._prefix_cache is not None:
            self._prefix_cache.clear()

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Pretend to load: counts tensors and bytes (tests check what arrived)."""
        for _, tensor in named_tensors:
            self.loaded_bytes += int(getattr(tensor, "nbytes", 0))
        self.loaded_tensors += len(named_tensors)
        return len(named_tensors)

    # -- native weight transfer: the "gloo" method, one rank per fake engine ------------------
    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        from inferpool.weights.groups import GlooInitInfo, open_gloo_group

        if self.weight_transfer != "gloo":
            raise self._no_native()
        info = GlooInitInfo(**init_info)
        self._gloo = await asyncio.to_thread(
            open_gloo_group, info.master_address, info.master_port, info.rank_offset, info.world_size, info.timeout_s
        )

    async def start_weight_update(self) -> None:
        if self._gloo is None:
            raise RequestError("weight_transfer: init_weight_transfer was not called on this engine")
        self._digest = {}

    async def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> int:
        from inferpool.weights.groups import TensorMeta, receive_gloo

        if isinstance(update_info, list):  # one payload per worker rank; the fake engine is one rank
            update_info = update_info[0]

        def receive() -> list[tuple[str, Any]]:
            return list(receive_gloo(self._gloo, TensorMeta(**update_info)))

        named = await asyncio.to_thread(receive)
        for name, tensor in named:
            self._digest[name] = float(tensor.double().sum())
        return await self.load_weights(named)

    async def finish_weight_update(self, version: int | str) -> None:
        await self.reset_prefix_cache()
        self.weight_version = version

    def weights_digest(self) -> dict[str, float]:
        """Sum of each tensor received by the last native update (tests compare with what was sent)."""
        return dict(self._digest)
