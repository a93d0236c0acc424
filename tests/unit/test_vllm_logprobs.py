"""Sampled-token logprobs read from vLLM's two shapes (flat lists, or one dict per position)
agree, built with vLLM's own code for appending a position's logprobs.

Run: pytest tests/unit/test_vllm_logprobs.py
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool.actors.backends.vllm.backend import sampled_logprobs, to_vllm_sampling
from inferpool.errors import BackendError
from inferpool.types import SamplingParams

vllm_logprobs = pytest.importorskip("vllm.logprobs")

VOCAB = 12


def _position(draw: st.DrawFn, top_k: int) -> tuple[int, list[int], list[float], int]:
    """(sampled token, ids, logprobs, its rank) as vLLM's sampler lays a position out: the
    sampled token first, then the top-k tokens best first (the sampled one may recur)."""
    values = draw(st.lists(st.floats(-20.0, 0.0), min_size=VOCAB, max_size=VOCAB, unique=True))
    ranked = sorted(range(VOCAB), key=lambda t: -values[t])
    sampled = draw(st.integers(0, VOCAB - 1))
    ids = [sampled, *ranked[:top_k]]
    return sampled, ids, [values[t] for t in ids], ranked.index(sampled) + 1


@st.composite
def _sequences(draw: st.DrawFn) -> tuple[int, list[tuple[int, list[int], list[float], int]]]:
    top_k = draw(st.integers(0, 4))
    return top_k, [_position(draw, top_k) for _ in range(draw(st.integers(0, 6)))]


@settings(max_examples=60, deadline=None)
@given(_sequences())
def test_flat_and_dict_logprobs_give_the_same_values(
    case: tuple[int, list[tuple[int, list[int], list[float], int]]],
) -> None:
    top_k, positions = case
    flat = vllm_logprobs.create_sample_logprobs(True)
    nested = vllm_logprobs.create_sample_logprobs(False)
    for _, ids, values, rank in positions:
        for container in (flat, nested):
            vllm_logprobs.append_logprobs_for_next_position(container, ids, values, [None] * len(ids), rank, top_k)
    sampled = [p[0] for p in positions]
    got_flat = sampled_logprobs(sampled, flat, top_k)
    assert got_flat == sampled_logprobs(sampled, nested, top_k)
    assert got_flat[0] == [p[2][0] for p in positions]  # the sampled token's own logprob
    if top_k:
        assert got_flat[1] is not None and all(len(t) == top_k for t in got_flat[1])


def test_a_missing_or_short_flat_logprob_is_a_backend_error() -> None:
    flat = vllm_logprobs.create_sample_logprobs(True)
    vllm_logprobs.append_logprobs_for_next_position(flat, [3], [-0.5], [None], 1, 0)
    assert sampled_logprobs([3], flat, 0) == ([-0.5], None)
    with pytest.raises(BackendError, match="no logprob for sampled token 4"):
        sampled_logprobs([4], flat, 0)
    with pytest.raises(BackendError, match="1 positions of 2 sampled tokens"):
        sampled_logprobs([3, 3], flat, 0)


def test_requests_ask_vllm_for_flat_logprobs() -> None:
    assert to_vllm_sampling(SamplingParams(max_tokens=4)).flat_logprobs is True
