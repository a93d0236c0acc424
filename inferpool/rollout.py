"""The main job: run rollouts through a pool and write token-exact trajectories.

Each rollout is one prompt rendered with the model's chat template, sampled ``n``
times; every trajectory row holds the prompt ids, completion ids, per-token logprobs,
finish reason, weight version and engine id exactly as the engine produced them.
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

from inferpool._model import ConfigModel
from inferpool.config import EngineConfig, PoolConfig
from inferpool.pool import Pool
from inferpool.types import GenerateResult, SamplingParams

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
    turns: int = Field(1, ge=1, description="Assistant turns per rollout.")
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


def _rows(rollout: int, result: GenerateResult) -> list[dict[str, Any]]:
    return [
        {
            "rollout": rollout,
            "choice": c.index,
            "engine_id": result.engine_id,
            "prompt_token_ids": result.prompt_token_ids,
            "completion_token_ids": c.token_ids,
            "logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
            "weight_version": c.weight_version,
        }
        for c in result.choices
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


async def _run(pool: Pool, cfg: RolloutConfig, tokenizer: Any) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_rollouts, disable=not cfg.progress, desc="rollouts", unit="rollout")
    rows: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        ids = tokenizer.apply_chat_template(
            prompt_messages(i), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        sp = SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed + i)
        result = await pool.generate(list(ids), sp)
        rows.extend(_rows(i, result))
        bar.update(1)

    await asyncio.gather(*(one(i) for i in range(cfg.num_rollouts)))
    bar.close()
    rows.sort(key=lambda r: (r["rollout"], r["choice"]))
    return rows


def run_rollouts(cfg: RolloutConfig, pool: Pool | None = None) -> dict[str, Any]:
    """Start a pool (unless given), run the rollouts, write the file; returns a summary."""
    from transformers import AutoTokenizer

    from inferpool.tiny_model import tiny_model

    model = cfg.model or tiny_model()
    own = pool is None
    if pool is None:
        pool = Pool.start(
            PoolConfig(
                name=f"rollout-{os.getpid()}",
                engines=[EngineConfig(backend=cfg.backend, model=model, replicas=cfg.engines)],  # type: ignore[arg-type]
            )
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        t0 = time.perf_counter()
        rows = asyncio.run(_run(pool, cfg, tokenizer))
        elapsed = time.perf_counter() - t0
    finally:
        if own:
            pool.shutdown()
    write_rows(rows, cfg.output)
    generated = sum(len(r["completion_token_ids"]) for r in rows)
    prompt = sum(len(r["prompt_token_ids"]) for r in rows)
    return {
        "rollouts": cfg.num_rollouts,
        "sequences": len(rows),
        "generated_tokens": generated,
        "prompt_tokens": prompt,
        "seconds": round(elapsed, 3),
        "generated_tokens_per_s": round(generated / elapsed, 1) if elapsed else 0.0,
        "output": str(Path(cfg.output).resolve()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
