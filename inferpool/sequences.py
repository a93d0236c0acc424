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
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

MASK = -100
PROMPT_LOGPROB = 1.0


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


def state_from_dict(data: dict[str, Any]) -> SessionState:
    """The inverse of :meth:`SessionState.to_dict` (e.g. ``GET /sessions/{id}/nodes`` JSON)."""
    nodes = []
    for n in data.get("nodes", []):
        tokens = np.asarray(n["tokens"], dtype=np.int64)
        masked = np.asarray(n["masked_tokens"], dtype=np.int64)
        metadata = dict(n.get("metadata") or {})
        versions = list(metadata.pop("weight_versions", [None] * len(tokens)))
        nodes.append(
            SequenceNode(
                node_id=n["node_id"],
                token_array=tokens,
                trainable=masked != MASK,
                logprob_array=np.asarray(n["logprobs"], dtype=np.float64),
                full_text=n.get("full_text", ""),
                weight_versions=versions,
                metadata=metadata,
                parent_id=n.get("parent_id"),
            )
        )
    return SessionState(
        session_id=data["session_id"], nodes=nodes, track_tree=bool(data.get("track_tree")), turns=data.get("turns", 0)
    )


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
