"""Metrics: after requests through the pool, the series hold counts that match.

Run: pytest tests/unit/test_metrics.py
"""

from __future__ import annotations

import asyncio

import inferpool as ip
from inferpool.metrics import MetricsRegistry


def total(snapshot: dict[str, float], prefix: str, **tags: str) -> float:
    return sum(
        v
        for k, v in snapshot.items()
        if k.startswith(prefix + "{") and all(f"{tk}={tv}" in k for tk, tv in tags.items())
    )


def test_registry_mirrors_counters_gauges_histograms() -> None:
    reg = MetricsRegistry(export=False)
    reg.inc("inferpool_requests_started_total", engine="e0", split="train")
    reg.inc("inferpool_requests_started_total", 2, engine="e0", split="train")
    reg.set("inferpool_in_flight", 5, engine="e0")
    reg.observe("inferpool_request_latency_seconds", 0.5, engine="e0", split="eval")
    snap = reg.snapshot()
    assert snap["inferpool_requests_started_total{engine=e0,split=train}"] == 3
    assert snap["inferpool_in_flight{engine=e0}"] == 5
    assert snap["inferpool_request_latency_seconds{engine=e0,split=eval}:count"] == 1
    assert snap["inferpool_request_latency_seconds{engine=e0,split=eval}:sum"] == 0.5


def test_pool_metrics_count_the_requests_made(fake_pool: ip.Pool) -> None:
    before = fake_pool.metrics_snapshot()
    results = asyncio.run(_run(fake_pool, 12))
    after = fake_pool.metrics_snapshot()
    tokens = sum(r.num_generated_tokens for r in results)

    def delta(prefix: str, **tags: str) -> float:
        return total(after, prefix, **tags) - total(before, prefix, **tags)

    assert delta("inferpool_requests_started_total", split="eval") == 12
    assert delta("inferpool_requests_finished_total", split="eval") == 12
    assert delta("inferpool_generated_tokens_total") == tokens
    assert delta("inferpool_routing_decisions_total", policy="least_loaded") == 12
    hist = sum(
        v
        for k, v in after.items()
        if k.startswith("inferpool_request_latency_seconds") and "eval" in k and k.endswith(":count")
    )
    assert hist >= 12
    ttft = sum(
        after.get(k, 0) - before.get(k, 0)
        for k in after
        if k.startswith("inferpool_time_to_first_token_seconds") and k.endswith(":count")
    )
    assert ttft == 12
    for eid in fake_pool.engine_ids():
        assert after[f"engine/{eid}/eval/request_count"] >= 1
        assert after[f"engine/{eid}/eval/request_mean_s"] >= 0
        assert after[f"engine/{eid}/avg_attempts"] >= 1


async def _run(pool: ip.Pool, n: int) -> list[ip.GenerateResult]:
    return list(
        await asyncio.gather(
            *(pool.generate([1, 2, 3], ip.SamplingParams(max_tokens=3), split="eval") for _ in range(n))
        )
    )
