"""``inferpool serve``: start a pool and its OpenAI-compatible HTTP ingress."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


def add_serve_parser(sub: Any) -> None:
    """Register the ``serve`` subcommand on the CLI's subparsers."""
    sv = sub.add_parser("serve", help="start a pool and its OpenAI-compatible HTTP ingress")
    sv.add_argument("--model", default=None, help="HF id or local path (default: the embedded tiny model)")
    sv.add_argument("--backend", default="vllm", help="engine backend (vllm, sglang, fake, ...)")
    sv.add_argument("--engines", type=int, default=1, help="engine replicas")
    sv.add_argument("--num-gpus", type=float, default=None, help="GPUs per engine (default: 1 if CUDA is visible)")
    sv.add_argument("--engine-kwargs", default=None, help="JSON object passed to the engine (e.g. max_model_len)")
    sv.add_argument("--host", default="127.0.0.1", help="HTTP host to bind")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' (env INFERPOOL_API_KEY)")
    sv.add_argument("--name", default="default", help="pool name (Pool.connect(name) finds it)")
    sv.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for engines and Serve")
    sv.set_defaults(func=_serve)


def _gpus(requested: float | None) -> float:
    if requested is not None:
        return requested
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except Exception:  # no torch: CPU engines
        return 0.0


def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from inferpool.config import EngineConfig, PoolConfig
    from inferpool.errors import ConfigError
    from inferpool.log import say
    from inferpool.pool import Pool
    from inferpool.ray_utils import ensure_ray

    from .app import API_KEY_ENV, build_app, run_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        engine_kwargs = json.loads(args.engine_kwargs) if args.engine_kwargs else {}
    except ValueError as exc:
        raise ConfigError(f"--engine-kwargs: not a JSON object: {exc}", field="engine_kwargs") from None
    gpus = _gpus(args.num_gpus) if args.backend in ("vllm", "sglang") else 0.0
    config = PoolConfig(
        name=args.name,
        engines=[
            EngineConfig(
                backend=args.backend,
                model=args.model,
                replicas=args.engines,
                num_gpus=gpus,
                engine_kwargs=engine_kwargs,
                start_timeout_s=args.start_timeout,
            )
        ],
    )
    ensure_ray()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pool = None
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        pool = Pool.start(config)
        run_app(build_app(pool=pool, api_key=api_key), name="inferpool", route_prefix="/", timeout_s=args.start_timeout)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        say(
            f"inferpool serving pool {args.name!r} ({pool.model_name()}) at http://{host}:{args.port}/v1",
            f"  sessions: POST http://{host}:{args.port}/sessions; auth: {'on' if api_key else 'off'}",
            "  Ctrl-C to stop",
        )
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        say("inferpool: shutting down")
        try:
            serve.shutdown()  # bounded: Serve's controller gets 30 s to stop the application
        except Exception:
            logger.debug("serve already shut down", exc_info=True)
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    return 0
