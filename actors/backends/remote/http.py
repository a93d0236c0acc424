"""The shared core of the remote backends: one aiohttp session per engine, bearer auth,
bounded retries, cheap health checks and ``n`` handling.

Every wire format (``openai``, ``vllm_http``, ``sglang_http``, ``trl_http``; one module
each beside this one) subclasses :class:`RemoteBackend` and only says how to build a
request and read a response. Finish reasons are normalised by
:func:`inferpool.actors.backends.base.normalize_finish_reason`, as for every backend.

Retries. A call makes at most ``max_attempts`` HTTP attempts in all. Only retryable
faults are retried: connection errors, timeouts, 429 and 5xx. A ``Retry-After`` header
(seconds) on such a response sets the wait, capped at ``retry_after_max_s``; otherwise the
wait is exponential backoff with full jitter. Any other 4xx fails at once. Whatever the fault,
the caller gets a :class:`RemoteHTTPError` (not retryable: the attempt budget is spent
here, so the pool must not multiply it), chained ``from`` the last original exception.

``n``. Some servers answer one choice whatever ``n`` is. The first time a request with
``n > 1`` comes back with fewer choices, the engine remembers it and from then on sends
``n`` single requests (seed + i when a seed is given); the choices already returned are
kept. ``n == 1`` always sends exactly one request. Neither the config nor the caller's
request is modified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from typing import Any, ClassVar

import aiohttp
from pydantic import Field

from inferpool.actors.backends.base import BaseBackend
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, ConfigError, InferpoolError
from inferpool.types import Choice, GenerateRequest, GenerateResult
from inferpool.validation import ConfigModel

logger = logging.getLogger(__name__)

#: Reported when the server does not say (the server validates ids and lengths itself).
DEFAULT_VOCAB_SIZE = 1 << 31
DEFAULT_MAX_MODEL_LEN = 1 << 20


class RemoteOptions(ConfigModel):
    """Options of every remote backend, given as ``EngineConfig.engine_kwargs``."""

    max_attempts: int = Field(3, ge=1, description="HTTP attempts per call in all, retries included.")
    backoff_base_s: float = Field(0.5, ge=0.0, description="First backoff ceiling; doubles per retry.")
    backoff_max_s: float = Field(8.0, ge=0.0, description="Largest backoff ceiling (full jitter below it).")
    retry_after_max_s: float = Field(30.0, ge=0.0, description="Cap on a server's Retry-After wait.")
    health_timeout_s: float = Field(5.0, gt=0.0, description="Timeout of one health check request.")
    max_connections: int = Field(256, ge=1, description="Concurrent connections to the server.")
    vocab_size: int | None = Field(
        None, ge=1, description=f"Vocabulary size to report; None: {DEFAULT_VOCAB_SIZE} (server checks)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length to report; None: the server's if it says, else 2**20."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers on every call.")


class RemoteHTTPError(BackendError):
    """A remote call failed for good: a non-retryable status, or the attempts ran out.

    ``status`` is the last HTTP status (None for a connection error or a timeout).
    """

    retryable = False

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_http_error, (type(self), self.message, self.status, self.field))


def _rebuild_http_error(
    cls: type[RemoteHTTPError], message: str, status: int | None, field: str | None
) -> RemoteHTTPError:
    return cls(message, status=status, field=field)


class _RetryableStatus(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


_RETRYABLE_EXC = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; None when absent or not a number of seconds."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(0.0, seconds)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2**attempt)))


def server_message(text: str) -> str:
    """The error message of a response body (OpenAI, FastAPI or plain text), shortened."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])[:500]
    return text.strip()[:500]


def root_url(base_url: str) -> str:
    """The server root: ``base_url`` without a trailing slash and ``/v1``."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteBackend(BaseBackend):
    """Base of the HTTP backends: session, retries, health, ``n`` fan-out."""

    name = "remote"
    options_cls: ClassVar[type[RemoteOptions]] = RemoteOptions
    health_path: ClassVar[str] = "/health"

    def __init__(self, config: EngineConfig, engine_id: str) -> None:
        if not config.base_url:
            raise ConfigError(f"EngineConfig.base_url: backend {self.name} needs one", field="base_url")
        self.config = config
        self.engine_id = engine_id
        self.options: RemoteOptions = self.options_cls.parse(config.engine_kwargs)
        self.base_url = config.base_url.rstrip("/")
        self.root = root_url(config.base_url)
        self.session: aiohttp.ClientSession | None = None
        self.ignores_n: bool | None = None  # learnt from the first n > 1 response
        self._rng = random.Random()
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._aborted: set[str] = set()
        self.calls = 0
        self.attempts = 0

    # -- session ----------------------------------------------------------------------
    async def _open(self) -> aiohttp.ClientSession:
        """Create the session inside the running loop (once)."""
        if self.session is None or self.session.closed:
            headers = {"Accept": "application/json", **self.options.headers}
            if self.config.api_key:
                headers["Authorization"] = f"Bearer {self.config.api_key}"
            self.session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                connector=aiohttp.TCPConnector(limit=self.options.max_connections),
            )
        return self.session

    async def shutdown(self) -> None:
        if self.session is not None and not self.session.closed:
            await self.session.close()
        self.session = None

    # -- HTTP with retries --------------------------------------------------------------
    async def request_json(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None = None,
        *,
        attempts: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One logical call: at most ``attempts`` HTTP attempts; the decoded JSON body."""
        session = await self._open()
        budget = attempts or self.options.max_attempts
        extra: dict[str, Any] = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
        self.calls += 1
        last: BaseException | None = None
        status: int | None = None
        for attempt in range(budget):
            self.attempts += 1
            retry_after: float | None = None
            try:
                async with session.request(method, url, json=payload, **extra) as resp:
                    status = resp.status
                    text = await resp.text()
                    if status < 400:
                        return self._decode(url, status, text)
                    message = server_message(text)
                    if status != 429 and status < 500:
                        raise RemoteHTTPError(
                            f"{self.name} engine {self.engine_id}: {method} {url} -> HTTP {status}: {message}",
                            status=status,
                        )
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    raise _RetryableStatus(status, message, retry_after)
            except (_RetryableStatus, *_RETRYABLE_EXC) as exc:
                last = exc
                if not isinstance(exc, _RetryableStatus):
                    status = None
            if attempt + 1 < budget:
                if retry_after is not None:
                    delay = min(retry_after, self.options.retry_after_max_s)
                else:
                    delay = backoff_delay(attempt, self.options.backoff_base_s, self.options.backoff_max_s, self._rng)
                what = f"{self.name} engine {self.engine_id}: {method} {url}"
                logger.warning("%s failed (%s); retry %d in %.2fs", what, _describe(last), attempt + 1, delay)
                await asyncio.sleep(delay)
        raise RemoteHTTPError(
            f"{self.name} engine {self.engine_id}: {method} {url} failed after {budget} attempt(s): {_describe(last)}",
            status=status,
        ) from last

    def _decode(self, url: str, status: int, text: str) -> Any:
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise RemoteHTTPError(
                f"{self.name} engine {self.engine_id}: {url} answered non-JSON: {text[:200]!r}", status=status
            ) from exc

    async def post(self, url: str, payload: dict[str, Any]) -> Any:
        return await self.request_json("POST", url, payload)

    async def get(self, url: str, *, attempts: int | None = None, timeout: float | None = None) -> Any:
        return await self.request_json("GET", url, attempts=attempts, timeout=timeout)

    async def health(self) -> None:
        """One GET of the server's cheap endpoint (never a completion); raises if it fails."""
        await self.get(self.root + self.health_path, attempts=1, timeout=self.options.health_timeout_s)

    async def backend_stats(self) -> dict[str, Any]:
        return {"http_calls": self.calls, "http_attempts": self.attempts, "ignores_n": self.ignores_n}

    # -- generation with n handling ------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Serve a request; fan out when the server is known (or found) to ignore ``n``."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks[request.request_id] = task
        start = time.perf_counter()
        try:
            result = await self._generate_n(request)
        except asyncio.CancelledError:
            if request.request_id not in self._aborted:
                raise
            self._aborted.discard(request.request_id)
            aborted = [Choice(request.choice_offset + i, [], [], "abort") for i in range(request.sampling.n)]
            result = GenerateResult(request.request_id, list(request.prompt_token_ids), aborted, self.engine_id)
        finally:
            self._tasks.pop(request.request_id, None)
        result.elapsed_s = time.perf_counter() - start
        return result

    async def _generate_n(self, request: GenerateRequest) -> GenerateResult:
        n = request.sampling.n
        if n > 1 and self.ignores_n:
            return await self._fan_out(request, range(n), [])
        result = await self.generate_once(request)
        if n > 1:
            if len(result.choices) < n:
                if not self.ignores_n:
                    what = f"{self.name} engine {self.engine_id}"
                    logger.warning(
                        "%s ignores n (asked %d, got %d): fanning out from now on", what, n, len(result.choices)
                    )
                self.ignores_n = True
                kept = result.choices
                return await self._fan_out(request, range(len(kept), n), kept, result)
            self.ignores_n = False
        return result

    async def _fan_out(
        self, request: GenerateRequest, indices: range, kept: list[Choice], first: GenerateResult | None = None
    ) -> GenerateResult:
        """Single requests for choices ``indices`` (seed + i), merged after ``kept``."""
        sp = request.sampling
        subs = [
            dataclasses.replace(
                request,
                request_id=f"{request.request_id}-{i}",
                sampling=sp.model_copy(update={"n": 1, "seed": None if sp.seed is None else sp.seed + i}),
                choice_offset=request.choice_offset + i,
            )
            for i in indices
        ]
        results = await asyncio.gather(*(self.generate_once(s) for s in subs))
        choices = list(kept)
        for sub, res in zip(subs, results, strict=True):
            for c in res.choices[:1]:
                c.index = sub.choice_offset
                choices.append(c)
        prompt_ids = (first or results[0]).prompt_token_ids
        return GenerateResult(
            request_id=request.request_id, prompt_token_ids=prompt_ids, choices=choices, engine_id=self.engine_id
        )

    async def generate_once(self, request: GenerateRequest) -> GenerateResult:
        """One HTTP generate call carrying ``request`` as it is (``n`` included)."""
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        """Cancel the in-flight HTTP call; closing the connection aborts it on the server."""
        task = self._tasks.get(request_id)
        if task is not None:
            self._aborted.add(request_id)
            task.cancel()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt made"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, InferpoolError | _RetryableStatus):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
