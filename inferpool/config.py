"""Typed configuration of a pool: engines, router, sessions, weight transfer (placement:
:mod:`inferpool.placement_config`, reasoning: :mod:`inferpool.reasoning_config`, both
re-exported here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from inferpool.errors import ConfigError
from inferpool.placement_config import ControlPlacement, PlacementConfig
from inferpool.reasoning_config import ReasoningConfig
from inferpool.registry import resolve_backend, resolve_policy
from inferpool.validation import ConfigModel

__all__ = [
    "ControlPlacement",
    "EngineConfig",
    "PlacementConfig",
    "PoolConfig",
    "ReasoningConfig",
    "RouterConfig",
    "SessionConfig",
    "WeightTransferConfig",
    "WeightTransferMethod",
    "check_quota",
]


class EngineConfig(ConfigModel):
    """One group of identical engine replicas."""

    backend: str = Field(
        "vllm",
        description="Engine backend: in-process 'vllm' / 'sglang', the deterministic 'fake', a "
        "remote server ('openai', 'vllm_http', 'sglang_http', 'trl_http'), a name registered with "
        "inferpool.registry.register_backend, or a 'package.module:Class' target.",
    )
    model: str | None = Field(
        None,
        description="Hugging Face id or local path. None: the embedded tiny model (ip.tiny_model()).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer (HF id or path) used to render chat for this pool. None: the model's; "
        "the fake engine has none unless set here.",
    )
    replicas: int = Field(1, ge=1, description="How many engine actors of this kind to start.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per engine (fractional for colocation).")
    num_cpus: float | None = Field(
        None,
        ge=0.0,
        description="Logical CPUs reserved per engine. None: 1 with GPUs; 0.5 for a CPU vLLM engine "
        "(two engines and a worker task fit on 2 cores); 0 for the fake engine.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed through to the backend (e.g. vLLM AsyncEngineArgs, fake engine options).",
    )
    engine_core_subprocess: bool | None = Field(
        None,
        description="vLLM: sets VLLM_ENABLE_V1_MULTIPROCESSING for the engine actor. AsyncLLM always "
        "runs its engine core in a subprocess; on, that core runs the model in a worker process of its "
        "own; off, the core runs the model itself (one process fewer, starts faster on small CPU "
        "machines). None: on with a GPU, off on CPU.",
    )
    dtype: str | None = Field(None, description="Model dtype. None: float32 on CPU (exact logprobs), 'auto' on GPU.")
    seed: int = Field(0, description="Engine seed (vLLM's global seed, the fake engine's RNG seed).")
    max_requests_per_engine: int | None = Field(
        None, ge=1, description="Capacity override for these engines; None: RouterConfig's value."
    )
    eval_requests_per_engine: int | None = Field(
        None, ge=0, description="Eval quota override for these engines; None: RouterConfig's value."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A generate call that takes longer is aborted and reported as a timeout."
    )
    start_timeout_s: float = Field(600.0, gt=0, description="How long an engine may take to start.")
    max_restarts: int = Field(
        3,
        ge=-1,
        description="Ray restarts of a dead engine actor (-1: unlimited); the router's probes "
        "restart its backend and route to it again.",
    )
    base_url: str | None = Field(None, description="Remote backends: the server's base URL.")
    api_key: str | None = Field(None, description="Remote backends: bearer token.")
    provider: str | None = Field(
        None, description="Remote 'openai' backend: provider name (openai, openrouter, anthropic, ...)."
    )
    timeout: float = Field(120.0, gt=0, description="Remote backends: per-HTTP-request timeout (s).")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the engine actor's process."
    )
    placement_group: Any = Field(
        None,
        description="Colocation: a Ray placement group (or its name) the trainer created; these engines "
        "are scheduled into its bundles instead of placement groups of their own, and the pool never "
        "removes it. None: each engine gets its own placement group (dedicated resources).",
    )
    bundle_indices: list[int] | None = Field(
        None,
        description="With placement_group: the bundle each replica goes to (replica i -> bundle_indices[i]; "
        "one per replica, distinct unless engines share a bundle by fractional num_gpus). None: bundles "
        "0..replicas-1.",
    )

    _backend_target: str = PrivateAttr("")  # resolved where the config was made, used in the engine actor

    def cross_check(self) -> None:
        entry = resolve_backend(self.backend)
        if entry.remote and not self.base_url:
            raise ConfigError(f"EngineConfig.base_url: backend {self.backend!r} needs base_url", field="base_url")
        if self.placement_group is not None and entry.remote:
            raise ConfigError(
                f"EngineConfig.placement_group: remote backend {self.backend!r} runs no local engine to place",
                field="placement_group",
            )
        self._backend_target = entry.target

    def backend_target(self) -> str:
        """The ``module:attr`` that builds this group's backend."""
        return self._backend_target or resolve_backend(self.backend).target

    @model_validator(mode="after")
    def _check_placement(self) -> EngineConfig:
        if self.bundle_indices is not None:
            if self.placement_group is None:
                raise ValueError("bundle_indices needs placement_group")
            if len(self.bundle_indices) < self.replicas:
                raise ValueError(
                    f"bundle_indices lists {len(self.bundle_indices)} bundles for {self.replicas} replicas"
                )
            if any(i < 0 for i in self.bundle_indices):
                raise ValueError("bundle_indices must be >= 0")
        return self

    def resolved_bundle_indices(self) -> list[int]:
        """Bundles of the trainer's placement group these replicas may use, in order."""
        if self.bundle_indices is not None:
            return list(self.bundle_indices)
        return list(range(self.replicas))

    def resolved_num_cpus(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        if self.num_gpus > 0:
            return 1.0
        if self.backend == "vllm" or self.backend == "sglang":
            return 0.5
        return 0.0

    def resolved_subprocess(self) -> bool:
        if self.engine_core_subprocess is not None:
            return self.engine_core_subprocess
        return self.num_gpus > 0


class RouterConfig(ConfigModel):
    """Selection policy and capacity of the router actor."""

    policy: str = Field(
        "least_loaded",
        description="Engine selection policy: least_loaded, session_affinity, prefix_aware, power_of_two, a "
        "name registered with inferpool.registry.register_policy, or a 'package.module:Class' target.",
    )
    max_requests_per_engine: int = Field(
        512, ge=1, description="Concurrent requests one engine may hold (train + eval)."
    )
    eval_requests_per_engine: int = Field(
        64,
        ge=0,
        description="Slots per engine reserved for eval requests: eval uses only these, train uses "
        "the rest, so train never takes capacity eval needs.",
    )
    affinity_abs_threshold: int = Field(
        32,
        ge=0,
        description="session_affinity/prefix_aware: leave the preferred engine only when it holds "
        "more than this many requests above the least-loaded one ...",
    )
    affinity_rel_threshold: float = Field(
        0.5, ge=0.0, description="... and at least (1 + this) times its load (both thresholds must pass)."
    )
    prefix_block_size: int = Field(16, ge=1, description="prefix_aware: tokens per hashed block.")
    prefix_match_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="prefix_aware: minimum share of the prompt's blocks an engine must hold."
    )
    prefix_max_blocks_per_engine: int = Field(
        50_000, ge=1, description="prefix_aware: bound of the per-engine prefix index (LRU eviction)."
    )
    route_prefix_tokens: int = Field(
        4096, ge=0, description="How many leading prompt tokens the router sees for prefix-aware routing."
    )
    max_n_per_request: int = Field(
        8, ge=1, description="Requests with larger n are split into sub-requests of at most this n."
    )
    shards: int = Field(
        1,
        ge=1,
        description="Router actors. Each is the authority over its own engines (an engine belongs to shard "
        "crc32(engine id) % shards); a caller asks the shard its session hashes to, else the next in turn, "
        "and moves on to the others when that one has no free slot. One router actor holds a few thousand "
        "lease decisions per second per core; more shards, more decisions (each needs a core of its own).",
    )
    acquire_timeout_s: float = Field(
        60.0, gt=0, description="Bounded wait for a free, healthy engine before a clear error."
    )
    lease_timeout_s: float = Field(
        3600.0, gt=0, description="A lease not released after this long is reclaimed (caller died)."
    )
    health_interval_s: float = Field(5.0, gt=0, description="Seconds between health checks of each engine.")
    health_timeout_s: float = Field(10.0, gt=0, description="A health check slower than this fails.")
    unhealthy_after: int = Field(1, ge=1, description="Consecutive failed checks that mark an engine unhealthy.")
    max_attempts: int = Field(3, ge=1, description="Total attempts per request across engines for retryable faults.")
    batch_engine_calls: bool = Field(
        True,
        description="Each caller process sends its requests for an engine in one actor call per event-loop turn "
        "and collects finished results in batches (a fraction of an actor call per request); False: one actor "
        "call per request. Either way each request is leased, retried and aborted alike.",
    )
    max_staleness: int | None = Field(
        None,
        ge=0,
        description="Bound, in weight updates, on how old a session's earlier sampled tokens may be when a "
        "turn extends them. None: no bound.",
    )
    staleness_policy: Literal["reject", "requeue"] = Field(
        "reject",
        description="A turn past max_staleness: 'reject' raises StaleSessionError; 'requeue' runs the turn "
        "again from the messages under the current weights (a fresh prompt, the stale sequence kept).",
    )

    _policy_target: str = PrivateAttr("")  # resolved where the config was made, used in the router actor

    def cross_check(self) -> None:
        check_quota(self.max_requests_per_engine, self.eval_requests_per_engine, "RouterConfig.")
        self._policy_target = resolve_policy(self.policy)

    def policy_target(self) -> str:
        """The ``module:attr`` that builds the policy."""
        return self._policy_target or resolve_policy(self.policy)


def check_quota(capacity: int, eval_quota: int, where: str) -> None:
    """Train requests get ``capacity - eval_quota`` slots: a quota that leaves none is refused."""
    if eval_quota >= capacity:
        raise ConfigError(
            f"{where}eval_requests_per_engine ({eval_quota}) must be below {where}max_requests_per_engine "
            f"({capacity}): the eval quota is reserved out of the capacity, so train requests would get "
            "no slot at all (set eval_requests_per_engine=0 to let eval share the train slots)",
            field="eval_requests_per_engine",
        )


class SessionConfig(ConfigModel):
    """Managed sessions."""

    shards: int = Field(2, ge=1, description="Number of SessionStore actors sessions are hashed over.")
    idle_ttl_s: float = Field(3600.0, gt=0, description="A session idle this long is evicted.")
    allow_placeholder_tokens: bool = Field(
        False,
        description="Allow sessions on backends without token ids (hosted APIs), recording text "
        "with placeholder tokens. Also enabled by INFERPOOL_ALLOW_PLACEHOLDER_TOKENS=1.",
    )
    turns_in_caller: bool = Field(
        True,
        description="Where the turns of a session made with pool.session() run: in the caller's process "
        "(it keeps a mirror of the session, renders only the new messages and calls the engine itself; "
        "the store checks and records what each turn added, so store CPU scales with the callers), or "
        "in the store (False). Handles on existing sessions (existing=True, the HTTP ingress) always "
        "run their turns in the store.",
    )


WeightTransferMethod = Literal["object_store", "nccl", "ipc", "gloo"]


class WeightTransferConfig(ConfigModel):
    """How Pool.update_weights moves a trainer's weights into the engines."""

    method: WeightTransferMethod = Field(
        "object_store",
        description="'object_store': one ray.put per chunk, every engine fetches and loads (any backend, "
        "CPU or GPU). 'nccl': vLLM's NCCL broadcast from the trainer's GPU (separate GPUs). 'ipc': vLLM's "
        "CUDA IPC handles (engines colocated on the trainer's GPU); for SGLang engines 'nccl' is SGLang's "
        "update_weights_from_distributed. 'gloo': the same broadcast protocol over "
        "a CPU process group (CPU vLLM and fake engines). Native methods need update_weights to be called "
        "in the process that holds the tensors.",
    )
    master_address: str | None = Field(
        None, description="nccl/gloo rendezvous host (the trainer's). None: this node's address."
    )
    master_port: int | None = Field(
        None, ge=1, le=65535, description="nccl/gloo rendezvous port. None: a free port, chosen per group."
    )
    packed: bool = Field(True, description="nccl/ipc: vLLM's packed transfer (tensors batched into buffers).")
    timeout_s: float = Field(600.0, gt=0, description="Bound on the group's rendezvous and on each update.")
    keep_latest: bool = Field(
        True,
        description="object_store: keep the last update's chunks in the object store, so engines added by "
        "scale() or restarted after a crash load them before serving (costs one copy of the weights in "
        "the object store, spilled to disk under pressure).",
    )


class PoolConfig(ConfigModel):
    """A whole pool: its name, engines, router and sessions."""

    name: str = Field("default", min_length=1, description="Pool name; Pool.connect(name) finds it.")
    engines: list[EngineConfig] = Field(
        default_factory=lambda: [EngineConfig()],
        description="Engine groups. Default: one vLLM engine on the embedded tiny model.",
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router settings.")
    sessions: SessionConfig = Field(default_factory=SessionConfig, description="Session settings.")
    reasoning: ReasoningConfig | None = Field(
        None, description="Default reasoning settings for chat calls (a call's own reasoning= wins)."
    )
    weight_transfer: WeightTransferConfig = Field(
        default_factory=WeightTransferConfig, description="How update_weights reaches the engines."
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig, description="Nodes of the router and session stores; the GPU check."
    )
    namespace: str = Field("inferpool", description="Ray namespace of the pool's named actors.")
    detached: bool = Field(False, description="Keep the pool's actors alive after the starting driver exits.")
    start_timeout_s: float = Field(900.0, gt=0, description="How long Pool.start waits for all engines.")
    gc_freeze: Literal["pool", "all", "off"] = Field(
        "pool",
        description="Python's garbage collector (inferpool.heap): 'pool': the pool's engine actors, "
        "routers and session stores collect once after starting and freeze what survives, so later "
        "collections skip their start-up heap (full collections of it took 170-260 ms each); 'all': "
        "also the process that starts or connects the pool, once started and once its chat renderer "
        "is loaded (an object alive then and later dropped inside a reference cycle is never freed); "
        "'off': neither.",
    )

    @field_validator("engines")
    @classmethod
    def _non_empty(cls, v: list[EngineConfig]) -> list[EngineConfig]:
        if not v:
            raise ValueError("at least one engine group is needed")
        return v

    def cross_check(self) -> None:
        for i, group in enumerate(self.engines):
            capacity = group.max_requests_per_engine or self.router.max_requests_per_engine
            quota = (
                self.router.eval_requests_per_engine
                if group.eval_requests_per_engine is None
                else group.eval_requests_per_engine
            )
            check_quota(capacity, quota, f"PoolConfig.engines[{i}].")

    def model_name(self) -> str:
        """The model name clients see (the first engine group's model)."""
        group = self.engines[0]
        return group.model or ("inferpool/tiny-chat" if group.backend in ("vllm", "sglang") else group.backend)

    @model_validator(mode="after")
    def _check_transfer(self) -> PoolConfig:
        method = self.weight_transfer.method
        if method == "object_store":
            return self
        native = {"nccl": ("vllm", "sglang"), "ipc": ("vllm",), "gloo": ("vllm", "fake")}[method]
        kinds = sorted({e.backend for e in self.engines})
        bad = [k for k in kinds if k not in native]
        if bad:
            raise ValueError(
                f"weight_transfer.method {method!r} is supported by {list(native)} engines, not {bad}; "
                "use 'object_store' (any backend)"
            )
        if len(kinds) > 1:
            raise ValueError(
                f"weight_transfer.method {method!r} needs one engine backend in the pool, got {kinds} "
                "(the trainer side differs per backend); use 'object_store' for mixed pools"
            )
        return self
