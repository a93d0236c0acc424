"""The reasoning ("thinking") settings of a request, independent of any provider (part of
the configuration floor: ``PoolConfig.reasoning`` holds one; re-exported by
:mod:`inferpool.reasoning`).

A :class:`ReasoningConfig` says *whether* a model should reason and *how much*; how
that is spelled on the wire (``reasoning_effort``, ``reasoning: {...}``, Anthropic's
``thinking`` block, a chat-template switch) is the job of
:mod:`inferpool.reasoning.providers`.
"""

from __future__ import annotations

import logging

from pydantic import Field, field_validator

from inferpool.validation import ConfigModel

logger = logging.getLogger(__name__)

#: The accepted effort levels, from least to most reasoning.
VALID_EFFORTS: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh")

#: Token budget used for each effort when a provider needs a number instead of a level.
#: The values are fractions of a 32k base (xhigh 95 %, high 80 %, medium 50 %, low 20 %,
#: minimal 10 %); "none" maps to 1,024, the smallest budget Anthropic accepts.
BUDGET_BASE_TOKENS: int = 32_000
EFFORT_BUDGETS: dict[str, int] = {
    "none": 1024,
    "minimal": 3200,
    "low": 6400,
    "medium": 16000,
    "high": 25600,
    "xhigh": 30400,
}

#: The effort used when reasoning is switched on without a level or a budget.
DEFAULT_EFFORT: str = "medium"


class ReasoningConfig(ConfigModel):
    """Whether and how much a model should reason before answering.

    ``enabled=False`` always wins and switches reasoning off. Otherwise giving an
    ``effort`` or a ``max_tokens`` budget switches it on, as does ``enabled=True``.
    Leaving every field unset means "no opinion": the provider's default applies.
    """

    enabled: bool | None = Field(
        None,
        description="Switch reasoning on (True) or off (False). None: on when effort or "
        "max_tokens is set, otherwise the provider's default.",
    )
    effort: str | None = Field(
        None,
        description="Reasoning effort: one of none, minimal, low, medium, high, xhigh "
        "(case-insensitive). Providers that need a token budget use EFFORT_BUDGETS.",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Reasoning token budget. When effort is also given, providers that take either one use the effort.",
    )

    @field_validator("effort", mode="before")
    @classmethod
    def _check_effort(cls, value: object) -> object:
        if value is None or not isinstance(value, str):
            return value  # None passes; a non-string fails pydantic's own str check
        normalised = value.strip().lower()
        if normalised not in VALID_EFFORTS:
            raise ValueError(f"effort {value!r} is not valid; expected one of {', '.join(VALID_EFFORTS)}")
        return normalised

    @property
    def is_enabled(self) -> bool:
        """True when reasoning should be on: not explicitly disabled, and asked for."""
        if self.enabled is False:
            return False
        return bool(self.enabled) or self.effort is not None or self.max_tokens is not None

    @property
    def is_explicitly_disabled(self) -> bool:
        """True when the caller said ``enabled=False`` (as opposed to saying nothing)."""
        return self.enabled is False

    def budget_tokens(self) -> int:
        """The reasoning budget in tokens, unclamped.

        ``effort`` wins over ``max_tokens`` (mapped through :data:`EFFORT_BUDGETS`); with
        neither, the budget of :data:`DEFAULT_EFFORT`.
        """
        if self.effort is not None:
            return EFFORT_BUDGETS[self.effort]
        if self.max_tokens is not None:
            return self.max_tokens
        return EFFORT_BUDGETS[DEFAULT_EFFORT]
