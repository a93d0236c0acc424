"""What the dispatcher does with results: ``n`` split into sub-requests and merged back
with consecutive choice indices, the empty result of a request aborted before it reached
an engine, and gathering many calls where the first failure cancels the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from inferpool.types import Choice, GenerateRequest, GenerateResult

T = TypeVar("T")


def split_n(n: int, cap: int) -> list[tuple[int, int]]:
    """(choice offset, n) of each sub-request when ``n`` exceeds ``cap``."""
    return [(off, min(cap, n - off)) for off in range(0, n, cap)]


def merge_results(request_id: str, parts: Sequence[GenerateResult]) -> GenerateResult:
    """Merge sub-request results (in offset order) into one with consecutive indices."""
    choices = [c for part in parts for c in part.choices]
    for i, c in enumerate(choices):
        c.index = i
    return GenerateResult(
        request_id=request_id,
        prompt_token_ids=parts[0].prompt_token_ids,
        choices=choices,
        engine_id=parts[0].engine_id,
        engine_ids=[p.engine_id for p in parts],
        elapsed_s=max(p.elapsed_s for p in parts),
    )


def aborted_result(request: GenerateRequest, engine_id: str) -> GenerateResult:
    """What a request aborted before it reached an engine returns: no tokens, finish 'abort'."""
    choices = [
        Choice(index=request.choice_offset + i, token_ids=[], logprobs=[], finish_reason="abort")
        for i in range(request.sampling.n)
    ]
    return GenerateResult(request.request_id, list(request.prompt_token_ids), choices, engine_id, [engine_id])


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the rest (and waits for them to unwind)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
