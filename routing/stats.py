"""Per-engine request timing statistics, bounded in memory.

:class:`RequestTimings` keeps, for every engine, a rolling window of the last ``window``
request durations for each split (train, eval) and of the attempts each request took.
``summary()`` reports mean, standard deviation and p99 of the durations per split and
the average attempts. Pure Python, no Ray: the router or pool records into it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

SPLITS: tuple[str, ...] = ("train", "eval")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100] of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def describe(values: deque[float] | list[float]) -> dict[str, Any]:
    """count, mean_s, std_s (population) and p99_s of durations; None values when empty."""
    data = list(values)
    if not data:
        return {"count": 0, "mean_s": None, "std_s": None, "p99_s": None}
    return {
        "count": len(data),
        "mean_s": statistics.fmean(data),
        "std_s": statistics.pstdev(data) if len(data) > 1 else 0.0,
        "p99_s": percentile(sorted(data), 99.0),
    }


class _EngineWindow:
    __slots__ = ("attempts", "durations", "total")

    def __init__(self, window: int) -> None:
        self.durations: dict[str, deque[float]] = {s: deque(maxlen=window) for s in SPLITS}
        self.attempts: deque[int] = deque(maxlen=window)
        self.total = 0


class RequestTimings:
    """Rolling per-engine request durations (train/eval) and attempts per request."""

    def __init__(self, window: int = 1000) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        self.window = window
        self._engines: dict[str, _EngineWindow] = {}

    def record(self, engine_id: str, duration_s: float, split: str = "train", attempts: int = 1) -> None:
        """Record one finished request: its wall time on ``engine_id`` and how many attempts it took."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s: must be a finite number >= 0, got {duration_s!r}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts: must be an integer >= 1, got {attempts!r}")
        stats = self._engines.get(engine_id)
        if stats is None:
            stats = self._engines[engine_id] = _EngineWindow(self.window)
        stats.durations[split].append(float(duration_s))
        stats.attempts.append(attempts)
        stats.total += 1

    def forget(self, engine_id: str) -> None:
        """Drop an engine's history (it left the pool)."""
        self._engines.pop(engine_id, None)

    def engine_ids(self) -> list[str]:
        return sorted(self._engines)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per engine: ``{"train": {...}, "eval": {...}, "avg_attempts": float | None,
        "requests": total recorded (not only the window)}``; each split has count, mean_s,
        std_s and p99_s over the window (None when empty)."""
        out: dict[str, dict[str, Any]] = {}
        for engine_id in sorted(self._engines):
            stats = self._engines[engine_id]
            entry: dict[str, Any] = {s: describe(stats.durations[s]) for s in SPLITS}
            entry["avg_attempts"] = statistics.fmean(stats.attempts) if stats.attempts else None
            entry["requests"] = stats.total
            out[engine_id] = entry
        return out
