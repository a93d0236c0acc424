"""The ``sglang_http`` backend against a real SGLang server (GPU only).

Starts ``python -m sglang.launch_server`` on the locally built tiny model at 127.0.0.1,
generates token ids with logprobs and scores a prompt through the backend.

Run: .venv/bin/pytest tests/gpu/test_sglang_http_gpu.py -q
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("sglang", reason="needs SGLang installed (pip install 'inferpool[sglang]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from inferpool.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("sglang_http") / "tiny", seed=0)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--mem-fraction-static",
            "0.3",
            "--disable-cuda-graph",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"sglang server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("sglang server did not become healthy in 600 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_generate_and_score_over_http(server: str) -> None:
    import inferpool as ip
    from inferpool.actors.backends.remote.sglang_http import SGLangHTTPBackend
    from inferpool.types import GenerateRequest

    backend = SGLangHTTPBackend(ip.EngineConfig(backend="sglang_http", base_url=server), "gpu-http")
    await backend.start()
    try:
        res = await backend.generate(
            GenerateRequest("r1", [1018, 84, 709, 198], ip.SamplingParams(n=2, max_tokens=8, seed=1))
        )
        assert len(res.choices) == 2
        for c in res.choices:
            assert len(c.token_ids) == len(c.logprobs) >= 1 and all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
        scored = await backend.prompt_logprobs([1018, 84, 709, 198, 71], 3)
        assert scored.prompt_topk_token_ids[0] == [] and all(len(t) == 3 for t in scored.prompt_topk_token_ids[1:])
    finally:
        await backend.shutdown()
