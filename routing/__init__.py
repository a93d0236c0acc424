"""Routing: the router actor, its selection policies, and the caller side (the Dispatcher)."""

from inferpool.routing.dispatch import Dispatcher
from inferpool.routing.leases import Lease, LeaseAsk, LeaseReturn
from inferpool.routing.policy import EngineSlot, LeastLoaded, Policy, RouteRequest, make_policy
from inferpool.routing.router import Router, RouterActor

__all__ = [
    "Dispatcher",
    "EngineSlot",
    "Lease",
    "LeaseAsk",
    "LeaseReturn",
    "LeastLoaded",
    "Policy",
    "RouteRequest",
    "Router",
    "RouterActor",
    "make_policy",
]
