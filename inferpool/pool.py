"""The Pool: the facade users hold over one pool of engines.

It starts or connects to a pool and hands each call to the stage that does the work:
requests to the :class:`~inferpool.routing.dispatch.Dispatcher` (lease → engine → release,
retries, ``n`` split), chat and completion turns to :mod:`inferpool.turns` (render →
dispatch → parse), managed sessions to their :class:`~inferpool.session.Session` handles,
engine placement and lifetime to the :class:`~inferpool.actors.fleet.Fleet`, weight
pushes to :class:`~inferpool.weights.push.WeightPusher`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import ray

from inferpool.actors.fleet import Fleet, find_router, find_routers
from inferpool.chat import ChatRenderer, load_renderer, validate_messages
from inferpool.config import PoolConfig
from inferpool.errors import ConfigError, RequestError, SessionError
from inferpool.heap import freeze_caller_heap
from inferpool.hub import check_model_source
from inferpool.lifecycle import EngineLifecycle
from inferpool.log import setup_logging
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref, ensure_ray, get_ref
from inferpool.reasoning import ReasoningConfig
from inferpool.routing.batching import CallBatcher, LoopLocal
from inferpool.routing.dispatch import Dispatcher
from inferpool.routing.shards import RouterSet
from inferpool.sequences import is_session_id, new_session_id, shard_of
from inferpool.stats import pool_metrics, pool_stats
from inferpool.turns import ChatAsk, chat_turn, completion_turn, text_call, text_chat
from inferpool.types import EngineInfo, GenerateRequest, GenerateResult, PromptLogprobs, SamplingParams, Split
from inferpool.weights.push import WeightPusher

if TYPE_CHECKING:
    from inferpool.session import Session

logger = logging.getLogger(__name__)


def _sampling(sampling: SamplingParams | dict[str, Any] | None) -> SamplingParams:
    if sampling is None:
        return SamplingParams()
    if isinstance(sampling, dict):
        return SamplingParams(**sampling)
    if not isinstance(sampling, SamplingParams):
        raise RequestError(
            f"sampling: expected ip.SamplingParams or a dict, got {type(sampling).__name__}", field="sampling"
        )
    return sampling


def _split(split: str) -> Split:
    if split not in ("train", "eval"):
        raise RequestError(f"split: must be 'train' or 'eval', got {split!r}", field="split")
    return split  # type: ignore[return-value]


class Pool(EngineLifecycle):
    """A pool of engine actors behind one router. Create with :meth:`start` or :meth:`connect`.

    Weight updates, pause/resume and sleep/wake: :class:`~inferpool.lifecycle.EngineLifecycle`."""

    def __init__(
        self,
        config: PoolConfig,
        routers: Any,
        infos: Sequence[EngineInfo] = (),
        stores: Sequence[Any] = (),
    ) -> None:
        """``routers``: the router shards in shard order (a list; or the one router)."""
        self.config = config
        self.name = config.name
        self.namespace = config.namespace
        self.routers = RouterSet.of(routers)
        self._router = self.routers.primary
        self._stores: list[Any] = list(stores)
        self.dispatcher = Dispatcher(self.routers, config, infos)
        self.fleet = Fleet(config, self.routers)
        self._weights = WeightPusher(config, self.routers, self.fleet.broadcast)
        self._renderer: ChatRenderer | None = None
        self._recorders: dict[tuple[int, str], LoopLocal[CallBatcher]] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def start(cls, config: PoolConfig | None = None) -> Pool:
        """Start a named pool on the current Ray cluster (a local one when none is running)."""
        setup_logging()
        config = config or PoolConfig()
        for i, group in enumerate(config.engines):  # fail now, not after an engine's download retries
            if group.backend in ("vllm", "sglang") and group.model is not None:
                check_model_source(group.model, f"PoolConfig.engines[{i}].model")
            if group.tokenizer is not None:
                check_model_source(group.tokenizer, f"PoolConfig.engines[{i}].tokenizer")
        ensure_ray()
        if find_router(config.name, config.namespace) is not None:
            raise ConfigError(
                f"PoolConfig.name: a pool named {config.name!r} is already running in namespace "
                f"{config.namespace!r}; use Pool.connect({config.name!r}) or another name",
                field="name",
            )
        fleet = Fleet.start_router(config)
        pool = cls(config, fleet.routers.routers)
        try:
            specs: list[tuple[str, int]] = []
            for g, group in enumerate(config.engines):
                specs.extend((f"e{len(specs)}", g) for _ in range(group.replicas))
            pool.dispatcher.engines.set_infos(fleet.start_engines(specs).values())
            pool._stores = fleet.start_stores()
        except BaseException:
            pool.shutdown()
            raise
        logger.info("pool %r started with %d engines", config.name, len(specs))
        freeze_caller_heap(config.gc_freeze, f"pool {config.name!r} started")
        return pool

    @classmethod
    def connect(cls, name: str = "default", namespace: str = "inferpool", timeout_s: float = 60.0) -> Pool:
        """Connect to a pool another process started (from any driver, task or actor)."""
        setup_logging()
        if not ray.is_initialized():
            ensure_ray(address="auto")
        router = find_router(name, namespace)
        if router is None:
            raise ConfigError(f"name: no pool named {name!r} in namespace {namespace!r}", field="name")
        config = get_ref(router.get_pool_config.remote(), timeout_s, "router")
        routers = find_routers(config)
        infos = routers.engine_infos()
        stores = get_ref(router.stores.remote(), timeout_s, "router")
        freeze_caller_heap(config.gc_freeze, f"pool {name!r} connected")
        return cls(config, routers.routers, infos, stores)

    def __reduce__(self) -> tuple[Any, ...]:
        # A pool passed to a Ray task arrives there connected to the same actors.
        return (Pool, (self.config, self.routers.routers, self.engine_infos_known(), self._stores))

    # -- generation ---------------------------------------------------------------------
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
        ids = cast(list[int], prompt_token_ids)  # checked (and made a list) by dispatcher.check
        request = GenerateRequest(
            self.dispatcher.request_id(), ids, _sampling(sampling), _split(split), session_id, 0, workload
        )
        await self.dispatcher.check(request)
        return await self.dispatcher.generate(request, timeout_s)

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
        Every prompt is checked before any is sent; an error names the bad one (``prompts[3]``).
        """
        sp, split = _sampling(sampling), _split(split)
        if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
            raise RequestError(f"prompts: must be a list of prompts, got {type(prompts).__name__}", field="prompts")
        requests = [GenerateRequest(self.dispatcher.request_id(), cast(list[int], p), sp, split) for p in prompts]
        for i, request in enumerate(requests):
            await self.dispatcher.check(request, where=f"prompts[{i}].")
        if sp.n > self.config.router.max_n_per_request:  # split per prompt: one call each
            return list(await asyncio.gather(*(self.dispatcher.generate(r, timeout_s) for r in requests)))
        return await self.dispatcher.generate_many(requests, chunk_size, timeout_s)

    # -- chat, completion, scoring ------------------------------------------------------
    def renderer(self) -> ChatRenderer:
        """The chat renderer of this pool's tokenizer (loaded once per process, thread-safe)."""
        if self._renderer is None:
            self._renderer = load_renderer(self.config)
            freeze_caller_heap(self.config.gc_freeze, "chat renderer loaded")
        return self._renderer

    def model_name(self) -> str:
        return self.config.model_name()

    def effective_reasoning(self, reasoning: ReasoningConfig | None, skip: bool) -> ReasoningConfig | None:
        """The call's reasoning, else the pool default; None when the call skips reasoning."""
        if skip:
            return None
        if reasoning is not None and not isinstance(reasoning, ReasoningConfig):
            reasoning = ReasoningConfig(**dict(reasoning))
        return reasoning if reasoning is not None else self.config.reasoning

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
        continue_final_message: bool = False,
        split: Split = "train",
        **sampling: Any,
    ) -> ChatCompletion:
        """Stateless OpenAI-shaped chat: render with the chat template, generate, parse.
        A conversation ending with an assistant message gets a new assistant turn, or with
        ``continue_final_message=True`` a continuation of that message."""
        reasoning = self.effective_reasoning(reasoning, skip_reasoning)
        split = _split(split)
        if await self.dispatcher.engines.text_only():
            return await text_chat(self.dispatcher, messages, n, tools, tool_choice, reasoning, split, sampling)
        ask = ChatAsk(
            messages, n, sampling, tools, tool_choice, reasoning, chat_template_kwargs, split,
            continue_final=continue_final_message,
        )  # fmt: skip
        done = await chat_turn(
            self.dispatcher, await asyncio.to_thread(self.renderer), ask, model_name=self.model_name()
        )
        out: ChatCompletion = done.response
        return out

    async def complete(
        self, prompt: str, n: int = 1, *, split: Split = "train", skip_reasoning: bool = False, **sampling: Any
    ) -> Completion:
        """Stateless OpenAI-shaped completion of a text prompt."""
        split = _split(split)
        if await self.dispatcher.engines.text_only():
            body = {"prompt": prompt, "n": n, **sampling}
            return Completion(**await text_call(self.dispatcher, "completion", body, split))
        done = await completion_turn(
            self.dispatcher,
            await asyncio.to_thread(self.renderer),
            prompt,
            n=n,
            sampling=sampling,
            split=split,
            model_name=self.model_name(),
        )
        out: Completion = done.response
        return out

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
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RequestError(f"top_k: must be an int >= 1, got {top_k!r}", field="top_k")
        if input_ids is not None:
            ids: Any = input_ids
        else:
            renderer = await asyncio.to_thread(self.renderer)
            text = renderer.template(validate_messages(messages), add_generation_prompt=False) if messages else prompt
            ids = renderer.encode(str(text))
        request = GenerateRequest(self.dispatcher.request_id(), ids, SamplingParams(), _split(split))
        await self.dispatcher.check(request, where="input_ids." if input_ids is not None else "")
        ids = request.prompt_token_ids
        out: PromptLogprobs = await self.dispatcher.call(request.split, lambda h: h.prompt_logprobs.remote(ids, top_k))
        return out.to_dict()

    # -- sessions -----------------------------------------------------------------------
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
        from inferpool.session import Session, SessionOptions

        if not self._stores:
            raise ConfigError("sessions: this pool has no session stores", field="sessions")
        sid = session_id or new_session_id()
        if not is_session_id(sid):
            raise RequestError(f"session_id: {sid!r} is not a hex session id", field="session_id")
        options = SessionOptions(track_tree=track_tree, tool_parser=tool_parser)
        return Session(self, sid, self.session_store(sid), options, existing=existing, fresh=session_id is None)

    def session_store(self, session_id: str) -> Any:
        """The store actor that owns a session id."""
        return self._stores[shard_of(session_id, len(self._stores))]

    def session_recorder(self, session_id: str, method: str = "record_batch") -> CallBatcher:
        """Batched calls of this process to the session's store (``record_batch``: records of turns
        run here; ``close_batch``: closes): one call per event-loop turn carries every session's."""
        shard = shard_of(session_id, len(self._stores))
        if (shard, method) not in self._recorders:
            send = getattr(self._stores[shard], method).remote
            self._recorders[shard, method] = LoopLocal(
                lambda: CallBatcher(send, CONTROL_TIMEOUT_S, f"session store {method}")
            )
        return self._recorders[shard, method].get()

    def session_stores(self) -> list[Any]:
        """The SessionStore actor handles, in shard order."""
        return list(self._stores)

    def session_timeout_s(self) -> float:
        """Upper bound of one session call: every attempt may wait for a slot and time out."""
        attempts = self.config.router.max_attempts
        return attempts * (self.dispatcher.engines.max_timeout() + self.config.router.acquire_timeout_s) + 30.0

    async def abort_session(self, session_id: str) -> int:
        """Abort the session's in-flight requests: each ends at once with finish reason
        ``abort`` and the tokens sampled so far (a session turn records them as usual).
        Returns how many requests were aborted."""
        count = await self.dispatcher.abort_session(session_id)
        if self.dispatcher.runs_session(session_id):
            return count
        if is_session_id(session_id) and self._stores:
            try:  # turns that run in a store (and their requests still being routed there)
                store = self.session_store(session_id)
                count += await await_ref(store.abort.remote(session_id), CONTROL_TIMEOUT_S, "session store")
            except SessionError:  # not a managed session (or gone): nothing runs for it there
                pass
        return count + await self._abort_on_engines(session_id)

    async def _abort_on_engines(self, session_id: str) -> int:
        """Abort the session's requests other processes sent (a session's turns run in the caller
        that made it): the engines know them by session id; one aborted already is not counted."""
        found = await self.fleet.broadcast(
            "abort_session", lambda h: h.abort_session.remote(session_id), CONTROL_TIMEOUT_S
        )
        return sum(found.values())

    # -- operations ---------------------------------------------------------------------
    @property
    def router(self) -> Any:
        """The router actor handle (control calls: health, engine infos, weights, load)."""
        return self._router

    def set_engine_weight(self, engine_id: str, weight: float) -> None:
        """Scale one engine's usable capacity (0..1) at run time."""
        get_ref(self.routers.owner(engine_id).set_engine_weight.remote(engine_id, weight), CONTROL_TIMEOUT_S, "router")

    def set_workload_weight(self, workload: str, weight: float) -> None:
        """Cap a workload's share (0..1) of capacity at run time; 0 parks it."""
        self.routers.gather("set_workload_weight", workload, weight)

    def engine_infos_known(self) -> list[EngineInfo]:
        """The engines this process knows of (no router call)."""
        return list(self.dispatcher.engines.known_infos().values())

    def engine_ids(self) -> list[str]:
        return sorted(self.dispatcher.engines.known_infos())

    def engine_infos(self) -> list[EngineInfo]:
        return self.routers.engine_infos()

    def engine_handle(self, engine_id: str) -> Any:
        """The actor handle of one engine (for lifecycle calls and tests)."""
        return self.fleet.engine_handle(engine_id)

    def stats(self) -> dict[str, Any]:
        """Engines (health, load, counters, node), session shards and router state, as plain dicts."""
        return pool_stats(self.config, self.routers, self._stores)

    def metrics_snapshot(self) -> dict[str, float]:
        """Every metric series of the pool as one flat dict (see :func:`inferpool.stats.pool_metrics`)."""
        return pool_metrics(self.routers, self._stores)

    def scale(self, replicas: int, group: int = 0, drain_timeout_s: float = 60.0) -> list[str]:
        """Set the replica count of an engine group; returns the engine ids now in the group."""
        ids = self.fleet.scale(replicas, group, drain_timeout_s)
        self.dispatcher.engines.set_infos(self.engine_infos())
        return ids

    def shutdown(self) -> None:
        """Stop every engine, the session stores and the router; the pool's name can be reused."""
        self._weights.drop_sender()
        self.fleet.shutdown(self._stores, self.dispatcher.engines.known_handles())
        logger.info("pool %r shut down", self.name)
