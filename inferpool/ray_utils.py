"""Small helpers around Ray: awaiting refs with timeouts and typed errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ray
from ray import exceptions as rex

from inferpool.errors import BackendError, EngineDeadError, EngineTimeoutError, InferpoolError

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONTROL_TIMEOUT_S = 60.0
"""Bound on a control call to a pool's actors (router, stores, engines' lifecycle calls)."""


def ensure_ray(address: str | None = None, namespace: str | None = None) -> None:
    """Connect to Ray: the given/current cluster, else start a local instance."""
    if ray.is_initialized():
        return
    ray.init(address=address, namespace=namespace, ignore_reinit_error=True, log_to_driver=True)


@contextmanager
def typed_errors(what: str) -> Iterator[None]:
    """Map Ray's wrappers to inferpool errors; inferpool errors from actors keep their type."""
    try:
        yield
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, InferpoolError):
            raise cause from None
        raise BackendError(f"{what} failed: {type(cause).__name__}: {cause}") from None
    except (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError) as exc:
        raise EngineDeadError(f"{what}: actor died ({type(exc).__name__})") from exc
    except rex.GetTimeoutError as exc:
        raise EngineTimeoutError(f"{what}: no answer in time") from exc


async def bounded(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw`` for at most ``timeout_s`` seconds (then ``aw`` is cancelled and
    asyncio.TimeoutError raised). Unlike ``asyncio.wait_for`` on Python 3.11, a cancellation
    of the caller is never swallowed when ``aw`` finishes at the same moment, so a cancelled
    caller always stops where it was cancelled."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout_s)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        raise asyncio.TimeoutError
    return fut.result()


async def await_ref(ref: ray.ObjectRef, timeout_s: float | None, what: str) -> Any:
    """Await an ObjectRef with a timeout; cancels the remote task on timeout or cancellation."""
    try:
        with typed_errors(what):
            return await bounded(asyncio.wrap_future(ref.future()), timeout_s)
    except asyncio.TimeoutError:
        _cancel(ref)
        raise EngineTimeoutError(f"{what}: no answer within {timeout_s}s") from None
    except asyncio.CancelledError:
        _cancel(ref)
        raise


def get_ref(ref: Any, timeout_s: float, what: str) -> Any:
    """Blocking ``ray.get`` with a timeout and typed errors (sync callers only)."""
    with typed_errors(what):
        return ray.get(ref, timeout=timeout_s)


def _cancel(ref: ray.ObjectRef) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # already finished or owner gone: nothing to cancel
        logger.debug("cancel of %s failed", ref, exc_info=True)
