"""Engine selection policies: small pure classes, testable without Ray.

A policy sees the router's view of every engine (:class:`EngineSlot`) and a
:class:`RouteRequest`, and returns the engine to use, or None when no healthy engine
has a free slot for the request's split. The router reserves the slot right after
the choice, in the same event-loop step, so choosing and reserving are atomic.

Capacity rule (train/eval split): each engine has ``capacity`` slots, of which
``eval_quota`` are reserved for eval. Eval requests use only those; train requests use
the other ``capacity - eval_quota``, so train never takes capacity eval needs. With
``eval_quota == 0`` nothing is reserved and eval shares the train slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from inferpool import registry
from inferpool.config import RouterConfig
from inferpool.errors import ConfigError
from inferpool.types import Split


@dataclasses.dataclass(slots=True)
class EngineSlot:
    """The router's view of one engine's load and health."""

    engine_id: str
    capacity: int = 512
    eval_quota: int = 64
    train_in_flight: int = 0
    eval_in_flight: int = 0
    healthy: bool = True
    weight: float = 1.0  # 0..1, scales usable capacity
    queue_len: int = 0  # engine-reported requests waiting inside the engine (last probe)
    kv_cache_usage: float | None = None  # engine-reported KV-cache use 0..1 where the backend exposes it

    @property
    def in_flight(self) -> int:
        return self.train_in_flight + self.eval_in_flight

    def limit(self, split: Split) -> int:
        """Usable slots for a split (before subtracting what is in flight)."""
        if split == "eval" and self.eval_quota > 0:
            base = self.eval_quota
        else:
            base = self.capacity - self.eval_quota
        return int(base * max(0.0, min(1.0, self.weight)))

    def free(self, split: Split) -> int:
        if split == "eval" and self.eval_quota > 0:
            return self.limit("eval") - self.eval_in_flight
        if split == "eval":  # no reservation: eval shares the train slots
            return self.limit("train") - self.in_flight
        return self.limit("train") - self.train_in_flight - (self.eval_in_flight if self.eval_quota == 0 else 0)

    def reserve(self, split: Split, count: int = 1) -> None:
        if split == "eval":
            self.eval_in_flight += count
        else:
            self.train_in_flight += count

    def release(self, split: Split, count: int = 1) -> None:
        if split == "eval":
            self.eval_in_flight = max(0, self.eval_in_flight - count)
        else:
            self.train_in_flight = max(0, self.train_in_flight - count)


@dataclasses.dataclass(slots=True)
class RouteRequest:
    """What a policy may look at when choosing."""

    split: Split = "train"
    session_id: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    exclude: frozenset[str] = frozenset()


class Policy(Protocol):
    """Chooses an engine for a request, or None when none can take it."""

    name: str
    reads_prompt: bool
    """Whether ``choose`` looks at ``request.prompt_token_ids``. When False, callers do not send
    prompts to the router (a policy without this attribute is given them)."""

    def choose(self, engines: Sequence[EngineSlot], request: RouteRequest) -> EngineSlot | None: ...

    def on_served(self, engine_id: str, request: RouteRequest) -> None:
        """Called after the router reserved a slot on ``engine_id`` for ``request``."""
        ...


def can_take(engine: EngineSlot, request: RouteRequest) -> bool:
    """Healthy, not excluded, and a free slot for the request's split."""
    return engine.healthy and engine.engine_id not in request.exclude and engine.free(request.split) > 0


def candidates(engines: Sequence[EngineSlot], request: RouteRequest) -> list[EngineSlot]:
    """The engines that can take the request."""
    return [e for e in engines if can_take(e, request)]


def engine_pressure(slot: EngineSlot) -> tuple[int, float]:
    """What the engine reports about itself: queued requests, then KV-cache use."""
    return (slot.queue_len, slot.kv_cache_usage or 0.0)


class LeastLoaded:
    """The healthy engine with the most free capacity; ties broken round-robin."""

    name = "least_loaded"
    reads_prompt = False

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, engines: Sequence[EngineSlot], request: RouteRequest) -> EngineSlot | None:
        # one pass, each engine's free capacity computed once (a fleet has hundreds of engines)
        split, exclude = request.split, request.exclude
        best = 0
        tied: list[EngineSlot] = []
        for e in engines:
            if not e.healthy or (exclude and e.engine_id in exclude):
                continue
            free = e.free(split)
            if free > best:
                best, tied = free, [e]
            elif free == best and free > 0:
                tied.append(e)
        if not tied:
            return None
        if len(tied) > 1:  # among equally free engines prefer the one the engine reports as less busy
            least = min(engine_pressure(e) for e in tied)
            tied = [e for e in tied if engine_pressure(e) == least]
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice

    def on_served(self, engine_id: str, request: RouteRequest) -> None:
        return None


POLICIES = registry.POLICIES  # the one list of policy names (inferpool.registry)


def policy_options(config: RouterConfig) -> dict[str, Any]:
    """The constructor options of the configured policy, from RouterConfig fields."""
    if config.policy == "session_affinity":
        return {"abs_threshold": config.affinity_abs_threshold, "rel_threshold": config.affinity_rel_threshold}
    if config.policy == "prefix_aware":
        return {
            "block_size": config.prefix_block_size,
            "match_threshold": config.prefix_match_threshold,
            "max_blocks_per_engine": config.prefix_max_blocks_per_engine,
            "abs_threshold": config.affinity_abs_threshold,
            "rel_threshold": config.affinity_rel_threshold,
        }
    return {}


def make_policy(name: str, **options: Any) -> Policy:
    """Instantiate a policy by its ``RouterConfig.policy`` name (or ``module:attr`` target).

    ``options`` are passed to the policy's constructor as keywords (each policy
    documents its own); an unknown or invalid option raises ConfigError.
    """
    cls = registry.load(registry.resolve_policy(name))
    try:
        policy: Policy = cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"RouterConfig.policy {name!r}: bad options {options!r}: {exc}", field="policy") from exc
    return policy


def policy_reads_prompt(name: str) -> bool:
    """Whether the policy ``name`` looks at prompts (True when that cannot be told here, e.g.
    a policy class that only the router's process can import)."""
    try:
        cls = registry.load(registry.resolve_policy(name))
    except Exception:
        return True
    return bool(getattr(cls, "reads_prompt", True))
