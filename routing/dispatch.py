"""The caller side of routing: one :class:`Dispatcher` per process and pool.

``await dispatcher.generate(request)`` takes the request an engine takes and returns
what the engine returns, so the code above it cannot tell a pool from one engine:

    lease a slot (router) → call the engine actor → give the lease back

with everything around it in this one place: the lease's lifetime (acquired and given
back in :meth:`~inferpool.routing.lease_client.LeaseClient.lease`, a construct that cannot
be skipped: cancellation, timeouts, engine death and router restarts all pass through its
``finally``; router calls batched per event-loop turn), retry on another engine for
retryable faults, ``n`` split into sub-requests and merged, and abort tracking per
session. ``Pool``, the session stores and the HTTP ingress (through ``Pool``) all
dispatch through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import ray

from inferpool.config import PoolConfig
from inferpool.errors import InferpoolError, NoHealthyEngineError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref
from inferpool.routing.batching import LoopLocal
from inferpool.routing.channel import EngineChannel
from inferpool.routing.engines import EngineView
from inferpool.routing.lease_client import Held, LeaseClient, Prepare
from inferpool.routing.leases import Lease, LeaseAsk, LeaseReturn
from inferpool.routing.policy import policy_reads_prompt
from inferpool.routing.results import aborted_result, gather_all, merge_results, split_n
from inferpool.routing.shards import RouterSet
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, SamplingParams, Split
from inferpool.validation import check_request

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Dispatcher(LeaseClient):
    """Routes requests of one process to a pool's engines (see the module docstring)."""

    def __init__(self, routers: Any, config: PoolConfig, infos: Sequence[EngineInfo] = ()) -> None:
        """``routers``: the pool's router shards (a :class:`RouterSet`, a list, or one handle)."""
        super().__init__(RouterSet.of(routers), config)
        self.router = self.routers.primary
        self.engines = EngineView(self.routers, config, infos)
        # the router sees prompts only when its policy reads them (they grow with a conversation)
        self._route_prefix = config.router.route_prefix_tokens if policy_reads_prompt(config.router.policy) else 0
        # engine_id -> this process's batched generate traffic with it (RouterConfig.batch_engine_calls)
        self._channels: LoopLocal[dict[str, EngineChannel]] = LoopLocal(dict)
        # session_id -> {request_id: engine_id, or None while routing}: what abort_session reaches
        self._session_requests: dict[str, dict[str, str | None]] = defaultdict(dict)
        self._aborted: set[str] = set()  # request ids aborted before they reached an engine

    # -- requests --------------------------------------------------------------------------
    def request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def check(self, request: GenerateRequest, where: str = "") -> None:
        """Refuse what no engine of the pool can serve, before any engine sees it."""
        vocab, ctx = await self.engines.limits()
        request.prompt_token_ids = check_request(request.prompt_token_ids, request.sampling, vocab, ctx, where)

    async def submit(
        self,
        prompt_token_ids: Sequence[int] | Callable[[], Sequence[int]],
        sampling: SamplingParams,
        split: Split = "train",
        session_id: str | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """Build, check and serve one request (what a chat or completion turn sends).

        ``prompt_token_ids`` may be a function that makes them (a turn's render): unless the
        router's policy reads prompts or ``n`` is split, it runs while the lease ask is at the
        router, so the caller's render and the router's round trip overlap."""
        render = prompt_token_ids if callable(prompt_token_ids) else None
        if render is not None and (
            self._route_prefix or len(split_n(sampling.n, self.config.router.max_n_per_request)) > 1
        ):
            prompt_token_ids, render = render(), None
        prompt: Any = [] if render is not None else prompt_token_ids
        request = GenerateRequest(self.request_id(), prompt, sampling, split, session_id)  # type: ignore[arg-type]
        if render is None:
            await self.check(request)
            return await self.generate(request, timeout_s)

        async def prepare() -> None:
            assert render is not None
            request.prompt_token_ids = render()  # type: ignore[assignment]
            await self.check(request)

        return await self._tracked(request, timeout_s, prepare)

    def _ask(self, request: GenerateRequest, exclude: Sequence[str] = (), count: int = 1) -> LeaseAsk:
        return LeaseAsk(
            ticket=self._ticket(),
            split=request.split,
            session_id=request.session_id,
            prompt_token_ids=request.prompt_token_ids[: self._route_prefix] if self._route_prefix else None,
            exclude=tuple(exclude),
            workload=request.workload,
            count=count,
        )

    async def _on_engine(self, engine_id: str, call: Callable[[Any], ray.ObjectRef], timeout_s: float | None) -> Any:
        handle = await self.engines.handle(engine_id)
        timeout = timeout_s or self.engines.timeout_for(engine_id)
        return await await_ref(call(handle), timeout, f"engine {engine_id}")

    async def _generate_on(self, engine_id: str, request: GenerateRequest, timeout_s: float | None) -> GenerateResult:
        if not self.config.router.batch_engine_calls:
            result: GenerateResult = await self._on_engine(
                engine_id, lambda h: h.generate.remote(request, echo_prompt=False), timeout_s
            )
            return result.with_sent_prompt(request.prompt_token_ids)
        handle = await self.engines.handle(engine_id)
        channels = self._channels.get()
        channel = channels.get(engine_id)
        if channel is None or channel.handle is not handle:
            channel = channels[engine_id] = EngineChannel(engine_id, handle)
        return await channel.generate(request, timeout_s or self.engines.timeout_for(engine_id))

    def _warn_failover(self, request_id: str, engine_id: str, attempt: int, attempts: int, exc: Exception) -> None:
        self._warnings.warn(
            logger,
            f"engine {engine_id}",
            "request %s failed on engine %s (attempt %d/%d): %s; retrying elsewhere",
            *(request_id, engine_id, attempt, attempts, exc),
        )

    def _report_failure(self, engine_id: str, exc: Exception) -> None:
        self.routers.owner(engine_id).report_failure.remote(engine_id, str(exc))

    async def generate(self, request: GenerateRequest, timeout_s: float | None = None) -> GenerateResult:
        """Serve one (checked) request: ``n`` above ``RouterConfig.max_n_per_request`` is split
        into sub-requests, which may land on different engines, and merged with consecutive
        choice indices."""
        sp = request.sampling
        parts = split_n(sp.n, self.config.router.max_n_per_request)
        if len(parts) == 1:
            return await self._tracked(request, timeout_s)
        subs = [
            dataclasses.replace(
                request,
                request_id=f"{request.request_id}.{k}",
                sampling=sp.model_copy(update={"n": size}),
                choice_offset=request.choice_offset + offset,
            )
            for k, (offset, size) in enumerate(parts)
        ]
        results = await gather_all([self._tracked(r, timeout_s) for r in subs])
        return merge_results(request.request_id, results)

    async def _tracked(
        self, request: GenerateRequest, timeout_s: float | None, prepare: Prepare | None = None
    ) -> GenerateResult:
        """Attempts of one request, visible to abort_session while they run."""
        if request.session_id is None:
            return await self._attempts(request, timeout_s, prepare)
        tracked = self._session_requests[request.session_id]
        tracked[request.request_id] = None
        try:
            return await self._attempts(request, timeout_s, prepare)
        finally:
            tracked.pop(request.request_id, None)
            self._aborted.discard(request.request_id)
            if not tracked:
                self._session_requests.pop(request.session_id, None)

    async def _attempts(
        self, request: GenerateRequest, timeout_s: float | None, prepare: Prepare | None = None
    ) -> GenerateResult:
        """route → generate → release, retried on another engine for retryable faults
        (``prepare``: see :meth:`submit`)."""

        async def run(held: Held) -> GenerateResult:
            if request.request_id in self._aborted:  # aborted while it was being routed
                return aborted_result(request, held.engine_id)
            if request.session_id is not None:
                self._session_requests[request.session_id][request.request_id] = held.engine_id
            return await self._generate_on(held.engine_id, request, timeout_s)

        return await self._failover(request.request_id, lambda exclude: self._ask(request, exclude), run, prepare)

    async def _failover(
        self,
        what: str,
        ask: Callable[[Sequence[str]], LeaseAsk],
        run: Callable[[Held], Awaitable[T]],
        prepare: Prepare | None = None,
    ) -> T:
        """Lease an engine and ``run`` on it; a retryable fault is retried on another engine
        (at most ``RouterConfig.max_attempts`` in all) and the failed engine reported.
        ``prepare`` runs once, during the first lease ask."""
        exclude: list[str] = []
        attempts = self.config.router.max_attempts
        last_error: InferpoolError | None = None
        for attempt in range(1, attempts + 1):
            failed: InferpoolError | None = None
            try:
                async with self.lease(ask(exclude), prepare) as held:
                    prepare = None
                    held.attempts = attempt
                    try:
                        out = await run(held)
                    except InferpoolError as exc:
                        if not exc.retryable or attempt == attempts:
                            raise
                        failed = exc
                    else:
                        held.ok = True
                        return out
            except NoHealthyEngineError:
                if last_error is not None:  # no engine left to retry on: surface the original
                    raise last_error from None
                raise
            self._warn_failover(what, held.engine_id, attempt, attempts, failed)
            self._report_failure(held.engine_id, failed)
            exclude.append(held.engine_id)
            last_error = failed
        raise AssertionError("unreachable")

    async def generate_many(
        self, requests: Sequence[GenerateRequest], chunk_size: int = 64, timeout_s: float | None = None
    ) -> list[GenerateResult]:
        """Serve many (checked) requests of one split with few actor calls, results in order.

        Slots are leased in bulk and requests travel to each engine in chunks of up to
        ``chunk_size``; a request whose engine failed is retried alone elsewhere.
        """
        if not requests:
            return []
        results: list[GenerateResult | None] = [None] * len(requests)
        pending = list(range(len(requests)))[::-1]
        tasks: list[asyncio.Task[None]] = []
        async with contextlib.AsyncExitStack() as stack:
            try:
                while pending:
                    ask = self._ask(requests[pending[-1]], count=len(pending))
                    ask.session_id, ask.prompt_token_ids = None, None
                    held = await stack.enter_async_context(self.lease(ask))
                    by_engine: dict[str, list[Lease]] = defaultdict(list)
                    for lease in held.leases:
                        by_engine[lease.engine_id].append(lease)
                    for engine_id, group in by_engine.items():
                        for start in range(0, len(group), chunk_size):
                            chunk = group[start : start + chunk_size]
                            idx = [pending.pop() for _ in chunk]
                            run = self._run_chunk(held, engine_id, chunk, idx, requests, results, timeout_s)
                            tasks.append(asyncio.ensure_future(run))
                await gather_all(tasks)
            except BaseException:  # stop the engine calls before their leases are given back
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [r for r in results if r is not None]

    async def _run_chunk(
        self,
        held: Held,
        engine_id: str,
        leases: list[Lease],
        idx: list[int],
        requests: Sequence[GenerateRequest],
        results: list[GenerateResult | None],
        timeout_s: float | None,
    ) -> None:
        ok = False
        try:
            outs: list[Any] = await self._on_engine(
                engine_id, lambda h: h.generate_batch.remote([requests[i] for i in idx]), timeout_s
            )
            ok = True
        except InferpoolError as exc:
            if not exc.retryable:
                raise
            self._report_failure(engine_id, exc)
            outs = [exc] * len(idx)
        finally:  # these slots are free now; the batch's ticket is closed when the batch ends
            lease_ids = tuple(le.lease_id for le in leases)
            self._lease_calls[held.shard or 0].get().enqueue(LeaseReturn(held.ticket, lease_ids, ok))
        retry = []
        for i, out in zip(idx, outs, strict=True):
            if isinstance(out, GenerateResult):
                results[i] = out
            elif isinstance(out, InferpoolError) and out.retryable:
                retry.append(i)
            else:
                raise out
        if retry:
            redone = await gather_all([self._tracked(requests[i], timeout_s) for i in retry])
            for i, out in zip(retry, redone, strict=True):
                results[i] = out

    async def call(self, split: Split, call: Callable[[Any], ray.ObjectRef], timeout_s: float | None = None) -> Any:
        """One leased engine call other than generate (text-level calls, prompt scoring),
        retried on another engine for retryable faults like generate."""

        async def run(held: Held) -> Any:
            return await self._on_engine(held.engine_id, call, timeout_s)

        return await self._failover(
            self.request_id(), lambda exclude: LeaseAsk(self._ticket(), split, exclude=tuple(exclude)), run
        )

    # -- aborts ----------------------------------------------------------------------------
    def runs_session(self, session_id: str) -> bool:
        """Whether this process has requests of ``session_id`` in flight."""
        return session_id in self._session_requests

    async def abort_session(self, session_id: str) -> int:
        """Abort the requests of ``session_id`` this process has in flight; returns how many."""
        tracked = dict(self._session_requests.get(session_id, {}))
        count = 0
        for request_id, engine_id in tracked.items():
            if engine_id is None:
                self._aborted.add(request_id)
                count += 1
                continue
            handle = await self.engines.handle(engine_id)
            if await await_ref(handle.abort.remote(request_id), CONTROL_TIMEOUT_S, f"engine {engine_id} abort"):
                count += 1
        return count
