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
