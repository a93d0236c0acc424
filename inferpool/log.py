"""The one logging setup of inferpool: a ``logging`` handler on the ``inferpool`` logger."""

from __future__ import annotations

import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Attach one stream handler to the ``inferpool`` logger (idempotent).

    The level comes from ``level``, else ``INFERPOOL_LOG_LEVEL``, else INFO.
    """
    logger = logging.getLogger("inferpool")
    chosen = level if level is not None else os.environ.get("INFERPOOL_LOG_LEVEL", "INFO")
    logger.setLevel(chosen if isinstance(chosen, int) else chosen.upper())
    if not any(getattr(h, "_inferpool", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._inferpool = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def say(*lines: str) -> None:
    """Print whole lines to stdout in one write and flush them. Ray's log forwarding writes to
    the same stdout from another thread; ``print`` writes a line's text and its newline
    separately, so a worker's log line could land in the middle of ours."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


class Throttle:
    """At most one log line per key per ``every_s`` (e.g. per engine: a lost engine fails every
    request it held at once, and hundreds of identical warnings hide what else happened)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._by_key: dict[str, tuple[float, int]] = {}  # key -> (last line, lines held back since)

    def allow(self, key: str, now: float) -> int | None:
        """None: hold this line back (it is counted); else log it, saying how many were held back."""
        last = self._by_key.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._by_key[key] = (last[0], last[1] + 1)
            return None
        self._by_key[key] = (now, 0)
        return last[1] if last is not None else 0

    def warn(self, log: logging.Logger, key: str, message: str, *args: object) -> None:
        """``log.warning(message, *args)`` at most once per key per ``every_s``, naming how many
        were held back since; the ones held back go to debug."""
        quiet = self.allow(key, time.monotonic())
        if quiet is None:
            log.debug(message, *args)
        else:
            log.warning(message + "%s", *args, f" ({quiet} more since the last warning)" if quiet else "")
