"""Power of two choices: sample two engines at random, take the less loaded.

Cheaper than scanning for the global minimum on large pools and, unlike strict
least-loaded, it does not send a burst of simultaneous decisions made on the same
stale view to a single engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from inferpool.routing.policy import EngineSlot, RouteRequest, can_take, candidates

_SCAN_BELOW = 16  # pools this small are scanned
_DRAWS = 32  # random draws before falling back to a scan


class PowerOfTwo:
    """Pick two distinct candidates at random; choose the one with more free slots.

    Options (constructor keywords):

    * ``seed`` (int | None, default None): seed of the policy's own
      :class:`random.Random`; None seeds from the OS. Give one for reproducible
      routing in tests.

    Candidates are the healthy, not excluded engines with a free slot for the
    request's split (free slots are counted for that split, weights included). With
    one candidate it is chosen; with none, None. Ties between the two sampled engines
    go to the first sampled (which is random).
    """

    name = "power_of_two"
    reads_prompt = False

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def choose(self, engines: Sequence[EngineSlot], request: RouteRequest) -> EngineSlot | None:
        pair = self._sample_two(engines, request) if len(engines) > _SCAN_BELOW else None
        if pair is None:  # small pools, or few engines can take it: scan
            pool = candidates(engines, request)
            if not pool:
                return None
            if len(pool) == 1:
                return pool[0]
            pair = self._rng.sample(pool, 2)
        a, b = pair
        return b if b.free(request.split) > a.free(request.split) else a

    def _sample_two(self, engines: Sequence[EngineSlot], request: RouteRequest) -> list[EngineSlot] | None:
        """Two distinct candidates drawn uniformly by rejection: O(1) expected per decision when
        most engines can take the request (a fleet), None after a bounded number of draws."""
        picked: list[EngineSlot] = []
        for _ in range(_DRAWS):
            e = engines[self._rng.randrange(len(engines))]
            if (not picked or e is not picked[0]) and can_take(e, request):
                picked.append(e)
                if len(picked) == 2:
                    return picked
        return None

    def on_served(self, engine_id: str, request: RouteRequest) -> None:
        return None
