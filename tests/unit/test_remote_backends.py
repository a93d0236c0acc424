"""Remote backends against small aiohttp servers on 127.0.0.1 speaking each wire format.

Run: pytest tests/unit/test_remote_backends.py
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from inferpool.actors.backends import create_backend
from inferpool.actors.backends.base import normalize_finish_reason
from inferpool.actors.backends.fake import FakeBackend
from inferpool.actors.backends.remote.http import RemoteBackend, RemoteHTTPError
from inferpool.actors.backends.remote.openai_api import OpenAIBackend
from inferpool.actors.backends.remote.sglang_http import SGLangHTTPBackend
from inferpool.actors.backends.remote.trl_http import TRLHTTPBackend
from inferpool.actors.backends.remote.vllm_http import VLLMHTTPBackend
from inferpool.config import EngineConfig
from inferpool.errors import RequestError
from inferpool.types import GenerateRequest, SamplingParams

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.02}
OPENED: list[RemoteBackend] = []  # closed by the serve fixture


class Server:
    """An aiohttp server on a free loopback port that records every request."""

    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes
        self.hits: list[tuple[str, str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Server:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            body = await request.json() if request.can_read_body else None
            self.hits.append((request.method, request.path, body))
            return await handler(request)

        app = web.Application(middlewares=[record])
        for (method, path), handler in self.routes.items():
            app.router.add_route(method, path, handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def posts(self, path: str) -> list[Any]:
        return [body for method, p, body in self.hits if method == "POST" and p == path]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[tuple[str, str], Handler]], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(routes: dict[tuple[str, str], Handler]) -> Server:
        servers.append(await Server(routes).start())
        return servers[-1]

    yield start
    while OPENED:
        await OPENED.pop().shutdown()
    for s in servers:
        if s.runner is not None:
            await s.runner.cleanup()


def reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


def backend(cls: type[RemoteBackend], url: str, **fields: Any) -> Any:
    kwargs = {**FAST, **fields.pop("engine_kwargs", {})}
    OPENED.append(cls(EngineConfig(backend=cls.name, base_url=url, engine_kwargs=kwargs, **fields), "e0"))
    return OPENED[-1]


def req(n: int = 1, seed: int | None = 7, **sp: Any) -> GenerateRequest:
    return GenerateRequest("r1", [1, 2, 3], SamplingParams(n=n, seed=seed, max_tokens=3, **sp))


# -- vLLM's OpenAI server ---------------------------------------------------------------
def vllm_choice(index: int, ids: list[int], token_ids: bool = True) -> dict[str, Any]:
    lps = [-0.5 - 0.1 * t for t in ids]
    top = [{f"token_id:{t}": lp, "token_id:99": -0.1, "token_id:98": -9.0} for t, lp in zip(ids, lps, strict=True)]
    out = {
        "index": index,
        "text": "x",
        "finish_reason": "length",
        "stop_reason": None,
        "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps, "top_logprobs": top},
        "prompt_token_ids": [1, 2, 3],
    }
    if token_ids:
        out["token_ids"] = ids
    return out


async def vllm_completions(request: web.Request) -> web.Response:
    body = await request.json()
    with_ids = bool(body.get("return_token_ids"))
    choices = [vllm_choice(i, [10 + i, 20 + i, 30 + i], with_ids) for i in range(body.get("n", 1))]
    return web.json_response({"object": "text_completion", "choices": choices})


VLLM_MODELS = reply({"object": "list", "data": [{"id": "tiny", "max_model_len": 4096}]})


async def test_vllm_http_generates_token_ids_and_logprobs(serve: Any) -> None:
    srv = await serve({("GET", "/v1/models"): VLLM_MODELS, ("POST", "/v1/completions"): vllm_completions})
    be = backend(VLLMHTTPBackend, srv.url + "/v1")
    info = await be.start()
    assert (info.model, info.max_model_len, info.supports_tokens, info.supports_prompt_logprobs) == (
        "tiny",
        4096,
        True,
        True,
    )
    res = await be.generate(req(n=2, logprobs=1, stop_token_ids=[5]))
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[1].token_ids == [11, 21, 31]
    assert res.choices[1].logprobs == pytest.approx([-1.6, -2.6, -3.6])
    assert res.choices[0].finish_reason == "length"
    assert res.choices[0].top_logprobs == [{99: -0.1}] * 3  # top 1 of the k + 1 reported
    sent = srv.posts("/v1/completions")[0]
    assert sent["prompt"] == [1, 2, 3] and sent["n"] == 2 and sent["seed"] == 7
    assert sent["return_token_ids"] is True and sent["return_tokens_as_token_ids"] is True
    assert sent["stop_token_ids"] == [5] and sent["logprobs"] == 1 and sent["model"] == "tiny"
    await be.shutdown()


async def test_vllm_http_without_return_token_ids_reads_token_strings(serve: Any) -> None:
    async def old_server(request: web.Request) -> web.Response:
        return web.json_response({"choices": [vllm_choice(0, [4, 5, 6], token_ids=False)]})

    srv = await serve({("GET", "/v1/models"): VLLM_MODELS, ("POST", "/v1/completions"): old_server})
    be = backend(VLLMHTTPBackend, srv.url)
    await be.start()
    for _ in range(2):
        assert (await be.generate(req())).choices[0].token_ids == [4, 5, 6]
    first, second = srv.posts("/v1/completions")
    assert first["return_token_ids"] is True and "return_token_ids" not in second
    await be.shutdown()


async def test_vllm_http_prompt_logprobs_exactly_k(serve: Any) -> None:
    def pos(actual: int, rank_in: bool) -> dict[str, Any]:
        entries = {"50": {"logprob": -1.0, "rank": 1}, "51": {"logprob": -2.0, "rank": 2}}
        entries[str(actual)] = {"logprob": -1.5 if rank_in else -7.0, "rank": 2 if rank_in else 40}
        return entries

    plp = [None, pos(2, False), pos(3, True)]
    srv = await serve(
        {
            ("GET", "/v1/models"): VLLM_MODELS,
            ("POST", "/v1/completions"): reply({"choices": [{"index": 0, "prompt_logprobs": plp}]}),
        }
    )
    be = backend(VLLMHTTPBackend, srv.url)
    await be.start()
    out = await be.prompt_logprobs([1, 2, 3], 2)
    assert out.prompt_tokens == [1, 2, 3]
    assert out.prompt_topk_token_ids == [[], [50, 51], [50, 3]]
    assert out.prompt_topk_logprobs == [[], [-1.0, -2.0], [-1.0, -1.5]]
    assert srv.posts("/v1/completions")[0]["prompt_logprobs"] == 2
    with pytest.raises(RequestError):
        await be.prompt_logprobs([1, 2], 0)
    await be.shutdown()


# -- SGLang -----------------------------------------------------------------------------
def sglang_item(ids: list[int], finish: Any) -> dict[str, Any]:
    triples = [[-0.25 * (i + 1), t, None if i else "a"] for i, t in enumerate(ids)]
    tops = [[[-0.1, 77, None], [lp, t, None], [-8.0, 78, None]] for lp, t, _ in triples]
    meta = {"finish_reason": finish, "output_token_logprobs": triples, "output_top_logprobs": tops}
    return {"text": "abc", "output_ids": ids, "meta_info": meta}


async def sglang_generate(request: web.Request) -> web.Response:
    body = await request.json()
    if body.get("logprob_start_len") == 0:
        n_in = len(body["input_ids"])
        top = [None] + [[[-1.0, 60, "x"], [-3.0, 61, None], [-2.0, 62, None]] for _ in range(n_in - 1)]
        return web.json_response({"text": "", "meta_info": {"input_top_logprobs": top}})
    n = body["sampling_params"]["n"]
    items = [sglang_item([40, 41], {"type": "stop", "matched": 2})]
    items += [sglang_item([50, 51, 52], {"type": "length", "length": 3}) for _ in range(n - 1)]
    return web.json_response(items if n > 1 else items[0])


async def test_sglang_http_triples_and_dict_finish_reasons(serve: Any) -> None:
    srv = await serve(
        {
            ("GET", "/get_model_info"): reply({"model_path": "org/model"}),
            ("POST", "/generate"): sglang_generate,
            ("GET", "/health"): reply({}),
        }
    )
    be = backend(SGLangHTTPBackend, srv.url)
    info = await be.start()
    assert info.model == "org/model" and info.supports_prompt_logprobs
    res = await be.generate(req(n=2, logprobs=1, top_k=0))
    first, second = res.choices
    assert first.token_ids == [40, 41] and first.logprobs == [-0.25, -0.5]
    assert (first.finish_reason, first.stop_reason) == ("stop", 2)
    assert second.finish_reason == "length" and second.index == 1
    assert first.top_logprobs == [{77: -0.1}, {77: -0.1}]
    sent = srv.posts("/generate")[0]
    assert sent["input_ids"] == [1, 2, 3] and sent["return_logprob"] is True
    sp = sent["sampling_params"]
    assert (sp["max_new_tokens"], sp["n"], sp["top_k"], sp["sampling_seed"]) == (3, 2, -1, 7)
    one = await be.generate(req(n=1))  # a single object, not a list
    assert len(one.choices) == 1
    scores = await be.prompt_logprobs([1, 2, 3, 4], 2)
    assert scores.prompt_topk_token_ids == [[], [60, 62], [60, 62], [60, 62]]
    assert scores.prompt_topk_logprobs[0] == [] and scores.prompt_topk_logprobs[1] == [-1.0, -2.0]
    sent = srv.posts("/generate")[-1]
    assert (sent["logprob_start_len"], sent["top_logprobs_num"]) == (0, 2)
    await be.shutdown()


def test_finish_reasons_normalise_to_strings() -> None:
    assert normalize_finish_reason({"type": "length", "length": 16}) == "length"
    assert normalize_finish_reason({"type": "abort", "message": "x"}) == "abort"
    assert normalize_finish_reason(None, default="abort") == "abort"
    assert normalize_finish_reason("end_turn") == "stop" and normalize_finish_reason("max_tokens") == "length"


# -- TRL's vLLM server --------------------------------------------------------------------
class ByteTokenizer:
    """Stands in for a Hugging Face tokenizer: ids are code points."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(64 + i) for i in ids)


async def trl_generate(request: web.Request) -> web.Response:
    body = await request.json()
    n = body["n"]
    completions = [[7, 8, 9][: body["max_tokens"] - i] for i in range(n)]
    logprobs = [[-0.5] * len(c) for c in completions]
    return web.json_response(
        {"prompt_ids": [[1, 2, 3]] * len(body["prompts"]), "completion_ids": completions, "logprobs": logprobs}
    )


async def test_trl_http_text_prompts_and_token_ids_out(serve: Any) -> None:
    srv = await serve({("GET", "/health/"): reply({"status": "ok"}), ("POST", "/generate/"): trl_generate})
    be = TRLHTTPBackend(
        EngineConfig(backend="trl_http", base_url=srv.url, engine_kwargs=FAST), "e0", tokenizer=ByteTokenizer()
    )
    OPENED.append(be)
    info = await be.start()
    assert info.supports_tokens and not info.supports_prompt_logprobs and info.eos_token_id == 0
    res = await be.generate(req(n=2))
    assert [c.token_ids for c in res.choices] == [[7, 8, 9], [7, 8]]
    assert [c.finish_reason for c in res.choices] == ["length", "stop"]
    assert res.choices[0].logprobs == [-0.5] * 3 and res.prompt_token_ids == [1, 2, 3]
    sent = srv.posts("/generate/")[0]
    assert sent["prompts"] == ["ABC"] and sent["generation_kwargs"] == {"seed": 7}
    with pytest.raises(RequestError):
        await be.prompt_logprobs([1, 2], 1)
    await be.shutdown()


async def test_trl_http_token_id_prompts(serve: Any) -> None:
    srv = await serve({("GET", "/health/"): reply({"status": "ok"}), ("POST", "/generate/"): trl_generate})
    be = backend(TRLHTTPBackend, srv.url, engine_kwargs={"prompt_format": "token_ids"})
    await be.start()
    await be.generate(req())
    assert srv.posts("/generate/")[0]["prompts"] == [[1, 2, 3]]
    await be.shutdown()


# -- OpenAI-compatible APIs ---------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "end_turn"}],
        }
    )


async def test_openai_chat_completion_reasoning_and_no_tokens(serve: Any) -> None:
    srv = await serve(
        {
            ("GET", "/v1/models"): reply({"data": [{"id": "gpt-x"}]}),
            ("POST", "/v1/chat/completions"): chat_completions,
            ("POST", "/v1/completions"): reply({"choices": [{"index": 0, "text": "t", "finish_reason": None}]}),
        }
    )
    be = backend(OpenAIBackend, srv.url + "/v1", provider="openrouter", api_key="sk-test")
    info = await be.start()
    assert info.supports_tokens is False and info.model == "gpt-x"
    msgs = [{"role": "user", "content": "hello"}]
    out = await be.chat({"messages": msgs, "reasoning": {"effort": "high"}})
    assert out["choices"][0]["finish_reason"] == "stop" and out["model"] == "gpt-x"
    await be.chat({"messages": msgs, "reasoning": {"effort": "high"}, "skip_reasoning": True})
    first, skipped = srv.posts("/v1/chat/completions")
    assert first["reasoning"] == {"enabled": True, "effort": "high"}
    assert "skip_reasoning" not in skipped and "reasoning" not in skipped
    done = await be.completion({"prompt": "x", "skip_reasoning": False})
    assert done["choices"][0]["finish_reason"] == "stop"
    assert "skip_reasoning" not in srv.posts("/v1/completions")[0]
    with pytest.raises(RequestError, match="no token ids"):
        await be.generate(req())
    with pytest.raises(RequestError):
        await be.prompt_logprobs([1, 2], 1)
    await be.shutdown()


async def test_bearer_token_is_sent(serve: Any) -> None:
    async def models(request: web.Request) -> web.Response:
        ok = request.headers.get("Authorization") == "Bearer sk-1"
        return web.json_response(
            {"data": [{"id": "m"}]} if ok else {"error": {"message": "bad key"}}, status=200 if ok else 401
        )

    srv = await serve({("GET", "/v1/models"): models})
    await backend(OpenAIBackend, srv.url + "/v1", api_key="sk-1").start()
    with pytest.raises(RemoteHTTPError, match="bad key") as err:
        await backend(OpenAIBackend, srv.url + "/v1", api_key="wrong").start()
    assert err.value.status == 401


# -- faults -------------------------------------------------------------------------------
def flaky(statuses: list[int], headers: dict[str, str] | None = None) -> Handler:
    """Answer the given error statuses in turn, then succeed like vLLM."""
    left = list(statuses)

    async def handler(request: web.Request) -> web.StreamResponse:
        if left:
            status = left.pop(0)
            return web.json_response({"error": {"message": f"boom {status}"}}, status=status, headers=headers)
        return await vllm_completions(request)

    return handler


async def started_vllm(serve: Any, completions: Handler, **engine_kwargs: Any) -> tuple[Server, Any]:
    srv = await serve({("GET", "/v1/models"): VLLM_MODELS, ("POST", "/v1/completions"): completions})
    be = backend(VLLMHTTPBackend, srv.url, engine_kwargs=engine_kwargs)
    await be.start()
    return srv, be


async def test_two_500s_then_200_succeeds_in_three_attempts(serve: Any) -> None:
    srv, be = await started_vllm(serve, flaky([500, 502]))
    res = await be.generate(req())
    assert res.choices[0].token_ids == [10, 20, 30]
    assert len(srv.posts("/v1/completions")) == 3


async def test_400_is_not_retried_and_typed(serve: Any) -> None:
    srv, be = await started_vllm(serve, flaky([400]))
    with pytest.raises(RemoteHTTPError, match="boom 400") as err:
        await be.generate(req())
    assert err.value.status == 400 and err.value.retryable is False
    assert len(srv.posts("/v1/completions")) == 1
    restored = pickle.loads(pickle.dumps(err.value))
    assert isinstance(restored, RemoteHTTPError) and restored.status == 400


async def test_retries_are_bounded_and_chain_the_original(serve: Any) -> None:
    srv, be = await started_vllm(serve, flaky([503] * 10), max_attempts=3)
    with pytest.raises(RemoteHTTPError, match="3 attempt") as err:
        await be.generate(req())
    assert err.value.status == 503 and err.value.__cause__ is not None
    assert len(srv.posts("/v1/completions")) == 3


async def test_429_honours_retry_after_capped(serve: Any) -> None:
    srv, be = await started_vllm(serve, flaky([429], {"Retry-After": "0.3"}))
    t0 = time.perf_counter()
    await be.generate(req())
    assert time.perf_counter() - t0 >= 0.3
    assert len(srv.posts("/v1/completions")) == 2
    srv, be = await started_vllm(serve, flaky([429], {"Retry-After": "3600"}), retry_after_max_s=0.05)
    t0 = time.perf_counter()
    await be.generate(req())
    assert time.perf_counter() - t0 < 2.0


async def test_hang_times_out_bounded(serve: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    srv = await serve({("GET", "/v1/models"): VLLM_MODELS, ("POST", "/v1/completions"): hang})
    be = backend(VLLMHTTPBackend, srv.url, timeout=0.2, engine_kwargs={"max_attempts": 2})
    await be.start()
    t0 = time.perf_counter()
    with pytest.raises(RemoteHTTPError, match="timed out") as err:
        await be.generate(req())
    assert time.perf_counter() - t0 < 2.0 and err.value.status is None
    assert len(srv.posts("/v1/completions")) == 2
    await be.shutdown()


async def test_connection_refused_is_typed() -> None:
    be = backend(VLLMHTTPBackend, "http://127.0.0.1:9", engine_kwargs={"max_attempts": 2})
    with pytest.raises(RemoteHTTPError, match="2 attempt"):
        await be.start()
    assert be.attempts == 2
    await be.shutdown()


# -- n handling -----------------------------------------------------------------------------
async def one_choice(request: web.Request) -> web.Response:
    body = await request.json()
    seed = body.get("seed") or 0
    return web.json_response({"choices": [vllm_choice(0, [seed, seed + 1, seed + 2])]})


async def test_ignored_n_detected_once_then_fanned_out(serve: Any) -> None:
    srv, be = await started_vllm(serve, one_choice)
    config_kwargs = dict(be.config.engine_kwargs)
    request = req(n=3, seed=10)
    res = await be.generate(request)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert [c.token_ids[0] for c in res.choices] == [10, 11, 12]  # seed + i per choice
    assert [(b["n"], b["seed"]) for b in srv.posts("/v1/completions")] == [(3, 10), (1, 11), (1, 12)]
    assert be.ignores_n is True
    assert request.sampling.n == 3 and request.sampling.seed == 10  # caller's request untouched
    assert be.config.engine_kwargs == config_kwargs
    srv.hits.clear()
    again = await be.generate(req(n=3, seed=10))
    assert sorted((b["n"], b["seed"]) for b in srv.posts("/v1/completions")) == [(1, 10), (1, 11), (1, 12)]
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in res.choices]
    srv.hits.clear()
    await be.generate(req(n=1))
    assert len(srv.posts("/v1/completions")) == 1  # n == 1 is never duplicated


async def test_server_honouring_n_sends_one_request(serve: Any) -> None:
    srv, be = await started_vllm(serve, vllm_completions)
    res = await be.generate(req(n=4))
    assert len(res.choices) == 4 and len(srv.posts("/v1/completions")) == 1
    assert be.ignores_n is False


# -- health, abort, registry ------------------------------------------------------------------
async def test_health_uses_cheap_endpoints_only(serve: Any) -> None:
    ok = reply({})
    routes = {
        ("GET", "/health"): ok,
        ("GET", "/health/"): ok,
        ("GET", "/v1/models"): VLLM_MODELS,
        ("GET", "/get_model_info"): ok,
    }
    srv = await serve(routes)
    backends = [
        backend(VLLMHTTPBackend, srv.url + "/v1"),
        backend(SGLangHTTPBackend, srv.url),
        backend(TRLHTTPBackend, srv.url, engine_kwargs={"prompt_format": "token_ids"}),
        backend(OpenAIBackend, srv.url + "/v1"),
    ]
    srv.hits.clear()
    for be in backends:
        await be.health()
        await be.shutdown()
    assert [(m, p) for m, p, _ in srv.hits] == [
        ("GET", "/health"),
        ("GET", "/health"),
        ("GET", "/health/"),
        ("GET", "/v1/models"),
    ]


async def test_abort_cancels_the_call(serve: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    _srv, be = await started_vllm(serve, hang)
    task = asyncio.ensure_future(be.generate(req(n=2)))
    await asyncio.sleep(0.2)
    await be.abort("r1")
    res = await asyncio.wait_for(task, 5)
    assert [c.finish_reason for c in res.choices] == ["abort", "abort"]
    await be.shutdown()


def test_registry_builds_remote_backends() -> None:
    for name, cls in [
        ("openai", OpenAIBackend),
        ("vllm_http", VLLMHTTPBackend),
        ("sglang_http", SGLangHTTPBackend),
        ("trl_http", TRLHTTPBackend),
    ]:
        built = create_backend(EngineConfig(backend=name, base_url="http://h:1/v1"), "e")  # type: ignore[arg-type]
        assert type(built) is cls


async def test_fake_backend_cannot_score() -> None:
    with pytest.raises(RequestError):
        await FakeBackend(EngineConfig(backend="fake"), "f").prompt_logprobs([1, 2], 1)
