"""Shared check of session token-exactness for tests that drive sessions through a pool."""

from __future__ import annotations

from typing import Any

import inferpool as ip


def check_exact(state: ip.SessionState, outs: list[Any]) -> None:
    """The stored tokens are exactly what the engines were given and sampled, turn after turn."""
    node = state.nodes[0]
    assert node.tokens == outs[-1].prompt_token_ids + outs[-1].choices[0].token_ids
    for out in outs[:-1]:
        seq = out.prompt_token_ids + out.choices[0].token_ids
        assert node.tokens[: len(seq)] == seq
    assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
