"""A Python client for the HTTP ingress that mirrors the in-process Session API.

Code written against ``pool.session()`` switches to HTTP by swapping the object::

    pool = RemotePool("http://127.0.0.1:8000", api_key="...")
    async with pool.session() as s:                 # same calls as inferpool.Session
        out = await s.chat(messages, n=4, max_tokens=64)
        state = await s.state()                     # SessionState (tokens, masks, logprobs)
    await pool.close()

Responses are the same ``ChatCompletion`` / ``Completion`` models; error responses come
back as the same inferpool error types (``SessionNotFoundError``, ``RequestError``, ...).
Every request has a timeout (aiohttp ``ClientTimeout``).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import aiohttp

from inferpool.errors import EngineDeadError, EngineTimeoutError
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.reasoning import ReasoningConfig
from inferpool.sequences import SessionState, state_from_dict

from .errors import error_from_response


def _body(
    n: int,
    sampling: dict[str, Any],
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    reasoning: ReasoningConfig | dict[str, Any] | None = None,
    skip_reasoning: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    split: str = "train",
) -> dict[str, Any]:
    body: dict[str, Any] = {"n": n, **{k: v for k, v in sampling.items() if v is not None}}
    if tools is not None:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if reasoning is not None:
        body["reasoning"] = (
            reasoning.model_dump(exclude_none=True) if isinstance(reasoning, ReasoningConfig) else dict(reasoning)
        )
    if skip_reasoning:
        body["skip_reasoning"] = True
    if chat_template_kwargs is not None:
        body["chat_template_kwargs"] = chat_template_kwargs
    if split != "train":
        body["split"] = split
    return body


class RemotePool:
    """The ingress at ``base_url`` (its root, e.g. ``http://host:8000``)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._http

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """One HTTP call; error responses raise the inferpool error they stand for."""
        try:
            async with self._client().request(method, f"{self.base_url}{path}", json=json) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = await resp.text()
                if resp.status >= 400:
                    raise error_from_response(resp.status, data)
                return data
        except asyncio.TimeoutError:
            raise EngineTimeoutError(
                f"ingress {self.base_url}: no answer to {method} {path} within {self.timeout_s}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise EngineDeadError(f"ingress {self.base_url}: {method} {path} failed: {exc}") from exc

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> RemotePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- stateless ---------------------------------------------------------------------------
    async def chat(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> ChatCompletion:
        return await self._chat("/v1/chat/completions", messages, n, kwargs)

    async def complete(self, prompt: str, n: int = 1, **kwargs: Any) -> Completion:
        return await self._complete("/v1/completions", prompt, n, kwargs)

    async def _chat(self, path: str, messages: list[dict[str, Any]], n: int, kwargs: dict[str, Any]) -> ChatCompletion:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _CHAT_OPTIONS}
        body = {"messages": messages, **_body(n, kwargs, **options)}
        return ChatCompletion(**await self.request("POST", path, body))

    async def _complete(self, path: str, prompt: str, n: int, kwargs: dict[str, Any]) -> Completion:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in ("skip_reasoning", "split")}
        body = {"prompt": prompt, **_body(n, kwargs, **options)}
        return Completion(**await self.request("POST", path, body))

    async def models(self) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", "/v1/models")
        return out

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = await self.request("GET", "/health")
        return out

    # -- sessions ----------------------------------------------------------------------------
    def session(
        self, track_tree: bool = False, *, tool_parser: str = "hermes", session_id: str | None = None
    ) -> RemoteSession:
        """A managed session (created on first use, like ``pool.session()``)."""
        return RemoteSession(self, track_tree=track_tree, tool_parser=tool_parser, session_id=session_id)

    def attach(self, session_id: str) -> RemoteSession:
        """A handle on a session that already exists (never creates one)."""
        return RemoteSession(self, session_id=session_id, created=True)

    async def list_sessions(self) -> list[dict[str, Any]]:
        out = await self.request("GET", "/sessions")
        return list(out["data"])


_CHAT_OPTIONS = frozenset({"tools", "tool_choice", "reasoning", "skip_reasoning", "chat_template_kwargs", "split"})


class RemoteSession:
    """A session behind the ingress, with the calls of :class:`inferpool.Session`.

    ``session_id=`` with ``created=True`` addresses a session that already exists.
    """

    def __init__(
        self,
        pool: RemotePool,
        *,
        track_tree: bool = False,
        tool_parser: str = "hermes",
        session_id: str | None = None,
        created: bool = False,
    ) -> None:
        self.pool = pool
        self.session_id = session_id
        self.track_tree = track_tree
        self.tool_parser = tool_parser
        self._created = created
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of this session (for ``openai.AsyncOpenAI(base_url=...)``)."""
        return f"{self.pool.base_url}/sessions/{self.session_id}/v1"

    async def _ensure_created(self) -> str:
        async with self._lock:
            if not self._created:
                body: dict[str, Any] = {"track_tree": self.track_tree, "tool_parser": self.tool_parser}
                if self.session_id is not None:
                    body["session_id"] = self.session_id
                out = await self.pool.request("POST", "/sessions", body)
                self.session_id = out["session_id"]
                self._created = True
        assert self.session_id is not None
        return self.session_id

    async def chat(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> ChatCompletion:
        """One chat turn; same arguments as ``Session.chat``."""
        sid = await self._ensure_created()
        return await self.pool._chat(f"/sessions/{sid}/v1/chat/completions", messages, n, kwargs)

    async def complete(self, prompt: str, n: int = 1, **kwargs: Any) -> Completion:
        """One completion turn; same arguments as ``Session.complete``."""
        sid = await self._ensure_created()
        return await self.pool._complete(f"/sessions/{sid}/v1/completions", prompt, n, kwargs)

    async def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        reasoning: ReasoningConfig | dict[str, Any] | None = None,
        skip_reasoning: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        extends: str | None = None,
        continue_final_message: bool = False,
    ) -> dict[str, Any]:
        """The prompt text and token ids a chat call would send now (nothing generated)."""
        sid = await self._ensure_created()
        options = _body(
            1,
            {"extends": extends, "continue_final_message": continue_final_message or None},
            tools=tools,
            reasoning=reasoning,
            skip_reasoning=skip_reasoning,
            chat_template_kwargs=chat_template_kwargs,
        )
        options.pop("n")
        body = {"messages": messages, **options}
        out: dict[str, Any] = await self.pool.request("POST", f"/sessions/{sid}/render", body)
        return out

    async def state(self) -> SessionState:
        """The session's sequences (token ids, masks, logprobs, metadata)."""
        sid = await self._ensure_created()
        return state_from_dict(await self.pool.request("GET", f"/sessions/{sid}/nodes"))

    async def reset(self) -> None:
        sid = await self._ensure_created()
        await self.pool.request("POST", f"/sessions/{sid}/reset")

    async def abort(self) -> int:
        """Abort the session's in-flight requests (a running turn ends with finish reason 'abort')."""
        sid = await self._ensure_created()
        out: dict[str, Any] = await self.pool.request("POST", f"/sessions/{sid}/abort")
        return int(out["aborted"])

    async def close(self) -> None:
        """Forget the session and its state."""
        if self._created and self.session_id is not None:
            await self.pool.request("DELETE", f"/sessions/{self.session_id}")
        self._created = False

    async def __aenter__(self) -> RemoteSession:
        await self._ensure_created()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"RemoteSession({self.session_id!r}, {self.pool.base_url!r})"
