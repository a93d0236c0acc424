"""Session turns alone: chat turns per second on fake engines that answer in microseconds,
as the stored history grows, with turns run by the caller (the default) or by the store.

- ``history``: ``sessions`` sessions each hold ``h`` recorded turns (h = 1, 8, 64); then
  every session runs ``turns`` more turns at once and the turns/s of that phase is timed,
  for both places a turn can run (``caller_*``, ``store_*``). A turn's cost must not grow
  with the history: turns/s at 64 turns of history over turns/s at 1 is the flatness
  figure (goal >= 0.8, for the default).
- ``shards``: turns run by the store, 1 / 2 / 4 shards, the same load: does adding shards
  add turns/s (until the cores are used up)?
- ``many``: 2,000 sessions x 2 turns on 2 fake engines (the issue's reference: 41.6 s
  before, about 96 turns/s).

CPU milliseconds per turn of the stores and of the driver (the caller) come from /proc.

Run: python -m inferpool.bench.store_turns [--quick]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from inferpool.bench.common import ensure_ray, goal, ratio, result
from inferpool.bench.process_cpu import ProcessCpu

FLATNESS_GOAL = 0.8

SHARDS = {"full": (1, 2, 4), "quick": (1, 2, 4), "tiny": (1,)}
# size -> (sessions, history lengths, timed turns per session, sessions of the "many" case)
SIZES: dict[str, tuple[int, tuple[int, ...], int, int]] = {
    "full": (64, (1, 8, 64), 4, 2000),
    "quick": (32, (1, 8, 32), 2, 500),  # the full run has the 64-turn point
    "tiny": (4, (1, 4), 1, 20),
}


def _pool(engines: int, name: str, shards: int = 1, in_caller: bool = True) -> Any:
    from transformers import AutoTokenizer

    import inferpool as ip

    model = ip.tiny_model()
    vocab = len(AutoTokenizer.from_pretrained(model))
    return ip.Pool.start(
        ip.PoolConfig(
            name=name,
            namespace="inferpool-bench",
            engines=[
                ip.EngineConfig(
                    backend="fake",
                    tokenizer=model,
                    replicas=engines,
                    engine_kwargs={"vocab_size": vocab, "eos_probability": 0.0, "max_model_len": 1 << 16},
                )
            ],
            router=ip.RouterConfig(max_requests_per_engine=100_000, eval_requests_per_engine=0),
            sessions=ip.SessionConfig(shards=shards, turns_in_caller=in_caller),
        )
    )


async def _turns(sessions: list[tuple[Any, list[dict[str, Any]]]], turns: int, max_tokens: int) -> float:
    """Run ``turns`` more turns on every session at once; wall seconds."""

    async def one(s: Any, messages: list[dict[str, Any]]) -> None:
        for t in range(turns):
            out = await s.chat(messages, max_tokens=max_tokens)
            messages.append(out.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "user", "content": f"next {t}"})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s, m) for s, m in sessions))
    return time.perf_counter() - t0


def _new_sessions(pool: Any, count: int, tag: str) -> list[tuple[Any, list[dict[str, Any]]]]:
    return [(pool.session(), [{"role": "user", "content": f"{tag}{i}"}]) for i in range(count)]


def _shard_load(pool: Any, count: int, timed: int, max_tokens: int) -> float:
    """Turns/s of ``2 x count`` sessions, each running ``timed`` turns after a warm-up turn."""
    sessions = _new_sessions(pool, 2 * count, "s")
    asyncio.run(_turns(sessions, 1, max_tokens))  # warm: every shard's renderer
    seconds = asyncio.run(_turns(sessions, timed, max_tokens))
    asyncio.run(_close(sessions))
    return 2 * count * timed / seconds


async def _close(sessions: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    await asyncio.gather(*(s.close() for s, _ in sessions))


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    size = "tiny" if tiny else "quick" if quick else "full"
    count, histories, timed, many = SIZES[size]
    max_tokens = 8
    ensure_ray()
    figures: dict[str, float] = {}
    for where in ("caller", "store"):
        pool = _pool(1, f"bench-store-turns-{where}", in_caller=where == "caller")
        try:
            for h in histories:
                sessions = _new_sessions(pool, count, f"h{h}-")
                asyncio.run(_turns(sessions, h, max_tokens))  # build the history (not timed)
                with ProcessCpu(["SessionStore"]) as cpu:
                    seconds = asyncio.run(_turns(sessions, timed, max_tokens))
                n = count * timed
                figures[f"{where}_turns_per_s@{h}history"] = n / seconds
                figures[f"{where}_store_cpu_ms_per_turn@{h}history"] = 1000 * cpu.seconds["SessionStore"] / n
                figures[f"{where}_driver_cpu_ms_per_turn@{h}history"] = 1000 * cpu.seconds["Driver"] / n
                asyncio.run(_close(sessions))
            if where == "store":  # the first point of the shard curve, on this pool
                figures["store_turns_per_s@1shards"] = _shard_load(pool, count, timed, max_tokens)
            else:  # the many-sessions case, on 2 engines
                pool.scale(2)
                sessions = _new_sessions(pool, many, "m")
                seconds = asyncio.run(_turns(sessions, 2, max_tokens))
                figures[f"many_{many}x2_seconds"] = seconds
                figures[f"many_{many}x2_turns_per_s"] = 2 * many / seconds
        finally:
            pool.shutdown()
        first, last = histories[0], histories[-1]
        figures[f"{where}_flatness"] = ratio(
            figures[f"{where}_turns_per_s@{last}history"], figures[f"{where}_turns_per_s@{first}history"]
        )
    for shards in SHARDS[size][1:]:
        pool = _pool(1, f"bench-store-shards-{shards}", shards=shards, in_caller=False)
        try:
            figures[f"store_turns_per_s@{shards}shards"] = _shard_load(pool, count, timed, max_tokens)
        finally:
            pool.shutdown()
    last, first = histories[-1], histories[0]
    goals = [goal(f"turns/s at {last} / at {first} turns of history", figures["caller_flatness"], ">=", FLATNESS_GOAL)]
    params = {
        "sessions": count,
        "histories": list(histories),
        "timed_turns": timed,
        "shards": list(SHARDS[size]),
        "many": many,
        "engine": "fake, answers at once",
    }
    notes = [
        "fake engines: the turn's own work (render, dispatch, record) is all that costs",
        "caller_*: turns run in the driver (SessionConfig.turns_in_caller, the default); store_*: in the store",
    ]
    return result("store_turns", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "store_turns", *sys.argv[1:]]))
