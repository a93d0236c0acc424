"""Bounded polling helpers shared by the test suites (no sleeps as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def wait_in_flight(pool: Any, count: int = 1, deadline_s: float = 10.0, stat: str = "in_flight") -> None:
    """Poll the pool's engines until ``count`` requests are in flight (bounded). ``stat="queue_len"``
    waits until the engine itself holds them (vLLM: its unfinished requests), not only the actor."""
    handles = [pool.engine_handle(e) for e in pool.engine_ids()]
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        stats = await asyncio.gather(*(h.stats.remote() for h in handles))
        if sum(getattr(s, stat) for s in stats) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("requests never got in flight")


async def wait_engines_idle(pool: Any, deadline_s: float = 10.0) -> None:
    """Poll until no engine of the pool runs a request (bounded): every cancelled call was stopped."""
    handles = [pool.engine_handle(e) for e in pool.engine_ids()]
    end = time.monotonic() + deadline_s
    left = -1
    while time.monotonic() < end:
        left = sum(s.in_flight for s in await asyncio.gather(*(h.stats.remote() for h in handles)))
        if left == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{left} requests still run on the engines {deadline_s}s after every call ended")


async def wait_until(predicate: Any, deadline_s: float = 5.0) -> None:
    """Poll a synchronous predicate until it holds (bounded)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{predicate} did not hold within {deadline_s}s")
