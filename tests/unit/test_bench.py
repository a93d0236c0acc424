"""The benchmark suite without vLLM: ``scaling`` and ``router_capacity`` in their tiny size, and the runner.

Checks that every expected figure is present, finite and positive and that goals are
reported; no timing is asserted (the figures depend on the machine).

Run: pytest tests/unit/test_bench.py
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ lives at the repository root, beside inferpool/
    sys.path.insert(0, str(ROOT))


def check_result(res: dict[str, Any], name: str, expected: list[str], goals: int) -> None:
    assert res["name"] == name
    figures = res["figures"]
    missing = [k for k in expected if k not in figures]
    assert not missing, f"missing figures: {missing}"
    bad = {k: v for k, v in figures.items() if not (math.isfinite(v) and v > 0)}
    assert not bad, f"figures not positive: {bad}"
    assert len(res["goals"]) == goals
    for g in res["goals"]:
        assert {"name", "value", "op", "target", "met"} <= set(g)
        assert g["op"] in (">=", "<=")
        assert isinstance(g["met"], bool)
        assert math.isfinite(g["value"]) and g["value"] > 0
    json.dumps(res)  # JSON-ready


def test_router_capacity_tiny(ray_session: None) -> None:
    from bench import router_capacity

    res = router_capacity.run(quick=True, tiny=True)
    expected = [
        "in_process_decisions_per_s",
        "in_process_acquire_p50_ms",
        "in_process_acquire_p99_ms",
        "in_process_acquire_max_ms",
        "actor_acquire_round_trip_p50_ms",
        "actor_acquire_round_trip_p99_ms",
        "actor_single_calls_decisions_per_s",
        "actor_batched_decisions_per_s",
    ]
    check_result(res, "router_capacity", expected, goals=2)
    assert res["params"]["in_flight"] == 1000


def test_scaling_tiny(ray_session: None) -> None:
    from bench import scaling

    res = scaling.run(quick=True, tiny=True)
    counts = scaling.SIZES["tiny"][0]
    expected = [
        f"{path}_{fig}@{k}"
        for path in ("batch", "per_request")
        for fig in ("req_per_s", "efficiency", "utilisation")
        for k in counts
    ]
    check_result(res, "scaling", expected, goals=2)
    assert res["figures"][f"batch_efficiency@{counts[0]}"] == pytest.approx(1.0)


def test_runner_prints_and_writes_a_registered_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import common, runner

    stub = types.ModuleType("bench_stub")

    def run(quick: bool) -> dict[str, Any]:
        figures = {"widgets_per_s": 12.5 if quick else 1.0}
        return common.result("stub", {"quick": quick}, figures, [common.goal("widgets", 12.5, ">=", 10.0)])

    stub.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench_stub", stub)
    monkeypatch.setattr(runner, "BENCHMARKS", dict(runner.BENCHMARKS))
    monkeypatch.delenv("INFERPOOL_LOG_LEVEL", raising=False)
    runner.register("stub", "bench_stub")
    out_json = tmp_path / "out" / "bench.json"

    assert runner.main(["--quick", "--only", "stub", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    for text in ("CPUs", "python", "ray", "vllm", "torch", "widgets_per_s", "12.5", "[goal >= 10.0]", "total"):
        assert text in printed
    payload = json.loads(out_json.read_text())
    assert payload["mode"] == "quick"
    assert payload["machine"]["cpu_count"] >= 1
    assert payload["results"][0]["figures"] == {"widgets_per_s": 12.5}
    assert payload["results"][0]["seconds"] >= 0


def test_runner_rejects_unknown_names_and_lists(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import runner

    assert runner.main(["--only", "no_such_benchmark"]) == 2
    assert runner.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("pool_vs_raw", "router_capacity", "scaling"):
        assert name in listed


def test_a_failing_benchmark_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import runner

    broken = types.ModuleType("bench_broken")

    def run(quick: bool) -> dict[str, Any]:
        raise RuntimeError("boom")

    broken.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench_broken", broken)
    monkeypatch.setattr(runner, "BENCHMARKS", {"broken": "bench_broken"})
    monkeypatch.delenv("INFERPOOL_LOG_LEVEL", raising=False)
    assert runner.main([]) == 1
    assert "ERROR RuntimeError: boom" in capsys.readouterr().out
