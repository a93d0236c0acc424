"""The caller side of batched request traffic with one engine (the engine side:
``actors/mailbox.py``).

An :class:`EngineChannel` serves ``generate`` for one engine on one event loop. The
requests queued during one turn of the loop leave in one ``submit`` call; one ``collect``
call is kept outstanding while any request waits, and hands every result it brings to
its waiter. A waiter that stops waiting (cancelled, timed out) queues a ``cancel`` for its
request in its ``finally``, which the engine turns into an abort. So a request costs
the caller and the engine a fraction of an actor call instead of a whole one.

Faults reach every request they concern: a failed ``submit`` fails its batch, a failed
``collect`` (the actor died) fails every request waiting on the engine, and an answer
from a new outbox (Ray restarted the engine actor, or the engine dropped this caller's
outbox after it stalled past ``idle_s``) fails the requests the old one had taken. All
of them fail with :class:`~inferpool.errors.EngineDeadError`, which the dispatcher
retries on another engine.

A result comes back without its prompt ids when they are the ones sent: its waiter holds
them and puts them back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

from inferpool.errors import EngineDeadError, EngineTimeoutError, InferpoolError
from inferpool.ray_utils import await_ref, bounded
from inferpool.types import GenerateRequest, GenerateResult

logger = logging.getLogger(__name__)

COLLECT_WAIT_S = 5.0  # how long one collect waits at the engine for a result
_COLLECT_SLACK_S = 30.0  # on top of that, how long the caller waits for the collect's answer


@dataclasses.dataclass
class _Waiting:
    future: asyncio.Future[GenerateResult]
    prompt: list[int]  # the request's prompt ids (a result that leaves them out is given these)
    outbox: str | None = None  # the id of the engine outbox that took the request (None: not yet known)
    delivered: bool = False  # the engine answered it (else a waiter that leaves cancels it there)


class EngineChannel:
    """Batched ``generate`` traffic of this process with one engine actor, on one loop."""

    def __init__(self, engine_id: str, handle: Any) -> None:
        self.engine_id = engine_id
        self.handle = handle
        self.caller = uuid.uuid4().hex
        self._waiting: dict[str, _Waiting] = {}
        self._outgoing: dict[str, GenerateRequest] = {}
        self._cancels: list[str] = []
        self._scheduled: asyncio.Handle | None = None
        self._collector: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        """Requests waiting for their result."""
        return len(self._waiting)

    async def generate(self, request: GenerateRequest, timeout_s: float | None) -> GenerateResult:
        """Serve ``request`` on this engine; on cancellation or timeout the engine aborts it."""
        rid = request.request_id
        loop = asyncio.get_running_loop()
        waiting = _Waiting(loop.create_future(), request.prompt_token_ids)
        self._waiting[rid] = waiting
        self._outgoing[rid] = request
        self._schedule()
        try:
            return await bounded(waiting.future, timeout_s)
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"engine {self.engine_id}: no answer within {timeout_s}s") from None
        finally:
            self._waiting.pop(rid, None)
            if not waiting.delivered and self._outgoing.pop(rid, None) is None:  # it left: stop it there
                self._cancels.append(rid)
                self._schedule()

    # -- sending -------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_soon(self._flush)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _flush(self) -> None:
        self._scheduled = None
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            self._spawn(self._cancel(cancels))
        if self._outgoing:
            batch, self._outgoing = list(self._outgoing.values()), {}
            self._spawn(self._submit(batch))
            if self._collector is None or self._collector.done():
                self._collector = asyncio.ensure_future(self._collect())

    async def _submit(self, batch: list[GenerateRequest]) -> None:
        try:
            ref = self.handle.submit.remote(self.caller, batch)
            outbox: str = await await_ref(ref, _COLLECT_SLACK_S, f"engine {self.engine_id} submit")
        except Exception as exc:  # the batch never reached a live engine
            self._fail([r.request_id for r in batch], exc)
            return
        for request in batch:
            waiting = self._waiting.get(request.request_id)
            if waiting is not None:
                waiting.outbox = outbox

    async def _cancel(self, request_ids: list[str]) -> None:
        try:
            await await_ref(self.handle.cancel.remote(self.caller, request_ids), _COLLECT_SLACK_S, "cancel")
        except Exception:  # a dead engine has nothing left to stop
            logger.debug("engine %s: cancel of %d requests failed", self.engine_id, len(request_ids), exc_info=True)

    # -- receiving -----------------------------------------------------------------------
    async def _collect(self) -> None:
        """Collect results while anything waits; deliver each to its waiter."""
        while self._waiting:
            try:
                outbox, ready = await await_ref(
                    self.handle.collect.remote(self.caller, COLLECT_WAIT_S),
                    COLLECT_WAIT_S + _COLLECT_SLACK_S,
                    f"engine {self.engine_id} collect",
                )
            except Exception as exc:  # the engine is gone (or unreachable): everything waiting fails
                self._fail(list(self._waiting), exc)
                return
            for rid, outcome in ready:
                waiting = self._waiting.get(rid)
                if waiting is None or waiting.future.done():
                    continue
                waiting.delivered = True
                if isinstance(outcome, BaseException):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome.with_sent_prompt(waiting.prompt))
            lost = [rid for rid, w in self._waiting.items() if w.outbox is not None and w.outbox != outbox]
            if lost:  # what the old outbox held is gone
                gone = EngineDeadError(f"engine {self.engine_id} restarted or dropped this caller's requests")
                self._fail(lost, gone)

    def _fail(self, request_ids: list[str], exc: Exception) -> None:
        err = exc if isinstance(exc, InferpoolError) else EngineDeadError(f"engine {self.engine_id}: {exc}")
        for rid in request_ids:
            waiting = self._waiting.get(rid)
            if waiting is not None and not waiting.future.done():
                waiting.future.set_exception(err)
