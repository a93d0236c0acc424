"""The pieces a :class:`~inferpool.session_tree.SessionTree` is made of: a :class:`Segment`
(what one choice of one turn added to a sequence, linked to the segment it extended), the
:class:`Match` that says what a new turn continues, and the ids segments are named by.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import numpy as np

from inferpool.message_index import Position

_node_ids = itertools.count(1)
_PROCESS_TAG = uuid.uuid4().hex[:10]  # node ids are made in stores and in callers: unique per process


def new_node_id() -> str:
    return f"n{next(_node_ids)}-{_PROCESS_TAG}"


class Segment:
    """What one choice of one turn added to a sequence (see :mod:`inferpool.session_tree`)."""

    __slots__ = (
        "_end",
        "_full",
        "children",
        "depth",
        "ended_with_eos",
        "length",
        "logprobs",
        "match_text",
        "messages",
        "metadata",
        "node_id",
        "parent",
        "render_key",
        "seq",
        "text",
        "tokens",
        "trainable",
        "versions",
        "vset",
    )

    def __init__(
        self,
        node_id: str,
        parent: Segment | None,
        tokens: np.ndarray,
        trainable: np.ndarray,
        logprobs: np.ndarray,
        versions: np.ndarray,
        text: str,
        metadata: dict[str, Any],
        *,
        messages: list[dict[str, Any]] | None = None,
        match_text: str | None = None,
        ended_with_eos: bool = False,
        render_key: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.parent = parent
        self.tokens = tokens  # int64: what this segment added
        self.trainable = trainable  # bool: True where the engine sampled the token
        self.logprobs = logprobs  # float64: the engine's logprob; PROMPT_LOGPROB elsewhere
        self.versions = versions  # int32 index into the tree's version labels; -1: not sampled
        self.text = text
        self.metadata = metadata
        self.messages = messages  # chat: the messages this segment added (new ones + the reply)
        self.match_text = match_text  # completion: the whole prompt + the returned text
        self.ended_with_eos = ended_with_eos
        self.render_key = render_key  # the render options (tools, template kwargs) it was rendered with
        self.depth: int = (parent.depth if parent else 0) + len(messages or ())
        self.length: int = (parent.length if parent else 0) + len(tokens)
        own = {v for v in versions[trainable].tolist() if v >= 0} if len(versions) else set()
        self.vset: frozenset[int] = (parent.vset if parent else frozenset()) | own
        self.children = 0
        self.seq = 0
        self._full: np.ndarray | None = None  # all token ids of the path (kept on leaves only)
        self._end: Position[Segment] | None = None

    def chain(self) -> list[Segment]:
        """Root first."""
        out: list[Segment] = []
        seg: Segment | None = self
        while seg is not None:
            out.append(seg)
            seg = seg.parent
        out.reverse()
        return out


class Match:
    """What a turn continues: ``parent`` (None: render from scratch) and how many of the
    request's messages its path covers; ``ambiguous`` lists the other candidates when the
    earliest-recorded rule had to choose; ``loose`` when arguments matched only as JSON."""

    __slots__ = ("ambiguous", "loose", "parent", "stored")

    def __init__(
        self, parent: Segment | None = None, stored: int = 0, ambiguous: list[str] | None = None, loose: bool = False
    ) -> None:
        self.parent = parent
        self.stored = stored
        self.ambiguous = ambiguous or []
        self.loose = loose
