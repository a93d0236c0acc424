"""Token-exact session state: sequence nodes and how a turn extends them.

A :class:`SequenceNode` is one sequence as the engine saw and sampled it. Invariants:
``len(tokens) == len(masked_tokens) == len(logprobs) == len(weight_versions)``;
prompt, tool and template positions have mask value -100 and logprob 1.0; sampled
positions keep their token id in ``masked_tokens`` and the engine's own logprob.
Token ids and logprobs are numpy arrays inside (zero-copy through the object store);
the node exposes lists for compatibility.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

MASK = -100
PROMPT_LOGPROB = 1.0
_node_ids = itertools.count(1)


def encode_versions(versions: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Per-token weight versions as (int32 index array, labels); -1 where there is none."""
    labels: list[Any] = []
    where: dict[Any, int] = {}
    index = np.full(len(versions), -1, np.int32)
    for i, v in enumerate(versions):
        if v is None:
            continue
        key = (type(v).__name__, v)
        j = where.get(key)
        if j is None:
            j = where[key] = len(labels)
            labels.append(v)
        index[i] = j
    return index, labels


class SequenceNode:
    """One token-exact sequence of a session.

    Token ids, the trainable mask, logprobs and the per-token weight versions (an int32
    index into ``version_labels``) are numpy arrays, so a fetched SessionState is mostly
    zero-copy buffers; ``tokens``, ``masked_tokens``, ``logprobs`` and ``weight_versions``
    give lists.
    """

    def __init__(
        self,
        node_id: str,
        token_array: np.ndarray,
        trainable: np.ndarray,
        logprob_array: np.ndarray,
        full_text: str,
        metadata: dict[str, Any],
        weight_versions: Sequence[Any] | None = None,
        messages: list[dict[str, Any]] | None = None,
        match_text: str | None = None,
        parent_id: str | None = None,
        ended_with_eos: bool = False,
        *,
        version_index: np.ndarray | None = None,
        version_labels: list[Any] | None = None,
    ) -> None:
        self.node_id = node_id
        self.token_array = token_array  # int64 token ids
        self.trainable = trainable  # bool, True where the engine sampled the token
        self.logprob_array = logprob_array  # float64; PROMPT_LOGPROB where not trainable
        self.full_text = full_text
        self.metadata = metadata
        self.messages = messages  # chat nodes: the conversation incl. the reply as returned
        self.match_text = match_text  # completion nodes: prompt + returned text
        self.parent_id = parent_id
        self.ended_with_eos = ended_with_eos
        if version_index is None:
            version_index, version_labels = encode_versions(
                weight_versions if weight_versions is not None else [None] * len(token_array)
            )
        self.version_index = version_index
        self.version_labels = list(version_labels or [])

    @property
    def tokens(self) -> list[int]:
        return self.token_array.tolist()

    @property
    def masked_tokens(self) -> list[int]:
        return np.where(self.trainable, self.token_array, MASK).tolist()

    @property
    def logprobs(self) -> list[float]:
        return self.logprob_array.tolist()

    @property
    def mask(self) -> list[int]:
        return self.trainable.astype(np.int8).tolist()

    @property
    def weight_versions(self) -> list[Any]:
        """The weight version of every token (None where the engine did not sample it)."""
        labels = self.version_labels
        return [labels[i] if i >= 0 else None for i in self.version_index.tolist()]

    def __len__(self) -> int:
        return int(self.token_array.shape[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceNode) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SequenceNode({self.node_id!r}, tokens={len(self)}, parent={self.parent_id!r})"

    def check(self) -> None:
        n = len(self)
        if not (self.trainable.shape[0] == self.logprob_array.shape[0] == self.version_index.shape[0] == n):
            raise AssertionError(f"node {self.node_id} is misaligned")

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "parent_id": self.parent_id,
            "full_text": self.full_text,
            "tokens": self.tokens,
            "masked_tokens": self.masked_tokens,
            "logprobs": self.logprobs,
            "metadata": {**self.metadata, "weight_versions": self.weight_versions},
        }


@dataclasses.dataclass
class SessionState:
    """All sequences of one session (what ``state()`` / ``state_ref()`` return)."""

    session_id: str
    nodes: list[SequenceNode]
    track_tree: bool = False
    turns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "track_tree": self.track_tree,
            "turns": self.turns,
            "nodes": [n.to_dict() for n in self.nodes],
        }


def new_session_id() -> str:
    """A random 128-bit session id."""
    return uuid.uuid4().hex


def is_session_id(session_id: str) -> bool:
    """Managed sessions have hex ids (hashed to a store shard)."""
    try:
        int(session_id, 16)
    except (TypeError, ValueError):
        return False
    return True


def shard_of(session_id: str, shards: int) -> int:
    """The store shard that owns a session id."""
    return int(session_id, 16) % shards


@dataclasses.dataclass
class SessionOptions:
    """Per-session options chosen at creation."""

    track_tree: bool = False
    tool_parser: str = "hermes"


@dataclasses.dataclass
class Prefix:
    """The stored sequence a new turn extends (or none) and the new prompt's pieces."""

    parent: SequenceNode | None
    suffix_ids: list[int]
    suffix_text: str

    def prompt_ids(self) -> list[int]:
        base = self.parent.tokens if self.parent is not None else []
        return base + self.suffix_ids


def longest_message_prefix(nodes: Sequence[SequenceNode], keys: Sequence[str]) -> tuple[SequenceNode | None, int]:
    """The stored chat node whose messages are the longest prefix of ``keys``."""
    from inferpool.chat import message_key

    best: SequenceNode | None = None
    best_len = 0
    for node in nodes:
        msgs = node.messages
        if not msgs or len(msgs) > len(keys) or len(msgs) <= best_len:
            continue
        if all(message_key(m) == k for m, k in zip(msgs, keys, strict=False)):
            best, best_len = node, len(msgs)
    return best, best_len


def longest_text_prefix(nodes: Sequence[SequenceNode], prompt: str) -> SequenceNode | None:
    """The stored completion node whose returned text is the longest prefix of ``prompt``."""
    best: SequenceNode | None = None
    for node in nodes:
        text = node.match_text
        if text is not None and prompt.startswith(text) and (best is None or len(text) > len(best.match_text or "")):
            best = node
    return best


def extend(
    prefix: Prefix,
    sampled: Sequence[int],
    sampled_logprobs: Sequence[float],
    sampled_versions: Sequence[Any],
    *,
    prompt_text: str,
    sampled_text: str,
    eos_token_id: int | None,
    metadata: dict[str, Any],
    messages: list[dict[str, Any]] | None = None,
    match_text: str | None = None,
) -> SequenceNode:
    """A new node: parent tokens (kept, still trainable where sampled) + masked suffix + sampled."""
    parent = prefix.parent
    k, s = len(prefix.suffix_ids), len(sampled)
    new_index, labels = encode_versions([*([None] * k), *sampled_versions])
    if parent is not None:
        # remap the new labels onto the parent's label table
        table = list(parent.version_labels)
        remap = np.empty(len(labels), np.int32)
        for j, label in enumerate(labels):
            try:
                remap[j] = next(i for i, x in enumerate(table) if type(x) is type(label) and x == label)
            except StopIteration:
                remap[j] = len(table)
                table.append(label)
        new_index = np.where(new_index >= 0, remap[np.maximum(new_index, 0)] if len(labels) else -1, -1).astype(
            np.int32
        )
        tokens = np.concatenate(
            [parent.token_array, np.asarray(prefix.suffix_ids, np.int64), np.asarray(sampled, np.int64)]
        )
        trainable = np.concatenate([parent.trainable, np.zeros(k, bool), np.ones(s, bool)])
        logprobs = np.concatenate(
            [parent.logprob_array, np.full(k, PROMPT_LOGPROB), np.asarray(sampled_logprobs, np.float64)]
        )
        version_index = np.concatenate([parent.version_index, new_index])
        full_text = parent.full_text + prompt_text + sampled_text
    else:
        tokens = np.asarray([*prefix.suffix_ids, *sampled], np.int64)
        trainable = np.concatenate([np.zeros(k, bool), np.ones(s, bool)])
        logprobs = np.concatenate([np.full(k, PROMPT_LOGPROB), np.asarray(sampled_logprobs, np.float64)])
        version_index, table = new_index, labels
        full_text = prompt_text + sampled_text
    node = SequenceNode(
        node_id=f"n{next(_node_ids)}-{uuid.uuid4().hex[:6]}",
        token_array=tokens,
        trainable=trainable,
        logprob_array=logprobs,
        full_text=full_text,
        metadata=metadata,
        messages=messages,
        match_text=match_text,
        parent_id=parent.node_id if parent is not None else None,
        ended_with_eos=bool(s) and eos_token_id is not None and sampled[-1] == eos_token_id,
        version_index=version_index,
        version_labels=table,
    )
    node.check()
    return node


def commit(state: SessionState, parent: SequenceNode | None, children: list[SequenceNode]) -> None:
    """Add a turn's children. List mode: an extension replaces its parent. Tree mode: keep
    every distinct sequence (by text) with its parent link."""
    if state.track_tree:
        seen = {n.full_text for n in state.nodes}
        for child in children:
            if child.full_text not in seen:
                state.nodes.append(child)
                seen.add(child.full_text)
    else:
        if parent is not None:
            state.nodes = [n for n in state.nodes if n.node_id != parent.node_id]
        state.nodes.extend(children)
    state.turns += 1
