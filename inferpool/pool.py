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
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from inferpool._ray import await_ref, ensure_ray, get_ref
from inferpool.actors.engine import engine_actor_class, engine_actor_options
from inferpool.config import EngineConfig, PoolConfig
from inferpool.errors import (
    ConfigError,
    EngineError,
    InferpoolError,
    NoHealthyEngineError,
    RequestError,
)
from inferpool.log import setup_logging
from inferpool.routing.router import Lease, RouterActor
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, SamplingParams, Split

logger = logging.getLogger(__name__)

_CONTROL_TIMEOUT_S = 60.0


def _router_name(name: str) -> str:
    return f"{name}:router"


def _engine_name(name: str, engine_id: str) -> str:
    return f"{name}:engine:{engine_id}"


def _pg_name(namespace: str, name: str, engine_id: str) -> str:
    return f"{namespace}:{name}:pg:{engine_id}"


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

    def __init__(self, config: PoolConfig, router: Any, infos: list[EngineInfo]) -> None:
        self.config = config
        self.name = config.name
        self.namespace = config.namespace
        self._router = router
        self._handles: dict[str, Any] = {}
        self._infos = {i.engine_id: i for i in infos}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]

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
            raise ConfigError(
                f"name: no pool named {name!r} in namespace {namespace!r}", field="name"
            ) from None
        config = get_ref(router.get_pool_config.remote(), timeout_s, "router")
        infos = get_ref(router.engine_infos.remote(), timeout_s, "router")
        return cls(config, router, infos)

    def __reduce__(self) -> tuple[Any, ...]:
        # A pool passed to a Ray task reconnects by name there.
        return (Pool._from_parts, (self.config, self._router, list(self._infos.values())))

    @classmethod
    def _from_parts(cls, config: PoolConfig, router: Any, infos: list[EngineInfo]) -> Pool:
        return cls(config, router, infos)

    def _start_engines(self, specs: list[tuple[str, int]]) -> None:
        """Create, start and register engines (in parallel, bounded by start timeouts)."""
        actor_cls = engine_actor_class()
        started: list[tuple[str, int, EngineConfig, Any, ray.ObjectRef]] = []
        for engine_id, g in specs:
            group = self.config.engines[g]
            options = engine_actor_options(
                group, _engine_name(self.name, engine_id), self.namespace, self.config.detached
            )
            bundle = {k: v for k, v in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"])) if v}
            if bundle:
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
            handle = actor_cls.options(**options).remote(group, engine_id)
            started.append((engine_id, g, group, handle, handle.start.remote()))
        for engine_id, g, group, handle, ref in started:
            info = get_ref(ref, group.start_timeout_s, f"engine {engine_id} start")
            get_ref(
                self._router.register.remote(
                    info, handle, group.max_requests_per_engine, group.eval_requests_per_engine, g
                ),
                _CONTROL_TIMEOUT_S,
                "router register",
            )
            self._handles[engine_id] = handle
            self._infos[engine_id] = info

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
                    f"prompt_token_ids[{pos}]: {tok!r} is not a token id of this model's "
                    f"vocabulary [0, {vocab})",
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
    ) -> GenerateResult:
        """Token-in / token-out generation of ``sampling.n`` choices for one prompt."""
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
            )
            for k, (offset, size) in enumerate(parts)
        ]
        results = await asyncio.gather(*(self._run(r, timeout_s) for r in requests))
        if len(results) == 1:
            return results[0]
        return merge_results(request_id, results)

    async def _run(self, request: GenerateRequest, timeout_s: float | None) -> GenerateResult:
        """route → generate → release, retried on another engine for retryable faults."""
        exclude: list[str] = []
        attempts = self.config.router.max_attempts
        last_error: InferpoolError | None = None
        for attempt in range(1, attempts + 1):
            try:
                lease: Lease = await await_ref(
                    self._router.acquire.remote(
                        request.split, request.session_id, request.prompt_token_ids[:256], exclude
                    ),
                    self.config.router.acquire_timeout_s + 10,
                    "router acquire",
                )
            except NoHealthyEngineError:
                if last_error is not None:  # no engine left to retry on: surface the original
                    raise last_error from None
                raise
            try:
                handle = await self._handle(lease.engine_id)
                timeout = timeout_s or self._timeout(lease.engine_id)
                return await await_ref(handle.generate.remote(request), timeout, f"engine {lease.engine_id}")
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
                await self._release(self._router.release.remote(lease.lease_id))
        raise AssertionError("unreachable")

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
            return list(
                await asyncio.gather(*(self.generate(p, sp, split, None, timeout_s) for p in prompts))
            )
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
                            asyncio.ensure_future(
                                self._run_chunk(engine_id, chunk, idx, requests, results, timeout_s)
                            )
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
            await self._release(self._router.release_many.remote([lease.lease_id for lease in leases]))
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

    # -- operations ------------------------------------------------------------------
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
        return {
            "pool": self.name,
            "engines": engines,
            "router": {
                "policy": self.config.router.policy,
                "leases": get_ref(self._router.num_leases.remote(), _CONTROL_TIMEOUT_S, "router"),
            },
        }

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
        mine = sorted((eid for eid, g in groups.items() if g == group), key=lambda e: int(e[1:]))
        if replicas > len(mine):
            next_index = 1 + max((int(e[1:]) for e in groups), default=-1)
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
        for eid, handle in handles.items():
            self._kill_engine(eid, handle)
        try:
            ray.kill(self._router)
        except Exception:
            logger.debug("router already gone", exc_info=True)
        logger.info("pool %r shut down", self.name)
