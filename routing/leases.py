"""Leases: reserved engine slots, and the book the router keeps of them.

A caller names what it asks for with a *ticket* (unique per caller). The leases the
router grants for an ask carry its ticket, and the caller gives them back by that
ticket, so it can do so on every path, including the ones where it never saw the
answer: cancelled while the acquire was in flight, timed out in the router's wait,
or cancelled between the router's grant and its own wake-up. Giving back a ticket the
router does not know (yet) leaves a tombstone, and a later ask with that ticket is
refused, whichever of the two calls reaches the router first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from inferpool.types import Split


@dataclasses.dataclass(slots=True)
class Lease:
    """A reserved slot on one engine."""

    lease_id: int
    engine_id: str
    split: Split
    deadline: float
    workload: str | None = None
    started: float = 0.0
    ticket: str = ""


@dataclasses.dataclass(slots=True)
class LeaseAsk:
    """What a caller asks the router for: up to ``count`` slots for one kind of request."""

    ticket: str
    split: Split = "train"
    session_id: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    exclude: tuple[str, ...] = ()
    workload: str | None = None
    count: int = 1


@dataclasses.dataclass(slots=True)
class LeaseReturn:
    """Give back the leases of ``ticket``: all of them (``lease_ids`` None, which also closes
    the ticket) or the listed ones. ``ok`` and ``attempts`` feed the request timings."""

    ticket: str
    lease_ids: tuple[int, ...] | None = None
    ok: bool = False
    attempts: int = 1


class LeaseBook:
    """Every lease out, by id and by ticket, plus tombstones of tickets closed before their
    ask arrived. Pure bookkeeping: the router owns the slots the leases stand for."""

    def __init__(self, tombstone_ttl_s: float) -> None:
        self.tombstone_ttl_s = tombstone_ttl_s
        self.leases: dict[int, Lease] = {}
        self._tickets: dict[str, set[int]] = {}
        self._tombstones: dict[str, float] = {}  # ticket -> when it may be forgotten

    def __len__(self) -> int:
        return len(self.leases)

    def refused(self, ticket: str) -> bool:
        """Whether asks with ``ticket`` must not be granted (the caller already gave it back)."""
        return bool(ticket) and ticket in self._tombstones

    def add(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease
        if lease.ticket:
            self._tickets.setdefault(lease.ticket, set()).add(lease.lease_id)

    def pop(self, lease_id: int) -> Lease | None:
        """Remove one lease by id (None when it is not out: releases are idempotent)."""
        lease = self.leases.pop(lease_id, None)
        if lease is not None and lease.ticket:
            held = self._tickets.get(lease.ticket)
            if held is not None:
                held.discard(lease_id)
                if not held:
                    del self._tickets[lease.ticket]
        return lease

    def give_back(self, ret: LeaseReturn) -> list[Lease]:
        """The leases ``ret`` gives back, removed from the book."""
        if ret.lease_ids is not None:
            return [lease for lid in ret.lease_ids if (lease := self.pop(lid)) is not None]
        held = self._tickets.pop(ret.ticket, None)
        if held is None:  # its ask has not arrived (or was refused): refuse it when it does
            self._tombstones[ret.ticket] = time.monotonic() + self.tombstone_ttl_s
            return []
        out = []
        for lid in held:
            lease = self.leases.pop(lid, None)
            if lease is not None:
                out.append(lease)
        return out

    def expired(self, now: float) -> list[int]:
        """Ids of leases past their deadline (their caller died without giving them back)."""
        return [lid for lid, lease in self.leases.items() if lease.deadline < now]

    def forget_tombstones(self, now: float) -> None:
        for ticket in [t for t, until in self._tombstones.items() if until < now]:
            del self._tombstones[ticket]

    def counts(self) -> dict[str, int]:
        return {"leases": len(self.leases), "tickets": len(self._tickets), "tombstones": len(self._tombstones)}
