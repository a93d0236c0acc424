"""The one logging setup of inferpool: a ``logging`` handler on the ``inferpool`` logger."""

from __future__ import annotations

import logging
import os

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
