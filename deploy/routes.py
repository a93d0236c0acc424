"""The FastAPI application of the ingress: OpenAI-compatible routes and session routes.

``create_app(gateway, api_key)`` builds the app; the Serve deployment in
:mod:`inferpool.deploy.app` serves it, and tests can drive it in-process.

Routes (all but ``/health`` need ``Authorization: Bearer <key>`` when a key is set;
that includes ``/docs`` and ``/openapi.json``)::

    GET    /health                                  200 when the pool has a healthy engine, else 503
    GET    /v1/models
    POST   /v1/chat/completions                     stateless chat (stream: true -> SSE)
    POST   /v1/completions                          stateless completion (stream: true -> SSE)
    POST   /sessions                                create: {"session_id", "base_url"} (201)
    GET    /sessions                                list open sessions
    GET    /sessions/{id}/v1/models
    POST   /sessions/{id}/v1/chat/completions       one token-exact session turn
    POST   /sessions/{id}/v1/completions
    POST   /sessions/{id}/render                    prompt text + ids a chat call would send now
    GET    /sessions/{id}/nodes                     the session's sequences (tokens, masks, logprobs)
    POST   /sessions/{id}/reset                     drop the sequences, keep the session
    DELETE /sessions/{id}

Streaming: the completion is generated in full, then sent as server-sent events in
OpenAI's chunk format (per choice: a role chunk, content / reasoning / tool-call
chunks, a finish chunk carrying ``token_ids`` and ``token_logprobs``; a usage chunk
when ``stream_options.include_usage``; then ``data: [DONE]``). Errors are never
streamed: they come back as ordinary JSON error responses before the stream starts.

Validation errors are answered with 400 (not FastAPI's 422) in the OpenAI error shape;
see :mod:`inferpool.deploy.errors` for every status code.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from inferpool.openai_types import ChatCompletion, Completion

from .errors import describe, error_body, validation_error_body
from .gateway import PoolGateway
from .schemas import ChatCompletionRequest, CompletionRequest, RenderRequest, SessionCreateRequest

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})


# -- auth --------------------------------------------------------------------------------
class BearerAuth:
    """ASGI middleware: every path but ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._route(scope) in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error_body(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                "invalid_api_key",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    @staticmethod
    def _route(scope: Scope) -> str:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        return path.rstrip("/") or "/"

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


# -- streaming ---------------------------------------------------------------------------
def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def chat_chunks(completion: ChatCompletion, include_usage: bool) -> Iterator[dict[str, Any]]:
    """A finished chat completion as OpenAI ``chat.completion.chunk`` objects."""
    base: dict[str, Any] = {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": completion.model,
    }
    if completion.session_id is not None:
        base["session_id"] = completion.session_id

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish, **extra}]}

    for n, choice in enumerate(completion.choices):
        msg = choice.message
        first = chunk(choice.index, {"role": "assistant", "content": ""})
        if n == 0:
            first["prompt_token_ids"] = completion.prompt_token_ids
        yield first
        if msg.reasoning_content:
            yield chunk(choice.index, {"reasoning_content": msg.reasoning_content})
        if msg.content:
            yield chunk(choice.index, {"content": msg.content})
        if msg.tool_calls:
            calls = [{"index": k, **call.model_dump(mode="json")} for k, call in enumerate(msg.tool_calls)]
            yield chunk(choice.index, {"tool_calls": calls})
        yield chunk(
            choice.index,
            {},
            choice.finish_reason,
            logprobs=choice.logprobs,
            token_ids=choice.token_ids,
            token_logprobs=choice.token_logprobs,
        )
    if include_usage:
        yield {**base, "choices": [], "usage": completion.usage.model_dump(mode="json")}


def completion_chunks(completion: Completion, include_usage: bool) -> Iterator[dict[str, Any]]:
    """A finished text completion as OpenAI streaming ``text_completion`` objects."""
    base: dict[str, Any] = {
        "id": completion.id,
        "object": "text_completion",
        "created": completion.created,
        "model": completion.model,
    }
    if completion.session_id is not None:
        base["session_id"] = completion.session_id
    for n, choice in enumerate(completion.choices):
        first = {**base, "choices": [{"index": choice.index, "text": choice.text, "finish_reason": None}]}
        if n == 0:
            first["prompt_token_ids"] = completion.prompt_token_ids
        yield first
        last = {
            "index": choice.index,
            "text": "",
            "finish_reason": choice.finish_reason,
            "logprobs": choice.logprobs,
            "token_ids": choice.token_ids,
            "token_logprobs": choice.token_logprobs,
        }
        yield {**base, "choices": [last]}
    if include_usage:
        yield {**base, "choices": [], "usage": completion.usage.model_dump(mode="json")}


def _stream(chunks: Iterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        for c in chunks:
            yield _sse(c)
        yield _sse("[DONE]")

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# -- the app -----------------------------------------------------------------------------
async def _answer(work: Callable[[], Awaitable[Any]], status: int = 200) -> Response:
    """Run a route's work; any exception becomes an OpenAI-shaped error response."""
    try:
        out = await work()
    except Exception as exc:
        code, body = describe(exc)
        if code >= 500:
            logger.warning("ingress: %d %s: %s", code, type(exc).__name__, exc)
        headers = {"Retry-After": "1"} if code == 503 else None
        return JSONResponse(body, status_code=code, headers=headers)
    if isinstance(out, Response):
        return out
    return JSONResponse(out, status_code=status)


def create_app(gateway: PoolGateway, api_key: str | None = None) -> FastAPI:
    """The ingress FastAPI app over one pool; ``api_key`` switches bearer auth on."""
    from inferpool import __version__

    app = FastAPI(
        title="inferpool ingress",
        version=__version__,
        description="OpenAI-compatible and token-exact session routes over an inferpool Pool.",
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, f"http_{exc.status_code}"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    # -- status
    @app.get("/health", tags=["status"], summary="Liveness: 200 with a healthy engine, else 503.")
    async def health() -> Response:
        return await _answer(gateway.health)

    @app.get("/v1/models", tags=["openai"], summary="The model the pool serves.")
    async def models() -> Response:
        return await _answer(gateway.models)

    # -- stateless OpenAI routes
    async def _chat(body: ChatCompletionRequest, session_id: str | None) -> Response:
        async def work() -> Any:
            completion = await gateway.chat(body, session_id)
            if body.stream:
                include = bool(body.stream_options and body.stream_options.include_usage)
                return _stream(chat_chunks(completion, include))
            return completion.model_dump(mode="json")

        return await _answer(work)

    async def _complete(body: CompletionRequest, session_id: str | None) -> Response:
        async def work() -> Any:
            completion = await gateway.complete(body, session_id)
            if body.stream:
                include = bool(body.stream_options and body.stream_options.include_usage)
                return _stream(completion_chunks(completion, include))
            return completion.model_dump(mode="json")

        return await _answer(work)

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat completion (stateless).")
    async def chat(body: ChatCompletionRequest) -> Response:
        return await _chat(body, None)

    @app.post("/v1/completions", tags=["openai"], summary="Text completion (stateless).")
    async def complete(body: CompletionRequest) -> Response:
        return await _complete(body, None)

    # -- sessions
    @app.post("/sessions", tags=["sessions"], status_code=201, summary="Create a managed session.")
    async def create_session(request: Request, body: SessionCreateRequest | None = None) -> Response:
        body = body or SessionCreateRequest()

        async def work() -> Any:
            sid = await gateway.create_session(body)
            return {
                "object": "session",
                "session_id": sid,
                "base_url": f"{str(request.base_url).rstrip('/')}/sessions/{sid}/v1",
                "track_tree": body.track_tree,
                "tool_parser": body.tool_parser,
            }

        return await _answer(work, status=201)

    @app.get("/sessions", tags=["sessions"], summary="List open sessions.")
    async def list_sessions() -> Response:
        async def work() -> Any:
            return {"object": "list", "data": await gateway.list_sessions()}

        return await _answer(work)

    @app.get("/sessions/{session_id}/v1/models", tags=["sessions"], summary="Models, under a session's base URL.")
    async def session_models(session_id: str) -> Response:
        async def work() -> Any:
            gateway.check_session_id(session_id)
            return await gateway.models()

        return await _answer(work)

    @app.post("/sessions/{session_id}/v1/chat/completions", tags=["sessions"], summary="One chat turn of a session.")
    async def session_chat(session_id: str, body: ChatCompletionRequest) -> Response:
        return await _chat(body, session_id)

    @app.post("/sessions/{session_id}/v1/completions", tags=["sessions"], summary="One completion turn of a session.")
    async def session_complete(session_id: str, body: CompletionRequest) -> Response:
        return await _complete(body, session_id)

    @app.post("/sessions/{session_id}/render", tags=["sessions"], summary="The prompt a chat call would send now.")
    async def render(session_id: str, body: RenderRequest) -> Response:
        return await _answer(lambda: gateway.render(session_id, body))

    @app.get("/sessions/{session_id}/nodes", tags=["sessions"], summary="The session's token-exact sequences.")
    async def nodes(session_id: str) -> Response:
        return await _answer(lambda: gateway.nodes(session_id))

    @app.post("/sessions/{session_id}/reset", tags=["sessions"], summary="Drop the sequences, keep the session.")
    async def reset(session_id: str) -> Response:
        async def work() -> Any:
            await gateway.reset(session_id)
            return {"object": "session", "session_id": session_id, "reset": True}

        return await _answer(work)

    @app.post("/sessions/{session_id}/abort", tags=["sessions"], summary="Abort the session's in-flight requests.")
    async def abort(session_id: str) -> Response:
        async def work() -> Any:
            return {"object": "session.abort", "session_id": session_id, "aborted": await gateway.abort(session_id)}

        return await _answer(work)

    @app.delete("/sessions/{session_id}", tags=["sessions"], summary="Close a session and forget its state.")
    async def delete(session_id: str) -> Response:
        async def work() -> Any:
            await gateway.delete(session_id)
            return {"object": "session.deleted", "id": session_id, "deleted": True}

        return await _answer(work)

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    return app
