"""The Ray Serve application: the HTTP ingress over a pool, and optionally Serve-managed engines.

Two ways to get an application:

* :func:`build_app` — from Python, over a pool that is running (``pool=`` or by name)::

      serve.run(build_app(pool_name="default", api_key="..."), route_prefix="/")

* :func:`app_builder` — Serve's ``import_path`` builder for ``serve run`` /
  ``serve deploy`` (see ``deploy/serve.yaml``). It connects to the named pool or
  starts it (detached, so it outlives the build task), on the embedded tiny model when
  no model is given. With ``engine_autoscaling`` set, the pool starts without engines
  and :class:`~inferpool.deploy.engines.EngineReplica` replicas, sized by Serve's
  autoscaler on the engines' in-flight requests, supply them.

The ingress replicas hold no session state (it lives in the pool's SessionStore
actors), so Serve may scale them too. Bearer-token auth is on when ``api_key`` is given
or the replica's environment has ``INFERPOOL_API_KEY``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fastapi import FastAPI
from pydantic import Field
from ray import serve
from ray.serve.deployment import Application

from inferpool.config import EngineConfig, PoolConfig, RouterConfig, SessionConfig
from inferpool.errors import ConfigError
from inferpool.log import setup_logging
from inferpool.pool import Pool
from inferpool.validation import ConfigModel

from .engines import EngineReplica, engine_deployment_options
from .gateway import PoolGateway
from .routes import create_app

logger = logging.getLogger(__name__)

API_KEY_ENV = "INFERPOOL_API_KEY"
INGRESS_NAME = "InferpoolIngress"


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """The OpenAI-compatible + session HTTP ingress (FastAPI) over one pool."""

    def __init__(
        self,
        pool_name: str = "default",
        namespace: str = "inferpool",
        api_key: str | None = None,
        pool: Pool | None = None,
        engines: Any = None,
    ) -> None:
        setup_logging()
        # The pool is connected on the first request, so the ingress can start before it.
        self.gateway = PoolGateway(pool_name, namespace, pool=pool)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.api_key = key or None
        self.engines = engines  # handle of the Serve-managed engine deployment, when there is one

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.gateway, api_key=self.api_key)


def build_app(
    pool_name: str = "default",
    namespace: str = "inferpool",
    *,
    pool: Pool | None = None,
    api_key: str | None = None,
    engine_autoscaling: dict[str, Any] | None = None,
    engine: EngineConfig | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> Application:
    """The Serve application over a running pool.

    With ``engine_autoscaling`` (keyword arguments of
    :func:`~inferpool.deploy.autoscaling.engine_autoscaling_config`), the application also
    runs the engine deployment: its replicas register engines of ``engine`` (default:
    the pool's first engine group) with the pool's router.
    """
    if pool is not None:
        pool_name, namespace = pool.name, pool.namespace
    engines = None
    if engine_autoscaling is not None:
        if engine is None:
            cfg = pool.config if pool is not None else Pool.connect(pool_name, namespace).config
            engine = cfg.engines[0]
        options = engine_deployment_options(engine, engine_autoscaling)
        engine_deployment: Any = EngineReplica  # a serve Deployment (the decorator is untyped)
        engines = engine_deployment.options(**options).bind(
            pool_name, namespace, engine.model_dump(exclude={"replicas"})
        )
    ingress: Any = Ingress
    if ingress_options:
        ingress = ingress.options(**ingress_options)
    return ingress.bind(pool_name=pool_name, namespace=namespace, api_key=api_key, pool=pool, engines=engines)


class ServeAppArgs(ConfigModel):
    """The ``args`` of ``inferpool.deploy.app:app_builder`` in a Serve config file."""

    pool_name: str = Field("default", min_length=1, description="Pool to serve (connected, or started).")
    namespace: str = Field("inferpool", description="Ray namespace of the pool's actors.")
    api_key: str | None = Field(None, description=f"Bearer token; None: env {API_KEY_ENV} of the replica, or no auth.")
    start_pool: bool = Field(True, description="Start the pool (detached) when none is running under that name.")
    backend: str = Field("vllm", description="Engine backend of a pool started here (see EngineConfig.backend).")
    model: str | None = Field(None, description="HF id or local path; None: the embedded tiny model.")
    engines: int = Field(1, ge=1, description="Engines of a pool started here (without engine_autoscaling).")
    engine: dict[str, Any] = Field(
        default_factory=dict, description="More EngineConfig fields (num_gpus, engine_kwargs, dtype, ...)."
    )
    engine_autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve-managed engines: min_replicas, max_replicas, target_ongoing_requests (in-flight "
        "requests per engine), upscale_delay_s, downscale_delay_s, look_back_period_s, metrics_interval_s.",
    )
    router: dict[str, Any] = Field(default_factory=dict, description="RouterConfig fields of a pool started here.")
    sessions: dict[str, Any] = Field(default_factory=dict, description="SessionConfig fields of a pool started here.")

    def pool_config(self) -> PoolConfig:
        group = EngineConfig(**{"backend": self.backend, "model": self.model, "replicas": self.engines, **self.engine})
        config = PoolConfig(
            name=self.pool_name,
            namespace=self.namespace,
            detached=True,
            engines=[group],
            router=RouterConfig(**self.router),
            sessions=SessionConfig(**self.sessions),
        )
        if self.engine_autoscaling is not None:
            # Serve's engine replicas supply this group's engines: the pool starts none.
            config = config.model_copy(update={"engines": [group.model_copy(update={"replicas": 0})]})
        return config


def ensure_pool(args: ServeAppArgs) -> Pool:
    """Connect to the named pool, or start it (detached) when allowed."""
    try:
        return Pool.connect(args.pool_name, args.namespace)
    except ConfigError:
        if not args.start_pool:
            raise
    logger.info("starting pool %r for the Serve application", args.pool_name)
    return Pool.start(args.pool_config())


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: inferpool.deploy.app:app_builder``)."""
    setup_logging()
    parsed = ServeAppArgs(**(args or {}))
    pool = ensure_pool(parsed)
    return build_app(
        pool_name=pool.name,
        namespace=pool.namespace,
        api_key=parsed.api_key,
        engine_autoscaling=parsed.engine_autoscaling,
        engine=pool.config.engines[0],
    )


def run_app(app: Application, name: str = "inferpool", route_prefix: str = "/", timeout_s: float = 300.0) -> Any:
    """``serve.run`` with a bounded wait for the application to be RUNNING; returns its handle."""
    from ray.serve.api import _run  # serve.run without its unbounded wait
    from ray.serve.schema import ApplicationStatus

    handle = _run(app, _blocking=False, name=name, route_prefix=route_prefix)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return handle
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Serve application {name!r} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve application {name!r} not RUNNING after {timeout_s}s (status: {status})")
        time.sleep(0.2)
