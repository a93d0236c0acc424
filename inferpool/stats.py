"""What ``Pool.stats()`` and ``Pool.metrics_snapshot()`` report, read from the router, the
engines and the session stores (each source bounded by a timeout; a source that does not
answer is reported as an error, not waited for)."""

from __future__ import annotations

import logging
from typing import Any

from inferpool.config import PoolConfig
from inferpool.errors import InferpoolError
from inferpool.ray_utils import CONTROL_TIMEOUT_S, get_ref

logger = logging.getLogger(__name__)

_SOURCE_TIMEOUT_S = 10.0


def pool_stats(config: PoolConfig, router: Any, stores: list[Any]) -> dict[str, Any]:
    """Engines (health, load, counters, node), session shards and router state, as plain dicts."""
    load = get_ref(router.load.remote(), CONTROL_TIMEOUT_S, "router")
    handles = get_ref(router.engines.remote(), CONTROL_TIMEOUT_S, "router")
    infos = {i.engine_id: i for i in get_ref(router.engine_infos.remote(), CONTROL_TIMEOUT_S, "router")}
    refs = {eid: h.stats.remote() for eid, h in handles.items()}
    engines: dict[str, Any] = {}
    for eid, ref in refs.items():
        entry = dict(load.get(eid, {}))
        if eid in infos:
            entry["node_id"] = infos[eid].node_id
        try:
            st = get_ref(ref, _SOURCE_TIMEOUT_S, f"engine {eid} stats")
            entry.update({k: getattr(st, k) for k in st.__dataclass_fields__ if k != "engine_id"})
        except InferpoolError as exc:
            entry["error"] = str(exc)
        engines[eid] = entry
    sessions: dict[str, Any] = {}
    for i, store in enumerate(stores):
        try:
            sessions[f"shard{i}"] = get_ref(store.counts.remote(), _SOURCE_TIMEOUT_S, "session store")
        except InferpoolError as exc:
            sessions[f"shard{i}"] = {"error": str(exc)}
    return {
        "pool": config.name,
        "engines": engines,
        "sessions": sessions,
        "router": {
            "policy": config.router.policy,
            "timings": get_ref(router.timing_summary.remote(), CONTROL_TIMEOUT_S, "router"),
            "leases": get_ref(router.num_leases.remote(), CONTROL_TIMEOUT_S, "router"),
        },
        "versions": get_ref(router.versions.remote(), CONTROL_TIMEOUT_S, "router"),
    }


def pool_metrics(router: Any, stores: list[Any]) -> dict[str, float]:
    """Every metric series of the pool as one flat dict (for wandb / TensorBoard): the engines',
    router's and session stores' ``inferpool_*`` series plus per-engine request time
    mean/std/p99 per split, average attempts and generated tokens/s."""
    handles = get_ref(router.engines.remote(), CONTROL_TIMEOUT_S, "router")
    out: dict[str, float] = {}
    sources = [router.metrics_snapshot.remote()]
    sources += [h.metrics_snapshot.remote() for h in handles.values()]
    sources += [store.metrics_snapshot.remote() for store in stores]
    for ref in sources:
        try:
            for key, value in get_ref(ref, _SOURCE_TIMEOUT_S, "metrics").items():
                out[key] = out.get(key, 0.0) + value if key.endswith("_total") else value
        except InferpoolError as exc:
            logger.warning("metrics source unavailable: %s", exc)
    timings = get_ref(router.timing_summary.remote(), CONTROL_TIMEOUT_S, "router")
    for eid, summary in timings.items():
        for split in ("train", "eval"):
            for stat in ("mean_s", "std_s", "p99_s", "count"):
                value = summary.get(split, {}).get(stat)
                if value is not None:
                    out[f"engine/{eid}/{split}/request_{stat}"] = float(value)
        if summary.get("avg_attempts") is not None:
            out[f"engine/{eid}/avg_attempts"] = float(summary["avg_attempts"])
    for eid, handle in handles.items():
        try:
            st = get_ref(handle.stats.remote(), _SOURCE_TIMEOUT_S, f"engine {eid} stats")
        except InferpoolError:
            continue
        out[f"engine/{eid}/in_flight"] = float(st.in_flight)
        out[f"engine/{eid}/generated_tokens_per_s"] = st.generated_tokens / st.uptime_s if st.uptime_s else 0.0
    return out
