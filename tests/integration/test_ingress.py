"""The HTTP ingress on real Ray Serve (127.0.0.1) over real vLLM CPU engines, driven by
the official ``openai`` client: chat, completions, n=3, streaming, a per-session base URL
over three turns with token-exact state, the Python RemoteSession, auth, error shapes.

Run: pytest tests/integration/test_ingress.py
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import inferpool as ip
from inferpool.deploy.app import build_app, run_app
from inferpool.deploy.client import RemotePool

pytestmark = pytest.mark.integration

API_KEY = "sk-it-ingress"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base(vllm_pool: ip.Pool) -> Iterator[str]:
    """Serve on a free port: the ingress at / (auth off) and at /auth (bearer auth on)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app(build_app(pool=vllm_pool), name="it-ingress", route_prefix="/", timeout_s=180)
        run_app(build_app(pool=vllm_pool, api_key=API_KEY), name="it-ingress-auth", route_prefix="/auth", timeout_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


def _extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {})[name]


async def test_openai_client_chat_completions_and_streaming(base: str) -> None:
    client = _client(f"{base}/v1")
    models = await client.models.list()
    model = models.data[0].id
    out = await client.chat.completions.create(model=model, messages=MSGS, n=3, max_tokens=8, seed=1)  # type: ignore[arg-type]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage is not None
    assert out.usage.completion_tokens == sum(len(_extra(c, "token_ids")) for c in out.choices)
    for c in out.choices:
        ids, lps = _extra(c, "token_ids"), _extra(c, "token_logprobs")
        assert 1 <= len(ids) == len(lps) <= 8 and all(lp <= 0 for lp in lps)

    done = await client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=2, seed=2)
    assert [c.index for c in done.choices] == [0, 1] and all(_extra(c, "token_ids") for c in done.choices)
    assert done.usage is not None and done.usage.prompt_tokens == len(_extra(done, "prompt_token_ids"))

    # Streaming: the same greedy completion, as chunks, ending with a usage chunk and [DONE].
    plain = await client.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(
        model=model,
        messages=MSGS,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert text == (plain.choices[0].message.content or "")
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and plain.usage is not None and usage.total_tokens == plain.usage.total_tokens
    await client.close()


async def test_per_session_base_url_three_turns_token_exact(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        created = (await http.post("/sessions", json={})).json()
        sid, session_url = created["session_id"], created["base_url"]
        assert session_url == f"{base}/sessions/{sid}/v1"
        client = _client(session_url)
        messages: list[dict[str, Any]] = list(MSGS)
        turns = []
        for i in range(3):
            rendered = (await http.post(f"/sessions/{sid}/render", json={"messages": messages})).json()
            out = await client.chat.completions.create(model="any", messages=messages, max_tokens=10, seed=i)  # type: ignore[arg-type]
            assert _extra(out, "prompt_token_ids") == rendered["prompt_token_ids"]  # render == what was sent
            if turns:  # each turn extends the stored tokens of the previous one
                stored = turns[-1][0] + turns[-1][1]
                assert _extra(out, "prompt_token_ids")[: len(stored)] == stored
            turns.append((_extra(out, "prompt_token_ids"), _extra(out.choices[0], "token_ids")))
            reply = out.choices[0].message.content or ""
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Again, {i}."}]
        await client.close()

        state = (await http.get(f"/sessions/{sid}/nodes")).json()
        assert state["session_id"] == sid and state["turns"] == 3 and len(state["nodes"]) == 1
        node = state["nodes"][0]
        prompt, sampled = turns[-1]
        assert node["tokens"] == prompt + sampled
        assert len(node["tokens"]) == len(node["masked_tokens"]) == len(node["logprobs"])
        trainable = [i for i, m in enumerate(node["masked_tokens"]) if m != -100]
        expected = []
        for p, s in turns:  # exactly the sampled positions of the three turns are trainable
            expected += list(range(len(p), len(p) + len(s)))
        assert trainable == expected
        assert node["logprobs"][-len(sampled) :] == pytest.approx(_extra(out.choices[0], "token_logprobs"))
        assert (await http.delete(f"/sessions/{sid}")).status_code == 200
        missing = await http.get(f"/sessions/{sid}/nodes")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"


async def test_the_openai_client_sends_the_node_id_back_and_continues_that_choice(base: str) -> None:
    """Continuing choice 1 by appending the returned message object as it is (what agent code
    written against the openai client does): its node_id survives the round trip, and the
    next turn extends exactly choice 1's sequence."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        created = (await http.post("/sessions", json={})).json()
        client = _client(created["base_url"])
        messages: list[Any] = list(MSGS)
        first = await client.chat.completions.create(model="m", messages=messages, n=3, max_tokens=8, seed=5)  # type: ignore[arg-type]
        chosen = first.choices[1].message
        node_id = _extra(chosen, "node_id")
        assert node_id and len({_extra(c.message, "node_id") for c in first.choices}) == 3
        messages += [chosen, {"role": "user", "content": "And then?"}]
        second = await client.chat.completions.create(model="m", messages=messages, max_tokens=6, seed=6)  # type: ignore[arg-type]
        state = (await http.get(f"/sessions/{created['session_id']}/nodes")).json()
        by_id = {n["node_id"]: n for n in state["nodes"]}
        child = by_id[_extra(second.choices[0].message, "node_id")]
        assert child["parent_id"] == node_id
        assert "ambiguous_parent" not in child["metadata"]
        stored = _extra(first, "prompt_token_ids") + _extra(first.choices[1], "token_ids")
        assert _extra(second, "prompt_token_ids")[: len(stored)] == stored
        await client.close()


async def test_remote_session_round_trip(base: str) -> None:
    async with RemotePool(base, timeout_s=120) as pool, pool.session() as s:
        first = await s.chat(MSGS, n=2, max_tokens=6, seed=5)
        assert isinstance(first, ip.ChatCompletion) and len(first.choices) == 2
        reply = {"role": "assistant", "content": first.choices[1].message.content}
        msgs = [*MSGS, reply, {"role": "user", "content": "ok"}]
        second = await s.chat(msgs, max_tokens=6, seed=6)
        state = await s.state()
        node = next(n for n in state.nodes if len(n.tokens) > len(second.prompt_token_ids))
        assert node.tokens == (second.prompt_token_ids or []) + second.choices[0].token_ids
        assert node.masked_tokens[-len(second.choices[0].token_ids) :] == second.choices[0].token_ids


async def test_auth_and_error_shapes_with_the_openai_client(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        assert (await http.get("/auth/health")).status_code == 200  # /health needs no key
    with pytest.raises(openai.AuthenticationError) as denied:
        await _client(f"{base}/auth/v1", "wrong").models.list()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    authed = _client(f"{base}/auth/v1", API_KEY)
    out = await authed.chat.completions.create(model="m", messages=MSGS, max_tokens=3)  # type: ignore[arg-type]
    assert out.choices[0].finish_reason in ("stop", "length")
    await authed.close()

    client = _client(f"{base}/v1")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="m", messages=MSGS, extra_body={"bogus_field": 1})  # type: ignore[arg-type]
    assert bad.value.code == "unknown_parameter" and bad.value.param == "bogus_field"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="m", messages=MSGS, top_p=7.0)  # type: ignore[arg-type]
    assert bad.value.param == "top_p" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        await _client(f"{base}/sessions/00ff00ff/v1").chat.completions.create(model="m", messages=MSGS)  # type: ignore[arg-type]
    assert missing.value.code == "session_not_found"
    await client.close()
