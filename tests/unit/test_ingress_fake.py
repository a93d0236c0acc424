"""The HTTP ingress (deploy/) on real Ray Serve over fake engines: error shapes, auth,
streaming, the Python client, Serve-autoscaled engines, and a schema fuzz.

Run: pytest tests/unit/test_ingress_fake.py
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

import inferpool as ip
from inferpool.deploy.app import build_app, run_app
from inferpool.deploy.client import RemotePool
from inferpool.deploy.errors import describe, error_from_response
from inferpool.deploy.gateway import PoolGateway
from inferpool.deploy.routes import create_app
from inferpool.deploy.schemas import Effort

API_KEY = "sk-unit-test"
MSGS = [{"role": "user", "content": "hi"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(session_pool: ip.Pool) -> Iterator[str]:
    """Serve on 127.0.0.1: the ingress at / (no auth) and at /auth (bearer auth)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app(build_app(pool=session_pool), name="ingress-open", route_prefix="/", timeout_s=120)
        run_app(build_app(pool=session_pool, api_key=API_KEY), name="ingress-auth", route_prefix="/auth", timeout_s=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served, timeout=60) as client:
        yield client


def _error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# -- errors -------------------------------------------------------------------------------
def test_error_table_maps_every_inferpool_error() -> None:
    cases = [
        (ip.RequestError("x", field="top_p"), 400, "invalid_value"),
        (ip.ConfigError("x"), 400, "invalid_value"),
        (ip.SessionNotFoundError("x"), 404, "session_not_found"),
        (ip.SessionExpiredError("x"), 410, "session_expired"),
        (ip.SessionError("x"), 409, "session_conflict"),
        (ip.EngineOverloadedError("x"), 503, "engine_overloaded"),
        (ip.NoHealthyEngineError("x"), 503, "no_healthy_engine"),
        (ip.EngineTimeoutError("x"), 504, "engine_timeout"),
        (ip.EngineDeadError("x"), 502, "engine_dead"),
        (ip.BackendError("x"), 502, "backend_error"),
        (RuntimeError("boom"), 500, "internal_error"),
    ]
    for exc, status, code in cases:
        got_status, body = describe(exc)
        assert (got_status, body["error"]["code"]) == (status, code)
        if isinstance(exc, ip.InferpoolError):  # the client raises the same type back (bad input: RequestError)
            expected = ip.RequestError if isinstance(exc, ip.ConfigError) else type(exc)
            assert type(error_from_response(got_status, body)) is expected
    assert describe(ip.RequestError("x", field="top_p"))[1]["error"]["param"] == "top_p"


def test_effort_literal_matches_reasoning_efforts() -> None:
    from inferpool.reasoning import VALID_EFFORTS

    assert set(Effort.__args__) == set(VALID_EFFORTS)  # type: ignore[attr-defined]


def test_bad_bodies_get_400_in_openai_shape(http: httpx.Client) -> None:
    url = "/v1/chat/completions"
    _error(http.post(url, json={"messages": MSGS, "max_token": 5}), 400, "unknown_parameter", "max_token")
    _error(http.post(url, json={"messages": MSGS, "logit_bias": {"1": 2}}), 400, "unknown_parameter", "logit_bias")
    _error(http.post(url, json={"messages": []}), 400, "invalid_value", "messages")
    _error(http.post(url, json={"model": "m"}), 400, "invalid_value", "messages")
    _error(http.post(url, json={"messages": MSGS, "n": 0}), 400, "invalid_value", "n")
    _error(http.post(url, json={"messages": MSGS, "top_p": 1.5}), 400, "invalid_value", "top_p")
    _error(http.post(url, json={"messages": [{"role": "robot", "content": "x"}]}), 400, "invalid_value")
    _error(http.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json")
    _error(http.post(url, json={"messages": MSGS, "max_tokens": 10_000}), 400, "invalid_value", "max_tokens")
    _error(
        http.post(url, json={"messages": MSGS, "reasoning": {"effort": "high"}, "reasoning_effort": "low"}),
        400,
        param="reasoning_effort",
    )
    _error(http.post(url, json={"messages": MSGS, "reasoning_effort": "extreme"}), 400, param="reasoning_effort")
    _error(http.post(url, json={"messages": MSGS, "parallel_tool_calls": False}), 400, param="parallel_tool_calls")
    _error(http.post("/v1/completions", json={"prompt": ""}), 400, param="prompt")
    _error(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400, "unknown_parameter", "echo")
    _error(http.post("/sessions", json={"tool_parser": "nope"}), 400, param="tool_parser")
    _error(http.get("/v1/nothing-here"), 404)
    _error(http.delete("/v1/models"), 405)


def test_unknown_sessions_are_404_and_duplicates_409(http: httpx.Client) -> None:
    for sid in ("0123abcd", "not-hex", "f" * 65):
        _error(http.get(f"/sessions/{sid}/nodes"), 404, "session_not_found")
        _error(http.post(f"/sessions/{sid}/v1/chat/completions", json={"messages": MSGS}), 404, "session_not_found")
        _error(http.post(f"/sessions/{sid}/render", json={"messages": MSGS}), 404, "session_not_found")
        _error(http.post(f"/sessions/{sid}/abort"), 404, "session_not_found")
        _error(http.delete(f"/sessions/{sid}"), 404, "session_not_found")
    sid = http.post("/sessions", json={"session_id": "abc123"}).json()["session_id"]
    _error(http.post("/sessions", json={"session_id": sid}), 409, "session_conflict")
    assert http.delete(f"/sessions/{sid}").json()["deleted"] is True


def test_ignored_openai_fields_are_accepted(http: httpx.Client) -> None:
    body = {"messages": MSGS, "max_tokens": 3, "user": "u1", "metadata": {"a": "b"}, "store": False, "seed": 1}
    out = http.post("/v1/chat/completions", json=body)
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] >= 1


# -- auth ---------------------------------------------------------------------------------
def test_auth_on_every_route_but_health(http: httpx.Client) -> None:
    assert http.get("/auth/health").status_code == 200
    for method, path in (
        ("GET", "/auth/v1/models"),
        ("POST", "/auth/v1/chat/completions"),
        ("GET", "/auth/sessions"),
        ("GET", "/auth/openapi.json"),
    ):
        err = _error(http.request(method, path, json={"messages": MSGS}), 401, "invalid_api_key")
        assert err["type"] == "authentication_error"
        bad = http.request(method, path, json={"messages": MSGS}, headers={"Authorization": "Bearer wrong"})
        _error(bad, 401, "invalid_api_key")
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert http.get("/auth/v1/models", headers=good).status_code == 200
    created = http.post("/auth/sessions", json={}, headers=good)
    assert created.status_code == 201
    assert created.json()["base_url"].endswith(f"/auth/sessions/{created.json()['session_id']}/v1")
    out = http.post(f"{created.json()['base_url']}/chat/completions", json={"messages": MSGS}, headers=good)
    assert out.status_code == 200, out.text
    assert http.get("/v1/models").status_code == 200  # the other app has auth off


# -- streaming ----------------------------------------------------------------------------
def _sse(resp: httpx.Response) -> list[Any]:
    events = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_chat_ends_with_done_and_carries_tokens(http: httpx.Client) -> None:
    body = {"messages": MSGS, "n": 2, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(resp)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(ch["index"] for ch in finals) == [0, 1]
    assert all(1 <= len(ch["token_ids"]) <= 4 for ch in finals)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == sum(len(ch["token_ids"]) for ch in finals)
    resp = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True})
    chunks = _sse(resp)
    assert chunks[0]["object"] == "text_completion" and chunks[-1]["choices"][0]["finish_reason"] is not None


# -- client -------------------------------------------------------------------------------
async def test_remote_session_mirrors_the_session_api(served: str) -> None:
    async with RemotePool(served, timeout_s=60) as pool:
        assert (await pool.health())["status"] == "ok"
        async with pool.session() as s:
            out = await s.chat(MSGS, n=2, max_tokens=5, seed=3)
            assert isinstance(out, ip.ChatCompletion) and len(out.choices) == 2
            reply = {"role": "assistant", "content": out.choices[0].message.content}
            msgs = [*MSGS, reply, {"role": "user", "content": "more"}]
            rendered = await s.render(msgs)
            out2 = await s.chat(msgs, max_tokens=5)
            assert out2.prompt_token_ids == rendered["prompt_token_ids"]
            state = await s.state()
            node = next(n for n in state.nodes if n.tokens[: len(out2.prompt_token_ids)] == out2.prompt_token_ids)
            assert node.tokens == out2.prompt_token_ids + out2.choices[0].token_ids
            assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
            assert node.masked_tokens[-len(out2.choices[0].token_ids) :] == out2.choices[0].token_ids
            assert any(row["session_id"] == s.session_id for row in await pool.list_sessions())
            assert await s.abort() == 0  # nothing in flight
            sid = s.session_id
        with pytest.raises(ip.SessionNotFoundError):
            await pool.attach(sid).state()
        with pytest.raises(ip.RequestError) as err:
            await pool.chat(MSGS, top_p=2.0)
        assert err.value.field == "top_p"
        done = await pool.complete("hello", n=3, max_tokens=2)
        assert isinstance(done, ip.Completion) and [c.index for c in done.choices] == [0, 1, 2]


# -- config files and the Serve builder ----------------------------------------------------
def test_serve_yaml_and_cluster_yaml_are_valid() -> None:
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.serve.schema import ServeDeploySchema

    import inferpool.deploy
    from inferpool.deploy.app import ServeAppArgs
    from inferpool.deploy.autoscaling import POLICY_PATH

    here = Path(inferpool.deploy.__file__).parent
    serve_cfg = yaml.safe_load((here / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(serve_cfg)
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "inferpool.deploy.app:app_builder"
    pool_cfg = ServeAppArgs(**app["args"]).pool_config()
    assert pool_cfg.detached and pool_cfg.engines[0].replicas == 0  # Serve supplies the engines
    engine = next(d for d in app["deployments"] if d["name"] == "InferpoolEngine")["autoscaling_config"]
    assert engine["policy"]["policy_function"] == POLICY_PATH
    assert engine["min_replicas"] <= engine["max_replicas"]

    cluster = yaml.safe_load((here / "cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    assert any("inferpool[vllm]" in cmd for cmd in cluster["setup_commands"])
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]


def test_engine_policy_sizes_on_total_in_flight() -> None:
    from types import SimpleNamespace

    from inferpool.deploy.autoscaling import METRIC, engine_in_flight_policy

    config = SimpleNamespace(get_target_ongoing_requests=lambda: 4.0)
    ctx = SimpleNamespace(aggregated_metrics={METRIC: {"r1": 10.0, "r2": 6.0}}, target_num_replicas=2, config=config)
    assert engine_in_flight_policy(ctx) == (4.0, {})
    ctx.aggregated_metrics = {}  # nothing reported yet: keep the current target
    assert engine_in_flight_policy(ctx) == (2, {})


def test_app_builder_starts_a_detached_pool_and_serves_it(served: str, tiny_tokenizer_path: str) -> None:
    from ray import serve

    from inferpool.deploy.app import app_builder

    args = {"pool_name": "unit-builder", "backend": "fake", "model": tiny_tokenizer_path, "api_key": "b1"}
    app = app_builder(args)
    try:
        run_app(app, name="builder", route_prefix="/builder", timeout_s=120)
        assert httpx.get(f"{served}/builder/health", timeout=30).json()["healthy_engines"] == 1
        out = httpx.post(
            f"{served}/builder/v1/chat/completions",
            json={"messages": MSGS, "max_tokens": 2},
            headers={"Authorization": "Bearer b1"},
            timeout=60,
        )
        assert out.status_code == 200, out.text
        app_builder(args)  # the pool is running now: the builder connects instead of starting another
    finally:
        serve.delete("builder", _blocking=True)
        ip.Pool.connect("unit-builder").shutdown()


# -- autoscaling --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def autoscale_pool(ray_session: None, tiny_tokenizer_path: str) -> Iterator[ip.Pool]:
    """A pool whose engines all come from the Serve engine deployment (its group starts none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    group = ip.EngineConfig(
        backend="fake",
        tokenizer=tiny_tokenizer_path,
        engine_kwargs={"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "base_latency_s": 0.3},
    )
    config = ip.PoolConfig(
        name="unit-autoscale",
        engines=[group],
        router=ip.RouterConfig(acquire_timeout_s=30.0, health_interval_s=0.5),
        sessions=ip.SessionConfig(shards=1),
    )
    config = config.model_copy(update={"engines": [group.model_copy(update={"replicas": 0})]})
    pool = ip.Pool.start(config)
    yield pool
    pool.shutdown()


def _engines(pool: ip.Pool) -> list[str]:
    return sorted(i.engine_id for i in ray.get(pool._router.engine_infos.remote(), timeout=30))


async def _wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_serve_autoscales_engines_on_in_flight_requests(served: str, autoscale_pool: ip.Pool) -> None:
    from ray import serve

    from inferpool.deploy.engines import EngineReplica, engine_deployment_options

    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 2.0,
        "look_back_period_s": 1.0,
        "metrics_interval_s": 0.25,
    }
    options = engine_deployment_options(autoscale_pool.config.engines[0], autoscaling)
    app = EngineReplica.options(**options).bind("unit-autoscale", "inferpool", None, 0, 10.0)
    t0 = time.monotonic()
    run_app(app, name="engines-autoscale", route_prefix=None, timeout_s=120)
    try:
        await _wait_for("the first engine", lambda: len(_engines(autoscale_pool)) == 1, 60)
        first = _engines(autoscale_pool)[0]
        assert first.startswith("serve-")
        session = autoscale_pool.session()
        turn1 = await session.complete("hello there", max_tokens=4)

        stop = asyncio.Event()
        served_by: dict[str, int] = {}

        async def worker(i: int) -> None:
            while not stop.is_set():
                res = await autoscale_pool.generate([1, 2, 3, i], {"max_tokens": 2})
                served_by[res.engine_id] = served_by.get(res.engine_id, 0) + 1

        workers = [asyncio.ensure_future(worker(i)) for i in range(10)]
        try:
            await _wait_for("a second engine", lambda: len(_engines(autoscale_pool)) == 2, 60)
            second = next(e for e in _engines(autoscale_pool) if e != first)
            await _wait_for("traffic on the second engine", lambda: served_by.get(second, 0) >= 3, 30)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)  # every request succeeded
        t_up = time.monotonic() - t0

        await _wait_for("scale-down to one engine", lambda: len(_engines(autoscale_pool)) == 1, 60)
        # the session's next turn re-prefills its stored tokens on whichever engine is left
        turn2 = await session.complete("hello there" + turn1.choices[0].text + " and more", max_tokens=4)
        assert turn2.prompt_token_ids[: len(turn1.prompt_token_ids)] == turn1.prompt_token_ids
        state = await session.state()
        assert state.nodes[0].tokens == turn2.prompt_token_ids + turn2.choices[0].token_ids
        print(f"autoscaling: up + traffic in {t_up:.1f}s, down after {time.monotonic() - t0:.1f}s; {served_by}")
    finally:
        serve.delete("engines-autoscale", _blocking=True)
    await _wait_for("engines deregistered", lambda: _engines(autoscale_pool) == [], 30)


# -- fuzz ---------------------------------------------------------------------------------
try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra brings it; without it the fuzz is skipped, not the module
    schemathesis = None

_FUZZ_EXAMPLES = int(os.environ.get("INFERPOOL_FUZZ_EXAMPLES", "20"))  # per route; raise it for a deeper run

if schemathesis is not None:
    # The app the Serve replicas run, driven in-process; it connects to the session_pool
    # fixture's pool by name on its first request (loading the schema needs no pool).
    _fuzz_app = create_app(PoolGateway("unit-sessions", "inferpool"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app)

    @schema.parametrize()
    @settings(max_examples=_FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzz_no_server_errors(case: Any, session_pool: ip.Pool) -> None:
        response = case.call(timeout=120)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

else:

    def test_fuzz_no_server_errors() -> None:
        pytest.skip("schemathesis is not installed")


# -- CLI ----------------------------------------------------------------------------------
def test_inferpool_serve_cli_starts_serves_and_stops(tiny_tokenizer_path: str) -> None:
    """``inferpool serve`` in its own process (its own local Ray): base URL printed, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "inferpool.cli", "serve", "--backend", "fake", "--model", tiny_tokenizer_path]
    cmd += ["--port", str(port), "--api-key", "k1", "--name", "cli-test"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "inferpool serving pool" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines[-30:])
        # the URL line is whole: Ray's forwarded worker logs share this stdout and must not split it
        url = next(line for line in lines if "inferpool serving pool" in line).rstrip("\n").rsplit(" at ", 1)[1]
        assert url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        out = httpx.post(
            f"{url}/chat/completions",
            json={"messages": MSGS, "max_tokens": 3},
            headers={"Authorization": "Bearer k1"},
            timeout=60,
        )
        assert out.status_code == 200, out.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines[-30:])
