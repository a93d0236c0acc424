"""The session store alone: chat turns per second of one store shard on fake engines that
answer in microseconds, as the stored history grows.

- ``history``: ``sessions`` sessions each hold ``h`` recorded turns (h = 1, 8, 64); then
  every session runs ``turns`` more turns at once and the turns/s of that phase is timed.
  A turn's cost must not grow with the history: turns/s at 64 turns of history over
  turns/s at 1 is the flatness figure (goal >= 0.8).
- ``many``: 2,000 sessions x 2 turns on 2 fake engines (the issue's reference: 41.6 s
  before, about 96 turns/s).

The store's CPU seconds per turn come from /proc (the store and the driver processes).

Run: python -m inferpool.bench.store_turns [--quick]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from inferpool.bench.common import ProcessCpu, ensure_ray, goal, ratio, result

FLATNESS_GOAL = 0.8

# size -> (sessions, history lengths, timed turns per session, sessions of the "many" case)
SIZES: dict[str, tuple[int, tuple[int, ...], int, int]] = {
    "full": (64, (1, 8, 64), 4, 2000),
    "quick": (32, (1, 8, 64), 2, 1000),
    "tiny": (4, (1, 4), 1, 20),
}


def _pool(engines: int, name: str) -> Any:
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
            sessions=ip.SessionConfig(shards=1),
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


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    size = "tiny" if tiny else "quick" if quick else "full"
    count, histories, timed, many = SIZES[size]
    max_tokens = 8
    ensure_ray()
    figures: dict[str, float] = {}
    pool = _pool(1, "bench-store-turns")
    try:
        for h in histories:
            sessions = [(pool.session(), [{"role": "user", "content": f"s{i}"}]) for i in range(count)]
            asyncio.run(_turns(sessions, h, max_tokens))  # build the history (not timed)
            with ProcessCpu(["SessionStore"]) as cpu:
                seconds = asyncio.run(_turns(sessions, timed, max_tokens))
            n = count * timed
            figures[f"turns_per_s@{h}history"] = n / seconds
            figures[f"store_cpu_ms_per_turn@{h}history"] = 1000 * cpu.seconds["SessionStore"] / n
            figures[f"driver_cpu_ms_per_turn@{h}history"] = 1000 * cpu.seconds["Driver"] / n
            asyncio.run(_close(sessions))
    finally:
        pool.shutdown()
    pool = _pool(2, "bench-store-many")
    try:
        sessions = [(pool.session(), [{"role": "user", "content": f"m{i}"}]) for i in range(many)]
        seconds = asyncio.run(_turns(sessions, 2, max_tokens))
        figures[f"many_{many}x2_seconds"] = seconds
        figures[f"many_{many}x2_turns_per_s"] = 2 * many / seconds
    finally:
        pool.shutdown()
    flat = ratio(figures[f"turns_per_s@{histories[-1]}history"], figures[f"turns_per_s@{histories[0]}history"])
    figures["flatness"] = flat
    goals = [goal(f"turns/s at {histories[-1]} / at {histories[0]} turns of history", flat, ">=", FLATNESS_GOAL)]
    params = {"sessions": count, "histories": list(histories), "timed_turns": timed, "many": many, "shards": 1}
    notes = ["fake engines (no latency, no EOS): the store, the router and the driver are all that costs"]
    return result("store_turns", params, figures, goals, notes)


async def _close(sessions: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    await asyncio.gather(*(s.close() for s, _ in sessions))


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main

    raise SystemExit(_main(["--only", "store_turns", *sys.argv[1:]]))
