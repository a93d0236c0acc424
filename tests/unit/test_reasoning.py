"""Reasoning config, provider detection, and provider-specific request fields."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from inferpool.errors import ConfigError
from inferpool.reasoning import (
    EFFORT_BUDGETS,
    ReasoningConfig,
    apply_reasoning,
    detect_provider,
    openai_effort_for_budget,
    strip_control_fields,
)

BASE: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0.6,
    "max_tokens": 512,
}
CLAUDE = "anthropic/claude-sonnet-4"

# (id, provider, model, ReasoningConfig kwargs or None, fields expected, keys absent)
Case = tuple[str, str, str | None, dict[str, Any] | None, dict[str, Any], tuple[str, ...]]
HI, MED = EFFORT_BUDGETS["high"], EFFORT_BUDGETS["medium"]
OFF = {"enabled": False}
OAI = {"temperature": 1.0, "max_completion_tokens": 512}
CASES: list[Case] = [
    (
        "openai-effort",
        "openai",
        None,
        {"effort": "high"},
        {"reasoning_effort": "high", **OAI},
        ("max_tokens", "reasoning", "thinking"),
    ),
    ("openai-enabled-only", "openai", None, {"enabled": True}, {"reasoning_effort": "medium", **OAI}, ("max_tokens",)),
    (
        "openai-max-tokens-low",
        "openai",
        None,
        {"max_tokens": 5000},
        {"reasoning_effort": "low", **OAI},
        ("max_tokens",),
    ),
    ("openai-max-tokens-high", "openai", None, {"max_tokens": 30000}, {"reasoning_effort": "high"}, ()),
    (
        "openai-effort-wins",
        "openai",
        None,
        {"effort": "minimal", "max_tokens": 30000},
        {"reasoning_effort": "minimal"},
        (),
    ),
    (
        "openrouter-effort",
        "openrouter",
        "qwen/qwen3-32b",
        {"effort": "low"},
        {"reasoning": {"enabled": True, "effort": "low"}, "temperature": 0.6, "max_tokens": 512},
        ("reasoning_effort", "max_completion_tokens"),
    ),
    (
        "openrouter-max-tokens",
        "openrouter",
        "qwen/qwen3-32b",
        {"max_tokens": 2000},
        {"reasoning": {"enabled": True, "max_tokens": 2000}},
        (),
    ),
    (
        "openrouter-both-effort-wins",
        "openrouter",
        "qwen/qwen3-32b",
        {"effort": "high", "max_tokens": 2000},
        {"reasoning": {"enabled": True, "effort": "high"}},
        (),
    ),
    (
        "openrouter-enabled-only",
        "openrouter",
        "qwen/qwen3-32b",
        {"enabled": True},
        {"reasoning": {"enabled": True}},
        (),
    ),
    (
        "openai-compatible-effort",
        "openai_compatible",
        "some-model",
        {"effort": "medium"},
        {"reasoning": {"enabled": True, "effort": "medium"}},
        ("chat_template_kwargs",),
    ),
    (
        "openrouter-anthropic-effort-to-budget",
        "openrouter",
        CLAUDE,
        {"effort": "high"},
        {"reasoning": {"enabled": True, "max_tokens": HI}},
        (),
    ),
    (
        "openrouter-claude-substring",
        "openrouter",
        "my-claude-proxy",
        {"effort": "low"},
        {"reasoning": {"enabled": True, "max_tokens": 6400}},
        (),
    ),
    (
        "openrouter-anthropic-cap-32k",
        "openrouter",
        CLAUDE,
        {"max_tokens": 100_000},
        {"reasoning": {"enabled": True, "max_tokens": 32_000}},
        (),
    ),
    (
        "openrouter-anthropic-floor-1024",
        "openrouter",
        CLAUDE,
        {"max_tokens": 10},
        {"reasoning": {"enabled": True, "max_tokens": 1024}},
        (),
    ),
    (
        "openrouter-anthropic-enabled-only",
        "openrouter",
        CLAUDE,
        {"enabled": True},
        {"reasoning": {"enabled": True, "max_tokens": MED}},
        (),
    ),
    (
        "anthropic-native-effort",
        "anthropic",
        "claude-sonnet-4",
        {"effort": "xhigh"},
        {"thinking": {"type": "enabled", "budget_tokens": 30400}},
        ("reasoning", "reasoning_effort"),
    ),
    (
        "anthropic-native-cap-128k",
        "anthropic",
        "claude-opus-4",
        {"max_tokens": 500_000},
        {"thinking": {"type": "enabled", "budget_tokens": 128_000}},
        (),
    ),
    (
        "anthropic-native-100k-allowed",
        "anthropic",
        "claude-opus-4",
        {"max_tokens": 100_000},
        {"thinking": {"type": "enabled", "budget_tokens": 100_000}},
        (),
    ),
    (
        "anthropic-native-floor",
        "anthropic",
        "claude-opus-4",
        {"max_tokens": 1},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        (),
    ),
    (
        "self-hosted-enabled",
        "self_hosted",
        None,
        {"enabled": True},
        {"chat_template_kwargs": {"enable_thinking": True}, "temperature": 0.6},
        ("thinking_token_budget", "reasoning"),
    ),
    (
        "self-hosted-budget",
        "self_hosted",
        None,
        {"max_tokens": 4096},
        {"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 4096},
        (),
    ),
    (
        "vllm-effort-no-budget",
        "vllm",
        None,
        {"effort": "high"},
        {"chat_template_kwargs": {"enable_thinking": True}},
        ("thinking_token_budget",),
    ),
    (
        "sglang-effort-none-disables",
        "sglang",
        None,
        {"effort": "none", "max_tokens": 100},
        {"chat_template_kwargs": {"enable_thinking": False}},
        ("thinking_token_budget",),
    ),
    (
        "self-hosted-explicitly-disabled",
        "self_hosted",
        None,
        {**OFF, "effort": "high"},
        {"chat_template_kwargs": {"enable_thinking": False}},
        ("thinking_token_budget",),
    ),
    (
        "self-hosted-unset",
        "self_hosted",
        None,
        {},
        {"temperature": 0.6},
        ("chat_template_kwargs", "thinking_token_budget"),
    ),
    (
        "openai-disabled",
        "openai",
        None,
        {**OFF, "effort": "high"},
        {"temperature": 0.6, "max_tokens": 512},
        ("reasoning_effort", "max_completion_tokens"),
    ),
    ("openrouter-disabled", "openrouter", CLAUDE, OFF, {"max_tokens": 512}, ("reasoning",)),
    ("anthropic-disabled", "anthropic", "claude-opus-4", OFF, {}, ("thinking",)),
    (
        "no-config",
        "openai",
        None,
        None,
        {"temperature": 0.6, "max_tokens": 512},
        ("reasoning_effort", "max_completion_tokens"),
    ),
]


@pytest.mark.parametrize(
    ("provider", "model", "reasoning", "expected", "absent"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_apply_reasoning_formats(
    provider: str,
    model: str | None,
    reasoning: dict[str, Any] | None,
    expected: dict[str, Any],
    absent: tuple[str, ...],
) -> None:
    request = copy.deepcopy(BASE)
    config = None if reasoning is None else ReasoningConfig(**reasoning)
    out = apply_reasoning(request, config, provider, model=model)
    for key, value in expected.items():
        assert out[key] == value, key
    for key in absent:
        assert key not in out, key
    assert out["messages"] == BASE["messages"]
    assert request == BASE  # the input is untouched


def test_model_defaults_to_request_model() -> None:
    out = apply_reasoning({"model": CLAUDE}, ReasoningConfig(effort="low"), "openrouter")
    assert out["reasoning"] == {"enabled": True, "max_tokens": 6400}


def test_openai_keeps_explicit_max_completion_tokens() -> None:
    request = {"max_tokens": 10, "max_completion_tokens": 99}
    out = apply_reasoning(request, ReasoningConfig(effort="low"), "openai")
    assert out["max_completion_tokens"] == 99
    assert "max_tokens" not in out


def test_self_hosted_merges_chat_template_kwargs_without_mutating() -> None:
    request = {"chat_template_kwargs": {"add_generation_prompt": True, "enable_thinking": True}}
    snapshot = copy.deepcopy(request)
    out = apply_reasoning(request, ReasoningConfig(enabled=False), "vllm")
    assert out["chat_template_kwargs"] == {"add_generation_prompt": True, "enable_thinking": False}
    assert request == snapshot
    assert out["chat_template_kwargs"] is not request["chat_template_kwargs"]


def test_apply_reasoning_returns_new_dict() -> None:
    request = {"model": "m"}
    assert apply_reasoning(request, None, "openai") is not request
    assert apply_reasoning(request, ReasoningConfig(effort="low"), "OpenRouter")["reasoning"] == {
        "enabled": True,
        "effort": "low",
    }


@pytest.mark.parametrize(
    ("max_tokens", "effort"),
    [(1, "low"), (11_199, "low"), (11_200, "medium"), (16_000, "medium"), (20_800, "high"), (10**6, "high")],
)
def test_openai_effort_for_budget(max_tokens: int, effort: str) -> None:
    assert openai_effort_for_budget(max_tokens) == effort


# ---- ReasoningConfig -------------------------------------------------------------------


def test_effort_budgets_table() -> None:
    assert EFFORT_BUDGETS == {
        "none": 1024,
        "minimal": 3200,
        "low": 6400,
        "medium": 16000,
        "high": 25600,
        "xhigh": 30400,
    }


@pytest.mark.parametrize("bad", ["extreme", "max", "", "very high"])
def test_invalid_effort_raises_config_error_naming_it(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        ReasoningConfig(effort=bad)
    assert info.value.field == "effort"
    assert repr(bad) in str(info.value)


def test_max_tokens_must_be_positive() -> None:
    with pytest.raises(ConfigError) as info:
        ReasoningConfig(max_tokens=0)
    assert info.value.field == "max_tokens"


def test_unknown_field_rejected() -> None:
    with pytest.raises(ConfigError):
        ReasoningConfig(budget=100)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "enabled"),
    [
        ({}, False),
        ({"enabled": True}, True),
        ({"effort": "low"}, True),
        ({"max_tokens": 10}, True),
        ({"enabled": False, "effort": "high"}, False),
        ({"enabled": False, "max_tokens": 10}, False),
    ],
)
def test_is_enabled(kwargs: dict[str, Any], enabled: bool) -> None:
    assert ReasoningConfig(**kwargs).is_enabled is enabled


def test_effort_is_normalised() -> None:
    assert ReasoningConfig(effort=" HIGH ").effort == "high"


# ---- control fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "skip"),
    [
        ({"temperature": 0.5, "skip_reasoning": True}, True),
        ({"temperature": 0.5, "skip_reasoning": False}, False),
        ({"temperature": 0.5}, False),
    ],
)
def test_strip_control_fields(kwargs: dict[str, Any], skip: bool) -> None:
    snapshot = dict(kwargs)
    clean, flag = strip_control_fields(kwargs)
    assert flag is skip
    assert clean == {"temperature": 0.5}
    assert "skip_reasoning" not in clean
    assert kwargs == snapshot


# ---- provider detection ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "base_url", "expected"),
    [
        ("OpenRouter", "https://api.openai.com/v1", "openrouter"),
        (" Anthropic ", None, "anthropic"),
        ("vLLM", "http://localhost:8000/v1", "vllm"),
        ("openai-compatible", None, "openai_compatible"),
        (None, "https://api.openai.com/v1", "openai"),
        (None, "https://API.OpenAI.com/v1/", "openai"),
        (None, "api.openai.com/v1", "openai"),
        (None, "https://openrouter.ai/api/v1", "openrouter"),
        (None, "https://eu.openrouter.ai/api/v1", "openrouter"),
        (None, "https://api.anthropic.com/v1", "anthropic"),
        (None, "http://localhost:8000/v1", "openai_compatible"),
        (None, "http://127.0.0.1:30000/v1", "openai_compatible"),
        (None, "http://[::1]:8000/v1", "openai_compatible"),
        (None, "http://evil.com/api.openai.com", "openai_compatible"),
        (None, "http://api.openai.com.evil.com/v1", "openai_compatible"),
        (None, "http://api.openai.com@evil.com/v1", "openai_compatible"),
        (None, "https://notopenrouter.ai/v1", "openai_compatible"),
        (None, "http://evil.com/?u=https://openrouter.ai", "openai_compatible"),
        (None, None, "self_hosted"),
        ("", "", "self_hosted"),
    ],
)
def test_detect_provider(provider: str | None, base_url: str | None, expected: str) -> None:
    assert detect_provider(provider, base_url) == expected
