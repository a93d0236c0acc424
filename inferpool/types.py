"""Request and result types.

The RL invariant lives here: token ids are the source of truth. A choice's
``token_ids`` are exactly what the engine sampled, ``logprobs[i]`` is the engine's own
logprob of ``token_ids[i]`` and ``weight_versions[i]`` the weight version that
sampled it, so the three always have the same length. Any text is derived from ids.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, model_validator

from inferpool.validation import RequestModel

Split = Literal["train", "eval"]
FinishReason = Literal["stop", "length", "abort", "tool_calls", "error"]


class SamplingParams(RequestModel):
    """How to sample. Field names follow vLLM/OpenAI."""

    n: int = Field(1, ge=1, description="Number of samples to draw for the prompt.")
    max_tokens: int = Field(16, ge=1, description="Maximum number of tokens to sample per choice.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Keep the k most likely tokens; -1 (or 0) keeps all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Minimum probability relative to the top token.")
    seed: int | None = Field(None, description="Per-request seed; same seed and engine config, same sample.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the output).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end a choice.")
    ignore_eos: bool = Field(False, description="Keep sampling past EOS (benchmarks).")
    logprobs: int = Field(
        0,
        ge=0,
        le=20,
        description="Top-k alternatives per sampled position to report besides the sampled token's own "
        "logprob (which is always returned).",
    )
    min_tokens: int = Field(0, ge=0, description="Minimum number of tokens before EOS/stop may end a choice.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM repetition penalty (1 is off).")
    presence_penalty: float = Field(0.0, description="OpenAI presence penalty.")
    frequency_penalty: float = Field(0.0, description="OpenAI frequency penalty.")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


@dataclasses.dataclass(slots=True)
class GenerateRequest:
    """What an engine actor is asked to do (already validated by the Pool)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    split: Split = "train"
    session_id: str | None = None
    choice_offset: int = 0  # index of this request's first choice in the caller's merged result
    workload: str | None = None


@dataclasses.dataclass(slots=True)
class Choice:
    """One sampled continuation."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    weight_version: int | str | None = None
    weight_versions: list[int | str | None] = dataclasses.field(default_factory=list)
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass(slots=True)
class GenerateResult:
    """The result of one generate call: the prompt ids the engine received and its choices."""

    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    engine_id: str = ""
    engine_ids: list[str] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0
    ttft_s: float | None = None  # time to the first sampled token, where the backend sees it

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def without_sent_prompt(self, sent: list[int]) -> GenerateResult:
        """For the trip back to the caller: ``prompt_token_ids`` emptied when they are exactly
        the ``sent`` ones (the caller holds those; a long prompt is most of a turn's bytes)."""
        if self.prompt_token_ids == sent:
            return dataclasses.replace(self, prompt_token_ids=[])
        return self

    def with_sent_prompt(self, sent: list[int]) -> GenerateResult:
        """The caller's side of :meth:`without_sent_prompt`: empty ids are the ones it sent."""
        if not self.prompt_token_ids:
            self.prompt_token_ids = sent
        return self


@dataclasses.dataclass(slots=True)
class EngineInfo:
    """Static facts an engine reports once it has started."""

    engine_id: str
    backend: str
    model: str
    vocab_size: int
    max_model_len: int
    eos_token_id: int | None = None
    node_id: str = ""
    supports_tokens: bool = True  # False: text-only (hosted OpenAI-style APIs); sessions need placeholders
    supports_prompt_logprobs: bool = False
    transfer_ranks: int = 1  # receiving workers in a native weight transfer (tensor x pipeline x data parallel)
    placement_group_id: str = ""  # the Ray placement group the engine runs in ("" outside one)
    bundle_index: int | None = None  # its bundle there, when the pool placed it into a given group
    group: int = 0  # index of its group in PoolConfig.engines (set when the router registers it)


@dataclasses.dataclass(slots=True)
class EngineStats:
    """Live counters of one engine actor."""

    engine_id: str
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_len: int = 0
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    weight_version: int | str | None = None
    weight_updates: int = 0
    last_update_bytes: int = 0
    last_update_s: float = 0.0
    uptime_s: float = 0.0
    gc_frozen_objects: int = 0  # frozen out of the actor process's garbage collection (PoolConfig.gc_freeze)


@dataclasses.dataclass(slots=True)
class PromptLogprobs:
    """Prompt scoring: per prompt position, the top-k token ids and their logprobs.

    ``prompt_topk_token_ids[i]`` and ``prompt_topk_logprobs[i]`` hold exactly ``k`` entries
    for every position ``i >= 1`` (sorted by logprob, best first). Position 0 has no
    logprob (nothing precedes it): its lists are empty.
    """

    prompt_tokens: list[int]
    prompt_topk_token_ids: list[list[int]]
    prompt_topk_logprobs: list[list[float]]

    def to_dict(self) -> dict[str, list]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_topk_token_ids": self.prompt_topk_token_ids,
            "prompt_topk_logprobs": self.prompt_topk_logprobs,
        }
