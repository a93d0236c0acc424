"""Which provider serves a request, and how that provider spells the reasoning settings.

:func:`detect_provider` names the provider from an explicit setting or the base URL's
host. :func:`apply_reasoning` returns a copy of an OpenAI-style request dict with the
fields of a :class:`~inferpool.reasoning_config.ReasoningConfig` written the way that
provider expects:

=====================  ==============================================================
provider               fields written
=====================  ==============================================================
``openai``             ``reasoning_effort``; ``temperature`` forced to 1.0;
                       ``max_tokens`` renamed ``max_completion_tokens``
``openrouter`` and     ``reasoning: {"enabled": True, "effort": e}`` or
other OpenAI-          ``reasoning: {"enabled": True, "max_tokens": n}`` (never both;
compatible servers     effort wins). Anthropic models get a number, 1,024-32,000.
``anthropic``          ``thinking: {"type": "enabled", "budget_tokens": n}``,
                       1,024-128,000
``self_hosted``,       ``chat_template_kwargs.enable_thinking`` and, with a budget,
``vllm``, ``sglang``   ``thinking_token_budget``
=====================  ==============================================================
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from inferpool.reasoning_config import DEFAULT_EFFORT, EFFORT_BUDGETS, ReasoningConfig

logger = logging.getLogger(__name__)

OPENAI = "openai"
OPENROUTER = "openrouter"
ANTHROPIC = "anthropic"
OPENAI_COMPATIBLE = "openai_compatible"
SELF_HOSTED = "self_hosted"

#: Providers that run the model in-process and switch thinking through the chat template.
SELF_HOSTED_PROVIDERS: frozenset[str] = frozenset({SELF_HOSTED, "vllm", "sglang"})

#: Request keys that steer inferpool itself and must never reach a backend.
CONTROL_FIELDS: tuple[str, ...] = ("skip_reasoning",)

#: Anthropic's smallest thinking budget, and the largest each route accepts.
ANTHROPIC_MIN_BUDGET = 1024
OPENROUTER_ANTHROPIC_MAX_BUDGET = 32_000
ANTHROPIC_MAX_BUDGET = 128_000

#: Efforts every OpenAI reasoning model accepts; a bare token budget maps to one of them.
_OPENAI_BUDGET_EFFORTS: tuple[str, ...] = ("low", "medium", "high")


def detect_provider(provider: str | None, base_url: str | None) -> str:
    """Name the provider of a request.

    An explicit ``provider`` wins (lower-cased, ``-`` read as ``_``). Otherwise the
    *host* of ``base_url`` decides: ``api.openai.com`` is "openai", ``openrouter.ai``
    and its subdomains "openrouter", ``api.anthropic.com`` "anthropic", and any other
    host (loopback included) "openai_compatible". With neither, the model is served
    in-process: "self_hosted". Only the parsed host is compared, so a path or a user
    name that merely contains ``api.openai.com`` does not count.
    """
    if provider is not None and provider.strip():
        return provider.strip().lower().replace("-", "_")
    if base_url is None or not base_url.strip():
        return SELF_HOSTED
    url = base_url.strip()
    if "//" not in url:
        url = "//" + url  # "api.openai.com/v1": urlsplit needs the // to find the host
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # e.g. an invalid port or bracketed host
        logger.warning("cannot parse base_url %r; treating it as openai_compatible", base_url)
        return OPENAI_COMPATIBLE
    if host == "api.openai.com":
        return OPENAI
    if host == "openrouter.ai" or host.endswith(".openrouter.ai"):
        return OPENROUTER
    if host == "api.anthropic.com":
        return ANTHROPIC
    return OPENAI_COMPATIBLE


def is_anthropic_model(model: str | None) -> bool:
    """True for model ids routed to Anthropic (``anthropic/...`` or containing ``claude``)."""
    if not model:
        return False
    lowered = model.lower()
    return lowered.startswith("anthropic/") or "claude" in lowered


def strip_control_fields(kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Split inferpool's control keys off request kwargs.

    Returns a copy without any of :data:`CONTROL_FIELDS` and the value of
    ``skip_reasoning`` (False when absent). The input is not modified.
    """
    clean = {k: v for k, v in kwargs.items() if k not in CONTROL_FIELDS}
    return clean, bool(kwargs.get("skip_reasoning", False))


def openai_effort_for_budget(max_tokens: int) -> str:
    """The OpenAI effort whose :data:`EFFORT_BUDGETS` entry is nearest to ``max_tokens``.

    Only low, medium and high are candidates (every OpenAI reasoning model accepts them,
    and a budget must not switch reasoning off via "none"); a tie goes to the larger effort.
    """
    return min(
        reversed(_OPENAI_BUDGET_EFFORTS),
        key=lambda effort: abs(EFFORT_BUDGETS[effort] - max_tokens),
    )


def _clamp(value: int, low: int, high: int) -> int:
    clamped = max(low, min(high, value))
    if clamped != value:
        logger.debug("reasoning budget %d clamped to %d", value, clamped)
    return clamped


def _apply_openai(out: dict[str, Any], reasoning: ReasoningConfig) -> None:
    if reasoning.effort is not None:
        effort = reasoning.effort
    elif reasoning.max_tokens is not None:
        effort = openai_effort_for_budget(reasoning.max_tokens)
    else:
        effort = DEFAULT_EFFORT
    out["reasoning_effort"] = effort
    if out.get("temperature") not in (None, 1, 1.0):
        logger.debug("OpenAI reasoning models only accept temperature 1.0; overriding")
    out["temperature"] = 1.0
    if "max_tokens" in out:
        max_tokens = out.pop("max_tokens")
        # An explicit max_completion_tokens is the newer spelling and wins.
        out.setdefault("max_completion_tokens", max_tokens)


def _apply_openai_compatible(out: dict[str, Any], reasoning: ReasoningConfig, provider: str, model: str | None) -> None:
    block: dict[str, Any] = {"enabled": True}
    if is_anthropic_model(model):
        block["max_tokens"] = _clamp(reasoning.budget_tokens(), ANTHROPIC_MIN_BUDGET, OPENROUTER_ANTHROPIC_MAX_BUDGET)
    elif reasoning.effort is not None:
        block["effort"] = reasoning.effort
    elif reasoning.max_tokens is not None:
        block["max_tokens"] = reasoning.max_tokens
    out["reasoning"] = block
    logger.debug("reasoning for %s (model %s): %s", provider, model, block)


def _apply_anthropic(out: dict[str, Any], reasoning: ReasoningConfig) -> None:
    budget = _clamp(reasoning.budget_tokens(), ANTHROPIC_MIN_BUDGET, ANTHROPIC_MAX_BUDGET)
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    max_tokens = out.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens <= budget:
        logger.warning(
            "Anthropic needs max_tokens (%d) greater than the thinking budget (%d)",
            max_tokens,
            budget,
        )


def _apply_self_hosted(out: dict[str, Any], reasoning: ReasoningConfig) -> None:
    enable = reasoning.is_enabled and reasoning.effort != "none"
    template_kwargs = dict(out.get("chat_template_kwargs") or {})
    template_kwargs["enable_thinking"] = enable
    out["chat_template_kwargs"] = template_kwargs
    if enable and reasoning.max_tokens is not None:
        # Engine-enforced: the backend stops the think block after this many tokens.
        out["thinking_token_budget"] = reasoning.max_tokens


def apply_reasoning(
    request: dict[str, Any],
    reasoning: ReasoningConfig | None,
    provider: str,
    *,
    model: str | None = None,
) -> dict[str, Any]:
    """Return a copy of ``request`` carrying ``reasoning`` in ``provider``'s format.

    ``request`` is an OpenAI-style chat-completions body (or the kwargs of an
    in-process call) and is never modified; nested dicts that get changed are copied.
    ``model`` (default: ``request["model"]``) tells OpenRouter-style providers whether
    the model is Anthropic's, which needs a token budget rather than an effort.

    With no config, or reasoning not asked for, no reasoning field is written, except
    that in-process providers get ``enable_thinking: False`` when reasoning is
    explicitly disabled (``enabled=False``, or effort "none"). A field the request
    already has (``reasoning``, ``thinking`` ...) is overwritten by the config.

    ``thinking_token_budget`` (in-process providers) is the budget the engine itself
    enforces: it ends the think block once that many reasoning tokens were generated.
    It is only written for an explicit ``max_tokens``; an effort alone sets no budget.
    """
    out = dict(request)
    if reasoning is None:
        return out
    name = provider.strip().lower().replace("-", "_")
    if model is None and isinstance(request.get("model"), str):
        model = request["model"]
    if name in SELF_HOSTED_PROVIDERS:
        if reasoning.is_enabled or reasoning.is_explicitly_disabled:
            _apply_self_hosted(out, reasoning)
        return out
    if not reasoning.is_enabled:
        return out
    if name == OPENAI:
        _apply_openai(out, reasoning)
    elif name == ANTHROPIC:
        _apply_anthropic(out, reasoning)
    else:
        if name not in (OPENROUTER, OPENAI_COMPATIBLE):
            logger.debug("provider %r: using the OpenAI-compatible reasoning format", provider)
        _apply_openai_compatible(out, reasoning, name, model)
    return out
