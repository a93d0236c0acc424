"""``inferpool bench --quick`` end to end, as a user runs it (issue 9: it runs in CI and exits 0
with every figure printed).

The real CLI runs in a subprocess (``python -m inferpool.cli bench --quick --json PATH``)
and starts a local Ray of its own (``bench.common.ensure_ray`` uses ``address="local"``
unless ``RAY_ADDRESS`` is set, and the subprocess gets no ``RAY_ADDRESS``), so the test
session's Ray and its vLLM engines are neither used nor changed; the test checks both.
Nothing here asserts a timing or a goal: the benchmarks report goals, they do not assert
them.

Run: pytest tests/integration/test_bench_quick.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 600  # the quick run takes about 2 minutes on 2 cores; this only bounds a hang

# goals each benchmark reports (weight_push reports figures only)
GOALS = {
    "pool_vs_raw": 1,
    "router_capacity": 2,
    "scaling": 2,
    "weight_push": 0,
    "state_ref_vs_json": 2,
    "routing_policies": 2,
    "sessions_vs_raw": 1,
    "store_turns": 1,
    "router_fleet": 1,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> dict[str, Any]:
    """Run ``inferpool bench --quick`` once; its exit status, output and JSON report."""
    import ray

    out_dir = tmp_path_factory.mktemp("bench")
    out_json = out_dir / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(  # from a directory other than the checkout, as a user may stand anywhere
        [sys.executable, "-m", "inferpool.cli", "bench", "--quick", "--json", str(out_json)],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "payload": json.loads(out_json.read_text()) if out_json.exists() else None,
        "session_address": ray.get_runtime_context().gcs_address,
    }


def test_bench_quick_exits_0_and_reports_every_benchmark(quick_run: dict[str, Any]) -> None:
    from inferpool.bench.runner import BENCHMARKS

    assert quick_run["returncode"] == 0, quick_run["stdout"][-4000:] + quick_run["stderr"][-4000:]
    payload = quick_run["payload"]
    assert payload is not None, "no JSON report written"
    assert payload["mode"] == "quick"
    results = {r["name"]: r for r in payload["results"]}
    assert list(results) == list(BENCHMARKS)
    assert set(GOALS) == set(BENCHMARKS), "a benchmark was added or removed: list its goals here"
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res.get('error')}"
        figures = res["figures"]
        assert figures, f"{name}: no figures"
        bad = {k: v for k, v in figures.items() if not math.isfinite(v)}
        assert not bad, f"{name}: figures not finite: {bad}"
        assert len(res["goals"]) == GOALS[name], f"{name}: goals {res['goals']}"
        for g in res["goals"]:
            assert {"name", "value", "op", "target", "met"} <= set(g)
            assert math.isfinite(g["value"])
            assert isinstance(g["met"], bool)


def test_bench_quick_prints_every_benchmark_figure_and_goal(quick_run: dict[str, Any]) -> None:
    payload = quick_run["payload"]
    assert payload is not None
    printed = quick_run["stdout"]
    assert "== inferpool bench (quick)" in printed
    for res in payload["results"]:
        assert f"-- {res['name']} (" in printed
        missing = [k for k in res["figures"] if f"  {k} " not in printed]
        assert not missing, f"{res['name']}: figures not printed: {missing}"
        for g in res["goals"]:
            assert f"goal  {g['name']}" in printed
    assert "== total" in printed


def test_bench_quick_uses_its_own_ray_and_leaves_the_sessions_alone(quick_run: dict[str, Any]) -> None:
    import ray

    payload = quick_run["payload"]
    assert payload is not None
    bench_ray = payload["ray"]
    assert bench_ray["started_by_bench"] is True
    assert bench_ray["address"] and bench_ray["address"] != quick_run["session_address"]
    # the session's Ray is the one it was, still works, and got none of the benchmarks' actors
    assert ray.is_initialized()
    assert ray.get_runtime_context().gcs_address == quick_run["session_address"]
    assert ray.get(ray.put("still here")) == "still here"
    namespaces = {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert "inferpool-bench" not in namespaces
