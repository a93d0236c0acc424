"""The one registry of engine backends and routing policies, by name.

``EngineConfig.backend`` and ``RouterConfig.policy`` are validated against it, and each
name resolves to an import target (``"package.module:attr"``) that the config carries to
the actors that build the object, so a third-party backend or policy registered in the
driver works in every engine and router process without registering it there too::

    import inferpool as ip
    from inferpool.registry import register_backend, register_policy

    register_backend("mine", "my_pkg.engines:MyBackend")    # MyBackend(config, engine_id)
    register_policy("sticky", "my_pkg.routing:Sticky")      # Sticky() with choose/on_served
    pool = ip.Pool.start(ip.PoolConfig(
        engines=[ip.EngineConfig(backend="mine")], router=ip.RouterConfig(policy="sticky")))

A target given directly (``backend="my_pkg.engines:MyBackend"``) works without
registering. The module must be importable where the actors run (installed on every node).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from inferpool.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    """Where a backend's class lives and what it needs."""

    target: str  # "package.module:attr", called as attr(config, engine_id)
    remote: bool = False  # talks to a server someone else runs: needs EngineConfig.base_url


BACKENDS: dict[str, BackendEntry] = {
    "vllm": BackendEntry("inferpool.actors.backends.vllm.backend:VLLMBackend"),
    "sglang": BackendEntry("inferpool.actors.backends.sglang.backend:SGLangBackend"),
    "fake": BackendEntry("inferpool.actors.backends.fake:FakeBackend"),
    "openai": BackendEntry("inferpool.actors.backends.remote.openai_api:OpenAIBackend", remote=True),
    "vllm_http": BackendEntry("inferpool.actors.backends.remote.vllm_http:VLLMHTTPBackend", remote=True),
    "sglang_http": BackendEntry("inferpool.actors.backends.remote.sglang_http:SGLangHTTPBackend", remote=True),
    "trl_http": BackendEntry("inferpool.actors.backends.remote.trl_http:TRLHTTPBackend", remote=True),
}

POLICIES: dict[str, str] = {
    "least_loaded": "inferpool.routing.policy:LeastLoaded",
    "session_affinity": "inferpool.routing.affinity:SessionAffinity",
    "prefix_aware": "inferpool.routing.prefix:PrefixAware",
    "power_of_two": "inferpool.routing.p2c:PowerOfTwo",
}


def _is_target(value: str) -> bool:
    module, _, attr = value.partition(":")
    return bool(module and attr) and all(part.isidentifier() for part in [*module.split("."), attr])


def register_backend(name: str, target: str, *, remote: bool = False) -> None:
    """Make ``EngineConfig(backend=name)`` build ``attr(config, engine_id)`` from ``target``."""
    if not _is_target(target):
        raise ConfigError(f"target: expected 'package.module:attr', got {target!r}", field="target")
    BACKENDS[name] = BackendEntry(target, remote)


def register_policy(name: str, target: str) -> None:
    """Make ``RouterConfig(policy=name)`` build ``attr()`` from ``target``."""
    if not _is_target(target):
        raise ConfigError(f"target: expected 'package.module:attr', got {target!r}", field="target")
    POLICIES[name] = target


def resolve_backend(name: str) -> BackendEntry:
    """The entry of a registered backend name, or of a ``module:attr`` target given directly."""
    entry = BACKENDS.get(name)
    if entry is not None:
        return entry
    if _is_target(name):
        return BackendEntry(name)
    raise ConfigError(
        f"EngineConfig.backend: unknown backend {name!r} (registered: {sorted(BACKENDS)}; or give "
        "'package.module:Class', or register_backend(name, target))",
        field="backend",
    )


def resolve_policy(name: str) -> str:
    """The target of a registered policy name, or a ``module:attr`` target given directly."""
    target = POLICIES.get(name)
    if target is not None:
        return target
    if _is_target(name):
        return name
    raise ConfigError(
        f"RouterConfig.policy: unknown policy {name!r} (registered: {sorted(POLICIES)}; or give "
        "'package.module:Class', or register_policy(name, target))",
        field="policy",
    )


def load(target: str) -> Any:
    """The object a ``module:attr`` target names (imported now)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
