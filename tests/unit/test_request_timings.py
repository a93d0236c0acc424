"""Per-engine request timing statistics: rolling window, mean/std/p99 per split, attempts.

Run: pytest tests/unit/test_request_timings.py
"""

from __future__ import annotations

import statistics

import pytest

from inferpool.routing.stats import RequestTimings, percentile


def test_summary_per_split_and_attempts() -> None:
    t = RequestTimings(window=100)
    for d in (1.0, 2.0, 3.0, 4.0):
        t.record("e0", d, "train", attempts=1)
    t.record("e0", 10.0, "eval", attempts=3)
    s = t.summary()["e0"]
    assert s["train"]["count"] == 4
    assert s["train"]["mean_s"] == pytest.approx(2.5)
    assert s["train"]["std_s"] == pytest.approx(statistics.pstdev([1, 2, 3, 4]))
    assert s["train"]["p99_s"] == 4.0
    assert s["eval"] == {"count": 1, "mean_s": 10.0, "std_s": 0.0, "p99_s": 10.0}
    assert s["avg_attempts"] == pytest.approx(7 / 5)
    assert s["requests"] == 5


def test_window_is_bounded() -> None:
    t = RequestTimings(window=10)
    for i in range(1000):
        t.record("e0", float(i), "train", attempts=1 + i % 2)
    s = t.summary()["e0"]
    assert s["train"]["count"] == 10
    assert s["train"]["mean_s"] == pytest.approx(statistics.fmean(range(990, 1000)))
    assert s["avg_attempts"] == pytest.approx(1.5)
    assert s["requests"] == 1000
    assert s["eval"]["mean_s"] is None


def test_p99_nearest_rank() -> None:
    values = [float(i) for i in range(1, 201)]
    assert percentile(values, 99) == 198.0
    assert percentile([5.0], 99) == 5.0
    t = RequestTimings()
    for v in values:
        t.record("e", v)
    assert t.summary()["e"]["train"]["p99_s"] == 198.0


def test_engines_are_separate_and_forgettable() -> None:
    t = RequestTimings()
    t.record("b", 1.0)
    t.record("a", 2.0, "eval")
    assert t.engine_ids() == ["a", "b"]
    assert t.summary()["a"]["train"]["count"] == 0
    t.forget("a")
    assert list(t.summary()) == ["b"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("e", -1.0), "duration_s"),
        (("e", float("nan")), "duration_s"),
        (("e", 1.0, "test"), "split"),
        (("e", 1.0, "train", 0), "attempts"),
    ],
)
def test_bad_records_are_rejected(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RequestTimings().record(*args)
    with pytest.raises(ValueError, match="window"):
        RequestTimings(window=0)
