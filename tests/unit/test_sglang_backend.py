"""The SGLang backend against a fake ``sgl.Engine`` that answers in SGLang's documented shape.

``Engine.async_generate`` (non-streaming) returns one dict per sample — a list of them
when ``sampling_params["n"] > 1`` — with ``text``, ``output_ids`` and ``meta_info``:
``id``, ``finish_reason`` (``{"type": "length", "length": n}``, ``{"type": "stop",
"matched": ...}``, ``{"type": "abort", ...}`` or null), ``prompt_tokens``,
``completion_tokens``, ``output_token_logprobs`` as ``[logprob, token_id, text]`` triples,
``output_top_logprobs`` (triples per position) and, with ``logprob_start_len=0``,
``input_top_logprobs`` (null at position 0). The fake is injected through
``SGLangBackend(engine_factory=...)``; it runs on the backend's engine thread, as the real
engine would.

Run: .venv/bin/pytest tests/unit/test_sglang_backend.py -q
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from inferpool.actors.backends import create_backend
from inferpool.actors.backends.base import normalize_finish
from inferpool.actors.backends.sglang.backend import SGLangBackend
from inferpool.actors.backends.sglang.loop import SGLangEngineFactory, SGLangEngineHandle
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError, RequestError
from inferpool.types import GenerateRequest, SamplingParams

VOCAB = 64
EOS = 63
CONTEXT = 2048
MODEL = "/models/tiny-sglang"  # never read: the fake engine loads nothing


def _logprob(tok: int) -> float:
    return -0.05 - tok / 100.0


class FakeSGLEngine:
    """A stand-in for ``sgl.Engine`` (as wrapped by SGLangEngineHandle): same calls, same shapes."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.threads: set[str] = set()
        self.tokenizer_manager = SimpleNamespace(
            model_config=SimpleNamespace(vocab_size=VOCAB, context_len=CONTEXT),
            context_len=CONTEXT,
            tokenizer=SimpleNamespace(eos_token_id=EOS),
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.holding = False  # hold generate calls until release()
        self._gate: asyncio.Event | None = None
        self._abort_all = False
        self.finish_script: list[Any] | None = None  # finish_reason per sample
        self.omit_output_ids = False
        self.corrupt_output_ids = False
        self.omit_position0 = False
        self.flush_result: Any = SimpleNamespace(success=True, message="")
        self.update_result: Any = (True, "Succeeded to update model weights.")

    # -- bookkeeping ----------------------------------------------------------------
    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        self.threads.add(threading.current_thread().name)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [kw for n, kw in self.calls if n == name]

    def release(self) -> None:
        self.holding = False
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def release_threadsafe(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.release)

    # -- generation --------------------------------------------------------------------
    async def async_generate(
        self,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        rid: str | None = None,
        **extra: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        self.loop = asyncio.get_running_loop()
        self._record(
            "async_generate",
            input_ids=list(input_ids),
            sampling_params=dict(sampling_params),
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            rid=rid,
            **extra,
        )
        if self.holding:
            if self._gate is None:
                self._gate = asyncio.Event()
            await self._gate.wait()
        n = int(sampling_params.get("n", 1))
        rids = [rid or "r"] if n == 1 else [f"{rid}_{i}" for i in range(n)]
        outs = [
            self._output(input_ids, sampling_params, i, rids[i], logprob_start_len, top_logprobs_num) for i in range(n)
        ]
        return outs[0] if n == 1 else outs

    def _output(
        self,
        prompt: list[int],
        sp: dict[str, Any],
        i: int,
        rid: str,
        logprob_start_len: int | None,
        top_k: int | None,
    ) -> dict[str, Any]:
        rng = random.Random(f"{prompt}:{sp.get('sampling_seed')}:{i}")
        length = int(sp.get("max_new_tokens", 16))
        tokens = [rng.randrange(VOCAB - 1) for _ in range(length)]
        finish: Any = {"type": "length", "length": length}
        if self.finish_script is not None:
            finish = self.finish_script[i]
        if self._abort_all:
            tokens = tokens[:2]
            finish = {"type": "abort", "message": "Abort in running batch.", "status_code": 400}
        triples = [[_logprob(t), t, None] for t in tokens]
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "cached_tokens": 0,
            "output_token_logprobs": triples,
            "e2e_latency": 0.001,
        }
        if top_k:
            # the sampled token, then worse alternatives
            meta["output_top_logprobs"] = [
                [
                    [_logprob(t), t, None],
                    *[[_logprob(t) - 1.0 - j, (t + 1 + j) % VOCAB, None] for j in range(top_k - 1)],
                ]
                for t in tokens
            ]
        if logprob_start_len == 0 and top_k:
            positions: list[Any] = [None]
            for pos in range(1, len(prompt)):
                # k candidates, worst first: the backend must sort them
                positions.append([[-1.0 - pos / 10 - j, (pos * 7 + j) % VOCAB, None] for j in range(top_k)][::-1])
            meta["input_top_logprobs"] = positions[1:] if self.omit_position0 else positions
            meta["input_token_logprobs"] = [[None, prompt[0], None]] + [[-2.0, t, None] for t in prompt[1:]]
        item: dict[str, Any] = {"text": "".join(f"<{t}>" for t in tokens), "meta_info": meta}
        if not self.omit_output_ids:
            item["output_ids"] = list(tokens) if not self.corrupt_output_ids else [t + 1 for t in tokens]
        return item

    # -- control ---------------------------------------------------------------------
    def check_health(self) -> None:
        self._record("check_health")

    def abort_request(self, rid: str) -> None:
        self._record("abort_request", rid=rid)

    async def pause_generation(self, mode: str) -> None:
        self._record("pause_generation", mode=mode)
        if mode == "abort":
            self._abort_all = True
            self.release()

    async def continue_generation(self) -> None:
        self._record("continue_generation")
        self._abort_all = False
        self.release()

    async def flush_cache(self) -> Any:
        self._record("flush_cache")
        return self.flush_result

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._record("release_memory_occupation", tags=tags)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._record("resume_memory_occupation", tags=tags)

    async def update_weights_from_tensor(
        self, named_tensors: list[tuple[str, Any]], load_format: str | None = None, flush_cache: bool = True
    ) -> Any:
        self._record("update_weights_from_tensor", named_tensors=named_tensors, load_format=load_format,
                     flush_cache=flush_cache)  # fmt: skip
        return self.update_result

    async def init_weights_update_group(self, **kwargs: Any) -> Any:
        self._record("init_weights_update_group", **kwargs)
        return (True, "Succeeded to initialize custom process group.")

    async def update_weights_from_distributed(self, **kwargs: Any) -> Any:
        self._record("update_weights_from_distributed", **kwargs)
        return (True, "Succeeded to update parameter online.")

    def shutdown(self) -> None:
        self._record("shutdown")


Make = Callable[..., Awaitable[SGLangBackend]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Start SGLang backends on fake engines; shut them all down afterwards."""
    started: list[SGLangBackend] = []

    async def _make(
        engine_kwargs: dict[str, Any] | None = None,
        factory: Callable[..., Any] = FakeSGLEngine,
        **config: Any,
    ) -> SGLangBackend:
        cfg = EngineConfig(backend="sglang", model=MODEL, engine_kwargs=engine_kwargs or {}, **config)
        backend = SGLangBackend(cfg, f"sg-{len(started)}", engine_factory=factory)
        await backend.start()
        started.append(backend)
        return backend

    yield _make
    for backend in started:
        await backend.shutdown()


def fake(backend: SGLangBackend) -> FakeSGLEngine:
    assert isinstance(backend.engine, FakeSGLEngine)
    return backend.engine


def req(rid: str = "req-1", prompt: list[int] | None = None, offset: int = 0, **sampling: Any) -> GenerateRequest:
    sampling.setdefault("max_tokens", 5)
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt or [1, 2, 3, 4],
        sampling=SamplingParams(**sampling),
        choice_offset=offset,
    )


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


# -- construction, start, engine facts -------------------------------------------------
def test_registry_creates_the_sglang_backend_without_starting_it() -> None:
    backend = create_backend(EngineConfig(backend="sglang", model=MODEL), "sg-x")
    assert isinstance(backend, SGLangBackend)
    assert backend.engine is None


async def test_start_passes_engine_kwargs_and_reports_engine_facts() -> None:
    config = EngineConfig(backend="sglang", model=MODEL, seed=3, engine_kwargs={"tp_size": 1, "log_level": "warning"})
    backend = SGLangBackend(config, "sg-i", engine_factory=FakeSGLEngine)
    info = await backend.start()
    engine = fake(backend)
    await backend.shutdown()
    assert engine.kwargs == {
        "model_path": MODEL,
        "random_seed": 3,
        "dtype": "auto",
        "skip_tokenizer_init": False,
        "tp_size": 1,
        "log_level": "warning",
    }
    assert (info.engine_id, info.backend, info.model) == ("sg-i", "sglang", MODEL)
    assert (info.vocab_size, info.max_model_len, info.eos_token_id) == (VOCAB, CONTEXT, EOS)
    assert info.supports_prompt_logprobs and info.supports_tokens


def test_colocated_defaults_leave_room_for_a_trainer_and_enable_sleep() -> None:
    shared = SGLangBackend(EngineConfig(backend="sglang", model=MODEL, num_gpus=0.5), "sg-c")
    kwargs = shared.engine_kwargs()
    assert kwargs["mem_fraction_static"] == pytest.approx(0.425)
    assert kwargs["enable_memory_saver"] is True
    override = SGLangBackend(
        EngineConfig(backend="sglang", model=MODEL, num_gpus=0.5, dtype="bfloat16",
                     engine_kwargs={"mem_fraction_static": 0.3, "enable_memory_saver": False}),
        "sg-o",
    )  # fmt: skip
    kwargs = override.engine_kwargs()
    assert (kwargs["mem_fraction_static"], kwargs["enable_memory_saver"], kwargs["dtype"]) == (0.3, False, "bfloat16")
    whole = SGLangBackend(EngineConfig(backend="sglang", model=MODEL, num_gpus=1), "sg-w").engine_kwargs()
    assert "mem_fraction_static" not in whole and "enable_memory_saver" not in whole


async def test_start_does_not_block_the_callers_event_loop() -> None:
    class SlowEngine(FakeSGLEngine):
        def __init__(self, **kwargs: Any) -> None:
            time.sleep(0.4)  # a blocking model load
            super().__init__(**kwargs)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    backend = SGLangBackend(EngineConfig(backend="sglang", model=MODEL), "sg-slow", engine_factory=SlowEngine)
    try:
        await backend.start()
    finally:
        task.cancel()
        await backend.shutdown()
    assert ticks >= 10


async def test_engine_calls_run_on_the_engines_own_thread(make: Make) -> None:
    backend = await make()
    await backend.generate(req())
    await backend.health()
    threads = fake(backend).threads
    assert threads == {"sglang-sg-0"}
    assert threading.current_thread().name not in threads


async def test_missing_sglang_is_a_clear_config_error() -> None:
    def no_sglang(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    backend = SGLangBackend(
        EngineConfig(backend="sglang", model=MODEL), "sg-m", engine_factory=SGLangEngineFactory(importer=no_sglang)
    )
    with pytest.raises(ConfigError, match=r"pip install 'inferpool\[sglang\]'") as info:
        await backend.start()
    assert info.value.field == "backend"
    assert backend.engine is None and backend._loop is None  # the engine thread was stopped
    with pytest.raises(BackendError, match="not started"):
        await backend.generate(req())


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
async def test_missing_sglang_with_the_default_factory() -> None:
    backend = SGLangBackend(EngineConfig(backend="sglang", model=MODEL), "sg-d")
    with pytest.raises(ConfigError, match="needs SGLang"):
        await backend.start()


async def test_engine_kwargs_sglang_rejects_are_a_config_error() -> None:
    class Engine:
        def __init__(self, **kwargs: Any) -> None:
            raise TypeError("ServerArgs.__init__() got an unexpected keyword argument 'no_such_arg'")

    factory = SGLangEngineFactory(importer=lambda name: SimpleNamespace(Engine=Engine))
    backend = SGLangBackend(
        EngineConfig(backend="sglang", model=MODEL, engine_kwargs={"no_such_arg": 1}), "sg-k", engine_factory=factory
    )
    with pytest.raises(ConfigError, match="no_such_arg") as info:
        await backend.start()
    assert info.value.field == "engine_kwargs"


# -- generate ------------------------------------------------------------------------------
async def test_generate_one_choice(make: Make) -> None:
    backend = await make()
    result = await backend.generate(req(max_tokens=6))
    assert result.request_id == "req-1" and result.prompt_token_ids == [1, 2, 3, 4]
    assert result.engine_id == "sg-0"
    (choice,) = result.choices
    assert choice.index == 0 and len(choice.token_ids) == 6
    assert choice.logprobs == [_logprob(t) for t in choice.token_ids]  # aligned with the sampled ids
    assert choice.finish_reason == "length" and choice.stop_reason is None
    assert choice.text == "".join(f"<{t}>" for t in choice.token_ids)
    assert choice.weight_version == 0 and choice.weight_versions == [0] * 6
    assert choice.top_logprobs is None
    (call,) = fake(backend).of("async_generate")
    assert call["input_ids"] == [1, 2, 3, 4] and call["rid"] == "req-1"
    assert call["return_logprob"] is True and call["top_logprobs_num"] is None


async def test_generate_three_choices_from_sglangs_list_output(make: Make) -> None:
    backend = await make()
    result = await backend.generate(req(n=3, temperature=1.0))
    (call,) = fake(backend).of("async_generate")  # one SGLang request with n=3
    assert call["sampling_params"]["n"] == 3 and call["rid"] == "req-1"
    assert [c.index for c in result.choices] == [0, 1, 2]
    for choice in result.choices:
        assert len(choice.token_ids) == len(choice.logprobs) == len(choice.weight_versions) == 5
        assert choice.logprobs == [_logprob(t) for t in choice.token_ids]
    assert len({tuple(c.token_ids) for c in result.choices}) == 3


async def test_choice_offset_numbers_the_choices(make: Make) -> None:
    backend = await make()
    result = await backend.generate(req(n=2, offset=4))
    assert [c.index for c in result.choices] == [4, 5]


async def test_finish_reasons_are_normalised(make: Make) -> None:
    backend = await make()
    fake(backend).finish_script = [
        {"type": "stop", "matched": EOS},
        {"type": "stop", "matched": "\n"},
        {"type": "length", "length": 5},
        None,  # unfinished
        {"type": "abort", "message": "aborted", "status_code": 400},
    ]
    result = await backend.generate(req(n=5))
    assert [c.finish_reason for c in result.choices] == ["stop", "stop", "length", "abort", "abort"]
    assert [c.stop_reason for c in result.choices] == [EOS, "\n", None, None, None]


def test_normalize_finish_spellings() -> None:
    assert normalize_finish({"type": "STOP", "matched": 7}) == ("stop", 7)
    assert normalize_finish("length") == ("length", None)
    assert normalize_finish({"type": "stop", "matched": True}) == ("stop", None)


async def test_sampling_params_mapping(make: Make) -> None:
    backend = await make()
    result = await backend.generate(
        req(
            max_tokens=7, min_tokens=2, temperature=0.5, top_p=0.9, top_k=0, min_p=0.1, seed=11, stop=["\n\n"],
            stop_token_ids=[5, 9], ignore_eos=True, logprobs=3, repetition_penalty=1.1, presence_penalty=0.2,
            frequency_penalty=-0.3, offset=2,
        )
    )  # fmt: skip
    (call,) = fake(backend).of("async_generate")
    assert call["sampling_params"] == {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": -1,  # ours: 0 or -1 keep all; SGLang: -1
        "min_p": 0.1,
        "n": 1,
        "ignore_eos": True,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": -0.3,
        "stop": ["\n\n"],
        "stop_token_ids": [5, 9],
        "sampling_seed": 13,  # seed + choice_offset
    }
    assert call["return_logprob"] is True and call["top_logprobs_num"] == 3
    (choice,) = result.choices
    assert choice.top_logprobs is not None and len(choice.top_logprobs) == len(choice.token_ids)
    for tok, lp, top in zip(choice.token_ids, choice.logprobs, choice.top_logprobs, strict=True):
        assert len(top) == 3 and top[tok] == lp and next(iter(top)) == tok  # best first
        assert list(top.values()) == sorted(top.values(), reverse=True)


async def test_defaults_send_no_seed_and_keep_top_k(make: Make) -> None:
    backend = await make()
    await backend.generate(req(top_k=40))
    (call,) = fake(backend).of("async_generate")
    assert call["sampling_params"]["top_k"] == 40 and "sampling_seed" not in call["sampling_params"]
    assert "stop" not in call["sampling_params"] and "stop_token_ids" not in call["sampling_params"]


async def test_a_seeded_request_with_n_samples_uses_one_seed_per_sample(make: Make) -> None:
    backend = await make()
    result = await backend.generate(req(n=3, seed=5, offset=2))
    calls = fake(backend).of("async_generate")
    assert sorted((c["rid"], c["sampling_params"]["sampling_seed"], c["sampling_params"]["n"]) for c in calls) == [
        ("req-1_0", 7, 1),
        ("req-1_1", 8, 1),
        ("req-1_2", 9, 1),
    ]
    assert [c.index for c in result.choices] == [2, 3, 4]
    assert len({tuple(c.token_ids) for c in result.choices}) == 3
    # split across engines (offset 2, n=1 then offset 3, n=2): the same seeds, the same samples
    other = await make()
    part = await other.generate(req(n=2, seed=5, offset=3))
    assert [c.token_ids for c in part.choices] == [c.token_ids for c in result.choices[1:]]


async def test_seed_field_none_sends_no_seed(make: Make) -> None:
    backend = SGLangBackend(
        EngineConfig(backend="sglang", model=MODEL), "sg-ns", engine_factory=FakeSGLEngine, seed_field=None
    )
    await backend.start()
    try:
        await backend.generate(req(n=2, seed=5))
        (call,) = fake(backend).of("async_generate")
        assert "sampling_seed" not in call["sampling_params"] and call["sampling_params"]["n"] == 2
    finally:
        await backend.shutdown()


async def test_token_ids_come_from_the_logprob_triples_without_output_ids(make: Make) -> None:
    backend = await make()
    fake(backend).omit_output_ids = True
    (choice,) = (await backend.generate(req())).choices
    assert len(choice.token_ids) == 5 and choice.logprobs == [_logprob(t) for t in choice.token_ids]


async def test_disagreeing_output_ids_and_logprob_ids_are_an_error(make: Make) -> None:
    backend = await make()
    fake(backend).corrupt_output_ids = True
    with pytest.raises(BackendError, match="disagree"):
        await backend.generate(req())


# -- prompt logprobs --------------------------------------------------------------------------
@pytest.mark.parametrize("omit_position0", [False, True])
async def test_prompt_logprobs_shape(make: Make, omit_position0: bool) -> None:
    backend = await make()
    fake(backend).omit_position0 = omit_position0
    prompt = [3, 1, 4, 1, 5, 9]
    out = await backend.prompt_logprobs(prompt, 3)
    assert out.prompt_tokens == prompt
    assert out.prompt_topk_token_ids[0] == [] and out.prompt_topk_logprobs[0] == []
    for pos in range(1, len(prompt)):
        ids, lps = out.prompt_topk_token_ids[pos], out.prompt_topk_logprobs[pos]
        assert len(ids) == len(lps) == 3
        assert lps == sorted(lps, reverse=True)
        assert ids[0] == (pos * 7) % VOCAB and lps[0] == pytest.approx(-1.0 - pos / 10)
    (call,) = fake(backend).of("async_generate")
    assert call["logprob_start_len"] == 0 and call["top_logprobs_num"] == 3 and call["return_logprob"] is True
    assert call["sampling_params"]["max_new_tokens"] == 1 and call["input_ids"] == prompt


async def test_prompt_logprobs_rejects_bad_input(make: Make) -> None:
    backend = await make()
    with pytest.raises(RequestError):
        await backend.prompt_logprobs([1, 2, 3], 0)
    with pytest.raises(RequestError):
        await backend.prompt_logprobs([], 2)
    assert fake(backend).of("async_generate") == []


# -- health, abort, lifecycle --------------------------------------------------------------------
async def test_health_never_generates(make: Make) -> None:
    backend = await make()
    await backend.health()
    await backend.health()
    assert fake(backend).names() == ["check_health", "check_health"]
    await backend.shutdown()
    with pytest.raises(BackendError):
        await backend.health()


async def test_lifecycle_calls_reach_the_engine(make: Make) -> None:
    backend = await make(engine_kwargs={"enable_memory_saver": True})
    engine = fake(backend)
    await backend.sleep(1)
    await backend.wake(["weights"])
    await backend.wake(None)
    await backend.reset_prefix_cache()
    await backend.pause("keep")
    await backend.resume()
    await backend.pause("abort")
    await backend.resume()
    assert engine.calls == [
        ("release_memory_occupation", {"tags": None}),
        ("resume_memory_occupation", {"tags": ["weights"]}),
        ("resume_memory_occupation", {"tags": None}),
        ("flush_cache", {}),
        ("pause_generation", {"mode": "in_place"}),
        ("continue_generation", {}),
        ("pause_generation", {"mode": "abort"}),
        ("continue_generation", {}),
    ]
    await backend.shutdown()
    assert engine.names()[-1] == "shutdown"


async def test_sleep_and_wake_are_no_ops_without_the_memory_saver(make: Make) -> None:
    backend = await make()
    await backend.sleep(2)
    await backend.wake(None)
    assert fake(backend).calls == []


async def test_a_refused_flush_is_logged_not_raised(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    backend = await make()
    fake(backend).flush_result = SimpleNamespace(success=False, message="running requests")
    await backend.reset_prefix_cache()
    assert "flush_cache refused: running requests" in caplog.text


async def test_abort_reaches_every_sample_of_a_request(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    engine.holding = True
    task = asyncio.create_task(backend.generate(req("r-abort", n=3)))
    await until(lambda: bool(engine.of("async_generate")))
    await backend.abort("r-abort")
    assert [kw["rid"] for kw in engine.of("abort_request")] == ["r-abort", "r-abort_0", "r-abort_1", "r-abort_2"]
    engine.release_threadsafe()
    await task


async def test_pause_abort_ends_in_flight_requests_and_holds_new_ones(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    engine.holding = True
    running = asyncio.create_task(backend.generate(req("r-run")))
    await until(lambda: len(engine.of("async_generate")) == 1)
    await backend.pause("abort")
    (choice,) = (await running).choices
    assert choice.finish_reason == "abort" and len(choice.token_ids) == len(choice.logprobs) == 2
    late = asyncio.create_task(backend.generate(req("r-late")))
    await asyncio.sleep(0.1)
    assert not late.done() and len(engine.of("async_generate")) == 1  # held before SGLang
    await backend.resume()
    (choice,) = (await late).choices
    assert choice.finish_reason == "length"


async def test_pause_keep_freezes_in_flight_requests_until_resume(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    engine.holding = True
    running = asyncio.create_task(backend.generate(req("r-keep")))
    await until(lambda: len(engine.of("async_generate")) == 1)
    await backend.pause("keep")
    assert engine.of("pause_generation") == [{"mode": "in_place"}]
    await asyncio.sleep(0.05)
    assert not running.done()
    await backend.resume()
    (choice,) = (await running).choices
    assert choice.finish_reason == "length" and len(choice.token_ids) == 5


async def test_pause_wait_drains_in_flight_requests(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    engine.holding = True
    running = asyncio.create_task(backend.generate(req("r-wait")))
    await until(lambda: len(engine.of("async_generate")) == 1)
    pausing = asyncio.create_task(backend.pause("wait"))
    await asyncio.sleep(0.05)
    assert not pausing.done()  # waits for the running request
    engine.release_threadsafe()
    await pausing
    assert (await running).choices[0].finish_reason == "length"
    assert engine.of("pause_generation") == []  # drained here, SGLang not paused
    late = asyncio.create_task(backend.generate(req("r-after")))
    await asyncio.sleep(0.05)
    assert not late.done()
    await backend.resume()
    await late
    assert engine.of("continue_generation") == []


async def test_a_pause_right_after_resume_still_holds_waiting_requests(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    await backend.pause("keep")
    late = asyncio.create_task(backend.generate(req("r-late")))
    await asyncio.sleep(0.05)
    await backend.resume()
    await backend.pause("wait")  # before the waiting request got to run
    await asyncio.sleep(0.05)
    assert not late.done() and engine.of("async_generate") == []
    await backend.resume()
    await late


async def test_generate_after_shutdown_is_an_error(make: Make) -> None:
    backend = await make()
    await backend.shutdown()
    with pytest.raises(BackendError, match="not started"):
        await backend.generate(req())
    await backend.shutdown()  # idempotent


# -- weights ----------------------------------------------------------------------------------
class Tensor:
    """Enough of a torch tensor for the byte count (importing torch is slow on small machines)."""

    def __init__(self, *shape: int) -> None:
        self.shape = shape

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def element_size(self) -> int:
        return 4


async def test_load_weights_sets_the_version_the_next_tokens_carry(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    state = {"model.norm.weight": Tensor(4), "lm_head.weight": np.zeros((2, 4), np.float32)}
    report = await backend.load_weights_from_tensor(state, version=7, flush_cache=False)
    assert report["weight_version"] == 7 and report["num_tensors"] == 2 and report["bytes"] == (4 + 8) * 4
    (call,) = engine.of("update_weights_from_tensor")
    assert [name for name, _ in call["named_tensors"]] == ["model.norm.weight", "lm_head.weight"]
    assert call["flush_cache"] is False and call["load_format"] is None
    (choice,) = (await backend.generate(req())).choices
    assert choice.weight_version == 7 and choice.weight_versions == [7] * 5
    assert (await backend.backend_stats())["weight_version"] == 7
    await backend.load_weights_from_tensor([("lm_head.weight", Tensor(2, 4))])  # no version: previous + 1
    assert backend.weight_version == 8


async def test_a_refused_weight_update_keeps_the_old_version(make: Make) -> None:
    backend = await make()
    fake(backend).update_result = (False, "shape mismatch")
    with pytest.raises(BackendError, match="shape mismatch"):
        await backend.load_weights_from_tensor([("w", [0.0])], version=1)
    assert backend.weight_version == 0


async def test_distributed_weight_transfer_calls(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    await backend.join_weight_update_group("10.0.0.1", 29500, rank_offset=1, world_size=2)
    assert engine.of("init_weights_update_group") == [
        {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2,
         "group_name": "weight_update_group", "backend": "nccl"}
    ]  # fmt: skip
    report = await backend.load_weights_from_distributed(
        ["a", "b"], ["torch.bfloat16", "float32"], [(2, 3), [4]], version="v2"
    )
    assert report["weight_version"] == "v2" and backend.weight_version == "v2"
    (call,) = engine.of("update_weights_from_distributed")
    assert call == {"names": ["a", "b"], "dtypes": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
                    "group_name": "weight_update_group", "flush_cache": True}  # fmt: skip


async def test_the_pools_native_protocol_maps_to_sglangs_distributed_update(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    with pytest.raises(RequestError, match="object_store"):  # only when the pool was configured for nccl
        await backend.init_weight_transfer({"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2})
    backend.weight_transfer = "nccl"
    init = {"master_address": "h", "master_port": 7, "rank_offset": 3, "world_size": 5, "group_name": "g"}
    await backend.init_weight_transfer(init)
    assert engine.of("init_weights_update_group") == [{**init, "backend": "nccl"}]
    await backend.start_weight_update()
    n = await backend.receive_weights({"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2, 2]]})
    assert n == 1 and backend.weight_version == 0  # labelled only when the update finishes
    (call,) = engine.of("update_weights_from_distributed")
    assert call["group_name"] == "g" and call["flush_cache"] is False and call["dtypes"] == ["bfloat16"]
    await backend.finish_weight_update("step-3")
    assert backend.weight_version == "step-3"
    (choice,) = (await backend.generate(req())).choices
    assert set(choice.weight_versions) == {"step-3"}


# -- SGLangEngineHandle: the control calls on the tokenizer manager -----------------------------
class Req:
    """Stands in for an ``io_struct`` request class: records its fields."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields


IO = SimpleNamespace(
    PauseGenerationReqInput=type("PauseGenerationReqInput", (Req,), {}),
    ContinueGenerationReqInput=type("ContinueGenerationReqInput", (Req,), {}),
    ReleaseMemoryOccupationReqInput=type("ReleaseMemoryOccupationReqInput", (Req,), {}),
    ResumeMemoryOccupationReqInput=type("ResumeMemoryOccupationReqInput", (Req,), {}),
    UpdateWeightsFromTensorReqInput=type("UpdateWeightsFromTensorReqInput", (Req,), {}),
    InitWeightsUpdateGroupReqInput=type("InitWeightsUpdateGroupReqInput", (Req,), {}),
    UpdateWeightsFromDistributedReqInput=type("UpdateWeightsFromDistributedReqInput", (Req,), {}),
)


class FakeTokenizerManager:
    """The tokenizer-manager coroutines (recent SGLang: request objects as arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.calls.append(("abort_request", rid))

    async def pause_generation(self, obj: Any) -> None:
        self.calls.append(("pause_generation", obj))

    async def continue_generation(self, obj: Any) -> None:
        self.calls.append(("continue_generation", obj))

    async def flush_cache(self) -> Any:
        self.calls.append(("flush_cache", None))
        return SimpleNamespace(success=True)

    async def release_memory_occupation(self, obj: Any, request: Any) -> None:
        self.calls.append(("release_memory_occupation", obj))

    async def resume_memory_occupation(self, obj: Any, request: Any) -> None:
        self.calls.append(("resume_memory_occupation", obj))

    async def update_weights_from_tensor(self, obj: Any, request: Any) -> Any:
        self.calls.append(("update_weights_from_tensor", obj))
        return True, "ok"


class OldTokenizerManager(FakeTokenizerManager):
    """SGLang <= 0.5.5: pause/continue take no argument; pausing aborts everything."""

    async def pause_generation(self) -> None:  # type: ignore[override]
        self.calls.append(("pause_generation", None))

    async def continue_generation(self) -> None:  # type: ignore[override]
        self.calls.append(("continue_generation", None))


def handle(tm: FakeTokenizerManager, children: list[Any] | None = None) -> SGLangEngineHandle:
    engine = SimpleNamespace(
        tokenizer_manager=tm,
        _serialize_tensors_per_rank=lambda tensors, fmt: [("rank0", tuple(tensors), fmt)],
        shutdown=lambda: tm.calls.append(("shutdown", None)),
    )
    return SGLangEngineHandle(engine, io=IO, children=children or [])


async def test_handle_awaits_the_tokenizer_manager() -> None:
    tm = FakeTokenizerManager()
    h = handle(tm)
    h.abort_request("r1")
    await h.pause_generation("in_place")
    await h.continue_generation()
    await h.flush_cache()
    await h.release_memory_occupation(["kv_cache"])
    await h.resume_memory_occupation(None)
    ok = await h.update_weights_from_tensor([("w", 1)], flush_cache=False)
    h.shutdown()
    names = [name for name, _ in tm.calls]
    assert names == ["abort_request", "pause_generation", "continue_generation", "flush_cache",
                     "release_memory_occupation", "resume_memory_occupation", "update_weights_from_tensor",
                     "shutdown"]  # fmt: skip
    objs = dict(tm.calls)
    assert objs["abort_request"] == "r1"
    assert objs["pause_generation"].fields == {"mode": "in_place"}
    assert objs["release_memory_occupation"].fields == {"tags": ["kv_cache"]}
    assert objs["resume_memory_occupation"].fields == {}
    assert objs["update_weights_from_tensor"].fields == {
        "serialized_named_tensors": [("rank0", (("w", 1),), None)],
        "load_format": None,
        "flush_cache": False,
    }
    assert ok == (True, "ok")


async def test_handle_on_an_sglang_without_pause_modes() -> None:
    tm = OldTokenizerManager()
    h = handle(tm)
    await h.pause_generation("abort")
    await h.continue_generation()
    assert tm.calls == [("pause_generation", None), ("continue_generation", None)]
    with pytest.raises(NotImplementedError):
        await h.pause_generation("in_place")


async def test_backend_falls_back_when_sglang_cannot_pause_in_place(make: Make) -> None:
    class OldEngine(FakeSGLEngine):
        async def pause_generation(self, mode: str) -> None:
            self._record("pause_generation", mode=mode)
            raise NotImplementedError("this SGLang version pauses only by aborting")

    backend = await make(factory=OldEngine)
    engine = fake(backend)
    engine.holding = True
    running = asyncio.create_task(backend.generate(req("r-old")))
    await until(lambda: len(engine.of("async_generate")) == 1)
    await backend.pause("abort")  # falls back to aborting each in-flight request
    assert [kw["rid"] for kw in engine.of("abort_request")] == ["r-old"]
    await backend.pause("keep")  # only holds new requests
    await backend.resume()
    assert engine.of("continue_generation") == []  # SGLang was never paused
    engine.release_threadsafe()
    await running


def test_handle_health_checks_the_engines_subprocesses() -> None:
    alive = SimpleNamespace(name="scheduler_0", pid=11, exitcode=None, is_alive=lambda: True)
    dead = SimpleNamespace(name="detokenizer", pid=12, exitcode=-9, is_alive=lambda: False)
    handle(FakeTokenizerManager(), [alive]).check_health()
    with pytest.raises(BackendError, match=r"detokenizer \(pid 12\) exited with code -9"):
        handle(FakeTokenizerManager(), [alive, dead]).check_health()


async def test_engine_actor_update_path_loads_chunks_then_labels(make: Make) -> None:
    backend = await make()
    engine = fake(backend)
    assert await backend.load_weights([("model.norm.weight", Tensor(4))]) == 1
    assert await backend.load_weights([("lm_head.weight", Tensor(2, 4))]) == 1
    assert backend.weight_version == 0  # not labelled until the whole update is in
    await backend.set_weight_version("step-3")
    assert len(engine.of("update_weights_from_tensor")) == 2
    (choice,) = (await backend.generate(req())).choices
    assert choice.weight_version == "step-3"
