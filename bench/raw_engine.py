"""The raw side of ``pool_vs_raw``: vLLM's ``AsyncLLM`` called directly, in its own process.

Started by :class:`RawEngine` as ``python raw_engine.py --result-fd N --engine-config JSON``;
it needs only inferpool and vLLM (not the ``bench`` package). The engine is built from
the same :class:`~inferpool.config.EngineConfig` as the pool's engine, through the vLLM
backend's own argument builder, so both get exactly the same ``AsyncEngineArgs`` (on a
CPU machine that includes the backend's CPU defaults: ``enforce_eager``, the ``uni``
executor); the parent starts it with the environment the pool gives its engine actor
(``engine_actor_options``: ``VLLM_ENABLE_V1_MULTIPROCESSING``, ``OMP_NUM_THREADS``, ...).

Commands arrive as JSON lines on stdin, answers leave as JSON lines on the result pipe
(vLLM's own logs go to stdout/stderr, which the parent sends to a log file):

- ``{"cmd": "run", "prompts": [[ids...], ...], "sampling": {...}}`` submits every prompt
  at once (``asyncio.gather`` over ``AsyncLLM.generate``) and answers
  ``{"event": "result", "requests": n, "tokens": generated, "seconds": wall}``;
- ``{"cmd": "sessions", "firsts": [[ids...], ...], "suffix": [ids...], "turns": T,
  "sampling": {...}}`` runs one conversation per first prompt, all at once: each turn sends
  the conversation's token ids, appends what was sampled and then ``suffix`` (the next user
  turn, pre-encoded); answers ``{"event": "result", "tokens": generated, "seconds": wall,
  "latencies": [per-turn seconds]}``;
- ``{"cmd": "chat", "tokenizer": PATH, "firsts": [[messages...], ...], "user_turn": TEXT,
  "turns": T, "sampling": {...}}`` the same conversations with the least work any client
  of chat messages does, in this process and with nothing recorded: the first prompt
  rendered from its messages, then per turn the sampled ids decoded into the reply's text,
  the reply and the next user message appended, and only those new messages rendered
  (:meth:`~inferpool.chat.ChatRenderer.suffix`) and encoded; answers as ``sessions``;
- ``{"cmd": "stop"}`` shuts the engine down.

Sampling parameters are converted with the vLLM backend's own ``to_vllm_sampling``, so
the raw engine gets exactly what the pool's engine gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, Any


class RawEngine:
    """Parent side: start the subprocess, send commands, read answers."""

    def __init__(self, engine_config_json: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        """``engine_config_json``: an :class:`~inferpool.config.EngineConfig` (vLLM backend) as JSON;
        ``env``: added to this process's environment for the subprocess."""
        read_fd, write_fd = os.pipe()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        cmd = [
            sys.executable,
            "-u",
            str(Path(__file__).resolve()),
            "--result-fd",
            str(write_fd),
            "--engine-config",
            engine_config_json,
        ]
        self._launched = time.perf_counter()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            text=True,
            env={**os.environ, **(env or {})},
        )
        os.close(write_fd)
        self._results: IO[str] = os.fdopen(read_fd, "r")

    @property
    def pid(self) -> int:
        """The subprocess (its vLLM engine core is a child of it)."""
        return int(self._proc.pid)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        ready, _, _ = select.select([self._results], [], [], timeout_s)
        line = self._results.readline() if ready else ""
        if not line:
            code = self._proc.poll()
            raise RuntimeError(
                f"raw engine gave no answer in {timeout_s:.0f}s (exit code {code}); see {self.log_path}:\n"
                + self.log_tail()
            )
        return json.loads(line)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        """Block until the engine started; returns seconds since the process was launched."""
        self._read(timeout_s)
        return time.perf_counter() - self._launched

    def run(self, prompts: list[list[int]], sampling: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
        """Submit all prompts at once in the subprocess; returns requests, tokens, seconds."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"cmd": "run", "prompts": prompts, "sampling": sampling}) + "\n")
        self._proc.stdin.flush()
        return self._read(timeout_s)

    def sessions(
        self, firsts: list[list[int]], suffix: list[int], turns: int, sampling: dict[str, Any], timeout_s: float = 900.0
    ) -> dict[str, Any]:
        """Multi-turn conversations driven with token ids in the subprocess (see the module docstring)."""
        assert self._proc.stdin is not None
        cmd = {"cmd": "sessions", "firsts": firsts, "suffix": suffix, "turns": turns, "sampling": sampling}
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        return self._read(timeout_s)

    def chat(
        self,
        tokenizer: str,
        firsts: list[list[dict[str, Any]]],
        user_turn: str,
        turns: int,
        sampling: dict[str, Any],
        timeout_s: float = 900.0,
    ) -> dict[str, Any]:
        """The same conversations as chat messages, rendered and decoded in the subprocess with
        nothing recorded (see the module docstring): what any client of messages must do."""
        assert self._proc.stdin is not None
        cmd = {"cmd": "chat", "tokenizer": tokenizer, "firsts": firsts, "user_turn": user_turn, "turns": turns}
        self._proc.stdin.write(json.dumps({**cmd, "sampling": sampling}) + "\n")
        self._proc.stdin.flush()
        return self._read(timeout_s)

    def request_stop(self) -> None:
        """Ask the subprocess to shut its engine down (returns at once; :meth:`stop` waits)."""
        if self._proc.poll() is None and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                self._proc.stdin.close()
            except OSError:  # already gone
                pass

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the subprocess (killed when it does not exit in time) and close the pipes."""
        try:
            self.request_stop()
            self._proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait(timeout_s)
        finally:
            self._results.close()
            self._log.close()


# -- child side ------------------------------------------------------------------------------
async def _generate_all(engine: Any, prompts: list[list[int]], sampling: dict[str, Any]) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    from inferpool.actors.backends.vllm.backend import to_vllm_sampling
    from inferpool.types import SamplingParams

    sp = to_vllm_sampling(SamplingParams(**sampling))
    tag = uuid.uuid4().hex[:8]

    async def one(i: int, ids: list[int]) -> int:
        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), sp, f"raw-{tag}-{i}"):
            final = out
        assert final is not None
        return sum(len(c.token_ids) for c in final.outputs)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - t0
    return {"event": "result", "requests": len(prompts), "tokens": sum(counts), "seconds": seconds}


async def _timed(conversations: list[Coroutine[Any, Any, int]], latencies: list[float]) -> dict[str, Any]:
    """Run every conversation at once; the answer of ``sessions`` and ``chat``."""
    t0 = time.perf_counter()
    counts = await asyncio.gather(*conversations)
    seconds = time.perf_counter() - t0
    return {"event": "result", "tokens": sum(counts), "seconds": seconds, "latencies": latencies}


async def _conversations(
    engine: Any, firsts: list[list[int]], suffix: list[int], turns: int, sampling: dict[str, Any]
) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    from inferpool.actors.backends.vllm.backend import to_vllm_sampling
    from inferpool.types import SamplingParams

    sp = to_vllm_sampling(SamplingParams(**sampling))
    tag = uuid.uuid4().hex[:8]
    latencies: list[float] = []

    async def one(i: int, ids: list[int]) -> int:
        generated = 0
        for turn in range(turns):
            t0 = time.perf_counter()
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), sp, f"raw-{tag}-{i}-{turn}"):
                final = out
            assert final is not None
            latencies.append(time.perf_counter() - t0)
            sampled = list(final.outputs[0].token_ids)
            generated += len(sampled)
            ids = [*ids, *sampled, *suffix]
        return generated

    return await _timed([one(i, list(p)) for i, p in enumerate(firsts)], latencies)


async def _chat_conversations(
    engine: Any,
    tokenizer: str,
    firsts: list[list[dict[str, Any]]],
    user_turn: str,
    turns: int,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    from inferpool.actors.backends.vllm.backend import to_vllm_sampling
    from inferpool.chat import ChatRenderer
    from inferpool.types import SamplingParams

    renderer = ChatRenderer.from_pretrained(tokenizer)
    sp = to_vllm_sampling(SamplingParams(**sampling))
    tag = uuid.uuid4().hex[:8]
    latencies: list[float] = []

    async def one(i: int, messages: list[dict[str, Any]]) -> int:
        generated = 0
        ids = renderer.render(messages)[1]
        for turn in range(turns):
            t0 = time.perf_counter()
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), sp, f"chat-{tag}-{i}-{turn}"):
                final = out
            assert final is not None
            sampled = list(final.outputs[0].token_ids)
            messages = [*messages, {"role": "assistant", "content": renderer.decode(sampled)}]
            messages.append({"role": "user", "content": user_turn})
            eos = bool(sampled) and sampled[-1] == renderer.eos_token_id
            ids = [*ids, *sampled, *renderer.encode(renderer.suffix(messages, len(messages) - 1, eos))]
            latencies.append(time.perf_counter() - t0)
            generated += len(sampled)
        return generated

    return await _timed([one(i, list(m)) for i, m in enumerate(firsts)], latencies)


def engine_args(engine_config_json: str) -> Any:
    """The ``AsyncEngineArgs`` the pool's vLLM backend builds for this engine config."""
    from inferpool.actors.backends.vllm.backend import VLLMBackend
    from inferpool.config import EngineConfig

    config = EngineConfig.model_validate_json(engine_config_json)
    return VLLMBackend(config, "raw")._engine_args()


async def _serve(args: argparse.Namespace, out: IO[str]) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args(args.engine_config))
    out.write(json.dumps({"event": "ready", "start_s": time.perf_counter() - t0}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "sessions":
                answer = await _conversations(engine, cmd["firsts"], cmd["suffix"], cmd["turns"], cmd["sampling"])
            elif cmd["cmd"] == "chat":
                answer = await _chat_conversations(
                    engine, cmd["tokenizer"], cmd["firsts"], cmd["user_turn"], cmd["turns"], cmd["sampling"]
                )
            else:
                answer = await _generate_all(engine, cmd["prompts"], cmd["sampling"])
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        engine.shutdown()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--result-fd", type=int, required=True)
    parser.add_argument("--engine-config", required=True, help="an inferpool EngineConfig (vLLM backend) as JSON")
    args = parser.parse_args()
    with os.fdopen(args.result_fd, "w") as out:
        asyncio.run(_serve(args, out))


if __name__ == "__main__":
    _main()
