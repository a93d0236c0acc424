"""Coalesce many concurrent small actor calls into one call per event-loop turn.

Concurrent ``generate`` calls each need a router lease and a release. Sent one by one
that is two router round trips per request, and the router actor's call rate becomes
the pool's ceiling. A :class:`CallBatcher` collects the items submitted during one
turn of the event loop and sends them with a single batch call; every caller still
gets its own result or its own exception.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

import ray

from inferpool._ray import await_ref


class CallBatcher:
    """One batch call per loop turn: ``send(items) -> ObjectRef[list[result | Exception]]``."""

    def __init__(self, send: Callable[[list[Any]], ray.ObjectRef], timeout_s: float, what: str) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._what = what
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._inflight: set[asyncio.Task[None]] = set()

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], False
        live = [(item, fut) for item, fut in batch if not fut.cancelled()]
        if live:
            task = asyncio.ensure_future(self._run(live))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await await_ref(self._send([item for item, _ in batch]), self._timeout_s, self._what)
        except BaseException as exc:  # the whole batch failed: every caller sees the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


class LoopLocal:
    """One batcher per running event loop (a Pool may be used from several)."""

    def __init__(self, factory: Callable[[], CallBatcher]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CallBatcher] = weakref.WeakKeyDictionary()

    def get(self) -> CallBatcher:
        loop = asyncio.get_running_loop()
        batcher = self._by_loop.get(loop)
        if batcher is None:
            batcher = self._factory()
            self._by_loop[loop] = batcher
        return batcher
