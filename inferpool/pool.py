"""The Pool: the public facade over the router and the engine actors.

Request path of ``generate``: validate → route (lease a slot) → generate (call the
engine actor directly) → release. Requests with ``n`` above the router's cap are split
into sub-requests, which may land on different engines, and merged with consecutive
choice indices. Retryable faults (engine death, timeouts) are retried on another
engine up to ``RouterConfig.max_attempts`` attempts in total.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from inferpool._batching import CallBatcher, LoopLocal
from inferpool._ray import await_ref, ensure_ray, get_ref
from inferpool.actors.backends.base import PauseMode
from inferpool.actors.engine import engine_actor_class, engine_actor_options
from inferpool.chat import ChatRenderer
from inferpool.config import EngineConfig, PoolConfig, WeightTransferMethod
from inferpool.errors import (
    ConfigError,
    EngineDeadError,
    EngineError,
    InferpoolError,
    NoHealthyEngineError,
    RequestError,
    SessionError,
)
from inferpool.log import setup_logging
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.reasoning import ReasoningConfig, strip_control_fields
from inferpool.routing.router import Lease, RouterActor
from inferpool.types import Choice, EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs, SamplingParams, Split
from inferpool.weight_sync import NativeSender, PoolWeightSyncClient, as_named_tensors, iter_named_tensors

if TYPE_CHECKING:
    from inferpool.session import Session

logger = logging.getLogger(__name__)

_CONTROL_TIMEOUT_S = 60.0
_ROUTER_RESTART_S = 30.0  # how long callers wait for a restarted router
_RENDERER_LOCK = threading.Lock()  # transformers' lazy imports are not thread-safe


def _router_name(name: str) -> str:
    return f"{name}:router"


def _engine_name(name: str, engine_id: str) -> str:
    return f"{name}:engine:{engine_id}"


def _pg_name(namespace: str, name: str, engine_id: str) -> str:
    return f"{namespace}:{name}:pg:{engine_id}"


def _aborted_result(request: GenerateRequest, engine_id: str) -> GenerateResult:
    """What a request aborted before it reached an engine returns: no tokens, finish 'abort'."""
    choices = [
        Choice(index=request.choice_offset + i, token_ids=[], logprobs=[], finish_reason="abort")
        for i in range(request.sampling.n)
    ]
    return GenerateResult(request.request_id, list(request.prompt_token_ids), choices, engine_id, [engine_id])


def _is_managed_id(session_id: str) -> bool:
    """Managed sessions have hex ids (hashed to a store); generate(session_id=...) takes any string."""
    try:
        int(session_id, 16)
    except ValueError:
        return False
    return True


def split_n(n: int, cap: int) -> list[tuple[int, int]]:
    """(choice offset, n) of each sub-request when ``n`` exceeds ``cap``."""
    return [(off, min(cap, n - off)) for off in range(0, n, cap)]


def merge_results(request_id: str, parts: Sequence[GenerateResult]) -> GenerateResult:
    """Merge sub-request results (in offset order) into one with consecutive indices."""
    choices = [c for part in parts for c in part.choices]
    for i, c in enumerate(choices):
        c.index = i
    return GenerateResult(
        request_id=request_id,
        prompt_token_ids=parts[0].prompt_token_ids,
        choices=choices,
        engine_id=parts[0].engine_id,
        engine_ids=[p.engine_id for p in parts],
        elapsed_s=max(p.elapsed_s for p in parts),
    )


class Pool:
    """A pool of engine actors behind one router. Create with :meth:`start` or :meth:`connect`."""

    def __init__(
        self, config: PoolConfig, router: Any, infos: list[EngineInfo], stores: list[Any] | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.namespace = config.namespace
        self._router = router
        self._handles: dict[str, Any] = {}
        self._infos = {i.engine_id: i for i in infos}
        self._stores: list[Any] = list(stores or [])
        self._renderer: ChatRenderer | None = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        # concurrent requests share one router call per event-loop turn for leases and releases
        acquire_timeout = config.router.acquire_timeout_s + 10
        self._acquirer = LoopLocal(
            lambda: CallBatcher(self._router.acquire_batch.remote, acquire_timeout, "router acquire")
        )
        self._releaser = LoopLocal(
            lambda: CallBatcher(self._router.release_batch.remote, _CONTROL_TIMEOUT_S, "router release")
        )
        self._sender: NativeSender | None = None  # native weight transfer: this process's end of the group
        # session_id -> {request_id: engine_id or None while routing}: what abort_session can reach
        self._session_requests: dict[str, dict[str, str | None]] = defaultdict(dict)
        self._aborted: set[str] = set()  # request ids aborted before they reached an engine
        self._transfer_lock = threading.Lock()

    # -- construction -----------------------------------------------------------------
    @classmethod
    def start(cls, config: PoolConfig | None = None) -> Pool:
        """Start a named pool on the current Ray cluster (a local one when none is running)."""
        setup_logging()
        config = config or PoolConfig()
        ensure_ray()
        try:
            ray.get_actor(_router_name(config.name), namespace=config.namespace)
        except ValueError:
            pass
        else:
            raise ConfigError(
                f"PoolConfig.name: a pool named {config.name!r} is already running in namespace "
                f"{config.namespace!r}; use Pool.connect({config.name!r}) or another name",
                field="name",
            )
        router = RouterActor.options(
            name=_router_name(config.name),
            namespace=config.namespace,
            lifetime="detached" if config.detached else None,
            max_concurrency=100_000,
        ).remote(config.router, config)
        pool = cls(config, router, [])
        try:
            get_ref(router.start.remote(), _CONTROL_TIMEOUT_S, "router start")
            specs: list[tuple[str, int]] = []
            for g, group in enumerate(config.engines):
                specs.extend((f"e{len(specs)}", g) for _ in range(group.replicas))
            pool._start_engines(specs)
            pool._start_stores()
        except BaseException:
            pool.shutdown()
            raise
        logger.info("pool %r started with %d engines", config.name, len(pool._infos))
        return pool

    @classmethod
    def connect(cls, name: str = "default", namespace: str = "inferpool", timeout_s: float = 60.0) -> Pool:
        """Connect to a pool another process started (from any driver, task or actor)."""
        setup_logging()
        if not ray.is_initialized():
            ensure_ray(address="auto")
        try:
            router = ray.get_actor(_router_name(name), namespace=namespace)
        except ValueError:
            raise ConfigError(f"name: no pool named {name!r} in namespace {namespace!r}", field="name") from None
        config = get_ref(router.get_pool_config.remote(), timeout_s, "router")
        infos = get_ref(router.engine_infos.remote(), timeout_s, "router")
        stores = get_ref(router.stores.remote(), timeout_s, "router")
        return cls(config, router, infos, stores)

    def __reduce__(self) -> tuple[Any, ...]:
        # A pool passed to a Ray task arrives there connected to the same actors.
        return (Pool, (self.config, self._router, list(self._infos.values()), self._stores))

    def _start_stores(self) -> None:
        """Start the SessionStore shards (no CPUs reserved) and tell the router about them."""
        from inferpool.actors.session_store import SessionStoreActor

        stores = [
            SessionStoreActor.options(
                name=f"{self.name}:sessions:{i}",
                namespace=self.namespace,
                lifetime="detached" if self.config.detached else None,
                max_concurrency=100_000,
            ).remote(self.config, self._router, i)
            for i in range(self.config.sessions.shards)
        ]
        for store in stores:
            get_ref(store.start.remote(), _CONTROL_TIMEOUT_S, "session store start")
        get_ref(self._router.set_stores.remote(stores), _CONTROL_TIMEOUT_S, "router")
        self._stores = stores

    def _start_engines(self, specs: list[tuple[str, int]]) -> None:
        """Create, start and register engines (in parallel, bounded by start timeouts)."""
        actor_cls = engine_actor_class()
        started: list[tuple[str, int, EngineConfig, Any, ray.ObjectRef]] = []
        free_bundles: dict[int, list[int]] = {}
        for engine_id, g in specs:
            group = self.config.engines[g]
            options = engine_actor_options(
                group, _engine_name(self.name, engine_id), self.namespace, self.config.detached
            )
            bundle_index: int | None = None
            if group.placement_group is not None:  # colocated: the trainer's placement group
                if g not in free_bundles:
                    free_bundles[g] = self._free_bundles(g, group)
                if not free_bundles[g]:
                    raise ConfigError(
                        f"EngineConfig.bundle_indices: every bundle of engine group {g} is taken "
                        f"({group.resolved_bundle_indices()}); list more bundles to scale further",
                        field="bundle_indices",
                    )
                bundle_index = free_bundles[g].pop(0)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self._given_placement_group(group),
                    placement_group_bundle_index=bundle_index,
                    placement_group_capture_child_tasks=True,
                )
            elif bundle := {k: v for k, v in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"])) if v}:
                pg = placement_group(
                    [bundle],
                    strategy="STRICT_PACK",
                    name=_pg_name(self.namespace, self.name, engine_id),
                    lifetime="detached" if self.config.detached else None,
                )
                get_ref(pg.ready(), group.start_timeout_s, f"placement group for engine {engine_id}")
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg,
                    placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True,
                )
            handle = actor_cls.options(**options).remote(
                group, engine_id, None, self.config.weight_transfer.method, bundle_index
            )
            started.append((engine_id, g, group, handle, handle.start.remote()))
        latest = get_ref(self._router.latest_weights.remote(), _CONTROL_TIMEOUT_S, "router") if started else None
        for engine_id, g, group, handle, ref in started:
            info = get_ref(ref, group.start_timeout_s, f"engine {engine_id} start")
            if latest is not None:  # a pool that already pushed weights: load them before serving
                chunks, version = latest
                index = get_ref(self._router.version_index.remote(version), _CONTROL_TIMEOUT_S, "router")
                get_ref(handle.update_weights.remote(chunks, version, None, index), group.start_timeout_s, "weights")
            get_ref(
                self._router.register.remote(
                    info, handle, group.max_requests_per_engine, group.eval_requests_per_engine, g
                ),
                _CONTROL_TIMEOUT_S,
                "router register",
            )
            self._handles[engine_id] = handle
            self._infos[engine_id] = info

    @staticmethod
    def _given_placement_group(group: EngineConfig) -> Any:
        """The trainer's placement group of ``group`` (looked up by name when given one), ready."""
        pg = group.placement_group
        if isinstance(pg, str):
            try:
                pg = get_placement_group(pg)
            except ValueError:
                raise ConfigError(
                    f"EngineConfig.placement_group: no placement group named {group.placement_group!r}",
                    field="placement_group",
                ) from None
        if not hasattr(pg, "bundle_count"):
            raise ConfigError(
                f"EngineConfig.placement_group: expected a Ray PlacementGroup or its name, got {type(pg).__name__}",
                field="placement_group",
            )
        bad = [i for i in group.resolved_bundle_indices() if i >= pg.bundle_count]
        if bad:
            raise ConfigError(
                f"EngineConfig.bundle_indices: {bad} out of range; the placement group has {pg.bundle_count} bundles",
                field="bundle_indices",
            )
        get_ref(pg.ready(), group.start_timeout_s, "the given placement group")
        return pg

    def _free_bundles(self, g: int, group: EngineConfig) -> list[int]:
        """Bundles of ``group``'s placement group not held by its running engines (a list may
        repeat a bundle that several engines share through fractional GPUs)."""
        groups = get_ref(self._router.engine_groups.remote(), _CONTROL_TIMEOUT_S, "router")
        infos = get_ref(self._router.engine_infos.remote(), _CONTROL_TIMEOUT_S, "router")
        free = group.resolved_bundle_indices()
        for info in infos:
            if groups.get(info.engine_id) == g and info.bundle_index in free:
                free.remove(info.bundle_index)
        return free

    # -- engines ----------------------------------------------------------------------
    async def _handle(self, engine_id: str) -> Any:
        handle = self._handles.get(engine_id)
        if handle is None:
            self._handles = await await_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
            handle = self._handles.get(engine_id)
            if handle is None:
                raise EngineError(f"engine {engine_id} is not registered")
        return handle

    async def _refresh_infos(self) -> None:
        infos = await await_ref(self._router.engine_infos.remote(), _CONTROL_TIMEOUT_S, "router")
        self._infos = {i.engine_id: i for i in infos}

    # -- validation -------------------------------------------------------------------
    async def _limits(self) -> tuple[int, int]:
        if not self._infos:
            await self._refresh_infos()
        if not self._infos:
            return (1 << 62, 1 << 62)
        vocab = min(i.vocab_size for i in self._infos.values())
        ctx = min(i.max_model_len for i in self._infos.values())
        return vocab, ctx

    async def _validate_prompt(self, prompt_token_ids: Any, sampling: SamplingParams) -> list[int]:
        if not isinstance(prompt_token_ids, Sequence) or isinstance(prompt_token_ids, str | bytes):
            raise RequestError(
                f"prompt_token_ids: must be a list of token ids, got {type(prompt_token_ids).__name__}",
                field="prompt_token_ids",
            )
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("prompt_token_ids: the prompt is empty", field="prompt_token_ids")
        vocab, ctx = await self._limits()
        for pos, tok in enumerate(ids):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
                raise RequestError(
                    f"prompt_token_ids[{pos}]: {tok!r} is not a token id of this model's vocabulary [0, {vocab})",
                    field="prompt_token_ids",
                )
        if len(ids) >= ctx:
            raise RequestError(
                f"prompt_token_ids: {len(ids)} tokens leave no room to generate within the "
                f"model's context of {ctx} tokens",
                field="prompt_token_ids",
            )
        return ids

    @staticmethod
    def _sampling(sampling: SamplingParams | dict[str, Any] | None) -> SamplingParams:
        if sampling is None:
            return SamplingParams()
        if isinstance(sampling, dict):
            return SamplingParams(**sampling)
        if not isinstance(sampling, SamplingParams):
            raise RequestError(
                f"sampling: expected ip.SamplingParams or a dict, got {type(sampling).__name__}",
                field="sampling",
            )
        return sampling

    @staticmethod
    def _split(split: str) -> Split:
        if split not in ("train", "eval"):
            raise RequestError(f"split: must be 'train' or 'eval', got {split!r}", field="split")
        return split  # type: ignore[return-value]

    def _request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # -- generation -------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams | dict[str, Any] | None = None,
        split: Split = "train",
        session_id: str | None = None,
        timeout_s: float | None = None,
        workload: str | None = None,
    ) -> GenerateResult:
        """Token-in / token-out generation of ``sampling.n`` choices for one prompt.

        ``workload`` names the caller's workload (e.g. an environment) for per-workload
        capacity weights (:meth:`set_workload_weight`).
        """
        sp = self._sampling(sampling)
        split = self._split(split)
        ids = await self._validate_prompt(prompt_token_ids, sp)
        request_id = self._request_id()
        cap = self.config.router.max_n_per_request
        parts = split_n(sp.n, cap)
        requests = [
            GenerateRequest(
                request_id=request_id if len(parts) == 1 else f"{request_id}.{k}",
                prompt_token_ids=ids,
                sampling=sp if len(parts) == 1 else sp.model_copy(update={"n": size}),
                split=split,
                session_id=session_id,
                choice_offset=offset,
                workload=workload,
            )
            for k, (offset, size) in enumerate(parts)
        ]
        results = await asyncio.gather(*(self._run(r, timeout_s) for r in requests))
        if len(results) == 1:
            return results[0]
        return merge_results(request_id, results)

    async def _run(self, request: GenerateRequest, timeout_s: float | None) -> GenerateResult:
        """route → generate → release, retried on another engine for retryable faults."""
        if request.session_id is None:
            return await self._attempts(request, timeout_s)
        tracked = self._session_requests[request.session_id]
        tracked[request.request_id] = None
        try:
            return await self._attempts(request, timeout_s)
        finally:
            tracked.pop(request.request_id, None)
            self._aborted.discard(request.request_id)
            if not tracked:
                self._session_requests.pop(request.session_id, None)

    async def _attempts(self, request: GenerateRequest, timeout_s: float | None) -> GenerateResult:
        exclude: list[str] = []
        attempts = self.config.router.max_attempts
        last_error: InferpoolError | None = None
        for attempt in range(1, attempts + 1):
            try:
                lease = await self._acquire(request, exclude)
            except NoHealthyEngineError:
                if last_error is not None:  # no engine left to retry on: surface the original
                    raise last_error from None
                raise
            ok = False
            try:
                if request.request_id in self._aborted:  # aborted while it was being routed
                    ok = True
                    return _aborted_result(request, lease.engine_id)
                if request.session_id is not None:
                    self._session_requests[request.session_id][request.request_id] = lease.engine_id
                handle = await self._handle(lease.engine_id)
                timeout = timeout_s or self._timeout(lease.engine_id)
                result: GenerateResult = await await_ref(
                    handle.generate.remote(request), timeout, f"engine {lease.engine_id}"
                )
                ok = True
                return result
            except InferpoolError as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                logger.warning(
                    "request %s failed on engine %s (attempt %d/%d): %s; retrying elsewhere",
                    request.request_id,
                    lease.engine_id,
                    attempt,
                    attempts,
                    exc,
                )
                self._router.report_failure.remote(lease.engine_id, str(exc))
                exclude.append(lease.engine_id)
                last_error = exc
            finally:
                await self._release_lease(lease.lease_id, ok, attempt)
        raise AssertionError("unreachable")

    async def abort_session(self, session_id: str) -> int:
        """Abort the session's in-flight requests: each ends at once with finish reason
        ``abort`` and the tokens sampled so far (a session turn records them as usual).
        Returns how many requests were aborted."""
        count = await self._abort_local(session_id)
        if session_id not in self._session_requests and _is_managed_id(session_id):  # turns run in a store
            try:
                count += await await_ref(
                    self.session_store(session_id).abort.remote(session_id), _CONTROL_TIMEOUT_S, "session store"
                )
            except SessionError:  # not a managed session (or gone): nothing runs for it there
                pass
        return count

    async def _abort_local(self, session_id: str) -> int:
        """Abort the requests of ``session_id`` this process has in flight."""
        tracked = dict(self._session_requests.get(session_id, {}))
        count = 0
        for request_id, engine_id in tracked.items():
            if engine_id is None:
                self._aborted.add(request_id)
                count += 1
                continue
            handle = await self._handle(engine_id)
            if await await_ref(handle.abort.remote(request_id), _CONTROL_TIMEOUT_S, f"engine {engine_id} abort"):
                count += 1
        return count

    async def _release_lease(self, lease_id: int, ok: bool, attempts: int) -> None:
        """Release through the batcher; if the caller is cancelled meanwhile, still release."""
        try:
            await asyncio.shield(self._releaser.get().submit((lease_id, ok, attempts)))
        except asyncio.CancelledError:
            raise
        except Exception:  # the router is gone or slow: the lease reaper reclaims the slot
            logger.warning("lease release was not confirmed", exc_info=True)

    async def _acquire(self, request: GenerateRequest, exclude: list[str]) -> Lease:
        """Lease a slot; if the router actor died, wait (bounded) for Ray to restart it."""
        deadline = time.monotonic() + _ROUTER_RESTART_S
        delay = 0.05
        while True:
            args = (
                request.split,
                request.session_id,
                request.prompt_token_ids[: self.config.router.route_prefix_tokens],
                exclude,
                None,
                request.workload,
            )
            try:
                lease: Lease | None = await self._acquirer.get().submit(args)
                if lease is None:  # nothing free right now: wait (bounded) in the router
                    lease = await await_ref(
                        self._router.acquire.remote(*args),
                        self.config.router.acquire_timeout_s + 10,
                        "router acquire",
                    )
                return lease
            except EngineDeadError:
                if time.monotonic() > deadline:
                    raise
                logger.warning("router unavailable; retrying acquire in %.2fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    async def _release(ref: ray.ObjectRef) -> None:
        """Wait (briefly) for a lease release so counts are exact when the call returns."""
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ref.future())), _CONTROL_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # the router is gone or slow: the lease reaper reclaims the slot
            logger.warning("lease release was not confirmed", exc_info=True)

    def _timeout(self, engine_id: str) -> float:
        return max(g.request_timeout_s for g in self.config.engines)

    async def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | dict[str, Any] | None = None,
        split: Split = "train",
        chunk_size: int = 64,
        timeout_s: float | None = None,
    ) -> list[GenerateResult]:
        """Generate for many prompts with few actor calls (results in prompt order).

        Slots are leased in bulk and requests travel to each engine in chunks of up to
        ``chunk_size``, so the engines' queues stay full without one actor call per request.
        """
        sp = self._sampling(sampling)
        split = self._split(split)
        if sp.n > self.config.router.max_n_per_request:
            return list(await asyncio.gather(*(self.generate(p, sp, split, None, timeout_s) for p in prompts)))
        checked = [await self._validate_prompt(p, sp) for p in prompts]
        requests = [
            GenerateRequest(request_id=self._request_id(), prompt_token_ids=ids, sampling=sp, split=split)
            for ids in checked
        ]
        results: list[GenerateResult | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        pending.reverse()
        tasks: list[asyncio.Task[None]] = []
        try:
            while pending:
                leases: list[Lease] = await await_ref(
                    self._router.acquire_many.remote(len(pending), split),
                    self.config.router.acquire_timeout_s + 10,
                    "router acquire",
                )
                by_engine: dict[str, list[Lease]] = defaultdict(list)
                for lease in leases:
                    by_engine[lease.engine_id].append(lease)
                for engine_id, group in by_engine.items():
                    for start in range(0, len(group), chunk_size):
                        chunk = group[start : start + chunk_size]
                        idx = [pending.pop() for _ in chunk]
                        tasks.append(
                            asyncio.ensure_future(self._run_chunk(engine_id, chunk, idx, requests, results, timeout_s))
                        )
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return [r for r in results if r is not None]

    async def _run_chunk(
        self,
        engine_id: str,
        leases: list[Lease],
        idx: list[int],
        requests: list[GenerateRequest],
        results: list[GenerateResult | None],
        timeout_s: float | None,
    ) -> None:
        try:
            handle = await self._handle(engine_id)
            outs = await await_ref(
                handle.generate_batch.remote([requests[i] for i in idx]),
                timeout_s or self._timeout(engine_id),
                f"engine {engine_id}",
            )
        except InferpoolError as exc:
            if not exc.retryable:
                raise
            self._router.report_failure.remote(engine_id, str(exc))
            outs = [exc] * len(idx)
        finally:
            await self._release(self._router.release_many.remote([lease.lease_id for lease in leases], True))
        retry = []
        for i, out in zip(idx, outs, strict=True):
            if isinstance(out, GenerateResult):
                results[i] = out
            elif isinstance(out, InferpoolError) and out.retryable:
                retry.append(i)
            else:
                raise out
        if retry:
            redone = await asyncio.gather(*(self._run(requests[i], timeout_s) for i in retry))
            for i, out in zip(retry, redone, strict=True):
                results[i] = out

    # -- chat, sessions, scoring -------------------------------------------------------
    def renderer(self) -> ChatRenderer:
        """The chat renderer of this pool's tokenizer (loaded once per process, thread-safe)."""
        with _RENDERER_LOCK:
            return self._load_renderer()

    def _load_renderer(self) -> ChatRenderer:
        if self._renderer is None:
            group = self.config.engines[0]
            path = group.tokenizer or group.model
            if path is None and group.backend in ("vllm", "sglang"):
                from inferpool.tiny_model import tiny_model

                path = tiny_model()
            if path is None:
                raise RequestError(
                    f"tokenizer: the {group.backend!r} engines have no tokenizer to render chat with; "
                    "set EngineConfig.tokenizer (or model)",
                    field="tokenizer",
                )
            self._renderer = ChatRenderer.from_pretrained(path)
        return self._renderer

    def model_name(self) -> str:
        group = self.config.engines[0]
        return group.model or ("inferpool/tiny-chat" if group.backend in ("vllm", "sglang") else group.backend)

    def session_timeout_s(self) -> float:
        """Upper bound of one session call: every attempt may wait for a slot and time out."""
        attempts = self.config.router.max_attempts
        return attempts * (self._timeout("") + self.config.router.acquire_timeout_s) + 30.0

    def effective_reasoning(self, reasoning: ReasoningConfig | None, skip: bool) -> ReasoningConfig | None:
        """The call's reasoning, else the pool default; None when the call skips reasoning."""
        if skip:
            return None
        if reasoning is not None and not isinstance(reasoning, ReasoningConfig):
            reasoning = ReasoningConfig(**dict(reasoning))
        return reasoning if reasoning is not None else self.config.reasoning

    def _text_only(self) -> bool:
        return bool(self._infos) and not all(i.supports_tokens for i in self._infos.values())

    @property
    def router(self) -> Any:
        """The router actor handle (control calls: health, engine infos, weights, load)."""
        return self._router

    def session_stores(self) -> list[Any]:
        """The SessionStore actor handles, in shard order."""
        return list(self._stores)

    def session(
        self,
        track_tree: bool = False,
        *,
        tool_parser: str = "hermes",
        session_id: str | None = None,
        existing: bool = False,
    ) -> Session:
        """A managed session (created in its store on first use); see :class:`Session`.

        ``existing=True`` addresses a session created elsewhere (by id): calls on it never
        create one, so an unknown or expired id raises instead.
        """
        from inferpool.actors.session_store import SessionOptions
        from inferpool.sequences import new_session_id
        from inferpool.session import Session

        if not self._stores:
            raise ConfigError("sessions: this pool has no session stores", field="sessions")
        sid = session_id or new_session_id()
        try:
            shard = int(sid, 16) % len(self._stores)
        except ValueError:
            raise RequestError(f"session_id: {sid!r} is not a hex session id", field="session_id") from None
        session = Session(
            self, sid, self._stores[shard], SessionOptions(track_tree=track_tree, tool_parser=tool_parser)
        )
        session._created = existing
        return session

    def session_store(self, session_id: str) -> Any:
        """The store actor that owns a session id."""
        return self._stores[int(session_id, 16) % len(self._stores)]

    async def chat(
        self,
        messages: list[dict[str, Any]],
        n: int = 1,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        reasoning: ReasoningConfig | None = None,
        skip_reasoning: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        split: Split = "train",
        **sampling: Any,
    ) -> ChatCompletion:
        """Stateless OpenAI-shaped chat: render with the chat template, generate, parse."""
        from inferpool.turns import chat_turn

        reasoning = self.effective_reasoning(reasoning, skip_reasoning)
        if not self._infos:
            await self._refresh_infos()
        if self._text_only():
            body = {"messages": messages, "n": n, **sampling}
            if tools is not None:
                body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
            if reasoning is not None:
                body["reasoning"] = reasoning.model_dump(exclude_none=True)
            return ChatCompletion(**await self._text_call("chat", body, split))
        renderer = await asyncio.to_thread(self.renderer)
        completion, _, _ = await chat_turn(
            self,
            renderer,
            messages,
            n=n,
            sampling=sampling,
            tools=tools,
            tool_choice=tool_choice,
            reasoning=reasoning,
            chat_template_kwargs=chat_template_kwargs,
            split=split,
            model_name=self.model_name(),
        )
        return completion

    async def complete(
        self, prompt: str, n: int = 1, *, split: Split = "train", skip_reasoning: bool = False, **sampling: Any
    ) -> Completion:
        """Stateless OpenAI-shaped completion of a text prompt."""
        from inferpool.turns import completion_turn

        if not self._infos:
            await self._refresh_infos()
        if self._text_only():
            return Completion(**await self._text_call("completion", {"prompt": prompt, "n": n, **sampling}, split))
        renderer = await asyncio.to_thread(self.renderer)
        completion, _, _ = await completion_turn(
            self, renderer, prompt, n=n, sampling=sampling, split=split, model_name=self.model_name()
        )
        return completion

    async def _text_call(self, method: str, body: dict[str, Any], split: Split) -> dict[str, Any]:
        """A text-level call on a text-only engine (hosted API), through a lease."""
        body, _ = strip_control_fields(body)
        return await self._on_engine(lambda h: getattr(h, method).remote(body), split)

    async def _on_engine(self, call: Any, split: Split = "train") -> Any:
        lease: Lease = await await_ref(
            self._router.acquire.remote(split), self.config.router.acquire_timeout_s + 10, "router acquire"
        )
        try:
            handle = await self._handle(lease.engine_id)
            return await await_ref(call(handle), self._timeout(lease.engine_id), f"engine {lease.engine_id}")
        finally:
            await self._release(self._router.release.remote(lease.lease_id))

    async def get_logprobs(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        input_ids: list[int] | None = None,
        top_k: int = 1,
        split: Split = "eval",
    ) -> dict[str, Any]:
        """Prompt scoring: per position the top-k token ids and logprobs (position 0: empty lists)."""
        given = [x is not None for x in (prompt, messages, input_ids)]
        if sum(given) != 1:
            raise RequestError("prompt: give exactly one of prompt, messages or input_ids", field="prompt")
        if not isinstance(top_k, int) or top_k < 1:
            raise RequestError(f"top_k: must be an int >= 1, got {top_k!r}", field="top_k")
        if input_ids is not None:
            ids = list(input_ids)
        else:
            renderer = await asyncio.to_thread(self.renderer)
            if messages is not None:
                from inferpool.chat import validate_messages

                text = renderer._template(validate_messages(messages), add_generation_prompt=False)
            else:
                text = str(prompt)
            ids = renderer.encode(text)
        ids = await self._validate_prompt(ids, SamplingParams())
        out: PromptLogprobs = await self._on_engine(lambda h: h.prompt_logprobs.remote(ids, top_k), split)
        return out.to_dict()

    # -- RL lifecycle -------------------------------------------------------------------
    async def _engine_handles(self) -> dict[str, Any]:
        self._handles = await await_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
        return self._handles

    async def _broadcast(self, what: str, call: Any, timeout_s: float) -> dict[str, Any]:
        handles = await self._engine_handles()
        outs = await asyncio.gather(
            *(await_ref(call(h), timeout_s, f"engine {eid} {what}") for eid, h in handles.items())
        )
        return dict(zip(handles, outs, strict=True))

    async def update_weights(
        self,
        weights: Any,
        version: int | str | None = None,
        *,
        chunk_bytes: int = 256 << 20,
        pause_mode: PauseMode | None = "keep",
        timeout_s: float = 1800.0,
        method: WeightTransferMethod | None = None,
    ) -> dict[str, Any]:
        """Push new weights to every engine, by ``method`` (None: ``PoolConfig.weight_transfer.method``;
        ``"object_store"`` works on any pool, a native method only on a pool configured with it).

        ``weights``: a state dict, an iterable of ``(name, tensor)``, or an ObjectRef to
        either. ``object_store``: tensors are put in chunks of at most ``chunk_bytes`` (one
        ``ray.put`` each); every engine fetches and loads one chunk at a time, so peak
        memory stays bounded. ``nccl`` / ``ipc`` / ``gloo``: this process broadcasts the
        tensors (on its GPU for nccl/ipc) through vLLM's weight-transfer protocol; the group
        with the engines is formed on first use and again whenever the engine set changed.
        Generation pauses with ``pause_mode`` during the load, so every sampled token's
        weight version is exact; the prefix cache is reset. Returns bytes and seconds.
        """
        if chunk_bytes < 1:
            raise RequestError(f"chunk_bytes: must be >= 1, got {chunk_bytes}", field="chunk_bytes")
        if pause_mode is not None and pause_mode not in ("abort", "wait", "keep"):
            raise RequestError(f"pause_mode: must be abort, wait, keep or None, got {pause_mode!r}", field="pause_mode")
        t0 = time.perf_counter()
        configured = self.config.weight_transfer.method
        method = method or configured
        if method not in ("object_store", configured):
            raise RequestError(
                f"method: {method!r} needs a pool started with weight_transfer.method={method!r} "
                f"(this one has {configured!r}); 'object_store' always works",
                field="method",
            )
        if method != "object_store":
            if isinstance(weights, ray.ObjectRef):
                weights = await await_ref(weights, timeout_s, "weights")
            named = as_named_tensors(weights)
            label, index = await self._record_version(version)
            out = await asyncio.to_thread(self._send_native, named, label, pause_mode, timeout_s, index)
            await await_ref(self._router.set_latest_weights.remote([], label), _CONTROL_TIMEOUT_S, "router")
            return {"version": label, "seconds": time.perf_counter() - t0, "method": method, **out}
        if isinstance(weights, ray.ObjectRef):
            refs, nbytes = [weights], 0
        else:
            refs, nbytes = self._put_chunks(weights, chunk_bytes)
        label, index = await self._record_version(version)
        per_engine = await self._broadcast(
            "update_weights", lambda h: h.update_weights.remote(refs, label, pause_mode, index), timeout_s
        )
        keep = refs if self.config.weight_transfer.keep_latest else []
        await await_ref(self._router.set_latest_weights.remote(keep, label), _CONTROL_TIMEOUT_S, "router")
        seconds = time.perf_counter() - t0
        nbytes = nbytes or max((r["bytes"] for r in per_engine.values()), default=0)
        return {
            "version": label,
            "bytes": nbytes,
            "seconds": seconds,
            "method": method,
            "chunks": len(refs),
            "engines": per_engine,
        }

    async def _record_version(self, version: int | str | None) -> tuple[int | str, int | None]:
        """Register an update with the router: its label and its index in the pool's history."""
        label: int | str = await await_ref(self._router.record_version.remote(version), _CONTROL_TIMEOUT_S, "router")
        index: int | None = await await_ref(self._router.version_index.remote(label), _CONTROL_TIMEOUT_S, "router")
        return label, index

    def _send_native(
        self,
        named: list[tuple[str, Any]],
        label: int | str,
        pause_mode: PauseMode | None,
        timeout_s: float,
        version_index: int | None = None,
    ) -> dict[str, Any]:
        """One native update from this process (blocking; run off the event loop)."""
        with self._transfer_lock:
            sender = self._weight_sender(timeout_s)
            client = sender.client
            client.version, client.pause_mode, client.timeout_s = label, pause_mode, timeout_s
            client.version_index = version_index
            client.nbytes = sum(int(getattr(t, "nbytes", 0)) for _, t in named)
            try:
                sender.send(named)
            except BaseException:
                self._drop_sender()  # a failed round leaves the group unusable: form it again next time
                raise
            return {"bytes": client.nbytes, "chunks": 1, "engines": client.per_engine}

    def _weight_sender(self, timeout_s: float) -> NativeSender:
        """This process's end of the transfer group, formed (again) when the engines changed."""
        handles: dict[str, Any] = get_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
        if self._sender is not None and self._sender.client.engine_ids == sorted(handles):
            joined = [
                get_ref(h.weight_transfer_joined.remote(), _CONTROL_TIMEOUT_S, f"engine {eid}")
                for eid, h in self._sender.client.engines_by_id()
            ]
            if all(joined):
                return self._sender
        self._drop_sender()
        infos = {i.engine_id: i for i in get_ref(self._router.engine_infos.remote(), _CONTROL_TIMEOUT_S, "router")}
        engines = [(eid, handles[eid], infos[eid].transfer_ranks if eid in infos else 1) for eid in sorted(handles)]
        client = PoolWeightSyncClient(engines, "keep", timeout_s)
        self._sender = NativeSender.form(self.config.weight_transfer, client, self.config.engines[0].backend)
        logger.info("pool %r: weight transfer group formed with %d engines", self.name, len(engines))
        return self._sender

    def _drop_sender(self) -> None:
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None

    @staticmethod
    def _put_chunks(weights: Any, chunk_bytes: int) -> tuple[list[ray.ObjectRef], int]:
        refs: list[ray.ObjectRef] = []
        chunk: list[tuple[str, Any]] = []
        size = total = 0
        for name, tensor in iter_named_tensors(weights):
            nb = int(getattr(tensor, "nbytes", 0))
            if chunk and size + nb > chunk_bytes:
                refs.append(ray.put(chunk))
                chunk, size = [], 0
            chunk.append((name, tensor))
            size += nb
            total += nb
        if chunk:
            refs.append(ray.put(chunk))
        return refs, total

    async def pause(self, mode: PauseMode = "keep") -> None:
        """Pause every engine: ``abort`` in-flight requests (finish 'abort'), ``wait`` for them
        to drain, or ``keep`` them frozen until resume. New requests wait meanwhile."""
        if mode not in ("abort", "wait", "keep"):
            raise RequestError(f"mode: must be abort, wait or keep, got {mode!r}", field="mode")
        await self._broadcast("pause", lambda h: h.pause.remote(mode), self._timeout(""))

    async def resume(self) -> None:
        await self._broadcast("resume", lambda h: h.resume.remote(), _CONTROL_TIMEOUT_S)

    async def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (weights and KV cache at level 2; KV cache at level 1)."""
        await self._broadcast("sleep", lambda h: h.sleep.remote(level), _CONTROL_TIMEOUT_S * 5)

    async def wake(self, tags: list[str] | None = None) -> None:
        await self._broadcast("wake", lambda h: h.wake.remote(tags), _CONTROL_TIMEOUT_S * 5)

    async def reset_prefix_cache(self) -> None:
        await self._broadcast("reset_prefix_cache", lambda h: h.reset_prefix_cache.remote(), _CONTROL_TIMEOUT_S)

    # -- operations ------------------------------------------------------------------
    def set_engine_weight(self, engine_id: str, weight: float) -> None:
        """Scale one engine's usable capacity (0..1) at run time."""
        get_ref(self._router.set_engine_weight.remote(engine_id, weight), _CONTROL_TIMEOUT_S, "router")

    def set_workload_weight(self, workload: str, weight: float) -> None:
        """Cap a workload's share (0..1) of capacity at run time; 0 parks it."""
        get_ref(self._router.set_workload_weight.remote(workload, weight), _CONTROL_TIMEOUT_S, "router")

    def engine_ids(self) -> list[str]:
        return sorted(self._infos)

    def engine_infos(self) -> list[EngineInfo]:
        return get_ref(self._router.engine_infos.remote(), _CONTROL_TIMEOUT_S, "router")

    def stats(self) -> dict[str, Any]:
        """Engines (health, load, counters) and router state, as plain dicts."""
        load = get_ref(self._router.load.remote(), _CONTROL_TIMEOUT_S, "router")
        handles = get_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
        refs = {eid: h.stats.remote() for eid, h in handles.items()}
        engines: dict[str, Any] = {}
        for eid, ref in refs.items():
            entry = dict(load.get(eid, {}))
            try:
                st = get_ref(ref, 10.0, f"engine {eid} stats")
                entry.update({k: getattr(st, k) for k in st.__dataclass_fields__ if k != "engine_id"})
            except InferpoolError as exc:
                entry["error"] = str(exc)
            engines[eid] = entry
        sessions: dict[str, Any] = {}
        for i, store in enumerate(self._stores):
            try:
                sessions[f"shard{i}"] = get_ref(store.counts.remote(), 10.0, "session store")
            except InferpoolError as exc:
                sessions[f"shard{i}"] = {"error": str(exc)}
        return {
            "pool": self.name,
            "engines": engines,
            "sessions": sessions,
            "router": {
                "policy": self.config.router.policy,
                "timings": get_ref(self._router.timing_summary.remote(), _CONTROL_TIMEOUT_S, "router"),
                "leases": get_ref(self._router.num_leases.remote(), _CONTROL_TIMEOUT_S, "router"),
            },
            "versions": get_ref(self._router.versions.remote(), _CONTROL_TIMEOUT_S, "router"),
        }

    def metrics_snapshot(self) -> dict[str, float]:
        """Every metric series of the pool as one flat dict (for wandb / TensorBoard): the engines',
        router's and session stores' ``inferpool_*`` series plus per-engine request time
        mean/std/p99 per split, average attempts and generated tokens/s."""
        handles = get_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
        out: dict[str, float] = {}
        sources = [self._router.metrics_snapshot.remote()]
        sources += [h.metrics_snapshot.remote() for h in handles.values()]
        sources += [store.metrics_snapshot.remote() for store in self._stores]
        for ref in sources:
            try:
                for key, value in get_ref(ref, 10.0, "metrics").items():
                    out[key] = out.get(key, 0.0) + value if key.endswith("_total") else value
            except InferpoolError as exc:
                logger.warning("metrics source unavailable: %s", exc)
        timings = get_ref(self._router.timing_summary.remote(), _CONTROL_TIMEOUT_S, "router")
        for eid, summary in timings.items():
            for split in ("train", "eval"):
                for stat in ("mean_s", "std_s", "p99_s", "count"):
                    value = summary.get(split, {}).get(stat)
                    if value is not None:
                        out[f"engine/{eid}/{split}/request_{stat}"] = float(value)
            if summary.get("avg_attempts") is not None:
                out[f"engine/{eid}/avg_attempts"] = float(summary["avg_attempts"])
        for eid, handle in handles.items():
            try:
                st = get_ref(handle.stats.remote(), 10.0, f"engine {eid} stats")
            except InferpoolError:
                continue
            out[f"engine/{eid}/in_flight"] = float(st.in_flight)
            out[f"engine/{eid}/generated_tokens_per_s"] = st.generated_tokens / st.uptime_s if st.uptime_s else 0.0
        return out

    def engine_handle(self, engine_id: str) -> Any:
        """The actor handle of one engine (for lifecycle calls and tests)."""
        handles = get_ref(self._router.engines.remote(), _CONTROL_TIMEOUT_S, "router")
        if engine_id not in handles:
            raise RequestError(f"engine_id: no engine {engine_id!r} in pool {self.name!r}", field="engine_id")
        return handles[engine_id]

    def scale(self, replicas: int, group: int = 0, drain_timeout_s: float = 60.0) -> list[str]:
        """Set the replica count of an engine group; returns the engine ids now in the group."""
        if replicas < 1:
            raise RequestError(f"replicas: must be >= 1, got {replicas}", field="replicas")
        if not 0 <= group < len(self.config.engines):
            raise RequestError(f"group: no engine group {group}", field="group")
        groups = get_ref(self._router.engine_groups.remote(), _CONTROL_TIMEOUT_S, "router")
        own = {eid: g for eid, g in groups.items() if eid[:1] == "e" and eid[1:].isdigit()}  # not Serve's
        mine = sorted((eid for eid, g in own.items() if g == group), key=lambda e: int(e[1:]))
        if replicas > len(mine):
            next_index = 1 + max((int(e[1:]) for e in own), default=-1)
            new = [(f"e{next_index + k}", group) for k in range(replicas - len(mine))]
            self._start_engines(new)
            return mine + [eid for eid, _ in new]
        for eid in mine[replicas:]:
            self._stop_engine(eid, drain_timeout_s)
        return mine[:replicas]

    def _stop_engine(self, engine_id: str, drain_timeout_s: float) -> None:
        handle = self.engine_handle(engine_id)
        get_ref(self._router.deregister.remote(engine_id), _CONTROL_TIMEOUT_S, "router")
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            try:
                st = get_ref(handle.stats.remote(), 10.0, "engine stats")
            except InferpoolError:
                break
            if st.in_flight == 0:
                break
            time.sleep(0.1)
        self._kill_engine(engine_id, handle)

    def _kill_engine(self, engine_id: str, handle: Any) -> None:
        try:
            get_ref(handle.shutdown.remote(), 30.0, "engine shutdown")
        except Exception:
            logger.debug("engine %s did not shut down cleanly", engine_id, exc_info=True)
        ray.kill(handle)
        self._handles.pop(engine_id, None)
        self._infos.pop(engine_id, None)
        try:
            remove_placement_group(get_placement_group(_pg_name(self.namespace, self.name, engine_id)))
        except Exception:  # no placement group (zero-resource engine) or already gone
            pass

    def shutdown(self) -> None:
        """Stop every engine and the router; the pool's name can be reused afterwards."""
        try:
            handles = get_ref(self._router.engines.remote(), 30.0, "router")
        except Exception:
            handles = dict(self._handles)
        try:
            self._router.shutdown.remote()
        except Exception:
            logger.debug("router already gone", exc_info=True)
        for store in self._stores:
            try:
                ray.kill(store)
            except Exception:
                logger.debug("session store already gone", exc_info=True)
        for eid, handle in handles.items():
            self._kill_engine(eid, handle)
        try:
            ray.kill(self._router)
        except Exception:
            logger.debug("router already gone", exc_info=True)
        logger.info("pool %r shut down", self.name)
