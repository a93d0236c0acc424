"""The index that finds which recorded sequence a new turn continues.

:class:`MessageIndex` (chat): a trie over the messages of every recorded path, added to
as segments are recorded; a request walks it once. A request message matches a recorded
one when everything the client sends back that the session returned agrees
(:func:`fine_match`): role, content, tool names and tool-call ids, ``reasoning_content``
when the request carries it, the ``node_id`` of the returned message when the request
carries it, and tool-call arguments (the exact string, or, *loosely*, the same JSON).

:class:`TextIndex` (completion): recorded prompt + returned text, found by length.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _calls(msg: dict[str, Any]) -> list[dict[str, Any]]:
    return list(msg.get("tool_calls") or ())


def coarse_key(msg: dict[str, Any]) -> tuple[Any, ...]:
    """What must be identical for two messages to match (the trie's key)."""
    calls = msg.get("tool_calls")
    names = tuple(str((c.get("function") or {}).get("name")) for c in calls) if calls else ()
    return (msg.get("role"), msg.get("content") or "", msg.get("tool_call_id"), msg.get("name"), names)


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def fine_match(request: dict[str, Any], stored: dict[str, Any]) -> int | None:
    """None when ``request`` cannot be the recorded ``stored`` message (same coarse key
    assumed); else how many tool-call arguments matched only as JSON (0: exact)."""
    node_id = request.get("node_id")
    if node_id is not None and node_id != stored.get("node_id"):
        return None
    reasoning = request.get("reasoning_content")
    if reasoning is not None and reasoning != stored.get("reasoning_content"):
        return None
    if not request.get("tool_calls"):  # the same coarse key: no named calls on either side
        return 0
    loose = 0
    for req_call, st_call in zip(_calls(request), _calls(stored), strict=True):
        if req_call.get("id") is not None and st_call.get("id") is not None and req_call["id"] != st_call["id"]:
            return None
        req_args = (req_call.get("function") or {}).get("arguments")
        st_args = (st_call.get("function") or {}).get("arguments")
        if req_args == st_args:
            continue
        if _json(req_args) != _json(st_args):
            return None
        loose += 1
    return loose


def matches(request: dict[str, Any], stored: dict[str, Any]) -> bool:
    return coarse_key(request) == coarse_key(stored) and fine_match(request, stored) is not None


class Position(Generic[T]):
    """A point in the trie: the recorded messages that follow it, and what ends here.

    ``sole`` is the only recorded message that follows (None: none, or several). A request
    message equal to it matches exactly (no loose comparison) and nothing else could match,
    so a walk along one conversation compares each message once, as a dict, instead of
    building its coarse key and comparing field by field."""

    __slots__ = ("children", "ends", "sole")

    def __init__(self) -> None:
        self.children: dict[tuple[Any, ...], list[tuple[dict[str, Any], Position[T]]]] = {}
        self.ends: list[T] = []
        self.sole: tuple[dict[str, Any], Position[T]] | None = None


@dataclasses.dataclass(slots=True)
class ExactWalk(Generic[T]):
    """What :meth:`MessageIndex.exact_walk` found: the recorded messages equal to a request's
    first ones; the point they reach while each step had one way on (else None), and the
    items that end deepest on the way, at which depth."""

    messages: list[dict[str, Any]]
    position: Position[T] | None
    best: list[tuple[T, int]]
    depth: int


class MessageIndex(Generic[T]):
    """Recorded message paths, each ending at some items (segments)."""

    def __init__(self) -> None:
        self.root: Position[T] = Position()

    def add(self, start: Position[T] | None, messages: Sequence[dict[str, Any]], item: T) -> Position[T]:
        """Record ``messages`` after ``start`` (None: the root) ending at ``item``; returns the end."""
        pos = start or self.root
        for msg in messages:
            entries = pos.children.setdefault(coarse_key(msg), [])
            for stored, child in entries:
                if stored == msg:
                    pos = child
                    break
            else:
                child = Position()
                entries.append((msg, child))
                first = len(pos.children) == 1 and len(entries) == 1
                pos.sole = (msg, child) if first else None
                pos = child
        if item not in pos.ends:
            pos.ends.append(item)
        return pos

    def exact_walk(self, messages: Sequence[Any]) -> ExactWalk[T]:
        """Follow ``messages`` while each equals (as a dict) a recorded message after the last:
        the checked copies a request's unchanged history stands for, and, while every step had
        one way on, where :meth:`match` goes on from."""
        walk: ExactWalk[T] = ExactWalk([], self.root, [], 0)
        pos = self.root
        for msg in messages:
            if type(msg) is not dict:
                break
            if pos.sole is not None:
                stored, child = pos.sole
                if stored != msg:
                    break
            else:
                walk.position = None  # several ways on: match walks from the root
                try:  # a bucket holds each distinct message once: at most one is equal
                    entries = pos.children.get(coarse_key(msg), ())
                except TypeError:  # an unhashable field: not a recorded message
                    break
                found = next(((st, ch) for st, ch in entries if st == msg), None)
                if found is None:
                    break
                stored, child = found
            walk.messages.append(stored)
            pos = child
            if walk.position is not None:
                walk.position = child
                if child.ends:
                    walk.best, walk.depth = [(item, 0) for item in child.ends], len(walk.messages)
        return walk

    def match(
        self, messages: Sequence[dict[str, Any]], walk: ExactWalk[T] | None = None
    ) -> tuple[list[tuple[T, int]], int]:
        """The items at the deepest recorded point the messages reach, each with how many
        loose comparisons led there, and that depth (in messages). ``walk``: this index's
        :meth:`exact_walk` of messages whose first ones ``messages`` holds as they were
        returned (the recorded copies), taken up where it stands."""
        frontier: list[tuple[Position[T], int]] = [(self.root, 0)]
        best: list[tuple[T, int]] = []
        best_depth = skip = 0
        if walk is not None and walk.position is not None:
            frontier, best, best_depth, skip = [(walk.position, 0)], walk.best, walk.depth, len(walk.messages)
        for depth in range(skip + 1, len(messages) + 1):
            msg = messages[depth - 1]
            if len(frontier) == 1:  # the common case: one way on, taken exactly
                pos, loose = frontier[0]
                if pos.sole is not None and (pos.sole[0] is msg or pos.sole[0] == msg):
                    child = pos.sole[1]
                    frontier = [(child, loose)]
                    if child.ends:
                        best, best_depth = [(item, loose) for item in child.ends], depth
                    continue
            key: tuple[Any, ...] | None = None
            nxt: list[tuple[Position[T], int]] = []
            for pos, loose in frontier:
                if pos.sole is not None and (pos.sole[0] is msg or pos.sole[0] == msg):
                    nxt.append((pos.sole[1], loose))
                    continue
                key = coarse_key(msg) if key is None else key
                for stored, child in pos.children.get(key, ()):
                    extra = fine_match(msg, stored)
                    if extra is not None:
                        nxt.append((child, loose + extra))
            if not nxt:
                break
            frontier = nxt
            ends = [(item, loose) for pos, loose in frontier for item in pos.ends]
            if ends:
                best, best_depth = ends, depth
        return best, best_depth


class TextIndex(Generic[T]):
    """Recorded texts (a completion's prompt + returned text) and what ends at each."""

    def __init__(self) -> None:
        self._by_text: dict[str, list[T]] = {}
        self._lengths: list[int] = []  # distinct lengths, longest first

    def add(self, text: str, item: T) -> None:
        bucket = self._by_text.setdefault(text, [])
        if not bucket and len(text) not in self._lengths:
            self._lengths.append(len(text))
            self._lengths.sort(reverse=True)
        if item not in bucket:
            bucket.append(item)

    def longest_prefix(self, prompt: str) -> tuple[list[T], int]:
        """The items of the longest recorded text that is a prefix of ``prompt``, and its length."""
        for length in self._lengths:
            if length <= len(prompt):
                found = self._by_text.get(prompt[:length])
                if found:
                    return list(found), length
        return [], 0
