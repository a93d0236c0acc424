"""Coalesce many concurrent small actor calls into one call per event-loop turn.

Concurrent requests each need a router lease and a release. Sent one by one that is
two router round trips per request, and the router actor's call rate becomes the
pool's ceiling. A :class:`CallBatcher` collects the items submitted during one turn
of the event loop and sends them with a single batch call; every caller still gets
its own result or its own exception.

Items are queued synchronously (:meth:`CallBatcher.enqueue`), so a caller being
cancelled can still queue a release from a ``finally`` block: it is sent with the next
batch whether or not anyone awaits its outcome.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import ray

from inferpool.ray_utils import await_ref

T = TypeVar("T")


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a future's exception so an outcome nobody awaits does not warn."""
    if not fut.cancelled():
        fut.exception()


class CallBatcher:
    """One batch call per loop turn: ``send(items) -> ObjectRef[list[result | Exception]]``.

    A result whose caller stopped waiting is dropped here: callers that acquire something
    through a batcher give it back by their own key (see the dispatcher's lease tickets),
    never by the result they may not have seen.
    """

    def __init__(self, send: Callable[[list[Any]], ray.ObjectRef], timeout_s: float, what: str) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._what = what
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled: asyncio.Handle | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def enqueue(self, item: Any) -> asyncio.Future[Any]:
        """Queue ``item`` for the next batch (synchronous); the future gets its outcome."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        fut.add_done_callback(_consume)
        self._pending.append((item, fut))
        if self._scheduled is None:
            self._scheduled = loop.call_soon(self._flush)
        return fut

    async def submit(self, item: Any) -> Any:
        return await self.enqueue(item)

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], None
        if not batch:
            return
        try:
            ref = self._send([item for item, _ in batch])
        except Exception as exc:  # the handle cannot submit at all: every caller sees it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        task = asyncio.ensure_future(self._run(batch, ref))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]], ref: ray.ObjectRef) -> None:
        try:
            results = await await_ref(ref, self._timeout_s, self._what)
        except BaseException as exc:  # the whole batch failed: every caller sees the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():  # the caller gave up waiting
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


class LoopLocal(Generic[T]):
    """One object per running event loop (a Pool may be used from several)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        value = self._by_loop.get(loop)
        if value is None:
            value = self._factory()
            self._by_loop[loop] = value
        return value
