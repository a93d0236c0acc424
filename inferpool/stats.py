"""What ``Pool.stats()`` and ``Pool.metrics_snapshot()`` report, read from the router, the
engines and the session stores (each source bounded by a timeout; a source that does not
answer is reported as an error, not waited for)."""

from __future__ import annotations

import logging
from typing import Any

from inferpool.actors.placement import actor_place
from inferpool.config import PoolConfig
from inferpool.errors import InferpoolError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, get_ref
from inferpool.routing.shards import RouterSet

logger = logging.getLogger(__name__)

_SOURCE_TIMEOUT_S = 10.0


def pool_stats(config: PoolConfig, routers: Any, stores: list[Any]) -> dict[str, Any]:
    """Engines (health, load, counters, node), session shards (counts, node) and router state
    (node included), as plain dicts. An engine's ``node_id`` is where it runs now (an engine
    Ray restarted on another node reports the new one). ``routers``: the router shards (a
    :class:`RouterSet`, a list, or the one router)."""
    rs = RouterSet.of(routers)
    load = rs.load()
    handles = rs.engines()
    infos = {i.engine_id: i for i in rs.engine_infos()}
    refs = {eid: (h.stats.remote(), h.get_info.remote()) for eid, h in handles.items()}
    engines: dict[str, Any] = {}
    for eid, (ref, info_ref) in refs.items():
        entry = dict(load.get(eid, {}))
        if eid in infos:
            entry["node_id"] = infos[eid].node_id
        entry.update(actor_place(handles[eid]))
        if entry.get("actor_state", "ALIVE") != "ALIVE":  # its node was lost: no answer to wait for
            entry["error"] = f"engine actor is {entry['actor_state']}" + (
                " (Ray restarts it once its CPUs and GPUs fit again, e.g. when a node joins after its node was lost)"
                if entry["actor_state"] == "RESTARTING"
                else ""
            )
            engines[eid] = entry
            continue
        try:
            st = get_ref(ref, _SOURCE_TIMEOUT_S, f"engine {eid} stats")
            entry.update({k: getattr(st, k) for k in st.__dataclass_fields__ if k != "engine_id"})
            live = get_ref(info_ref, _SOURCE_TIMEOUT_S, f"engine {eid} info")
            if live is not None and live.node_id:
                entry["node_id"] = live.node_id
        except InferpoolError as exc:
            entry["error"] = str(exc)
        engines[eid] = entry
    sessions: dict[str, Any] = {}
    for i, store in enumerate(stores):
        try:
            sessions[f"shard{i}"] = get_ref(store.counts.remote(), _SOURCE_TIMEOUT_S, "session store")
        except InferpoolError as exc:
            sessions[f"shard{i}"] = {"error": str(exc)}
        sessions[f"shard{i}"].update(actor_place(store))
    return {
        "pool": config.name,
        "engines": engines,
        "sessions": sessions,
        "router": {
            "policy": config.router.policy,
            "timings": rs.timing_summary(),
            "leases": rs.num_leases(),
            **actor_place(rs.primary),
            "shards": [
                {**actor_place(r), "gc_frozen_objects": frozen}
                for r, frozen in zip(rs.routers, rs.frozen_objects(), strict=True)
            ],
        },
        "versions": get_ref(rs.primary.versions.remote(), CONTROL_TIMEOUT_S, "router"),
    }


def pool_metrics(routers: Any, stores: list[Any]) -> dict[str, float]:
    """Every metric series of the pool as one flat dict (for wandb / TensorBoard): the engines',
    routers' and session stores' ``inferpool_*`` series plus per-engine request time
    mean/std/p99 per split, average attempts and generated tokens/s. Engines that are not
    alive (restarting after their node was lost) are left out, not waited for."""
    rs = RouterSet.of(routers)
    handles = {eid: h for eid, h in rs.engines().items() if actor_place(h).get("actor_state", "ALIVE") == "ALIVE"}
    out: dict[str, float] = {}
    try:
        out.update(rs.metrics_snapshot())
    except InferpoolError as exc:
        logger.warning("metrics source unavailable: %s", exc)
    sources = [h.metrics_snapshot.remote() for h in handles.values()]
    sources += [store.metrics_snapshot.remote() for store in stores]
    stats_refs = {eid: h.stats.remote() for eid, h in handles.items()}
    for ref in sources:
        try:
            for key, value in get_ref(ref, _SOURCE_TIMEOUT_S, "metrics").items():
                out[key] = out.get(key, 0.0) + value if key.endswith("_total") else value
        except InferpoolError as exc:
            logger.warning("metrics source unavailable: %s", exc)
    for eid, summary in rs.timing_summary().items():
        for split in ("train", "eval"):
            for stat in ("mean_s", "std_s", "p99_s", "count"):
                value = summary.get(split, {}).get(stat)
                if value is not None:
                    out[f"engine/{eid}/{split}/request_{stat}"] = float(value)
        if summary.get("avg_attempts") is not None:
            out[f"engine/{eid}/avg_attempts"] = float(summary["avg_attempts"])
    for eid, ref in stats_refs.items():
        try:
            st = get_ref(ref, _SOURCE_TIMEOUT_S, f"engine {eid} stats")
        except InferpoolError:
            continue
        out[f"engine/{eid}/in_flight"] = float(st.in_flight)
        out[f"engine/{eid}/generated_tokens_per_s"] = st.generated_tokens / st.uptime_s if st.uptime_s else 0.0
    return out
