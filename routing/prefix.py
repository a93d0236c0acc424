"""Prefix-aware routing: send a prompt to the engine that recently saw its prefix.

Engines with a prefix cache (vLLM, SGLang) skip prefill for the leading blocks of a
prompt they already hold. This policy keeps an approximate, bounded picture of what
each engine may hold: the prompts it routed, cut into fixed blocks of
``block_size`` token ids and hashed as a chain (block *i*'s hash covers blocks
``0..i``), the way block-hash prefix caches identify blocks. A prompt's match on an
engine is the number of its leading blocks whose chained hash the engine's index
holds.

The index is approximate on purpose: it does not know what the engine evicted, and
the router only passes the start of a prompt (``RouteRequest.prompt_token_ids``), so
"total blocks" means blocks of what the router passed. Only full blocks count; a
prompt shorter than one block is routed least-loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from inferpool.routing.affinity import _check_thresholds, is_imbalanced, split_load
from inferpool.routing.policy import EngineSlot, LeastLoaded, RouteRequest, candidates

PrefixOutcome = Literal["hit", "fallback", "miss", "none"]

_ROOT = 0x9E3779B97F4A7C15  # chain seed: the parent "hash" of the first block


def block_hashes(token_ids: Sequence[int] | None, block_size: int) -> list[int]:
    """Chained hashes of the full ``block_size``-token blocks of ``token_ids``.

    ``hashes[i] == hash((hashes[i - 1], tuple(block_i)))``, so equal hashes at position
    *i* mean (up to hash collisions) equal prompts up to the end of block *i*. Integer
    and tuple hashes do not depend on ``PYTHONHASHSEED``.
    """
    if not token_ids:
        return []
    out: list[int] = []
    h = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start : start + block_size])))
        out.append(h)
    return out


class PrefixAware:
    """Route to the engine whose recent prompts share the longest leading prefix.

    Options (constructor keywords):

    * ``block_size`` (int, default 16): tokens per hashed block.
    * ``max_blocks_per_engine`` (int, default 50_000): block hashes remembered per
      engine; beyond that the least recently routed blocks are evicted (LRU). A
      prompt's blocks are refreshed leaf first, root last, so a prefix loses its
      deepest blocks before its first ones and stays matchable as long as possible.
      Memory is about ``max_blocks_per_engine`` hashes per registered engine.
    * ``match_threshold`` (float in [0, 1], default 0.5): least match rate
      (matched leading blocks / full blocks of the prompt) for the prefix to count.
      At least one block must match whatever the threshold.
    * ``abs_threshold`` (int, default 32) and ``rel_threshold`` (float, default 0.5):
      the imbalance rule of :func:`inferpool.routing.affinity.is_imbalanced`.

    ``choose``: candidates whose match rate reaches the threshold are tried by match
    (longest first), then by free slots (most first); the first one not imbalanced
    against the engine least-loaded would pick is chosen (outcome ``"hit"``). If some
    candidate reached the threshold but all were imbalanced: least-loaded (outcome
    ``"fallback"``). If none reached it: least-loaded (outcome ``"miss"``). No prompt
    or less than one block: least-loaded (outcome ``"none"``).

    ``on_served`` inserts the prompt's block hashes into the serving engine's index.

    ``engines`` passed to ``choose`` is taken to be the full registry (as the router
    passes it): index entries of engine ids no longer in it are dropped.

    Counters (cumulative, counted in ``choose`` when it returns an engine): ``hits``,
    ``fallbacks``, ``misses``, ``unprefixed``; :meth:`last_outcome` is the outcome of
    the latest ``choose`` (None if it returned None).
    """

    name = "prefix_aware"
    reads_prompt = True

    def __init__(
        self,
        block_size: int = 16,
        max_blocks_per_engine: int = 50_000,
        match_threshold: float = 0.5,
        abs_threshold: int = 32,
        rel_threshold: float = 0.5,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if max_blocks_per_engine < 1:
            raise ValueError(f"max_blocks_per_engine: must be >= 1, got {max_blocks_per_engine}")
        if not 0.0 <= match_threshold <= 1.0:
            raise ValueError(f"match_threshold: must be in [0, 1], got {match_threshold}")
        _check_thresholds(abs_threshold, rel_threshold)
        self.block_size = block_size
        self.max_blocks_per_engine = max_blocks_per_engine
        self.match_threshold = match_threshold
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self._fallback = LeastLoaded()
        self._index: dict[str, OrderedDict[int, None]] = {}
        # hashes of the latest request seen, so on_served need not hash it again
        self._cached: tuple[RouteRequest, Sequence[int] | None, int, list[int]] | None = None
        self._last: PrefixOutcome | None = None
        self.hits = 0
        self.fallbacks = 0
        self.misses = 0
        self.unprefixed = 0

    # -- policy -----------------------------------------------------------------------
    def choose(self, engines: Sequence[EngineSlot], request: RouteRequest) -> EngineSlot | None:
        self._prune(engines)
        least = self._fallback.choose(engines, request)
        if least is None:
            self._last = None
            return None
        hashes = self._hashes(request)
        if not hashes:
            return self._outcome(least, "none")
        split = request.split
        total = len(hashes)
        qualified: list[tuple[int, int, EngineSlot]] = []
        for e in candidates(engines, request):
            matched = self._matched(e.engine_id, hashes)
            if matched > 0 and matched >= self.match_threshold * total:
                qualified.append((matched, e.free(split), e))
        if not qualified:
            return self._outcome(least, "miss")
        qualified.sort(key=lambda t: (t[0], t[1]), reverse=True)
        least_load = split_load(least, split)
        for _, _, e in qualified:
            if e is least or not is_imbalanced(
                split_load(e, split), least_load, self.abs_threshold, self.rel_threshold
            ):
                return self._outcome(e, "hit")
        return self._outcome(least, "fallback")

    def on_served(self, engine_id: str, request: RouteRequest) -> None:
        hashes = self._hashes(request)
        if not hashes:
            return
        index = self._index.get(engine_id)
        if index is None:
            index = self._index[engine_id] = OrderedDict()
        for h in reversed(hashes):  # root ends most recent: evicted last
            index[h] = None
            index.move_to_end(h)
        while len(index) > self.max_blocks_per_engine:
            index.popitem(last=False)

    # -- introspection ----------------------------------------------------------------
    def last_outcome(self) -> PrefixOutcome | None:
        """``"hit"`` | ``"fallback"`` | ``"miss"`` | ``"none"`` for the latest choice."""
        return self._last

    def match_rate(self, engine_id: str, token_ids: Sequence[int]) -> float:
        """Matched leading blocks / full blocks of ``token_ids`` on ``engine_id`` (0 if none)."""
        hashes = block_hashes(token_ids, self.block_size)
        return self._matched(engine_id, hashes) / len(hashes) if hashes else 0.0

    def num_blocks(self, engine_id: str | None = None) -> int:
        """Block hashes held for one engine, or for all engines."""
        if engine_id is not None:
            return len(self._index.get(engine_id, ()))
        return sum(len(ix) for ix in self._index.values())

    def forget_engine(self, engine_id: str) -> None:
        """Drop an engine's index (e.g. it restarted and lost its cache)."""
        self._index.pop(engine_id, None)

    def stats(self) -> dict[str, int]:
        """Counters for metrics."""
        return {
            "hits": self.hits,
            "fallbacks": self.fallbacks,
            "misses": self.misses,
            "unprefixed": self.unprefixed,
            "indexed_blocks": self.num_blocks(),
        }

    # -- helpers ----------------------------------------------------------------------
    def _hashes(self, request: RouteRequest) -> list[int]:
        ids = request.prompt_token_ids
        n = len(ids) if ids is not None else 0
        c = self._cached
        if c is not None and c[0] is request and c[1] is ids and c[2] == n:
            return c[3]
        hashes = block_hashes(ids, self.block_size)
        self._cached = (request, ids, n, hashes)
        return hashes

    def _matched(self, engine_id: str, hashes: list[int]) -> int:
        index = self._index.get(engine_id)
        if not index:
            return 0
        matched = 0
        for h in hashes:
            if h not in index:
                break
            matched += 1
        return matched

    def _prune(self, engines: Sequence[EngineSlot]) -> None:
        if len(self._index) <= len(engines):
            return
        live = {e.engine_id for e in engines}
        for eid in [eid for eid in self._index if eid not in live]:
            del self._index[eid]

    def _outcome(self, slot: EngineSlot, outcome: PrefixOutcome) -> EngineSlot:
        self._last = outcome
        if outcome == "hit":
            self.hits += 1
        elif outcome == "fallback":
            self.fallbacks += 1
        elif outcome == "miss":
            self.misses += 1
        else:
            self.unprefixed += 1
        return slot
