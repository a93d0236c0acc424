"""The engine side of batched request traffic: requests arrive many per actor call, results
leave many per actor call.

A caller process sends every request it has for this engine in one event-loop turn with
one ``submit`` call and keeps one ``collect`` call outstanding, which returns every result
finished since the last one (waiting, bounded, while there is none). Per request that is
a fraction of an actor call each way instead of one whole call, which is most of what the
pool costs per request on top of the engine itself (see ``bench/sessions_vs_raw.py``).

One :class:`Outbox` per caller holds its requests' tasks and finished results. A caller
that gave up on a request (cancelled, timed out) ``cancel``s it: its task is cancelled,
which aborts it in the backend, and nothing is delivered for it. A cancel that arrives
before its request leaves a tombstone, so the request is dropped when it arrives. An
outbox nobody collected from for ``idle_s`` belongs to a caller that is gone: its tasks
are cancelled and it is dropped. Each outbox has an id of its own (the engine instance
plus a key), so a caller that was only stalled sees a new id on its next call and knows
its earlier requests are gone.

A result leaves without its prompt ids (an empty list) when they are the ones its request
brought: the caller holds them, and a long conversation's prompt would otherwise travel
back on every turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from inferpool.errors import BackendError, InferpoolError
from inferpool.ray_utils import bounded
from inferpool.types import GenerateRequest, GenerateResult

Outcome = GenerateResult | InferpoolError
"""What a request ends with: its result, or the inferpool error it failed with."""

_TOMBSTONE_S = 300.0  # how long a cancel waits for a request that has not arrived


@dataclasses.dataclass
class Outbox:
    """One caller's requests on this engine: running tasks and results not yet collected."""

    seen: float
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # a new outbox, a new key
    tasks: dict[str, asyncio.Task[Outcome]] = dataclasses.field(default_factory=dict)
    ready: list[tuple[str, Outcome]] = dataclasses.field(default_factory=list)
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Mailboxes:
    """Every caller's outbox on one engine. ``serve`` serves one request (the engine's own
    ``generate``), so requests that come in batches are served exactly like single calls."""

    def __init__(self, serve: Callable[[GenerateRequest], Awaitable[GenerateResult]], idle_s: float = 120.0) -> None:
        self._serve = serve
        self.idle_s = idle_s
        self.instance = uuid.uuid4().hex  # a restarted engine actor answers with a new one
        self._boxes: dict[str, Outbox] = {}
        self._tombstones: dict[str, float] = {}  # request id -> when it may be forgotten
        self._next_sweep = 0.0

    def _box(self, caller: str, now: float) -> Outbox:
        box = self._boxes.get(caller)
        if box is None:
            box = self._boxes[caller] = Outbox(seen=now)
        return box

    def submit(self, caller: str, requests: Sequence[GenerateRequest]) -> str:
        """Start serving ``requests`` for ``caller``; returns the id of the outbox they went to
        (new when Ray restarted the actor or an idle outbox was dropped)."""
        box = self._box(caller, time.monotonic())
        for request in requests:
            rid = request.request_id
            if self._tombstones.pop(rid, None) is not None:  # its caller gave up before it arrived
                continue
            task = asyncio.ensure_future(self._serve(request))
            box.tasks[rid] = task
            task.add_done_callback(lambda t, r=request, box=box: self._finished(box, r, t))  # type: ignore[misc]
        return self._id(box)

    def _id(self, box: Outbox) -> str:
        return f"{self.instance}/{box.key}"

    def _finished(self, box: Outbox, request: GenerateRequest, task: asyncio.Task[Outcome]) -> None:
        rid = request.request_id
        if box.tasks.pop(rid, None) is None or task.cancelled():  # cancelled: its caller gave up
            return
        exc = task.exception()
        outcome: Outcome
        if exc is None:
            outcome = task.result()
            if isinstance(outcome, GenerateResult):
                outcome = outcome.without_sent_prompt(request.prompt_token_ids)
        elif isinstance(exc, InferpoolError):
            outcome = exc
        else:
            outcome = BackendError(f"{type(exc).__name__}: {exc}")
        box.ready.append((rid, outcome))
        box.event.set()

    def cancel(self, caller: str, request_ids: Sequence[str]) -> int:
        """Stop serving these requests and deliver nothing for them; how many were running."""
        box = self._boxes.get(caller)
        now = time.monotonic()
        running = 0
        for rid in request_ids:
            task = box.tasks.get(rid) if box is not None else None
            if task is None:
                self._tombstones[rid] = now + _TOMBSTONE_S
                continue
            task.cancel()
            running += 1
        return running

    async def collect(self, caller: str, wait_s: float) -> tuple[str, list[tuple[str, Outcome]]]:
        """(outbox id, results finished since the last collect); waits up to ``wait_s`` for one."""
        now = time.monotonic()
        box = self._box(caller, now)
        box.seen = now
        if not box.ready:
            try:
                await bounded(box.event.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        box.event.clear()
        ready, box.ready = box.ready, []
        box.seen = time.monotonic()
        self._sweep(box.seen)
        return self._id(box), ready

    def _sweep(self, now: float) -> None:
        """Drop the outboxes of callers gone quiet (cancelling their requests) and old tombstones."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self.idle_s, 10.0)
        for caller in [c for c, b in self._boxes.items() if now - b.seen > self.idle_s]:
            for task in self._boxes.pop(caller).tasks.values():
                task.cancel()
        for rid in [r for r, until in self._tombstones.items() if until < now]:
            del self._tombstones[rid]
