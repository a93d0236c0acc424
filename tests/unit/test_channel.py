"""Batched engine traffic (routing/channel.py, actors/mailbox.py): every request gets exactly
its own outcome, a caller that leaves stops its request on the engine, faults reach every
request they concern, and nothing is left behind on either side.

The channel talks to a Mailboxes object in this process through a stand-in actor handle
(``.method.remote(...)`` returns something with ``.future()``, as an ObjectRef does), so
the interleavings are the test's to choose; the Ray path runs in test_soundness.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import wait_until

from inferpool.actors.mailbox import Mailboxes
from inferpool.errors import EngineDeadError, EngineTimeoutError, RequestError
from inferpool.routing.channel import EngineChannel
from inferpool.types import Choice, GenerateRequest, GenerateResult, SamplingParams


class _Ref:
    def __init__(self, fut: concurrent.futures.Future[Any]) -> None:
        self._fut = fut

    def future(self) -> concurrent.futures.Future[Any]:
        return self._fut


class _Method:
    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def remote(self, *args: Any) -> _Ref:
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()
        task = asyncio.ensure_future(self._run(args))
        task.add_done_callback(lambda t: _settle(out, t))
        return _Ref(out)

    async def _run(self, args: tuple[Any, ...]) -> Any:
        await asyncio.sleep(0)  # an actor call never answers in the caller's own loop turn
        out = self._call(*args)
        return await out if asyncio.iscoroutine(out) else out


def _settle(out: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        out.cancel()
    elif task.exception() is not None:
        out.set_exception(task.exception())
    else:
        out.set_result(task.result())


class FakeEngine:
    """An engine actor's batched methods over a Mailboxes; ``serve`` is the test's."""

    def __init__(self, serve: Callable[[GenerateRequest], Awaitable[GenerateResult]]) -> None:
        self.serve = serve
        self.mail = Mailboxes(serve)
        self.calls = {"submit": 0, "collect": 0, "cancel": 0}
        self.dead = False
        self.submit = _Method(self._submit)
        self.collect = _Method(self._collect)
        self.cancel = _Method(self._cancel)

    def _check(self, what: str) -> None:
        self.calls[what] += 1
        if self.dead:
            raise EngineDeadError("engine e0: actor died")

    def _submit(self, caller: str, requests: list[GenerateRequest]) -> str:
        self._check("submit")
        return self.mail.submit(caller, requests)

    async def _collect(self, caller: str, wait_s: float) -> Any:
        self._check("collect")
        mail = self.mail
        out = await mail.collect(caller, wait_s)
        self._check("collect")  # died while the collect waited
        return out

    def _cancel(self, caller: str, ids: list[str]) -> int:
        self._check("cancel")
        return self.mail.cancel(caller, ids)

    def running(self) -> int:
        return sum(len(b.tasks) for b in self.mail._boxes.values())


def request(i: int) -> GenerateRequest:
    return GenerateRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2))


def result_for(req: GenerateRequest) -> GenerateResult:
    return GenerateResult(req.request_id, list(req.prompt_token_ids), [Choice(0, [7], [-0.1], "length")], "e0", ["e0"])


def timed_serve(delays: dict[str, float]) -> Callable[[GenerateRequest], Awaitable[GenerateResult]]:
    async def serve(req: GenerateRequest) -> GenerateResult:
        await asyncio.sleep(delays.get(req.request_id, 0.0))
        return result_for(req)

    return serve


async def test_many_requests_travel_in_few_calls_and_each_gets_its_own_result() -> None:
    engine = FakeEngine(timed_serve({}))
    channel = EngineChannel("e0", engine)
    reqs = [request(i) for i in range(64)]
    outs = await asyncio.gather(*(channel.generate(r, 5.0) for r in reqs))
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    assert engine.calls["submit"] == 1
    assert engine.calls["collect"] <= 4
    assert len(channel) == 0 and engine.running() == 0


async def test_a_timed_out_request_is_cancelled_on_the_engine_and_others_are_served() -> None:
    stopped: list[str] = []

    async def serve(req: GenerateRequest) -> GenerateResult:
        try:
            await asyncio.sleep(10.0 if req.request_id == "r0" else 0.01)
        except asyncio.CancelledError:
            stopped.append(req.request_id)
            raise
        return result_for(req)

    engine = FakeEngine(serve)
    channel = EngineChannel("e0", engine)
    slow = asyncio.ensure_future(channel.generate(request(0), 0.05))
    fast = await channel.generate(request(1), 5.0)
    assert fast.request_id == "r1"
    with pytest.raises(EngineTimeoutError, match="e0"):
        await slow
    await wait_until(lambda: engine.running() == 0)
    assert stopped == ["r0"]


async def test_a_cancel_that_overtakes_its_request_drops_it_on_arrival() -> None:
    served: list[str] = []

    async def serve(req: GenerateRequest) -> GenerateResult:
        served.append(req.request_id)
        return result_for(req)

    mail = Mailboxes(serve)
    assert mail.cancel("c", ["r0"]) == 0  # not there yet: a tombstone
    mail.submit("c", [request(0), request(1)])
    _, ready = await mail.collect("c", 1.0)
    assert served == ["r1"] and [rid for rid, _ in ready] == ["r1"]


async def test_errors_reach_their_own_request_only() -> None:
    async def serve(req: GenerateRequest) -> GenerateResult:
        if req.request_id == "r1":
            raise RequestError("prompt: too long", field="prompt")
        if req.request_id == "r2":
            raise ZeroDivisionError("boom")
        return result_for(req)

    channel = EngineChannel("e0", FakeEngine(serve))
    outs = await asyncio.gather(*(channel.generate(request(i), 5.0) for i in range(3)), return_exceptions=True)
    assert isinstance(outs[0], GenerateResult)
    assert isinstance(outs[1], RequestError) and outs[1].field == "prompt"
    assert isinstance(outs[2], ip_backend_error()) and "ZeroDivisionError" in str(outs[2])


def ip_backend_error() -> type[Exception]:
    from inferpool.errors import BackendError

    return BackendError


async def test_an_engine_that_dies_fails_every_waiting_request_as_retryable() -> None:
    engine = FakeEngine(timed_serve({f"r{i}": 10.0 for i in range(5)}))
    channel = EngineChannel("e0", engine)
    waiters = [asyncio.ensure_future(channel.generate(request(i), 30.0)) for i in range(5)]
    await wait_until(lambda: engine.running() == 5)
    engine.dead = True
    engine.mail._boxes[channel.caller].event.set()  # wake the outstanding collect, which now fails
    outs = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, EngineDeadError) and o.retryable for o in outs)
    assert len(channel) == 0


async def test_a_restarted_engine_fails_what_the_old_instance_took() -> None:
    engine = FakeEngine(timed_serve({"r0": 10.0}))
    channel = EngineChannel("e0", engine)
    waiter = asyncio.ensure_future(channel.generate(request(0), 30.0))
    await wait_until(lambda: engine.running() == 1)
    old = engine.mail
    engine.mail = Mailboxes(engine.serve)  # Ray restarted the actor: a new instance, empty
    old._boxes[channel.caller].event.set()
    with pytest.raises(EngineDeadError, match="restarted"):
        await waiter
    for box in old._boxes.values():
        for task in box.tasks.values():
            task.cancel()


async def test_an_outbox_nobody_collects_from_is_dropped_with_its_requests() -> None:
    mail = Mailboxes(timed_serve({"r0": 10.0}), idle_s=0.0)
    mail.submit("gone", [request(0)])
    task = mail._boxes["gone"].tasks["r0"]
    await mail.collect("other", 0.0)
    assert "gone" not in mail._boxes
    await asyncio.sleep(0)
    assert task.cancelled()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.01), st.one_of(st.none(), st.floats(0.0, 0.012))),
        min_size=1,
        max_size=24,
    )
)
def test_every_waiter_gets_exactly_its_outcome_and_nothing_is_left(plan: list[tuple[float, float | None]]) -> None:
    """Requests with random service times, some cancelled at random moments: a waiter that
    stayed gets its own result, one that left gets nothing, and afterwards neither side
    holds anything."""

    async def scenario() -> None:
        engine = FakeEngine(timed_serve({f"r{i}": service for i, (service, _) in enumerate(plan)}))
        channel = EngineChannel("e0", engine)

        async def one(i: int, cancel_at: float | None) -> str:
            task = asyncio.ensure_future(channel.generate(request(i), 5.0))
            if cancel_at is not None:
                await asyncio.sleep(cancel_at)
                task.cancel()
            try:
                return (await task).request_id
            except asyncio.CancelledError:
                return "cancelled"

        outs = await asyncio.gather(*(one(i, c) for i, (_, c) in enumerate(plan)))
        for i, ((_, cancel_at), out) in enumerate(zip(plan, outs, strict=True)):
            assert out == f"r{i}" or (cancel_at is not None and out == "cancelled")
        assert len(channel) == 0
        await wait_until(lambda: engine.running() == 0 and not channel._cancels)
        # what finished after its waiter left waits in the outbox until the next collect, never longer
        delivered = {rid for box in engine.mail._boxes.values() for rid, _ in box.ready}
        assert delivered <= {f"r{i}" for i, out in enumerate(outs) if out == "cancelled"}

    asyncio.run(scenario())


async def test_a_caller_stalled_past_idle_s_learns_its_requests_are_gone() -> None:
    """The engine dropped the outbox of a caller that did not collect for ``idle_s`` (its loop
    was blocked); the caller's next collect sees a new outbox and fails what the old one held
    as retryable, instead of waiting for results that will never come."""
    engine = FakeEngine(timed_serve({"r0": 10.0}))
    channel = EngineChannel("e0", engine)
    waiter = asyncio.ensure_future(channel.generate(request(0), 30.0))
    await wait_until(lambda: engine.running() == 1)
    old_box = engine.mail._boxes[channel.caller]
    engine.mail.idle_s = 0.0
    old_box.seen = -1.0
    await engine.mail.collect("someone-else", 0.0)  # the sweep drops the stalled caller's outbox
    assert channel.caller not in engine.mail._boxes
    old_box.event.set()  # the stalled caller's outstanding collect returns
    with pytest.raises(EngineDeadError, match="dropped") as err:
        await waiter
    assert err.value.retryable


async def test_a_result_travels_back_without_the_prompt_it_was_sent() -> None:
    """The engine leaves out prompt ids equal to the request's and the waiter puts them back;
    prompt ids the engine reports otherwise (a backend that changed them) come back as they are."""
    changed = {"r1": [9, 1, 2, 3]}

    async def serve(req: GenerateRequest) -> GenerateResult:
        out = result_for(req)
        out.prompt_token_ids = changed.get(req.request_id, out.prompt_token_ids)
        return out

    engine = FakeEngine(serve)
    collected: list[Any] = []
    collect = engine.mail.collect

    async def spy(caller: str, wait_s: float) -> Any:
        out = await collect(caller, wait_s)
        collected.extend((rid, list(o.prompt_token_ids)) for rid, o in out[1])  # as it leaves (no pickling here)
        return out

    engine.mail.collect = spy  # type: ignore[method-assign]
    channel = EngineChannel("e0", engine)
    outs = await asyncio.gather(*(channel.generate(request(i), 5.0) for i in range(2)))
    assert [o.prompt_token_ids for o in outs] == [[1, 2, 3], [9, 1, 2, 3]]
    assert dict(collected) == {"r0": [], "r1": [9, 1, 2, 3]}
