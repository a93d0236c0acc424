"""Python's garbage collector in the pool's long-lived processes.

A process that imported Ray, vLLM, torch and transformers holds a few hundred thousand
container objects that live as long as it does. CPython's full (oldest-generation)
collection walks all of them every time it runs: measured in a 64-conversation session run
on the 2-core development VM, one full collection took 170-260 ms in the engine actor and
in the caller, and collections were 15-20% of those processes' CPU (vLLM's own front end,
driven directly, spends the same 19%). vLLM's engine core and Ray Serve's replicas avoid it
the same way as here: once a process has started, one collection, then ``gc.freeze()``,
which moves every surviving object to a permanent generation that later collections skip.

The cost of a freeze: an object that was alive when it ran and later becomes unreachable
only through a reference cycle is never collected. The pool's processes freeze after their
start-up and unfreeze before they tear an engine down; a user's own process freezes only
when asked (``PoolConfig.gc_freeze="all"``), since a trainer that drops a model it built
before the pool started could otherwise keep its memory.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_heap(what: str) -> int:
    """Collect, then freeze what survives; returns how many objects are frozen in all."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug(
        "%s: %d objects frozen out of garbage collection (%.0f ms)", what, frozen, 1e3 * (time.perf_counter() - t0)
    )
    return frozen


def freeze_caller_heap(gc_freeze: str, what: str) -> None:
    """The user's process (the one that starts or connects a pool): only with ``"all"``."""
    if gc_freeze == "all":
        freeze_heap(what)


def unfreeze_heap() -> None:
    """Hand every frozen object back to the collector (before tearing down what they hold)."""
    gc.unfreeze()
