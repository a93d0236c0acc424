"""Routing policies on a multi-turn shared-prefix workload: least_loaded vs session_affinity vs prefix_aware.

Workload (identical for every policy): ``sessions`` concurrent sessions of ``turns`` turns.
Every prompt starts with the same system prefix (``system_tokens``), then the session's
own first message (``first_tokens``); each later turn's prompt is the previous prompt +
the engine's reply (``reply_tokens`` sampled tokens) + a new message (``message_tokens``,
e.g. a tool result). All sessions start at once; a session sends its next turn when
the previous one returned. Token ids are synthetic (seeded), so no tokenizer is needed.
Before the clock starts, the system prefix is served once by every engine (sent to the
engine actors directly, not routed), so each engine holds it, as after a first RL step.

It is driven through ``pool.generate(prompt_ids, sampling, session_id=sid)`` directly,
not through ``pool.session()``: managed sessions render chat with a tokenizer (the fake
engine has none) and add a session-store actor hop that is the same for every policy,
while the router sees the same thing either way (the session id and the prompt's
leading tokens), so the direct path isolates what the policy changes.

Engines (4 fake engines): each serves ``max_concurrency`` requests at once (others
queue), and a request takes ``base_latency_s`` + ``prefill_latency_per_token_s`` x
*uncached* prompt tokens + ``decode_latency_per_token_s`` x sampled tokens (1 ms per
token either way: a token costs the same prefilled or decoded). The fake's
prefix cache (``prefix_cache_blocks``: an LRU of chained 16-token block hashes of the
sequences it served, large enough to hold every session here) decides which prompt
tokens are cached, so an engine that served a session's previous turn skips
re-prefilling its history, and one that did not pays for it.

Router: the same :class:`~inferpool.config.RouterConfig` for all three policies except
``policy``, with the imbalance threshold sized to the engines
(``affinity_abs_threshold`` = one engine's ``max_concurrency``; the default 32 is meant
for engines that take hundreds of requests at once). In full mode prefix_aware also runs
with the default thresholds (``prefix_aware_default_thresholds``), for reference.

Figures per policy: throughput (turns/s over the whole workload), p50/p99 turn latency
(the caller's view, queueing included), and the engines' mean prefix-cache hit rate
(cached prompt tokens / prompt tokens, this policy's requests only). Ratios: throughput
of affinity and of prefix over least_loaded (goal >= 1.5 each).

One set of engines serves every policy, one policy at a time, so the engines start once:
the pool is started with least_loaded's config; each other policy gets a router actor of
its own (its own config and name) over the same engines, registered with it the way Ray
Serve replicas register theirs (``deploy/engines.py``), reached through ``Pool.connect``,
and killed when its policy is done (the engines stay). Before each policy every engine's
prefix cache is reset, so each policy starts from the engines' state after a start (the
warm-up above then serves the system prefix again); the hit rate of a policy is computed
from the engines' cumulative counters read before and after it.

In full mode, when vLLM is installed, the same is run on 2 real vLLM CPU engines (the
tiny model, ``enable_prefix_caching``, shorter prompts), reported with a ``vllm_`` prefix.

Run: python -m inferpool.bench.routing_policies [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import math
import random
import statistics
import time
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, goal, percentile, ratio, result
from inferpool.ray_utils import CONTROL_TIMEOUT_S

RATIO_GOAL = 1.5
POLICIES = ("least_loaded", "session_affinity", "prefix_aware")
FAKE_ENGINES = 4
MAX_CONCURRENCY = 8  # per fake engine


@dataclasses.dataclass(frozen=True)
class Workload:
    sessions: int
    turns: int
    system_tokens: int
    first_tokens: int
    reply_tokens: int
    message_tokens: int
    low: int = 10  # token ids drawn from [low, high)
    high: int = 1000

    def last_prompt_tokens(self) -> int:
        return self.system_tokens + self.first_tokens + (self.turns - 1) * (self.reply_tokens + self.message_tokens)


# size -> (fake workload, vLLM workload or None)
SIZES: dict[str, tuple[Workload, Workload | None]] = {
    "full": (Workload(128, 4, 1024, 512, 64, 64), Workload(16, 4, 256, 128, 16, 32)),
    "quick": (Workload(32, 4, 1024, 512, 64, 64), None),
    "tiny": (Workload(8, 2, 256, 64, 8, 16), None),
}

FAKE_ENGINE_KWARGS: dict[str, Any] = {
    "vocab_size": 1024,
    "max_model_len": 8192,
    "max_concurrency": MAX_CONCURRENCY,
    "base_latency_s": 0.004,
    "prefill_latency_per_token_s": 0.001,
    "decode_latency_per_token_s": 0.001,
    "prefix_cache_blocks": 8192,
    "prefix_block_size": 16,
}


def _tokens(rng: random.Random, count: int, w: Workload) -> list[int]:
    return [rng.randrange(w.low, w.high) for _ in range(count)]


async def _session(pool: Any, w: Workload, system: list[int], index: int, latencies: list[float]) -> int:
    """One session's turns in order; returns the tokens generated."""
    import inferpool as ip

    rng = random.Random(1000 + index)  # the same messages for every policy
    sid = f"{index:032x}"
    prompt = system + _tokens(rng, w.first_tokens, w)
    generated = 0
    for turn in range(w.turns):
        sp = ip.SamplingParams(max_tokens=w.reply_tokens, ignore_eos=True, temperature=1.0, seed=index * 100 + turn)
        t0 = time.perf_counter()
        out = await pool.generate(prompt, sp, session_id=sid)
        latencies.append(time.perf_counter() - t0)
        reply = out.choices[0].token_ids
        generated += len(reply)
        prompt = prompt + list(reply) + _tokens(rng, w.message_tokens, w)
    return generated


def _system_prompt(w: Workload) -> list[int]:
    return _tokens(random.Random(7), w.system_tokens, w)


async def _warm(pool: Any, w: Workload) -> None:
    """Serve the system prefix once on every engine, straight to the engine actors (not routed):
    every engine starts with it cached, as after a first RL step, whatever the policy."""
    import inferpool as ip
    from inferpool.types import GenerateRequest

    system = _system_prompt(w)
    sp = ip.SamplingParams(max_tokens=1, ignore_eos=True, seed=0)
    await asyncio.gather(
        *(
            pool.engine_handle(eid).generate.remote(GenerateRequest(f"warm-{eid}", system, sp))
            for eid in pool.engine_ids()
        )
    )


async def _workload(pool: Any, w: Workload) -> tuple[float, list[float], int]:
    """Every session at once; wall seconds, per-turn latencies and generated tokens."""
    await _warm(pool, w)
    system = _system_prompt(w)
    latencies: list[float] = []
    with Stopwatch() as sw:
        generated = await asyncio.gather(*(_session(pool, w, system, i, latencies) for i in range(w.sessions)))
    return sw.seconds, latencies, sum(generated)


Counters = dict[str, tuple[int, float | None]]
"""Engine id -> (prompt tokens served, cumulative prefix-cache hit rate or None), since the engine started."""


def engine_counters(pool: Any) -> Counters:
    engines = pool.stats()["engines"]
    return {eid: (int(e.get("prompt_tokens", 0)), e.get("prefix_cache_hit_rate")) for eid, e in engines.items()}


def hit_rate_between(before: Counters, after: Counters) -> float:
    """Mean over engines of cached prompt tokens / prompt tokens served between two readings
    (an engine's hit rate counts prompt tokens looked up: the same tokens as ``prompt_tokens``);
    NaN when no engine reports a hit rate."""
    rates = []
    for eid, (tokens, rate) in after.items():
        old_tokens, old_rate = before.get(eid, (0, 0.0))
        if rate is None or tokens <= old_tokens:
            continue
        hits = rate * tokens - (old_rate or 0.0) * old_tokens
        rates.append(hits / (tokens - old_tokens))
    return statistics.fmean(rates) if rates else float("nan")


def _attach(config: Any, base: Any) -> tuple[Any, Any]:
    """A pool with ``config``'s router over ``base``'s engines, and that router's actor (kill it
    to detach: the engines stay with ``base``)."""
    import ray

    import inferpool as ip
    from inferpool.routing.router import RouterActor

    router = RouterActor.options(
        name=f"{config.name}:router", namespace=config.namespace, max_concurrency=100_000
    ).remote(config.router, config)
    try:
        ray.get(router.start.remote(), timeout=CONTROL_TIMEOUT_S)
        group = config.engines[0]
        for info in sorted(base.engine_infos(), key=lambda i: int(i.engine_id[1:])):  # the base pool's order
            handle = base.engine_handle(info.engine_id)
            ray.get(
                router.register.remote(info, handle, group.max_requests_per_engine, group.eval_requests_per_engine, 0),
                timeout=CONTROL_TIMEOUT_S,
            )
        return ip.Pool.connect(config.name, config.namespace), router
    except BaseException:
        ray.kill(router)
        raise


def _measure_policy(pool: Any, base: Any, w: Workload) -> dict[str, float]:
    """Reset every engine's prefix cache, run the workload once through ``pool``, read the hit rate."""
    asyncio.run(base.reset_prefix_cache())
    before = engine_counters(pool)
    seconds, latencies, generated = asyncio.run(_workload(pool, w))
    hit = hit_rate_between(before, engine_counters(pool))
    turns = w.sessions * w.turns
    out = {
        "turns_per_s": turns / seconds,
        "generated_tokens_per_s": generated / seconds,
        "turn_p50_ms": 1000 * percentile(latencies, 50),
        "turn_p99_ms": 1000 * percentile(latencies, 99),
    }
    if not math.isnan(hit):  # the engines report a prefix-cache hit rate (the fake does)
        out["prefix_cache_hit_rate"] = hit
    return out


def _run_policies(configs: dict[str, Any], w: Workload) -> dict[str, dict[str, float]]:
    """Each configuration's policy in turn over one set of engines: the first one's pool."""
    import ray

    import inferpool as ip

    labels = list(configs)
    base = ip.Pool.start(configs[labels[0]])
    try:
        out = {labels[0]: _measure_policy(base, base, w)}
        for label in labels[1:]:
            pool, router = _attach(configs[label], base)
            try:
                out[label] = _measure_policy(pool, base, w)
            finally:
                ray.kill(router)
        return out
    finally:
        base.shutdown()


def _router(policy: str, **overrides: Any) -> Any:
    import inferpool as ip

    return ip.RouterConfig(policy=policy, acquire_timeout_s=300.0, **overrides)


def _fake_config(label: str, router: Any) -> Any:
    import inferpool as ip

    return ip.PoolConfig(
        name=f"bench-routing-{label}",
        namespace="inferpool-bench",
        engines=[ip.EngineConfig(backend="fake", replicas=FAKE_ENGINES, engine_kwargs=dict(FAKE_ENGINE_KWARGS))],
        router=router,
        sessions=ip.SessionConfig(shards=1),  # no managed sessions here: one store, one process less
    )


def _vllm_config(policy: str) -> Any:
    import inferpool as ip
    from inferpool.tiny_model import tiny_model

    engine = ip.EngineConfig(
        backend="vllm",
        model=tiny_model(),
        replicas=2,
        seed=0,
        engine_kwargs={"max_model_len": 2048, "enable_prefix_caching": True, "gpu_memory_utilization": 0.1},
    )
    return ip.PoolConfig(
        name=f"bench-routing-vllm-{policy}",
        namespace="inferpool-bench",
        engines=[engine],
        router=_router(policy, affinity_abs_threshold=8),
        sessions=ip.SessionConfig(shards=1),
    )


def _ratios(prefix: str, per_policy: dict[str, dict[str, float]], figures: dict[str, float]) -> None:
    for name, values in per_policy.items():
        for key, value in values.items():
            figures[f"{prefix}{name}_{key}"] = value
    base = per_policy["least_loaded"]["turns_per_s"]
    figures[f"{prefix}affinity_over_least_loaded"] = ratio(per_policy["session_affinity"]["turns_per_s"], base)
    figures[f"{prefix}prefix_over_least_loaded"] = ratio(per_policy["prefix_aware"]["turns_per_s"], base)


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Throughput and turn latency of each policy on fake engines (and vLLM in full mode)."""
    size = "tiny" if tiny else "quick" if quick else "full"
    w, vw = SIZES[size]
    ensure_ray()
    configs = {p: _fake_config(p, _router(p, affinity_abs_threshold=MAX_CONCURRENCY)) for p in POLICIES}
    if size == "full":
        label = "prefix_aware_default_thresholds"
        configs[label] = _fake_config(label, _router("prefix_aware"))
    per_policy = _run_policies(configs, w)
    figures: dict[str, float] = {}
    _ratios("", per_policy, figures)
    goals = [
        goal("session_affinity / least_loaded turns/s", figures["affinity_over_least_loaded"], ">=", RATIO_GOAL),
        goal("prefix_aware / least_loaded turns/s", figures["prefix_over_least_loaded"], ">=", RATIO_GOAL),
    ]
    notes = [
        f"{FAKE_ENGINES} fake engines x {MAX_CONCURRENCY} concurrent requests; prefill charged only for "
        "prompt tokens beyond the engine's cached prefix (fake prefix cache); 1 ms per prefilled or "
        "decoded token",
        "the system prefix is served once on every engine before the clock starts (not routed)",
        "one set of engines for every policy (a router each, caches reset in between); hit rates count "
        "each policy's requests only",
        f"turns/s over the whole workload ({w.sessions} sessions x {w.turns} turns, all sessions at once); "
        "latency = one pool.generate call as the session sees it, queueing included",
        f"affinity_abs_threshold={MAX_CONCURRENCY} (one engine's batch) for every policy; the default 32 "
        "suits engines taking hundreds of requests at once",
        "prefix_cache_hit_rate = mean over engines of cached prompt tokens / prompt tokens",
    ]
    params: dict[str, Any] = {
        **dataclasses.asdict(w),
        "last_prompt_tokens": w.last_prompt_tokens(),
        "engines": FAKE_ENGINES,
        "fake_engine": FAKE_ENGINE_KWARGS,
    }
    if vw is not None and importlib.util.find_spec("vllm") is not None:
        vllm_per_policy = _run_policies({p: _vllm_config(p) for p in POLICIES}, vw)
        _ratios("vllm_", vllm_per_policy, figures)
        params["vllm_workload"] = dataclasses.asdict(vw)
        notes.append(
            "vllm_*: 2 vLLM CPU engines on the tiny model with enable_prefix_caching, "
            f"{vw.sessions} sessions x {vw.turns} turns, affinity_abs_threshold=8, reported (no goal)"
        )
    elif vw is not None:
        notes.append("vLLM is not installed: the real-engine comparison was skipped")
    return result("routing_policies", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main
    from inferpool.bench.runner import register

    register("routing_policies", "inferpool.bench.routing_policies")
    raise SystemExit(_main(["--only", "routing_policies", *sys.argv[1:]]))
