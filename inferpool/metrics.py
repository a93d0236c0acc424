"""Metrics through Ray's metrics API (exported by Ray's Prometheus endpoint), mirrored locally.

Every actor keeps one :class:`MetricsRegistry`. Each update goes to a
``ray.util.metrics`` series (names prefixed ``inferpool_``) and to an in-process mirror,
so ``Pool.metrics_snapshot()`` can return the same figures as a flat dict without
scraping Prometheus. Series (tags in brackets):

- ``inferpool_requests_started_total`` / ``_finished_total`` / ``_failed_total`` [engine, split]
- ``inferpool_request_latency_seconds`` (histogram) [engine, split]
- ``inferpool_time_to_first_token_seconds`` (histogram) [engine] — backends that report it
- ``inferpool_prompt_tokens_total`` / ``inferpool_generated_tokens_total`` [engine]
- ``inferpool_in_flight`` / ``inferpool_queued`` (gauges) [engine]
- ``inferpool_routing_decisions_total`` [policy, outcome] (hit, fallback, new, miss, chosen, failover)
- ``inferpool_sessions_open`` (gauge) / ``inferpool_sessions_expired_total`` [shard]
- ``inferpool_weight_updates_total``, ``inferpool_weight_update_bytes``,
  ``inferpool_weight_update_seconds`` (gauges of the last update) [engine]
- ``inferpool_weight_version`` (gauge) [engine] — update index of the weights served
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "inferpool_requests_started_total": ("counter", "Requests an engine started.", ("engine", "split")),
    "inferpool_requests_finished_total": ("counter", "Requests an engine finished.", ("engine", "split")),
    "inferpool_requests_failed_total": ("counter", "Requests that failed on an engine.", ("engine", "split")),
    "inferpool_request_latency_seconds": ("histogram", "Engine-side request latency.", ("engine", "split")),
    "inferpool_time_to_first_token_seconds": ("histogram", "Time to first token.", ("engine",)),
    "inferpool_prompt_tokens_total": ("counter", "Prompt tokens received.", ("engine",)),
    "inferpool_generated_tokens_total": ("counter", "Tokens sampled.", ("engine",)),
    "inferpool_in_flight": ("gauge", "Requests in flight on an engine.", ("engine",)),
    "inferpool_queued": ("gauge", "Requests queued inside an engine.", ("engine",)),
    "inferpool_routing_decisions_total": ("counter", "Routing decisions.", ("policy", "outcome")),
    "inferpool_sessions_open": ("gauge", "Open sessions per store shard.", ("shard",)),
    "inferpool_sessions_expired_total": ("counter", "Sessions expired per store shard.", ("shard",)),
    "inferpool_weight_updates_total": ("counter", "Weight updates loaded.", ("engine",)),
    "inferpool_weight_update_bytes": ("gauge", "Bytes of the last weight update.", ("engine",)),
    "inferpool_weight_update_seconds": ("gauge", "Seconds of the last weight update.", ("engine",)),
    "inferpool_weight_version": (
        "gauge",
        "Update index of the weights an engine serves (0: the checkpoint; see pool.stats()['versions']).",
        ("engine",),
    ),
}


def _key(name: str, tags: dict[str, str]) -> str:
    if not tags:
        return name
    return name + "{" + ",".join(f"{k}={tags[k]}" for k in sorted(tags)) + "}"


class MetricsRegistry:
    """The metrics of one process: Ray series plus a local mirror for snapshots.

    Counters and gauges are exported to Ray once a second from a background thread
    (summed, or the last value), not on every update: an engine updates several per
    request, and each export is a call into Ray's core worker. Histograms are exported
    as they are observed (values cannot be merged).
    """

    FLUSH_S = 1.0

    def __init__(self, export: bool = True) -> None:
        self._export = export
        self._ray: dict[str, Any] = {}
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # not exported yet
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._flusher: threading.Thread | None = None

    def _series(self, name: str) -> Any:
        if not self._export:
            return None
        series = self._ray.get(name)
        if series is None:
            kind, desc, tags = _SPECS[name]
            try:
                from ray.util import metrics as rm

                if kind == "counter":
                    series = rm.Counter(name, desc, tag_keys=tags)
                elif kind == "gauge":
                    series = rm.Gauge(name, desc, tag_keys=tags)
                else:
                    series = rm.Histogram(name, desc, boundaries=LATENCY_BUCKETS, tag_keys=tags)
            except Exception:  # outside a Ray worker: keep the local mirror only
                logger.debug("ray metrics unavailable for %s", name, exc_info=True)
                self._export = False
                return None
            self._ray[name] = series
        return series

    def _start_flusher(self) -> None:
        if self._flusher is None and self._export:
            self._flusher = threading.Thread(target=self._flush_loop, name="inferpool-metrics", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            try:
                self.flush()
            except Exception:  # exporting is best effort; the local mirror stays exact
                logger.debug("metrics flush failed", exc_info=True)

    def flush(self) -> None:
        """Export the counters and gauges updated since the last flush."""
        with self._lock:
            counts, self._counts = self._counts, {}
            gauges, self._gauges = self._gauges, {}
        for (name, tags), value in counts.items():
            series = self._series(name)
            if series is not None and value:
                series.inc(value, tags=dict(tags))
        for (name, tags), value in gauges.items():
            series = self._series(name)
            if series is not None:
                series.set(value, tags=dict(tags))

    def inc(self, name: str, value: float = 1.0, /, **tags: str) -> None:
        key = (name, tuple(sorted(tags.items())))
        with self._lock:
            mirror = _key(name, tags)
            self._values[mirror] = self._values.get(mirror, 0.0) + value
            self._counts[key] = self._counts.get(key, 0.0) + value
        self._start_flusher()

    def set(self, name: str, value: float, /, **tags: str) -> None:
        with self._lock:
            self._values[_key(name, tags)] = float(value)
            self._gauges[(name, tuple(sorted(tags.items())))] = float(value)
        self._start_flusher()

    def observe(self, name: str, value: float, /, **tags: str) -> None:
        with self._lock:
            base = _key(name, tags)
            self._values[base + ":count"] = self._values.get(base + ":count", 0.0) + 1
            self._values[base + ":sum"] = self._values.get(base + ":sum", 0.0) + value
        series = self._series(name)
        if series is not None:
            series.observe(value, tags=tags)

    def snapshot(self) -> dict[str, float]:
        """Flat ``name{tag=value,...}`` -> value (histograms as ``:count`` and ``:sum``)."""
        with self._lock:
            return dict(self._values)
