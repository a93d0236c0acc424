"""What travels between a caller that runs a session's turns and the store that owns it.

When turns run where the caller is (``SessionConfig.turns_in_caller``), the caller keeps a
mirror of the session's :class:`~inferpool.session_tree.SessionTree`, renders and
dispatches there, and sends the store only what each turn added: one
:class:`SegmentWire` per choice (its own tokens, mask, logprobs and versions, and the id
of the segment it extends) — in proportion to what is new, never the whole history. The
store adopts them into its own tree (:func:`adopt`) after checking that each extends a
sequence it holds and that its arrays align; it stays the owner of the session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from inferpool.errors import SessionError
from inferpool.session_tree import Segment, SessionTree


@dataclasses.dataclass
class SegmentWire:
    """One segment with its parent named by id and its versions as labels (picklable, O(new))."""

    node_id: str
    parent_id: str | None
    tokens: np.ndarray
    trainable: np.ndarray
    logprobs: np.ndarray
    version_labels: list[Any]  # the labels this segment's tokens use
    version_index: np.ndarray  # per token: index into version_labels, -1 where not sampled
    text: str
    metadata: dict[str, Any]
    messages: list[dict[str, Any]] | None
    match_text: str | None
    ended_with_eos: bool
    render_key: str | None


def to_wire(tree: SessionTree, seg: Segment) -> SegmentWire:
    """``seg`` (a segment of ``tree``, recorded or not) as it travels."""
    used = sorted({v for v in seg.versions.tolist() if v >= 0})
    remap = np.full(max(used, default=-1) + 2, -1, np.int32)  # remap[-1] stays -1
    for j, i in enumerate(used):
        remap[i] = j
    return SegmentWire(
        node_id=seg.node_id,
        parent_id=seg.parent.node_id if seg.parent is not None else None,
        tokens=seg.tokens,
        trainable=seg.trainable,
        logprobs=seg.logprobs,
        version_labels=tree.labels(used),
        version_index=remap[seg.versions],
        text=seg.text,
        metadata=seg.metadata,
        messages=seg.messages,
        match_text=seg.match_text,
        ended_with_eos=seg.ended_with_eos,
        render_key=seg.render_key,
    )


def adopt(tree: SessionTree, wires: Sequence[SegmentWire]) -> list[Segment]:
    """Record a turn's segments sent by a caller: each must extend a sequence ``tree`` holds
    (or start a new one) and keep tokens, mask, logprobs and versions aligned."""
    segments = []
    for w in wires:
        n = len(w.tokens)
        if not (len(w.trainable) == len(w.logprobs) == len(w.version_index) == n):
            raise SessionError(f"session {tree.session_id}: node {w.node_id} arrived misaligned")
        if w.node_id in tree:
            raise SessionError(f"session {tree.session_id}: node {w.node_id} was recorded already")
        parent = None
        if w.parent_id is not None:
            if w.parent_id not in tree:
                raise SessionError(
                    f"session {tree.session_id}: node {w.node_id} extends {w.parent_id}, which the session does "
                    "not hold (it was reset or closed meanwhile)"
                )
            parent = tree.get(w.parent_id)
        index = w.version_index
        if n and (int(index.max()) >= len(w.version_labels) or int(index.min()) < -1):
            raise SessionError(f"session {tree.session_id}: node {w.node_id} names a weight version it does not carry")
        table = np.array([*(-1 if v is None else tree.label_index(v) for v in w.version_labels), -1], np.int32)
        segments.append(
            Segment(
                w.node_id,
                parent,
                w.tokens,
                w.trainable,
                w.logprobs,
                table[index],
                w.text,
                w.metadata,
                messages=w.messages,
                match_text=w.match_text,
                ended_with_eos=w.ended_with_eos,
                render_key=w.render_key,
            )
        )
    tree.record(segments)
    return segments


def export(tree: SessionTree) -> list[SegmentWire]:
    """Every recorded segment of ``tree``, parents first (what a caller's mirror is built from)."""
    return [to_wire(tree, seg) for seg in tree.segments()]


def rebuild(session_id: str, track_tree: bool, turns: int, wires: Sequence[SegmentWire]) -> SessionTree:
    """A tree from :func:`export` (a caller's mirror of a session the store holds)."""
    tree = SessionTree(session_id, track_tree)
    for wire in wires:
        adopt(tree, [wire])
    tree.turns = turns
    return tree
