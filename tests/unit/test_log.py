"""The logging helpers: one line per key per interval (failover storms), whole lines on stdout."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferpool.log import Throttle, say
from inferpool.routing.dispatch import Dispatcher


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.5)), max_size=60))
def test_throttle_lets_one_line_per_key_per_interval_and_counts_the_rest(steps: list[tuple[str, float]]) -> None:
    throttle = Throttle(every_s=1.0)
    now = 0.0
    allowed: dict[str, list[float]] = {}
    held: dict[str, int] = {}
    for key, dt in steps:
        now += dt
        out = throttle.allow(key, now)
        if out is None:
            held[key] = held.get(key, 0) + 1
            assert now - allowed[key][-1] < 1.0
        else:
            assert out == held.pop(key, 0)  # what was held back since the last line
            assert not allowed.get(key) or now - allowed[key][-1] >= 1.0
            allowed.setdefault(key, []).append(now)


def test_a_failover_storm_from_one_engine_logs_one_warning() -> None:
    dispatcher = Dispatcher.__new__(Dispatcher)  # only the logging part is exercised
    dispatcher._warnings = Throttle(60.0)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("inferpool.routing.dispatch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        for i in range(50):
            dispatcher._warn_failover(f"r{i}", "e1", 1, 3, RuntimeError("actor died"))
        dispatcher._warn_failover("r50", "e2", 1, 3, RuntimeError("actor died"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "engine e1" in warnings[0] and "engine e2" in warnings[1]
    assert sum(r.levelno == logging.DEBUG for r in records) == 49  # the rest, at debug


def test_say_writes_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    say("first line", "second line")
    assert capsys.readouterr().out == "first line\nsecond line\n"


def test_throttled_warnings_name_how_many_were_held_back() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("inferpool.test.throttle")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        throttle = Throttle(3600.0)
        for i in range(3):
            throttle.warn(log, "shard 0", "release %d not confirmed", i)
        throttle.every_s = 0.0  # the interval has passed
        throttle.warn(log, "shard 0", "release %d not confirmed", 3)
    finally:
        log.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "release 0 not confirmed"),
        (logging.DEBUG, "release 1 not confirmed"),
        (logging.DEBUG, "release 2 not confirmed"),
        (logging.WARNING, "release 3 not confirmed (2 more since the last warning)"),
    ]
