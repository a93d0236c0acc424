"""Helpers of the multi-node tests: the cluster handle, bounded waits, a multi-turn session
workload and its token-exactness check."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

import inferpool as ip

GPU_LABELS = {"inferpool-test/role": "gpu"}
HEAD_LABELS = {"inferpool-test/role": "head", "inferpool-test/stores": "yes"}
# faster node-death detection than Ray's defaults (which suit real networks)
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


@dataclasses.dataclass
class LocalCluster:
    """A running multi-node cluster on this machine and the handles to change it."""

    cluster: Any
    tmpdir: str
    workers: list[Any] = dataclasses.field(default_factory=list)
    gpu_workers: list[Any] = dataclasses.field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_gpu_worker(self) -> Any:
        """A worker with one logical GPU (an engine's place)."""
        node = self.cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}, labels=dict(GPU_LABELS))
        self.workers.append(node)
        self.gpu_workers.append(node)
        return node

    def add_cpu_worker(self, labels: dict[str, str]) -> Any:
        """A worker without GPUs, carrying ``labels``."""
        node = self.cluster.add_node(num_cpus=1, num_gpus=0, labels=dict(labels))
        self.workers.append(node)
        return node

    def remove(self, node: Any) -> None:
        """Kill every process of a worker node at once (its raylet, workers and actors), as a crash does."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        if node in self.gpu_workers:
            self.gpu_workers.remove(node)

    def top_up_gpu_workers(self, count: int) -> None:
        """Add one-GPU workers until ``count`` are up (a test that lost one and failed before
        adding it back leaves the next test the cluster it expects)."""
        for _ in range(count - len(self.gpu_workers)):
            self.add_gpu_worker()
        self.cluster.wait_for_nodes()

    def node(self, node_id: str) -> Any:
        """The worker node object with this id."""
        return next(n for n in self.workers if n.node_id == node_id)

    def driver_env(self) -> dict[str, str]:
        """Environment of a driver process connecting to this cluster by address."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_TMPDIR": self.tmpdir}


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"]]


def gpu_node_ids() -> set[str]:
    return {n["NodeID"] for n in alive_nodes() if n["Resources"].get("GPU", 0) > 0}


def head_node_id() -> str:
    return next(n["NodeID"] for n in alive_nodes() if "node:__internal_head__" in n["Resources"])


async def until(pred: Callable[[], Awaitable[bool]], what: str, deadline_s: float = 60.0) -> float:
    """Poll ``pred`` until it holds (bounded); returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if await pred():
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not reached within {deadline_s}s")


def session_engines(tokenizer_path: str, replicas: int = 3, num_gpus: float = 1.0) -> ip.EngineConfig:
    """Fake engines that sample from the tiny tokenizer's vocabulary, one GPU each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return ip.EngineConfig(
        backend="fake",
        tokenizer=tokenizer_path,
        replicas=replicas,
        num_gpus=num_gpus,
        request_timeout_s=20,
        engine_kwargs={
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "decode_latency_per_token_s": 0.002,
            "max_model_len": 4096,
        },
    )


@dataclasses.dataclass
class Workload:
    """Many multi-turn sessions at once; logs every turn so a test can act mid-run and measure."""

    pool: ip.Pool
    turns: int = 4
    done_turns: int = 0
    turn_log: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (ended at, seconds)
    loss_at: float = 0.0
    until_loss: bool = False  # keep taking turns (bounded) until loss_felt: the loss lands mid-run
    loss_felt: bool = False  # the pool has seen the loss (not only the node's processes killed)
    max_extra_turns: int = 60

    def wants_turn(self, turn: int) -> bool:
        """Turn ``turn`` (0-based) is taken: within ``turns``, or an extra one while the loss is unfelt."""
        if turn < self.turns:
            return True
        return self.until_loss and not self.loss_felt and turn < self.turns + self.max_extra_turns

    async def session(self, i: int) -> tuple[ip.SessionState, list[Any]]:
        outs = []
        s = self.pool.session()
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"session {i}"}]
        turn = 0
        while self.wants_turn(turn):
            t0 = time.monotonic()
            out = await s.chat(msgs, max_tokens=6, seed=i * 10 + turn)
            self.turn_log.append((time.monotonic(), time.monotonic() - t0))
            self.done_turns += 1
            outs.append(out)
            msgs += [out.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": f"t{turn}"}]
            turn += 1
        return await s.state(), outs
