"""A session's token-exact history, and the index that finds what a new turn continues.

Segments. A turn records one :class:`~inferpool.segment.Segment` per choice: the tokens it added (the
rendered suffix of the new messages, not trainable, then what the engine sampled,
trainable), their logprobs and weight versions, and a link to the segment it extended.
A sequence is the path from a root to a segment. Recording a turn costs in proportion to
what is new in it, and nothing recorded is ever dropped: every sequence the session
returned can be extended token-exactly for the session's lifetime. ``state()`` is a view
of it: the leaves (list mode) or every distinct sequence (tree mode).

Matching (chat). A turn sends the whole conversation; the tree's
:class:`~inferpool.message_index.MessageIndex`, kept up to date as segments are recorded,
finds the recorded path the request's messages follow furthest (what a match compares:
see that module). The deepest recorded path wins. When the request matches several recorded sequences
whose tokens differ (identical replies sampled as different tokens, or a client that
dropped what told them apart), the session does not guess silently: the documented rule
picks the closest match (exact arguments over JSON-equal ones), then the earliest
recorded, and the new nodes say so in ``metadata["ambiguous_parent"]`` (counted in
``stats()``). ``node_id`` (or ``extends=``) always says exactly which sequence is meant.

Matching (completion). The prompt's longest recorded prefix (prompt + returned text of a
completion turn), from a :class:`~inferpool.message_index.TextIndex`; the same rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from inferpool.errors import RequestError
from inferpool.message_index import ExactWalk, MessageIndex, TextIndex, matches
from inferpool.segment import Match, Segment, new_node_id
from inferpool.sequences import PROMPT_LOGPROB, SequenceNode, SessionState

__all__ = ["Match", "Segment", "SessionTree", "new_node_id"]


class SessionTree:
    """Every sequence one session recorded, indexed for matching (not thread-safe: a store
    serializes a session's turns)."""

    def __init__(self, session_id: str, track_tree: bool = False) -> None:
        self.session_id = session_id
        self.track_tree = track_tree
        self.turns = 0
        self.ambiguous_turns = 0
        self.rerendered_turns = 0
        self._labels: list[Any] = []
        self._label_at: dict[tuple[str, Any], int] = {}
        self._by_id: dict[str, Segment] = {}
        self._order: list[Segment] = []
        self._messages: MessageIndex[Segment] = MessageIndex()
        self._texts: TextIndex[Segment] = TextIndex()
        self._seq = itertools.count(1)

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order)

    def segments(self) -> list[Segment]:
        """Every recorded segment, in recording order (parents before children)."""
        return list(self._order)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def labels(self, indices: Sequence[int]) -> list[Any]:
        """The weight-version labels at these indices of this tree's table."""
        return [self._labels[i] for i in indices]

    def get(self, node_id: str, field: str = "extends") -> Segment:
        seg = self._by_id.get(node_id)
        if seg is None:
            raise RequestError(f"{field}: session {self.session_id} has no node {node_id!r}", field=field)
        return seg

    def tokens(self, seg: Segment) -> np.ndarray:
        """All token ids of ``seg``'s sequence (cached while ``seg`` is a leaf)."""
        if seg._full is not None:
            return seg._full
        full = np.concatenate([s.tokens for s in seg.chain()]) if seg.parent is not None else seg.tokens
        if seg.children == 0:
            seg._full = full
        return full

    def sampled_versions(self, seg: Segment) -> list[Any]:
        """The weight versions that sampled any token of ``seg``'s sequence."""
        return [self._labels[i] for i in sorted(seg.vset)]

    def path_messages(self, seg: Segment) -> list[dict[str, Any]]:
        return [m for s in seg.chain() for m in (s.messages or ())]

    # -- matching -----------------------------------------------------------------------
    def exact_walk(self, messages: Sequence[Any]) -> ExactWalk[Segment]:
        """The recorded (checked) messages equal to the first of ``messages``, for match_chat."""
        return self._messages.exact_walk(messages)

    def match_chat(
        self, messages: Sequence[dict[str, Any]], extends: str | None = None, walk: ExactWalk[Segment] | None = None
    ) -> Match:
        """The recorded sequence ``messages`` continue (see the module docstring)."""
        if extends is not None:
            seg = self.get(extends)
            path = self.path_messages(seg)
            if seg.messages is None or len(path) > len(messages):
                raise self._not_continued(extends)
            if not all(matches(r, s) for r, s in zip(messages, path, strict=False)):
                raise self._not_continued(extends)
            return Match(seg, len(path))
        best, depth = self._messages.match(messages, walk)
        if not best:
            return Match()
        # the closest match first (fewest loose comparisons, then the earliest recorded); every
        # other candidate whose tokens differ makes the choice a guess, which is reported
        ranked = sorted(best, key=lambda c: (c[1], c[0].seq))
        chosen = self._resolve([seg for seg, _ in ranked])
        return Match(chosen[0], depth, [s.node_id for s in chosen[1:]], ranked[0][1] > 0)

    @staticmethod
    def _not_continued(node_id: str) -> RequestError:
        return RequestError(
            f"extends: the messages do not continue node {node_id!r} (its conversation is not their prefix)",
            field="extends",
        )

    def match_text(self, prompt: str, extends: str | None = None) -> Match:
        """The recorded completion whose prompt + returned text is the longest prefix of ``prompt``."""
        if extends is not None:
            seg = self.get(extends)
            if seg.match_text is None or not prompt.startswith(seg.match_text):
                raise RequestError(
                    f"extends: the prompt does not continue node {extends!r} (its text is not the prompt's prefix)",
                    field="extends",
                )
            return Match(seg, len(seg.match_text))
        found, length = self._texts.longest_prefix(prompt)
        if not found:
            return Match()
        chosen = self._resolve(sorted(found, key=lambda seg: seg.seq))
        return Match(chosen[0], length, [s.node_id for s in chosen[1:]])

    def _resolve(self, candidates: list[Segment]) -> list[Segment]:
        """The first candidate, then only those whose tokens differ from it (an empty tail: no
        real ambiguity). Completion candidates come unordered: earliest recorded first."""
        ordered = list(dict.fromkeys(candidates))
        first = ordered[0]
        rest = [s for s in ordered[1:] if not self._same_tokens(first, s)]
        return [first, *rest]

    def _same_tokens(self, a: Segment, b: Segment) -> bool:
        if a.length != b.length:
            return False
        if a.parent is b.parent:
            return bool(np.array_equal(a.tokens, b.tokens))
        return bool(np.array_equal(self.tokens(a), self.tokens(b)))

    # -- recording ----------------------------------------------------------------------
    def version_indices(self, versions: Sequence[Any]) -> np.ndarray:
        """Per-token weight versions as indices into this tree's labels (-1: none)."""
        n = len(versions)
        out = np.full(n, -1, np.int32)
        if n and isinstance(versions, list | tuple):  # the usual turn: one version for every token
            first = versions[0]
            if versions.count(first) == n and len(set(map(type, versions))) == 1:
                if first is not None:
                    out[:] = self.label_index(first)
                return out
        for i, v in enumerate(versions):
            if v is not None:
                out[i] = self.label_index(v)
        return out

    def label_index(self, version: Any) -> int:
        """The index of ``version`` among this tree's labels (added if new; 1 and "1" differ)."""
        key = (type(version).__name__, version)
        j = self._label_at.get(key)
        if j is None:
            j = self._label_at[key] = len(self._labels)
            self._labels.append(version)
        return j

    def new_segment(
        self,
        parent: Segment | None,
        suffix_ids: Sequence[int],
        suffix_text: str,
        sampled: Sequence[int],
        sampled_logprobs: Sequence[float],
        sampled_versions: Sequence[Any],
        sampled_text: str,
        *,
        eos_token_id: int | None,
        metadata: dict[str, Any],
        messages: list[dict[str, Any]] | None = None,
        match_text: str | None = None,
        render_key: str | None = None,
        node_id: str | None = None,
    ) -> Segment:
        """A segment for one choice (not recorded until :meth:`record`)."""
        k, s = len(suffix_ids), len(sampled)
        return Segment(
            node_id or new_node_id(),
            parent,
            np.asarray([*suffix_ids, *sampled], np.int64),
            np.concatenate([np.zeros(k, bool), np.ones(s, bool)]),
            np.concatenate([np.full(k, PROMPT_LOGPROB), np.asarray(sampled_logprobs, np.float64)]),
            np.concatenate([np.full(k, -1, np.int32), self.version_indices(sampled_versions)]),
            suffix_text + sampled_text,
            metadata,
            messages=messages,
            match_text=match_text,
            ended_with_eos=bool(s) and eos_token_id is not None and sampled[-1] == eos_token_id,
            render_key=render_key,
        )

    def continuation(
        self,
        base: Segment,
        sampled: Sequence[int],
        sampled_logprobs: Sequence[float],
        sampled_versions: Sequence[Any],
        sampled_text: str,
        *,
        eos_token_id: int | None,
        eos_text: str,
        metadata: dict[str, Any],
        reply: dict[str, Any] | None = None,
        node_id: str | None = None,
    ) -> Segment:
        """A segment that continues ``base``'s final reply (``continue_final_message``): its own
        tokens without the end-of-turn token it sampled, then the new sample; a sibling of
        ``base``. ``reply``: the continued assistant message (chat)."""
        cut = 1 if base.ended_with_eos else 0
        keep = len(base.tokens) - cut
        s = len(sampled)
        messages = None if base.messages is None else [*base.messages[:-1], *([reply] if reply else [])]
        return Segment(
            node_id or new_node_id(),
            base.parent,
            np.concatenate([base.tokens[:keep], np.asarray(sampled, np.int64)]),
            np.concatenate([base.trainable[:keep], np.ones(s, bool)]),
            np.concatenate([base.logprobs[:keep], np.asarray(sampled_logprobs, np.float64)]),
            np.concatenate([base.versions[:keep], self.version_indices(sampled_versions)]),
            (base.text.removesuffix(eos_text) if cut else base.text) + sampled_text,
            metadata,
            messages=messages,
            match_text=None if base.match_text is None else base.match_text + sampled_text,
            ended_with_eos=bool(s) and eos_token_id is not None and sampled[-1] == eos_token_id,
            render_key=base.render_key,
        )

    def record(self, segments: Sequence[Segment]) -> None:
        """Add one turn's segments (every one, duplicates included: any returned node id can be
        extended; tree mode's view shows each distinct sequence once)."""
        parents: dict[int, np.ndarray] = {}
        for seg in segments:
            parent = seg.parent
            if parent is not None:
                key = id(parent)
                if key not in parents:
                    parents[key] = self.tokens(parent)
                seg._full = np.concatenate([parents[key], seg.tokens])
            else:
                seg._full = seg.tokens
            seg.seq = next(self._seq)
            self._by_id[seg.node_id] = seg
            self._order.append(seg)
            if seg.messages is not None:
                seg._end = self._messages.add(parent._end if parent is not None else None, seg.messages, seg)
            if seg.match_text is not None:
                self._texts.add(seg.match_text, seg)
            if parent is not None:
                parent.children += 1
        for seg in segments:
            if seg.parent is not None:
                seg.parent._full = None  # no longer a leaf: its tokens are rebuilt on demand
        self.turns += 1

    def reset(self) -> None:
        """Forget every recorded sequence (the session stays)."""
        fresh = SessionTree(self.session_id, self.track_tree)
        for name in ("_labels", "_label_at", "_by_id", "_order", "_messages", "_texts"):
            setattr(self, name, getattr(fresh, name))
        self.turns = 0

    # -- the view -----------------------------------------------------------------------
    def visible(self) -> list[Segment]:
        """List mode: the sequences nothing extended (an extension replaces its parent in the
        view); tree mode: every distinct sequence (a choice with the very same tokens as an
        earlier sibling is shown once). In recording order."""
        if not self.track_tree:
            return [s for s in self._order if s.children == 0]
        canon = self._canonical()
        return [s for s in self._order if canon[s.node_id] is s]

    def _canonical(self) -> dict[str, Segment]:
        """node id -> the first recorded sibling with the very same tokens (itself if none)."""
        first: dict[tuple[int, bytes], Segment] = {}
        return {s.node_id: first.setdefault((id(s.parent), s.tokens.tobytes()), s) for s in self._order}

    def node(self, seg: Segment, canonical: dict[str, Segment] | None = None) -> SequenceNode:
        """``seg``'s whole sequence as a :class:`SequenceNode` (copies of its arrays); tree
        mode names a duplicate parent by the sibling the view shows."""
        chain = seg.chain()
        node = SequenceNode(
            node_id=seg.node_id,
            token_array=self.tokens(seg).copy(),
            trainable=np.concatenate([s.trainable for s in chain]),
            logprob_array=np.concatenate([s.logprobs for s in chain]),
            full_text="".join(s.text for s in chain),
            metadata=seg.metadata,
            messages=self.path_messages(seg) if seg.messages is not None else None,
            match_text=seg.match_text,
            parent_id=(canonical or {}).get(seg.parent.node_id, seg.parent).node_id if seg.parent else None,
            ended_with_eos=seg.ended_with_eos,
            version_index=np.concatenate([s.versions for s in chain]),
            version_labels=list(self._labels),
        )
        node.check()
        return node

    def state(self) -> SessionState:
        canonical = self._canonical() if self.track_tree else None
        return SessionState(
            session_id=self.session_id,
            nodes=[self.node(s, canonical) for s in self.visible()],
            track_tree=self.track_tree,
            turns=self.turns,
        )
