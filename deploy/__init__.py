"""Deploy: the Ray Serve HTTP ingress, Serve-autoscaled engines, and the HTTP client.

* :mod:`.app` — the Serve application (``build_app``, ``app_builder`` for serve.yaml).
* :mod:`.routes` — the FastAPI routes (OpenAI-compatible and session routes), auth, SSE.
* :mod:`.gateway` — what the routes do, over a lazily connected Pool (no session state).
* :mod:`.schemas` — request bodies and the unknown-field rule.
* :mod:`.errors` — HTTP status codes and the OpenAI error shape, both ways.
* :mod:`.engines` / :mod:`.autoscaling` — engine replicas sized by Serve's autoscaler
  on the engines' in-flight requests.
* :mod:`.client` — ``RemotePool`` / ``RemoteSession``, the Session API over HTTP.
* :mod:`.cli` — ``inferpool serve``.
* ``serve.yaml`` (``serve run`` / ``serve deploy``), ``cluster.yaml`` (``ray up``).

Importing this package is cheap; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemotePool": "client",
    "RemoteSession": "client",
    "build_app": "app",
    "app_builder": "app",
    "run_app": "app",
    "create_app": "routes",
    "PoolGateway": "gateway",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
