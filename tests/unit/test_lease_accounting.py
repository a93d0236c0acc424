"""Lease accounting as a property (hypothesis), on the router class without Ray.

Callers ask for slots under tickets and give them back by ticket, and the router may see
those calls in any order: a give-back before its ask (the caller was cancelled before the
ask arrived), chunks of a ticket's leases given back one by one, asks that find nothing
free. Whatever the interleaving, once every ticket is closed the router holds no lease and
counts no slot as taken, and it never grants more than the capacity.

Run: pytest tests/unit/test_lease_accounting.py
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool.config import RouterConfig
from inferpool.errors import RequestError
from inferpool.routing.leases import LeaseAsk, LeaseReturn
from inferpool.routing.router import Router
from inferpool.types import EngineInfo

CAPACITY = 3


def _info(eid: str) -> EngineInfo:
    return EngineInfo(engine_id=eid, backend="fake", model="m", vocab_size=10, max_model_len=100)


# one step: (ticket number, what) — what: "ask" (exchange), "wait" (lease_wait), "part"
# (give back one of its leases), "close" (give back the ticket), "swap" (give back and ask in one call)
steps = st.lists(
    st.tuples(st.integers(0, 7), st.sampled_from(["ask", "ask", "wait", "part", "close", "swap"]), st.integers(1, 4)),
    max_size=60,
)


async def _play(plan: list[tuple[int, str, int]], engines: int) -> None:
    router = Router(RouterConfig(max_requests_per_engine=CAPACITY, eval_requests_per_engine=0, acquire_timeout_s=0.01))
    for i in range(engines):
        await router.register(_info(f"e{i}"), object())
    held: dict[str, list[int]] = {}
    for number, what, count in plan:
        ticket = f"t{number}"
        if what in ("ask", "wait"):
            ask = LeaseAsk(ticket=ticket, count=count)
            if what == "ask":
                (granted,) = await router.exchange([ask])
                assert isinstance(granted, list)
            else:
                try:
                    granted = await router.lease_wait(ask)
                except Exception:  # full, or the ticket was already given back
                    granted = []
            held.setdefault(ticket, []).extend(lease.lease_id for lease in granted)
        elif what == "part" and held.get(ticket):
            await router.exchange([LeaseReturn(ticket, (held[ticket].pop(),), True)])
        elif what == "close":
            await router.exchange([LeaseReturn(ticket)])
            held.pop(ticket, None)
        elif what == "swap":  # close this ticket and ask under the next one in one call
            nxt = f"t{(number + 1) % 8}"
            _, granted = await router.exchange([LeaseReturn(ticket), LeaseAsk(ticket=nxt, count=count)])
            held.pop(ticket, None)
            assert isinstance(granted, list)
            held.setdefault(nxt, []).extend(lease.lease_id for lease in granted)
        load = router.load()
        assert all(e["train_in_flight"] <= CAPACITY for e in load.values())
        assert sum(e["train_in_flight"] for e in load.values()) == router.num_leases()
    # every caller closes its ticket on the way out
    await router.exchange([LeaseReturn(f"t{n}") for n in range(8)])
    assert router.num_leases() == 0
    assert all(e["train_in_flight"] == 0 for e in router.load().values())
    assert router.lease_counts()["tickets"] == 0


@settings(max_examples=150, deadline=None)
@given(plan=steps, engines=st.integers(1, 3))
def test_every_lease_is_given_back_whatever_the_order(plan: list[tuple[int, str, int]], engines: int) -> None:
    asyncio.run(_play(plan, engines))


async def test_an_ask_that_arrives_after_its_ticket_was_closed_is_refused() -> None:
    router = Router(RouterConfig(max_requests_per_engine=CAPACITY, eval_requests_per_engine=0, acquire_timeout_s=0.5))
    await router.register(_info("e0"), object())
    await router.exchange([LeaseReturn("late")])  # the caller was cancelled before its ask arrived
    (granted,) = await router.exchange([LeaseAsk("late", count=2)])
    assert granted == []
    with pytest.raises(RequestError, match="given back"):
        await router.lease_wait(LeaseAsk("late"))
    assert router.num_leases() == 0


async def test_a_waiting_ask_stops_when_its_ticket_is_closed() -> None:
    router = Router(RouterConfig(max_requests_per_engine=1, eval_requests_per_engine=0, acquire_timeout_s=5.0))
    await router.register(_info("e0"), object())
    (first,) = await router.exchange([LeaseAsk("a")])
    assert len(first) == 1  # the only slot
    waiter: asyncio.Task[Any] = asyncio.ensure_future(router.lease_wait(LeaseAsk("b")))
    await router.exchange([LeaseReturn("b")])  # b's caller gave up while b waited
    await router.exchange([LeaseReturn("a")])  # the slot frees: b must not take it
    with pytest.raises(RequestError, match="given back"):
        await asyncio.wait_for(waiter, 3.0)
    assert router.num_leases() == 0
