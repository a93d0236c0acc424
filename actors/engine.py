"""The engine actor: one Ray actor per engine replica, wrapping one backend in-process.

:class:`EngineActor` is a plain class (constructing it starts nothing; ``start()``
starts the backend), so it can be tested without Ray. :func:`engine_actor_class`
returns it as a Ray actor class; :func:`engine_actor_options` computes the resources,
placement and environment of one replica from its :class:`EngineConfig`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import ray

from inferpool.actors.backends import create_backend
from inferpool.actors.backends.base import EngineBackend, PauseMode
from inferpool.actors.mailbox import Mailboxes, Outcome
from inferpool.actors.weights import WeightReceiver
from inferpool.config import EngineConfig
from inferpool.errors import BackendError, EngineDeadError, InferpoolError, RequestError
from inferpool.heap import freeze_heap, unfreeze_heap
from inferpool.log import setup_logging
from inferpool.metrics import MetricsRegistry
from inferpool.types import EngineInfo, EngineStats, GenerateRequest, GenerateResult, PromptLogprobs

logger = logging.getLogger(__name__)

_HANDLERS_DRAIN_S = 30.0  # pause("wait"): how long the handlers may take to hand back drained outputs


class EngineActor(WeightReceiver):
    """One engine replica: generate, health, stats, abort and lifecycle calls (weight updates:
    :class:`~inferpool.actors.weights.WeightReceiver`)."""

    def __init__(
        self,
        config: EngineConfig,
        engine_id: str,
        backend: EngineBackend | None = None,
        weight_transfer: str = "object_store",
        bundle_index: int | None = None,
        gc_freeze: bool = False,
    ) -> None:
        """``gc_freeze``: once started, freeze the start-up heap out of garbage collection
        (``PoolConfig.gc_freeze``, :mod:`inferpool.heap`)."""
        setup_logging()
        self.config = config
        self.engine_id = engine_id
        self.backend = backend if backend is not None else create_backend(config, engine_id)
        self.backend.weight_transfer = weight_transfer  # type: ignore[attr-defined]
        self._transfer_joined = False
        self._bundle_index = bundle_index
        self._gc_freeze = gc_freeze
        self._native: dict[str, Any] = {}
        self.info: EngineInfo | None = None
        self._in_flight: dict[str, float] = {}
        self._left = asyncio.Event()  # set each time a request leaves its handler (pause("wait") waits on it)
        self._by_session: dict[str, set[str]] = {}  # session_id -> its request ids in flight here
        self._aborting: set[str] = set()  # request ids already asked to abort (counted once)
        self._stats = EngineStats(engine_id=engine_id)
        self._started = time.monotonic()
        self.metrics = MetricsRegistry()
        self._mail = Mailboxes(self.generate)

    async def start(self) -> EngineInfo:
        """Start the backend (load the model); returns the engine's static facts."""
        if self.info is None:
            t0 = time.perf_counter()
            self.info = await self.backend.start()
            try:
                ctx = ray.get_runtime_context()
                self.info.node_id = ctx.get_node_id()
                self.info.placement_group_id = ctx.get_placement_group_id() or ""
                self.info.bundle_index = self._bundle_index
            except Exception:  # not inside Ray
                self.info.node_id = ""
            logger.info("engine %s (%s) started in %.1fs", self.engine_id, self.info.backend, time.perf_counter() - t0)
            if self._gc_freeze:  # counted once: gc.get_freeze_count() walks every frozen object
                self._stats.gc_frozen_objects = freeze_heap(f"engine {self.engine_id}")
        return self.info

    def _require_started(self) -> None:
        """A request reached an engine whose backend is not loaded: Ray restarted the actor and
        the router's probe has not loaded it again yet. Retryable: the caller goes elsewhere."""
        if self.info is None:
            raise EngineDeadError(
                f"engine {self.engine_id} is not started (restarted by Ray; its backend is loading again)"
            )

    # -- generation -------------------------------------------------------------------
    async def generate(self, request: GenerateRequest, echo_prompt: bool = True) -> GenerateResult:
        """Serve one request. Errors leave as inferpool errors, never bare backend ones.
        ``echo_prompt=False``: the result's ``prompt_token_ids`` come back empty when the engine
        received exactly the ids sent (the caller holds them; see ``GenerateResult.with_sent_prompt``)."""
        self._require_started()
        t0 = time.monotonic()
        self._in_flight[request.request_id] = t0
        if request.session_id is not None:
            self._by_session.setdefault(request.session_id, set()).add(request.request_id)
        self._stats.prompt_tokens += len(request.prompt_token_ids)
        tags = {"engine": self.engine_id, "split": request.split}
        self.metrics.inc("inferpool_requests_started_total", **tags)
        self.metrics.inc("inferpool_prompt_tokens_total", len(request.prompt_token_ids), engine=self.engine_id)
        self.metrics.set("inferpool_in_flight", len(self._in_flight), engine=self.engine_id)
        try:
            result = await self.backend.generate(request)
        except asyncio.CancelledError:
            self._stats.aborted += 1
            self.metrics.inc("inferpool_requests_failed_total", **tags)
            await self.backend.abort(request.request_id)
            raise
        except InferpoolError:
            self._stats.failed += 1
            self.metrics.inc("inferpool_requests_failed_total", **tags)
            raise
        except ValueError as exc:  # backends reject bad input with ValueError
            self._stats.failed += 1
            self.metrics.inc("inferpool_requests_failed_total", **tags)
            raise RequestError(f"engine {self.engine_id} rejected the request: {exc}") from exc
        except Exception as exc:
            self._stats.failed += 1
            self.metrics.inc("inferpool_requests_failed_total", **tags)
            logger.exception("engine %s: backend failed on %s", self.engine_id, request.request_id)
            raise BackendError(
                f"engine {self.engine_id} ({self.config.backend}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._in_flight.pop(request.request_id, None)
            self._left.set()
            self._aborting.discard(request.request_id)
            if request.session_id is not None:
                mine = self._by_session.get(request.session_id)
                if mine is not None:
                    mine.discard(request.request_id)
                    if not mine:
                        del self._by_session[request.session_id]
            self.metrics.set("inferpool_in_flight", len(self._in_flight), engine=self.engine_id)
        result.engine_id = self.engine_id
        self._stats.served += 1
        self._stats.generated_tokens += result.num_generated_tokens
        self.metrics.inc("inferpool_requests_finished_total", **tags)
        self.metrics.observe("inferpool_request_latency_seconds", time.monotonic() - t0, **tags)
        if result.ttft_s is not None:
            self.metrics.observe("inferpool_time_to_first_token_seconds", result.ttft_s, engine=self.engine_id)
        self.metrics.inc("inferpool_generated_tokens_total", result.num_generated_tokens, engine=self.engine_id)
        return result if echo_prompt else result.without_sent_prompt(request.prompt_token_ids)

    async def generate_batch(self, requests: list[GenerateRequest]) -> list[GenerateResult | InferpoolError]:
        """Serve many requests with one actor call; a failed request yields its error in place."""
        outcomes = await asyncio.gather(*(self.generate(r) for r in requests), return_exceptions=True)
        results: list[GenerateResult | InferpoolError] = []
        for out in outcomes:
            if isinstance(out, GenerateResult | InferpoolError):
                results.append(out)
            elif isinstance(out, BaseException):
                results.append(BackendError(f"engine {self.engine_id}: {type(out).__name__}: {out}"))
        return results

    # -- batched traffic (one caller process's requests, many per actor call: actors/mailbox.py)
    async def submit(self, caller: str, requests: list[GenerateRequest]) -> str:
        """Start serving ``requests`` for ``caller`` (results come back through ``collect``);
        returns the id of the caller's outbox, which changes when Ray restarts the actor or an
        idle outbox was dropped."""
        self._require_started()
        return self._mail.submit(caller, requests)

    async def collect(self, caller: str, wait_s: float) -> tuple[str, list[tuple[str, Outcome]]]:
        """(outbox id, [(request id, result or error)]) of ``caller``'s requests finished since
        its last collect; waits up to ``wait_s`` seconds while none is."""
        return await self._mail.collect(caller, wait_s)

    async def cancel(self, caller: str, request_ids: list[str]) -> int:
        """``caller`` gave up on these requests: stop them, deliver nothing; how many ran."""
        return self._mail.cancel(caller, request_ids)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Text-level OpenAI chat call (text-only backends such as hosted APIs)."""
        return await self._call("chat", self.backend.chat(body))

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """Text-level OpenAI completion call (text-only backends)."""
        return await self._call("completion", self.backend.completion(body))

    async def prompt_logprobs(self, prompt_token_ids: list[int], top_k: int) -> PromptLogprobs:
        """Top-k logprobs at every prompt position."""
        return await self._call("prompt_logprobs", self.backend.prompt_logprobs(prompt_token_ids, top_k))

    async def _call(self, what: str, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await a backend call; errors leave as inferpool errors. An engine whose backend is
        not loaded refuses it with a retryable error (the call never runs)."""
        try:
            self._require_started()
            return await coro
        except InferpoolError:
            raise
        except Exception as exc:
            raise BackendError(f"engine {self.engine_id} {what} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            coro.close()  # no-op once it ran; one refused unstarted does not warn "never awaited"

    async def abort(self, request_id: str) -> bool:
        """Abort one in-flight request; it ends with finish reason 'abort'. True the first time
        a request is asked to abort, so callers that reach it by different ways count it once."""
        if request_id not in self._in_flight or request_id in self._aborting:
            return False
        self._aborting.add(request_id)
        await self.backend.abort(request_id)
        return True

    async def abort_session(self, session_id: str) -> int:
        """Abort every request of ``session_id`` in flight here, whoever sent it; how many."""
        aborted = [await self.abort(rid) for rid in list(self._by_session.get(session_id, ()))]
        return sum(aborted)

    # -- health and stats ---------------------------------------------------------------
    async def health(self) -> bool:
        """Cheap liveness check (no generation): False when the backend is not started (e.g. the
        actor was restarted by Ray); raises if the backend cannot serve."""
        if self.info is None:
            return False
        await self.backend.health()
        return True

    async def stats(self) -> EngineStats:
        extra = await self.backend.backend_stats()
        self._stats.in_flight = len(self._in_flight)
        self._stats.queue_len = int(extra.get("queue_len", 0) or 0)
        self._stats.kv_cache_usage = extra.get("kv_cache_usage")
        self._stats.prefix_cache_hit_rate = extra.get("prefix_cache_hit_rate")
        self._stats.weight_version = extra.get("weight_version", getattr(self.backend, "weight_version", None))
        self._stats.uptime_s = time.monotonic() - self._started
        self.metrics.set("inferpool_queued", self._stats.queue_len, engine=self.engine_id)
        return self._stats

    def metrics_snapshot(self) -> dict[str, float]:
        """This engine's metric series (the local mirror of what Ray exports)."""
        return self.metrics.snapshot()

    def get_info(self) -> EngineInfo | None:
        return self.info

    # -- lifecycle ------------------------------------------------------------------------
    async def pause(self, mode: PauseMode = "keep") -> None:
        draining = set(self._in_flight)  # requests sent during the pause wait in the backend: not these
        await self.backend.pause(mode)
        if mode == "wait":  # the backend has finished them; their handlers here may still be handing
            await self._handlers_done(draining)  # the last outputs back (the caller then sees them done)

    async def _handlers_done(self, ids: set[str]) -> None:
        """Wait (bounded) until none of ``ids`` is in flight here any more."""
        end = time.monotonic() + _HANDLERS_DRAIN_S
        while not ids.isdisjoint(self._in_flight):
            self._left.clear()
            try:
                await asyncio.wait_for(self._left.wait(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                left = len(ids & self._in_flight.keys())
                logger.warning("engine %s: paused (wait), %d requests still in its handlers", self.engine_id, left)
                return

    async def resume(self) -> None:
        await self.backend.resume()

    async def sleep(self, level: int = 1) -> None:
        await self.backend.sleep(level)

    async def wake(self, tags: list[str] | None = None) -> None:
        await self.backend.wake(tags)

    async def reset_prefix_cache(self) -> None:
        await self.backend.reset_prefix_cache()

    async def control(self, method: str, kwargs: dict[str, Any] | None = None) -> Any:
        """Call a backend-specific control method it declares (e.g. the fake's inject_fault)."""
        allowed: frozenset[str] = getattr(self.backend, "control_methods", frozenset())
        if method not in allowed:
            raise RequestError(
                f"method: backend {self.config.backend!r} has no control method {method!r} (has: {sorted(allowed)})",
                field="method",
            )
        out = getattr(self.backend, method)(**(kwargs or {}))
        if asyncio.iscoroutine(out):
            out = await out
        return out

    async def shutdown(self) -> None:
        unfreeze_heap()  # what the engine held becomes collectable again
        self._stats.gc_frozen_objects = 0
        await self.backend.shutdown()


def engine_actor_options(config: EngineConfig, name: str, namespace: str, detached: bool) -> dict[str, Any]:
    """Ray actor options of one replica: resources, concurrency, process environment."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if config.resolved_subprocess() else "0"}
    env.update(config.env_vars)
    return {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached" if detached else None,
        "num_cpus": config.resolved_num_cpus(),
        "num_gpus": config.num_gpus,
        "max_concurrency": 100_000,
        "max_restarts": config.max_restarts,
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env},
    }


def engine_actor_class() -> Any:
    """EngineActor as a Ray actor class."""
    return _ENGINE_ACTOR


_ENGINE_ACTOR = ray.remote(EngineActor)
