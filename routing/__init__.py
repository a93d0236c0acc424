"""Routing: the router actor and its selection policies."""

from inferpool.routing.policy import EngineSlot, LeastLoaded, Policy, RouteRequest, make_policy
from inferpool.routing.router import Lease, Router, RouterActor

__all__ = [
    "EngineSlot",
    "Lease",
    "LeastLoaded",
    "Policy",
    "RouteRequest",
    "Router",
    "RouterActor",
    "make_policy",
]
