"""SGLang's wire format, encoded and decoded once.

The in-process engine (``sgl.Engine.async_generate``, :mod:`.backend`) and the server's
native ``POST /generate`` endpoint (:mod:`inferpool.actors.backends.remote.sglang_http`)
take the same request fields and answer the same dicts, so both backends build requests
and read answers here.

Request: ``input_ids``, ``sampling_params`` (:func:`to_sglang_sampling`; the per-request
seed is added by the caller under its ``seed_field``), ``return_logprob: true`` and, when
top-k alternatives are asked for, ``top_logprobs_num`` (:func:`logprob_args`). Prompt
scoring: :func:`scoring_args` (``logprob_start_len: 0``, ``max_new_tokens: 1``).

Answer: one dict, or a list of dicts when ``sampling_params["n"] > 1`` (one per sample,
in order). Per item (:func:`decode_choice`): ``text``; ``output_ids`` (absent in older
versions: then the ids of ``meta_info.output_token_logprobs`` are used; when both are
present they must agree); ``meta_info.output_token_logprobs`` as ``[logprob, token_id,
text]`` triples (text may be null); ``meta_info.output_top_logprobs`` (a list of triples
per position); ``meta_info.finish_reason`` (``{"type": "stop", "matched": id_or_str}``,
``{"type": "length", "length": n}``, ``{"type": "abort", "message": ...}``, or null while
unfinished, reported as "abort"; ``matched`` becomes ``stop_reason``). Prompt scoring
reads ``meta_info.input_top_logprobs`` (null at position 0; some versions leave position
0 out) (:func:`decode_prompt_logprobs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferpool.actors.backends.base import build_prompt_logprobs, normalize_finish
from inferpool.errors import BackendError
from inferpool.types import Choice, GenerateRequest, PromptLogprobs, SamplingParams


def to_sglang_sampling(sp: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as SGLang's ``sampling_params`` dict (without the seed)."""
    params: dict[str, Any] = {
        "max_new_tokens": sp.max_tokens,
        "min_new_tokens": sp.min_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "min_p": sp.min_p,
        "n": sp.n,
        "ignore_eos": sp.ignore_eos,
        "repetition_penalty": sp.repetition_penalty,
        "presence_penalty": sp.presence_penalty,
        "frequency_penalty": sp.frequency_penalty,
    }
    if sp.stop:
        params["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    return params


def logprob_args(top_k: int) -> dict[str, Any]:
    """The logprob fields of a generate request: sampled-token logprobs always, top ``k`` if > 0."""
    args: dict[str, Any] = {"return_logprob": True}
    if top_k > 0:
        args["top_logprobs_num"] = top_k
    return args


def scoring_args(prompt_token_ids: list[int], top_k: int) -> dict[str, Any]:
    """A prompt-scoring request: top-k logprobs at every prompt position, one token sampled."""
    return {
        "input_ids": list(prompt_token_ids),
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": top_k,
    }


def logprob_pairs(value: Any, what: str) -> list[tuple[float | None, int]]:
    """``[[logprob, token_id, text], ...]`` as (logprob, token id) pairs."""
    if not isinstance(value, list | tuple):
        raise BackendError(f"SGLang: {what} missing or not a list")
    out: list[tuple[float | None, int]] = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise BackendError(f"SGLang: {what} entry {entry!r} is not a [logprob, token_id, text] triple")
        out.append((None if entry[0] is None else float(entry[0]), int(entry[1])))
    return out


def top_position(position: Any, k: int | None = None) -> dict[int, float] | None:
    """One position of ``*_top_logprobs`` as {token id: logprob}, best first (top ``k``)."""
    if not position:
        return None
    ranked = sorted(
        ((tok, lp) for lp, tok in logprob_pairs(position, "top logprobs") if lp is not None),
        key=lambda kv: (-kv[1], kv[0]),
    )
    return dict(ranked if k is None else ranked[:k])


def decode_choice(item: Any, i: int, request: GenerateRequest, source: str) -> Choice:
    """Output ``i`` of an answer to ``request`` as a :class:`Choice` (no weight version:
    the caller labels it). ``source`` names the engine in errors."""
    where = f"{source}, request {request.request_id}, output {i}"
    meta = item.get("meta_info") if isinstance(item, Mapping) else None
    if not isinstance(meta, Mapping):
        raise BackendError(f"{where}: no meta_info")
    pairs = logprob_pairs(meta.get("output_token_logprobs"), "meta_info.output_token_logprobs")
    logprob_ids = [tok for _, tok in pairs]
    output_ids = item.get("output_ids")
    if output_ids is None:
        token_ids = logprob_ids
    else:
        token_ids = [int(t) for t in output_ids]
        if token_ids != logprob_ids:
            raise BackendError(
                f"{where}: output_ids ({len(token_ids)} tokens) and the ids of "
                f"meta_info.output_token_logprobs ({len(logprob_ids)}) disagree"
            )
    if any(lp is None for lp, _ in pairs):
        raise BackendError(f"{where}: a sampled token has no logprob")
    finish, stop_reason = normalize_finish(meta.get("finish_reason"))
    k = request.sampling.logprobs
    tops = None
    if k > 0:
        positions = meta.get("output_top_logprobs") or []
        tops = [top_position(pos, k) or {} for pos in positions]
        if len(tops) != len(token_ids):
            raise BackendError(f"{where}: top logprobs for {len(tops)} of {len(token_ids)} positions")
    return Choice(
        index=request.choice_offset + i,
        token_ids=token_ids,
        logprobs=[float(lp) for lp, _ in pairs if lp is not None],
        finish_reason=finish,
        text=item.get("text"),
        stop_reason=stop_reason,
        top_logprobs=tops,
    )


def decode_prompt_logprobs(out: Any, prompt_token_ids: list[int], top_k: int, source: str) -> PromptLogprobs:
    """The answer to :func:`scoring_args` as top-k logprobs per prompt position (position 0 empty)."""
    item = out[0] if isinstance(out, list) and out else out
    meta = item.get("meta_info") if isinstance(item, Mapping) else None
    positions = meta.get("input_top_logprobs") if isinstance(meta, Mapping) else None
    if not isinstance(positions, list):
        raise BackendError(f"{source}: no meta_info.input_top_logprobs")
    tops = [top_position(p) for p in positions]
    if len(tops) == len(prompt_token_ids) - 1:  # some versions leave position 0 out
        tops.insert(0, None)
    return build_prompt_logprobs(list(prompt_token_ids), tops, top_k, source)
