"""Session affinity: a session's turns go back to the engine that served it last.

An engine that served turn *k* of a session still holds that session's KV cache, so
sending turn *k+1* to the same engine (its "home") skips re-prefilling the whole
conversation. Stickiness must not defeat load balancing, though: when the home cannot
take the request, or is clearly more loaded than the least-loaded engine, the request
goes to the least-loaded engine, which becomes the session's new home.

The imbalance rule (shared with :mod:`inferpool.routing.prefix`) is in
:func:`is_imbalanced`; the load it compares is :func:`split_load`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from inferpool.routing.policy import EngineSlot, LeastLoaded, RouteRequest
from inferpool.types import Split

AffinityOutcome = Literal["hit", "fallback", "new", "none"]
FallbackReason = Literal["unhealthy", "excluded", "full", "gone", "imbalanced"]


def split_load(slot: EngineSlot, split: Split) -> int:
    """Requests in flight on ``slot`` that occupy the slots ``split`` requests use.

    This is ``slot.limit(split) - slot.free(split)``: the train requests for a train
    request (plus eval requests when ``eval_quota == 0``, as they then share the train
    slots), the eval requests for an eval request with an eval quota, and all
    requests for an eval request without one. It is never negative.
    """
    return max(0, slot.limit(split) - slot.free(split))


def is_imbalanced(preferred_load: int, least_load: int, abs_threshold: int, rel_threshold: float) -> bool:
    """Whether the preferred engine is too loaded compared with the least-loaded one.

    True iff BOTH hold::

        preferred_load - least_load >  abs_threshold                 (absolute, requests)
        preferred_load              >= (1 + rel_threshold) * least_load   (relative)

    where the loads are :func:`split_load` values. With the defaults
    (``abs_threshold=32``, ``rel_threshold=0.5``) the preferred engine is given up
    only when it holds more than 32 more requests than the least-loaded engine AND at
    least 1.5x as many. Because the absolute test is strict, equal loads are never
    imbalanced, even with both thresholds at 0. No division is involved, so a least
    load of 0 is fine (any preferred load passes the relative test).
    """
    gap = preferred_load - least_load
    return gap > abs_threshold and preferred_load >= (1.0 + rel_threshold) * least_load


def _check_thresholds(abs_threshold: int, rel_threshold: float) -> None:
    if abs_threshold < 0:
        raise ValueError(f"abs_threshold: must be >= 0, got {abs_threshold}")
    if not rel_threshold >= 0:  # also rejects NaN
        raise ValueError(f"rel_threshold: must be >= 0, got {rel_threshold}")


class SessionAffinity:
    """Send a session's turns to its home engine unless that would unbalance the pool.

    Options (constructor keywords):

    * ``abs_threshold`` (int, default 32): absolute part of the imbalance rule, in
      requests (see :func:`is_imbalanced`).
    * ``rel_threshold`` (float, default 0.5): relative part of the imbalance rule; 0.5
      means the home must hold at least 1.5x the least-loaded engine's load.
    * ``max_sessions`` (int, default 100_000): how many session homes are remembered;
      beyond that the least recently served session is forgotten (its next turn is
      routed like a new session).

    ``choose``:

    * no ``session_id``: least-loaded (outcome ``"none"``);
    * no recorded home: least-loaded (outcome ``"new"``);
    * the home is unhealthy, excluded, has no free slot for the split, or is no longer
      registered: least-loaded (outcome ``"fallback"``);
    * the home is a candidate: it is chosen (outcome ``"hit"``) unless it is
      imbalanced against the engine least-loaded would pick, in which case that one
      is chosen (outcome ``"fallback"``, reason ``"imbalanced"``).

    ``on_served`` records the serving engine as the session's home, so after a
    fallback the new engine is the home.

    Counters (cumulative, counted in ``choose`` whenever it returns an engine; the
    router always reserves what ``choose`` returns): ``hits``, ``fallbacks``,
    ``new_sessions``, ``unsessioned``, and ``fallback_reasons`` (reason -> count).
    :meth:`last_outcome` is the outcome of the latest ``choose`` (None if it returned
    None or was never called).
    """

    name = "session_affinity"
    reads_prompt = False

    def __init__(
        self,
        abs_threshold: int = 32,
        rel_threshold: float = 0.5,
        max_sessions: int = 100_000,
    ) -> None:
        _check_thresholds(abs_threshold, rel_threshold)
        if max_sessions < 1:
            raise ValueError(f"max_sessions: must be >= 1, got {max_sessions}")
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.max_sessions = max_sessions
        self._fallback = LeastLoaded()
        self._homes: OrderedDict[str, str] = OrderedDict()
        self._last: AffinityOutcome | None = None
        self.hits = 0
        self.fallbacks = 0
        self.new_sessions = 0
        self.unsessioned = 0
        self.fallback_reasons: dict[str, int] = {}

    # -- policy -----------------------------------------------------------------------
    def choose(self, engines: Sequence[EngineSlot], request: RouteRequest) -> EngineSlot | None:
        least = self._fallback.choose(engines, request)
        if least is None:
            self._last = None
            return None
        sid = request.session_id
        if sid is None:
            return self._outcome(least, "none")
        home_id = self._homes.get(sid)
        if home_id is None:
            return self._outcome(least, "new")
        if least.engine_id == home_id:
            return self._outcome(least, "hit")
        home = next((e for e in engines if e.engine_id == home_id), None)
        reason = self._unusable(home, request)
        if reason is None:
            assert home is not None
            split = request.split
            if not is_imbalanced(
                split_load(home, split),
                split_load(least, split),
                self.abs_threshold,
                self.rel_threshold,
            ):
                return self._outcome(home, "hit")
            reason = "imbalanced"
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1
        return self._outcome(least, "fallback")

    def on_served(self, engine_id: str, request: RouteRequest) -> None:
        sid = request.session_id
        if sid is None:
            return
        self._homes[sid] = engine_id
        self._homes.move_to_end(sid)
        while len(self._homes) > self.max_sessions:
            self._homes.popitem(last=False)

    # -- introspection ----------------------------------------------------------------
    def last_outcome(self) -> AffinityOutcome | None:
        """``"hit"`` | ``"fallback"`` | ``"new"`` | ``"none"`` for the latest choice."""
        return self._last

    def home(self, session_id: str) -> str | None:
        """The engine recorded as the session's home (does not refresh its recency)."""
        return self._homes.get(session_id)

    def forget_session(self, session_id: str) -> None:
        """Drop a session's home (e.g. when the session is closed)."""
        self._homes.pop(session_id, None)

    @property
    def num_sessions(self) -> int:
        return len(self._homes)

    def stats(self) -> dict[str, int]:
        """Counters for metrics."""
        out = {
            "hits": self.hits,
            "fallbacks": self.fallbacks,
            "new_sessions": self.new_sessions,
            "unsessioned": self.unsessioned,
            "sessions": len(self._homes),
        }
        out.update({f"fallback_{k}": v for k, v in self.fallback_reasons.items()})
        return out

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _unusable(home: EngineSlot | None, request: RouteRequest) -> FallbackReason | None:
        if home is None:
            return "gone"
        if not home.healthy:
            return "unhealthy"
        if home.engine_id in request.exclude:
            return "excluded"
        if home.free(request.split) <= 0:
            return "full"
        return None

    def _outcome(self, slot: EngineSlot, outcome: AffinityOutcome) -> EngineSlot:
        self._last = outcome
        if outcome == "hit":
            self.hits += 1
        elif outcome == "fallback":
            self.fallbacks += 1
        elif outcome == "new":
            self.new_sessions += 1
        else:
            self.unsessioned += 1
        return slot
