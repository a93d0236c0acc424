"""The staleness bound of session turns (``RouterConfig.max_staleness``): a turn may extend
tokens sampled at most that many weight updates ago. Checked under the session's lock,
against the versions the turn will extend when it runs, not those it saw when it queued.
"""

from __future__ import annotations

import logging
from typing import Any

from inferpool.config import RouterConfig
from inferpool.errors import StaleSessionError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, await_ref
from inferpool.session_tree import Segment, SessionTree
from inferpool.turns import Stale

logger = logging.getLogger(__name__)


async def staleness_check(router: Any, config: RouterConfig, tree: SessionTree) -> Stale | None:
    """None without a bound; else a check that raises StaleSessionError (policy ``reject``) or
    returns True (``requeue``: the turn renders fresh under the current weights)."""
    bound = config.max_staleness
    if bound is None:
        return None
    versions: dict[str, int] = await await_ref(router.versions.remote(), CONTROL_TIMEOUT_S, "router")
    current = max(versions.values(), default=0)

    def stale(seg: Segment) -> bool:
        sampled = tree.sampled_versions(seg)
        if not sampled:
            return False
        oldest = min(versions.get(str(v), 0) for v in sampled)
        if current - oldest <= bound:
            return False
        if config.staleness_policy == "reject":
            raise StaleSessionError(
                f"session {tree.session_id}, node {seg.node_id}: its earliest sampled tokens are "
                f"{current - oldest} weight updates old, more than RouterConfig.max_staleness={bound}"
            )
        logger.info("session node %s is stale (%d updates): requeued", seg.node_id, current - oldest)
        return True

    return stale
