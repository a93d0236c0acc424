"""Managed multi-turn sessions against the same vLLM engine driven directly with token ids.

Workload (one run per conversation length): ``conversations`` conversations in flight,
``turns`` assistant turns each, ``max_tokens`` sampled per turn (``ignore_eos``, so both
sides sample the same number of tokens), n=1, temperature 1.0.

- raw: vLLM's ``AsyncLLM`` in a subprocess (:mod:`inferpool.bench.raw_engine`), each
  conversation a list of token ids: the rendered first prompt, then per turn what was
  sampled plus the pre-encoded next user turn. The limit: no rendering, no bookkeeping.
- chat: the same ``AsyncLLM`` process driven with the same chat messages, doing only what
  any client of messages must: render the first prompt, decode each reply, render and encode
  only the new messages. Nothing is recorded or checked. ``chat_over_raw`` is what the
  message format itself costs on this machine; ``sessions_over_chat`` is what the pool adds.
- sessions: ``pool.session()`` + ``s.chat(messages)`` through the pool's engine built
  from the same ``EngineConfig``; every turn renders only the new messages, records
  tokens, masks and logprobs, and the client sends the returned message back.

Reported per conversation length: generated tokens/s of both and their ratio, turn latency
p50/p99, and the CPU seconds per turn of the session stores, the engine actor, the router
and the driver (read from /proc for the processes of this run), and how long the engine
core waited for a core per turn on each side (its run-queue wait): on a machine with few
cores the pool's own processes compete with the engine core, and this is what that costs
it. The cost per turn must stay flat as conversations grow (3, 12, 30 turns). Goal:
sessions >= 0.95 of raw.

Run: python -m inferpool.bench.sessions_vs_raw [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from inferpool.bench.common import ensure_ray as bench_ray
from inferpool.bench.common import finish_later, goal, percentile, ratio, result
from inferpool.bench.pool_vs_raw import engine_env, omp_threads
from inferpool.bench.process_cpu import ProcessCpu
from inferpool.bench.raw_engine import RawEngine

RATIO_GOAL = 0.95
ENGINE_KWARGS: dict[str, Any] = {"gpu_memory_utilization": 0.1, "max_model_len": 4096}
USER_TURN = "Continue."
PROCESSES = ("SessionStore", "EngineActor", "Router")  # plus EngineCore and Driver (bench.process_cpu.ProcessCpu)

# size -> (conversations, conversation lengths in turns, tokens per turn, repeats)
SIZES: dict[str, tuple[int, tuple[int, ...], int, int]] = {
    "full": (64, (3, 12, 30), 24, 2),
    "quick": (32, (3, 12), 16, 1),
    "tiny": (4, (2,), 4, 1),
}


def first_messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a careful coding assistant."},
        {"role": "user", "content": f"Task {i}: write a short Python function."},
    ]


def _pool_config(model: str) -> Any:
    import inferpool as ip

    engine = ip.EngineConfig(backend="vllm", model=model, tokenizer=model, engine_kwargs=dict(ENGINE_KWARGS))
    engine = engine.model_copy(update={"env_vars": {"OMP_NUM_THREADS": str(omp_threads(engine))}})
    return ip.PoolConfig(
        name="bench-sessions-vs-raw",
        namespace="inferpool-bench",
        engines=[engine],
        router=ip.RouterConfig(max_requests_per_engine=4096, eval_requests_per_engine=0),
        sessions=ip.SessionConfig(shards=2),
    )


async def sessions_path(pool: Any, conversations: int, turns: int, max_tokens: int) -> dict[str, Any]:
    """Every conversation as a managed session; generated tokens, wall seconds, turn latencies."""
    latencies: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        s = pool.session()
        messages: list[dict[str, Any]] = first_messages(i)
        for _ in range(turns):
            t0 = time.perf_counter()
            out = await s.chat(messages, max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
            latencies.append(time.perf_counter() - t0)
            tokens += len(out.choices[0].token_ids)
            messages = [*messages, out.choices[0].message.model_dump(exclude_none=True)]
            messages.append({"role": "user", "content": USER_TURN})
        await s.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conversations)))
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "latencies": latencies}


def raw_inputs(tokenizer_path: str, conversations: int) -> tuple[list[list[int]], list[int]]:
    """The rendered first prompts and the token ids appended after each sampled turn (the end of
    the assistant turn, the next user message and the generation prompt)."""
    from inferpool.chat import ChatRenderer

    renderer = ChatRenderer.from_pretrained(tokenizer_path)
    firsts = [renderer.render(first_messages(i))[1] for i in range(conversations)]
    probe = [*first_messages(0), {"role": "assistant", "content": "x"}, {"role": "user", "content": USER_TURN}]
    suffix = renderer.suffix(probe, 3, ended_with_eos=False)
    return firsts, renderer.encode(suffix)


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    import inferpool as ip

    size = "tiny" if tiny else "quick" if quick else "full"
    conversations, lengths, max_tokens, repeats = SIZES[size]
    model = ip.tiny_model()
    config = _pool_config(model)
    engine = config.engines[0]
    log_path = Path(tempfile.mkstemp(prefix="inferpool-bench-sessions-raw-", suffix=".log")[1])
    raw = RawEngine(engine.model_dump_json(), log_path, env=engine_env(engine))
    pool: Any = None

    def teardown() -> None:
        try:
            raw.request_stop()
            if pool is not None:
                pool.shutdown()
        finally:
            raw.stop()
            log_path.unlink(missing_ok=True)

    figures: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    try:
        bench_ray()
        pool = ip.Pool.start(config)
        raw.wait_ready()
        firsts, suffix = raw_inputs(model, conversations)
        sampling = {"max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
        asyncio.run(sessions_path(pool, 4, 2, 4))  # warm-up: store renderers, router, engine
        raw.sessions(firsts[:4], suffix, 2, {**sampling, "max_tokens": 4})
        chat_firsts = [first_messages(i) for i in range(conversations)]
        raw.chat(model, chat_firsts[:4], USER_TURN, 2, {**sampling, "max_tokens": 4})
        for turns in lengths:
            rates: dict[str, list[float]] = {"raw": [], "chat": [], "sessions": []}
            lats: dict[str, list[float]] = {"raw": [], "chat": [], "sessions": []}
            cpu: dict[str, float] = {}
            waits: dict[str, float] = {}  # run-queue wait of the engine core, by side
            for _ in range(repeats):
                for side in ("raw", "chat"):
                    with ProcessCpu((), trees={"RawEngine": raw.pid}) as raw_meter:
                        if side == "raw":
                            out = raw.sessions(firsts, suffix, turns, sampling)
                        else:
                            out = raw.chat(model, chat_firsts, USER_TURN, turns, sampling)
                    cpu[f"{side}_RawEngine"] = cpu.get(f"{side}_RawEngine", 0.0) + raw_meter.seconds["RawEngine"]
                    waits[side] = waits.get(side, 0.0) + raw_meter.core_wait_seconds
                    rates[side].append(out["tokens"] / out["seconds"])
                    lats[side] += out["latencies"]
                with ProcessCpu(PROCESSES) as meter:
                    got = asyncio.run(sessions_path(pool, conversations, turns, max_tokens))
                rates["sessions"].append(got["tokens"] / got["seconds"])
                lats["sessions"] += got["latencies"]
                for name, seconds in meter.seconds.items():
                    cpu[name] = cpu.get(name, 0.0) + seconds
                waits["sessions"] = waits.get("sessions", 0.0) + meter.core_wait_seconds
            n_turns = conversations * turns * repeats
            key = f"@{turns}turns"
            median = {side: statistics.median(r) for side, r in rates.items()}
            for side, rate in median.items():
                figures[f"{side}_tokens_per_s{key}"] = rate
            figures[f"sessions_over_raw{key}"] = ratio(median["sessions"], median["raw"])
            figures[f"chat_over_raw{key}"] = ratio(median["chat"], median["raw"])
            figures[f"sessions_over_chat{key}"] = ratio(median["sessions"], median["chat"])
            for name, lat in lats.items():
                figures[f"{name}_turn_p50_s{key}"] = percentile(lat, 50)
                figures[f"{name}_turn_p99_s{key}"] = percentile(lat, 99)
            for name, seconds in cpu.items():
                figures[f"cpu_ms_per_turn_{name}{key}"] = 1000.0 * seconds / n_turns
            for side, seconds in waits.items():
                figures[f"engine_core_runqueue_wait_ms_per_turn_{side}{key}"] = 1000.0 * seconds / n_turns
            samples[key] = [round(v, 1) for side in rates.values() for v in side]
    except BaseException:
        teardown()
        raise
    finish_later(teardown, "sessions_vs_raw")
    worst = min(figures[f"sessions_over_raw@{t}turns"] for t in lengths)
    goals = [goal("sessions / raw tokens/s (worst conversation length)", worst, ">=", RATIO_GOAL)]
    params = {
        "conversations": conversations,
        "turns": list(lengths),
        "tokens_per_turn": max_tokens,
        "repeats": repeats,
        "engine": {"model": model, **ENGINE_KWARGS},
        "session_shards": config.sessions.shards,
        "samples_tokens_per_s_raw_chat_sessions": samples,
    }
    notes = [
        "raw = AsyncLLM in a subprocess with token ids and a pre-encoded user turn; sessions = "
        "pool.session() + s.chat(messages) on the same engine config; chat = raw's AsyncLLM driven with "
        "the same chat messages and the least work any client of messages does (render the first prompt, "
        "decode each reply, render and encode only the new messages), nothing recorded or checked: "
        "chat_over_raw is what the message format itself costs, sessions_over_chat what the pool adds",
        "cpu_ms_per_turn_*: CPU of those processes of this run per session turn (Driver: the caller, which "
        "runs the turns; EngineCore: vLLM's engine core; raw_RawEngine, chat_RawEngine: the raw engine's process "
        "and core)",
        "engine_core_runqueue_wait_ms_per_turn_*: how long the engine core's threads were runnable but "
        "waited for a core (/proc schedstat), per turn: where the pool's own processes compete with the "
        "engine for the machine's cores, the raw and sessions figures part",
    ]
    return result("sessions_vs_raw", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "sessions_vs_raw", *sys.argv[1:]]))
