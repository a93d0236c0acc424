"""The model and the workload of :mod:`inferpool.bench.gpu.pool_vs_raw_gpu`.

Model: Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 KV heads of 64,
intermediate 4864, vocabulary 151,936, tied embeddings: ~494M parameters) with random
bfloat16 weights, built locally with transformers (``Qwen2ForCausalLM(config)`` +
``save_pretrained``) into ``~/.cache/inferpool`` once, nothing downloaded; the tokenizer
files are the tiny model's (1,024 tokens: prompts use ids below that, the model may
sample any of its 151,936).

Workload (deterministic, seed :data:`SEED`): the saturation prompts and the multi-turn
conversations of each :class:`Size`, rendered with the model's chat template for the raw
side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

SEED = 0

QWEN2_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 151_936,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
"""Qwen2.5-0.5B's architecture (random weights here)."""

_WORDS = (
    "the agent reads the task then calls a tool to search the web and writes a short answer "
    "with the result of each step weather city price list file code test error value plan"
).split()


@dataclasses.dataclass(frozen=True)
class Size:
    prompts: int  # saturation: prompts submitted at once
    prompt_tokens: int
    max_tokens: int
    repeats: int
    sessions: int  # sessions: concurrent conversations
    turns: int
    turn_max_tokens: int
    system_words: int
    user_words: int


SIZES: dict[str, Size] = {
    "full": Size(1024, 128, 256, 3, 256, 4, 128, 300, 60),
    "quick": Size(1024, 128, 256, 1, 128, 4, 64, 300, 60),
    "tiny": Size(8, 16, 8, 1, 4, 2, 8, 20, 8),
}


# -- the model ----------------------------------------------------------------------------------
def build_model(path: str | os.PathLike[str] | None = None, seed: int = SEED) -> str:
    """The 0.5B-shaped random Qwen2 in bfloat16 (built once into the cache); returns its path."""
    from inferpool.tiny_model import default_cache_dir

    params = {"shape": QWEN2_05B, "seed": seed, "format": 1}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(path) if path is not None else default_cache_dir() / f"qwen2-0.5b-random-{digest}"
    if (final / "config.json").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_model(tmp, seed)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def _write_model(out: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from inferpool.tiny_model import tiny_model

    tiny = Path(tiny_model())
    ids = json.loads((tiny / "generation_config.json").read_text())
    config = Qwen2Config(
        **QWEN2_05B,
        rope_parameters={"rope_theta": QWEN2_05B["rope_theta"], "rope_type": "default"},
        max_window_layers=QWEN2_05B["num_hidden_layers"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, out / name)
    for entry in out.iterdir():
        entry.chmod(0o644)  # the cache may be shared
    out.chmod(0o755)


def model_parameters() -> int:
    """Parameters of the QWEN2_05B shape (tied embeddings counted once)."""
    h, inter, v = QWEN2_05B["hidden_size"], QWEN2_05B["intermediate_size"], QWEN2_05B["vocab_size"]
    kv = QWEN2_05B["num_key_value_heads"] * QWEN2_05B["head_dim"]
    layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * inter + 2 * h
    return v * h + QWEN2_05B["num_hidden_layers"] * layer + h


# -- the workload -------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]  # saturation
    sampling: dict[str, Any]
    messages: list[list[dict[str, Any]]]  # per session: system + user turn 0
    user_turns: list[list[dict[str, Any]]]  # per session: the user messages of turns 1..
    first_ids: list[list[int]]  # per session: the rendered first prompt (raw side)
    suffix_ids: list[list[list[int]]]  # per session and later turn: the rendered new user turn (raw side)
    session_sampling: dict[str, Any]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def make_workload(model: str, size: Size) -> Workload:
    """Prompts and conversations (deterministic), rendered with the model's chat template."""
    from inferpool.chat import ChatRenderer

    renderer = ChatRenderer.from_pretrained(model)
    rng = random.Random(SEED)
    prompts = [[rng.randrange(10, 1000) for _ in range(size.prompt_tokens)] for _ in range(size.prompts)]
    system = {"role": "system", "content": _text(rng, size.system_words)}
    messages, user_turns, first_ids, suffix_ids = [], [], [], []
    for _ in range(size.sessions):
        first = [system, {"role": "user", "content": _text(rng, size.user_words)}]
        later = [{"role": "user", "content": _text(rng, size.user_words)} for _ in range(size.turns - 1)]
        messages.append(first)
        user_turns.append(later)
        first_ids.append(renderer.render(first)[1])
        probe = [*first, {"role": "assistant", "content": "x"}]
        suffix_ids.append([renderer.encode(renderer.suffix([*probe, u], len(probe), False)) for u in later])
    return Workload(
        prompts=prompts,
        sampling={"max_tokens": size.max_tokens, "temperature": 1.0, "ignore_eos": True},
        messages=messages,
        user_turns=user_turns,
        first_ids=first_ids,
        suffix_ids=suffix_ids,
        session_sampling={"max_tokens": size.turn_max_tokens, "temperature": 1.0, "ignore_eos": True},
    )
