"""A tiny random-weight Qwen2-style chat model, built locally so nothing has to be downloaded.

:func:`tiny_model` builds the model directory once per parameter set into a cache folder and
returns its path; :func:`build_tiny_model` writes one into an explicit directory. The directory
holds ``config.json``, ``generation_config.json``, float32 ``model.safetensors``, a byte-level
BPE ``tokenizer.json`` trained on a small built-in corpus, ``tokenizer_config.json`` and a
ChatML ``chat_template.jinja`` (Qwen-style tools, tool calls, tool responses and thinking).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "inferpool/tiny-chat"
"""Served-model name to use for the tiny model."""

FORMAT_VERSION = 1
"""Bump when the files written change, so cached builds of an older format are not reused."""

HEAD_DIM = 64  # vLLM's CPU attention backend needs a supported head size; 64 works.
_TARGET_VOCAB = 1024  # trained tokens + added tokens
_INIT_STD = 0.02
# Pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, whitespace.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special added tokens (skipped on decode with ``skip_special_tokens``)."""
EXTRA_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<tool_call>", "</tool_call>")
"""Non-special added tokens: always one token each, kept in decoded text (as in Qwen3)."""
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{% endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '
        'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
        '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
        {{- '\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{% endif %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- message.content or '' }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {%- if message.content or not loop.first %}{{- '\\n' }}{% endif %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}{{- call.arguments }}
            {%- else %}{{- call.arguments | tojson }}{% endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
"""ChatML template with Qwen2.5-style tools and Qwen3-style ``enable_thinking``."""

_WORDS = (
    "the a an of to in is it that for on with as was by this be are at from or have not but "
    "they his her we you can all one there which their will when up out if about who get so "
    "model token tokens request batch engine pool worker actor prompt reply answer reward "
    "policy rollout sample samples weights update server client queue stream chat system user "
    "assistant tool call function value result error time number list string text data file "
    "small large quick brown fox jumps over lazy dog river mountain city light water world "
    "learn learning train training think reason step steps first second then finally because "
    "green purple orange yellow window garden kitchen street market library museum station "
    "morning evening tomorrow yesterday always never sometimes quickly slowly carefully "
    "compute return print import class async await yield lambda global config option default "
    "memory thread process network socket buffer cache latency throughput gradient optimizer "
    "question problem solution example context history message content weather temperature"
).split()
_NAMES = ("alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi")
_CODE = (
    "def {f}(x, y):\n    return x + y * {n}\n",
    "for i in range({n}):\n    print(i, {f}(i))\n",
    'if {f} is None:\n    raise ValueError("missing {f}")\n',
    "class {F}:\n    def __init__(self, {f}: int = {n}) -> None:\n        self.{f} = {f}\n",
    "import json\ndata = json.loads('{{\"{f}\": {n}}}')\n",
    "async def {f}(self):\n    await asyncio.sleep({n})\n    return [x for x in range({n})]\n",
    '{{"name": "{f}", "arguments": {{"city": "Paris", "count": {n}}}}}\n',
)


def _corpus() -> list[str]:
    """A deterministic English + code corpus of a few hundred short documents."""
    docs: list[str] = []
    n_words = len(_WORDS)
    for i in range(600):
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % n_words] for j in range(6 + i % 9)]
        sentence = " ".join(words).capitalize()
        name = _NAMES[i % len(_NAMES)]
        docs.append(f"{sentence}, said {name.capitalize()} at {i % 24:02d}:{(i * 7) % 60:02d}.")
        fname = f"{words[0]}_{words[-1]}"
        docs.append(_CODE[i % len(_CODE)].format(f=fname, F=fname.title().replace("_", ""), n=i))
    return docs


def _train_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer and add the special/extra tokens (``tokenizers``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers.trainers import BpeTrainer

    # The same pipeline as Qwen2's tokenizer: transformers 5 rebuilds it that way for any
    # qwen2 model, so anything else would make AutoTokenizer disagree with tokenizer.json.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = pre.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False)
    tok.pre_tokenizer = pre.Sequence([split, pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_TARGET_VOCAB - len(SPECIAL_TOKENS) - len(EXTRA_TOKENS),
        min_frequency=2,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def _tokenizer_config(tok: Any) -> dict[str, Any]:
    """``tokenizer_config.json``: generic fast tokenizer, ChatML specials, the chat template."""
    added = {
        str(tok.token_to_id(text)): {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": text in SPECIAL_TOKENS,
        }
        for text in (*SPECIAL_TOKENS, *EXTRA_TOKENS)
    }  # fmt: skip
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != PAD_TOKEN],
        "bos_token": None, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "split_special_tokens": False, "chat_template": CHAT_TEMPLATE,
    }  # fmt: skip


def _weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random float32 Qwen2 weights; same ``seed`` gives identical arrays on every platform."""
    rng = np.random.default_rng(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    qkv = config["num_key_value_heads"] * HEAD_DIM

    def normal(*shape: int, std: float = _INIT_STD) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    shapes = {  # Qwen2 layer tensors in file order; 1-D norm weights start at one
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (qkv, h), "self_attn.k_proj.bias": (qkv,),
        "self_attn.v_proj.weight": (qkv, h), "self_attn.v_proj.bias": (qkv,),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
    }  # fmt: skip
    out = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        for name, shape in shapes.items():
            norm = name.endswith("layernorm.weight")
            out[f"model.layers.{i}.{name}"] = np.ones(shape, np.float32) if norm else normal(*shape)
    out["model.norm.weight"] = np.ones(h, dtype=np.float32)
    # Larger lm_head so logits (std ~1.4) are not flat: greedy choices are stable across backends.
    out["lm_head.weight"] = normal(vocab, h, std=1.0 / np.sqrt(h / 2))
    return out


def build_tiny_model(
    path: str | os.PathLike[str], *, seed: int = 0, num_layers: int = 2, hidden_size: int = 128
) -> str:
    """Write the tiny model into ``path`` (created if missing; files are overwritten).

    ``hidden_size`` must be a multiple of 64 (head_dim is fixed at 64). Returns ``str(path)``.
    """
    from safetensors.numpy import save_file

    if hidden_size <= 0 or hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a positive multiple of {HEAD_DIM}: {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1: {num_layers}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    pad_id, eos_id = tok.token_to_id(PAD_TOKEN), tok.token_to_id(EOS_TOKEN)
    heads = hidden_size // HEAD_DIM
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True), "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers,
        "attention_dropout": 0.0, "initializer_range": _INIT_STD, "tie_word_embeddings": False,
        "use_cache": True, "torch_dtype": "float32", "dtype": "float32",
    }  # fmt: skip
    generation = {"bos_token_id": pad_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    config.update(generation)
    files = {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": _tokenizer_config(tok),
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok.save(str(out / "tokenizer.json"))
    save_file(_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the cache may be shared
    return str(out)


def default_cache_dir() -> Path:
    """``$INFERPOOL_CACHE_DIR`` if set, else ``~/.cache/inferpool``."""
    env = os.environ.get("INFERPOOL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "inferpool"


def tiny_model(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 128,
) -> str:
    """Return the path of the cached tiny model for these parameters, building it on first use.

    Safe across concurrent processes: one builder holds an ``fcntl`` lock, builds into a
    temporary sibling directory and renames it into place, so readers never see partial files.
    """
    params = {"format": FORMAT_VERSION, "seed": seed, "layers": num_layers, "hidden": hidden_size}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-chat-{digest}"
    if (final / "config.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".tiny-chat-{digest}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        if (final / "config.json").is_file():
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-chat-{digest}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            start = time.monotonic()
            build_tiny_model(tmp, seed=seed, num_layers=num_layers, hidden_size=hidden_size)
            if final.exists():  # a stale, incomplete directory (not written by this module)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built tiny model %s in %.1fs", final, time.monotonic() - start)
    return str(final)
