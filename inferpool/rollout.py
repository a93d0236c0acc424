"""The main job: multi-turn rollouts through a pool, written as token-exact trajectories.

Each rollout is a managed session: the first turn samples ``n`` answers, later turns
extend the first one with a new user message. Every row of the output is one of the
session's sequences: token ids, masked tokens (-100 where not trainable), the engine's
logprobs (1.0 where not sampled), per-token weight versions, finish reason, engine id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from inferpool.config import EngineConfig, PoolConfig
from inferpool.pool import Pool
from inferpool.validation import ConfigModel

logger = logging.getLogger(__name__)

_TOPICS = (
    "sorting a list",
    "parsing a date",
    "a binary search",
    "reversing a string",
    "counting words",
    "merging two dicts",
    "reading a CSV file",
    "a retry loop",
)


class RolloutConfig(ConfigModel):
    """What ``inferpool rollout`` runs."""

    model: str | None = Field(None, description="HF id or local path; None: the embedded tiny model.")
    backend: str = Field("vllm", description="Engine backend.")
    engines: int = Field(1, ge=1, description="Engine replicas.")
    num_rollouts: int = Field(64, ge=1, description="How many prompts (rollouts) to run.")
    n: int = Field(2, ge=1, description="Samples per prompt.")
    turns: int = Field(2, ge=1, description="Assistant turns per rollout.")
    max_tokens: int = Field(32, ge=1, description="Tokens sampled per turn.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature.")
    seed: int = Field(0, description="Base seed; rollout i uses seed + i.")
    output: str = Field("rollouts.jsonl", description="Trajectory file (.jsonl or .parquet).")
    progress: bool = Field(True, description="Show a progress bar.")


def prompt_messages(i: int) -> list[dict[str, str]]:
    """A deterministic synthetic task for rollout ``i``."""
    topic = _TOPICS[i % len(_TOPICS)]
    return [
        {"role": "system", "content": "You are a careful coding assistant."},
        {"role": "user", "content": f"Task {i}: write a short Python function for {topic}."},
    ]


def _node_rows(rollout: int, state: Any) -> list[dict[str, Any]]:
    return [
        {
            "rollout": rollout,
            "session_id": state.session_id,
            "node_id": node.node_id,
            "turns": state.turns,
            "engine_id": node.metadata.get("engine_id"),
            "finish_reason": node.metadata.get("finish_reason"),
            "tokens": node.tokens,
            "masked_tokens": node.masked_tokens,
            "logprobs": node.logprobs,
            "weight_versions": node.weight_versions,
        }
        for node in state.nodes
    ]


def write_rows(rows: Sequence[dict[str, Any]], output: str) -> None:
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
        return
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


async def _run(pool: Pool, cfg: RolloutConfig) -> tuple[list[dict[str, Any]], int]:
    """Multi-turn rollouts through managed sessions: each turn answers, then a new user turn."""
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_rollouts, disable=not cfg.progress, desc="rollouts", unit="rollout")
    rows: list[dict[str, Any]] = []
    sampled = 0

    async def one(i: int) -> None:
        nonlocal sampled
        async with pool.session() as s:
            messages = prompt_messages(i)
            for turn in range(cfg.turns):
                out = await s.chat(
                    messages,
                    n=cfg.n if turn == 0 else 1,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    seed=cfg.seed + 1000 * i + turn,
                )
                sampled += sum(len(c.token_ids) for c in out.choices)
                reply = out.choices[0].message.model_dump(exclude_none=True)
                messages = [*messages, reply, {"role": "user", "content": f"Step {turn + 2}: improve it."}]
            rows.extend(_node_rows(i, await s.state()))
        bar.update(1)

    await asyncio.gather(*(one(i) for i in range(cfg.num_rollouts)))
    bar.close()
    rows.sort(key=lambda r: (r["rollout"], r["node_id"]))
    return rows, sampled


def run_rollouts(cfg: RolloutConfig, pool: Pool | None = None) -> dict[str, Any]:
    """Start a pool (unless given), run the rollouts, write the file; returns a summary."""
    from inferpool.tiny_model import tiny_model

    model = cfg.model or tiny_model()
    own = pool is None
    if pool is None:
        pool = Pool.start(
            PoolConfig(
                name=f"rollout-{os.getpid()}",
                engines=[EngineConfig(backend=cfg.backend, model=model, tokenizer=model, replicas=cfg.engines)],  # type: ignore[arg-type]
            )
        )
    try:
        t0 = time.perf_counter()
        rows, generated = asyncio.run(_run(pool, cfg))
        elapsed = time.perf_counter() - t0
    finally:
        if own:
            pool.shutdown()
    write_rows(rows, cfg.output)
    return {
        "rollouts": cfg.num_rollouts,
        "turns": cfg.turns,
        "sequences": len(rows),
        "generated_tokens": generated,
        "trainable_tokens": sum(sum(1 for m in r["masked_tokens"] if m != -100) for r in rows),
        "seconds": round(elapsed, 3),
        "generated_tokens_per_s": round(generated / elapsed, 1) if elapsed else 0.0,
        "output": str(Path(cfg.output).resolve()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
