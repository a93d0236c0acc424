"""The locally built tiny chat model: determinism, tokenizer, chat template, caching."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inferpool.tiny_model import (
    EOS_TOKEN,
    EXTRA_TOKENS,
    SPECIAL_TOKENS,
    TINY_MODEL_NAME,
    build_tiny_model,
    tiny_model,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_files_and_config(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "chat_template.jinja"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["head_dim"] == 64
    assert config["torch_dtype"] == "float32"
    assert TINY_MODEL_NAME


def test_same_seed_same_weights_different_seed_differs(tmp_path: Path, model_dir: Path) -> None:
    again = Path(build_tiny_model(tmp_path / "again", seed=0))
    other = Path(build_tiny_model(tmp_path / "other", seed=1))
    weights = _sha(model_dir / "model.safetensors")
    assert _sha(again / "model.safetensors") == weights
    assert _sha(other / "model.safetensors") != weights
    assert _sha(again / "tokenizer.json") == _sha(model_dir / "tokenizer.json")


def test_weights_are_float32_with_full_vocab(model_dir: Path) -> None:
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    assert all(str(w.dtype) == "float32" for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 128)
    assert weights["lm_head.weight"].shape == (config["vocab_size"], 128)


def test_tokenizer_special_tokens(model_dir: Path, tokenizer) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert tokenizer.is_fast
    assert 1000 <= len(tokenizer) <= 2000
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token == EOS_TOKEN == "<|im_end|>"
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eos == config["eos_token_id"] == generation["eos_token_id"]
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in (*SPECIAL_TOKENS, *EXTRA_TOKENS):
        assert tokenizer.encode(token) == [tokenizer.convert_tokens_to_ids(token)]
    # <think> and friends are ordinary added tokens: kept when special tokens are skipped.
    ids = tokenizer.encode("<think>a</think>b<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


def test_round_trip(tokenizer) -> None:
    from tokenizers import Tokenizer

    text = "Hello, world!\n\tdef f(x: int) -> int:\n    return x * 42  # {}[]~`|\\ naïve"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges actually happened
    raw = Tokenizer.from_file(str(Path(tokenizer.name_or_path) / "tokenizer.json"))
    assert raw.encode(text).ids == ids  # AutoTokenizer agrees with tokenizer.json


def test_chat_template_generation_prompt(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    closed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert closed == text + "<think>\n\n</think>\n\n"
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")


def test_chat_template_tools(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "<think>\nlook it up\n</think>\n\n",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"c": 1}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"c": 2}'}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Sunny."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert (
        "<|im_start|>assistant\n<think>\nlook it up\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"c": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"c": 2}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\nSunny.<|im_end|>\n")


def test_transformers_loads_model(model_dir: Path, tokenizer) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("Hello world")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_cache_reuses_build(tmp_path: Path) -> None:
    path = tiny_model(tmp_path, seed=3)
    weights = Path(path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert tiny_model(tmp_path, seed=3) == path
    assert weights.stat().st_mtime_ns == mtime
    assert tiny_model(tmp_path, seed=4) != path
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERPOOL_CACHE_DIR", str(tmp_path / "env-cache"))
    path = tiny_model()
    assert isinstance(path, str)
    assert Path(path).parent == tmp_path / "env-cache"


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: tiny_model(tmp_path, seed=5), range(4)))
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(paths[0]).name]


def test_rejects_bad_hidden_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        build_tiny_model(tmp_path, hidden_size=100)


def test_ip_tiny_model_stays_callable_after_the_submodule_import(tmp_path: Path) -> None:
    import importlib

    import inferpool as ip

    importlib.import_module("inferpool.tiny_model")
    assert callable(ip.tiny_model)
    assert ip.tiny_model(tmp_path) == ip.tiny_model(tmp_path)
