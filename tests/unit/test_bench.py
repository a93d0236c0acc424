"""The benchmark suite without vLLM: ``scaling`` and ``router_capacity`` in their tiny size, the
runner, and the helpers the benchmarks share (steady-state windows, CPU accounting, shared pools,
background teardowns, which Ray a run uses).

Checks that every expected figure is present, finite and positive and that goals are
reported; no timing is asserted (the figures depend on the machine). The whole
``inferpool bench --quick`` runs in tests/integration/test_bench_quick.py.

Run: pytest tests/unit/test_bench.py
"""

from __future__ import annotations

import json
import math
import os
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
    from inferpool.bench import router_capacity

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
    from inferpool.bench import scaling

    res = scaling.run(quick=True, tiny=True)
    counts = scaling.SIZES["tiny"].counts
    expected = [
        f"{path}_{fig}@{k}"
        for path in ("batch", "per_request")
        for fig in ("req_per_s", "efficiency", "utilisation", "cpu_ms_per_req", "machine_busy")
        for k in counts
    ]
    check_result(res, "scaling", expected, goals=2)
    assert res["figures"][f"batch_efficiency@{counts[0]}"] == pytest.approx(1.0)
    assert res["params"]["service_rate_per_engine_req_per_s"] == pytest.approx(4 / 0.05)


def test_routing_policies_tiny_runs_every_policy_on_one_set_of_engines(ray_session: None) -> None:
    from inferpool.bench import routing_policies

    res = routing_policies.run(quick=True, tiny=True)
    expected = [
        f"{policy}_{fig}"
        for policy in routing_policies.POLICIES
        for fig in ("turns_per_s", "generated_tokens_per_s", "turn_p50_ms", "turn_p99_ms", "prefix_cache_hit_rate")
    ] + ["affinity_over_least_loaded", "prefix_over_least_loaded"]
    check_result(res, "routing_policies", expected, goals=2)
    for policy in routing_policies.POLICIES:  # each policy's own requests: the warm-up misses, later turns hit
        assert 0 < res["figures"][f"{policy}_prefix_cache_hit_rate"] < 1


def test_window_rates_count_whole_waves_between_completions_at_the_same_phase() -> None:
    from inferpool.bench.scaling import window_rates

    # 3 engines' worth of completions arrive in waves of 6, one wave every 0.5 s (12 req/s),
    # shuffled; the first wave is the warm-up, then two windows of 2 waves
    stamps = [0.5 * (wave + 1) + 0.001 * i for wave in range(6) for i in range(6)]
    stamps.reverse()
    rates = window_rates(stamps, wave=6, window=12, windows=2)
    assert rates == pytest.approx([12.0, 12.0])
    with pytest.raises(ValueError, match="completions"):
        window_rates(stamps[:20], wave=6, window=12, windows=2)


def test_hit_rate_between_counts_only_the_requests_in_between() -> None:
    from inferpool.bench.routing_policies import hit_rate_between

    # e0: 1000 tokens at 0.5 before; 1000 more tokens all cached -> 1.0 in between
    # e1: nothing before; 400 tokens, 100 cached -> 0.25; e2 served nothing in between; e3 reports no rate
    before = {"e0": (1000, 0.5), "e2": (300, 0.2), "e3": (10, None)}
    after = {"e0": (2000, 0.75), "e1": (400, 0.25), "e2": (300, 0.2), "e3": (50, None)}
    assert hit_rate_between(before, after) == pytest.approx((1.0 + 0.25) / 2)
    assert math.isnan(hit_rate_between({}, {"e0": (10, None)}))


def test_borrow_shares_within_a_scope_and_stops_at_its_end() -> None:
    from inferpool.bench.common import borrow, shared_scope

    events: list[str] = []

    def start() -> object:
        events.append("start")
        return object()

    def stop(obj: object) -> None:
        events.append("stop")

    with borrow("k", start, stop) as a:  # outside a scope: started and stopped per use
        assert events == ["start"]
    assert events == ["start", "stop"]

    events.clear()
    with shared_scope():
        with borrow("k", start, stop) as a:
            pass
        with borrow("k", start, stop) as b:
            assert b is a
        with borrow("other", start, stop):
            pass
        assert events == ["start", "start"]
    assert events == ["start", "start", "stop", "stop"]

    events.clear()
    with shared_scope():
        with pytest.raises(RuntimeError), borrow("k", start, stop):
            raise RuntimeError("the benchmark failed")
        assert events == ["start", "stop"]  # a failed use does not hand the object on
        with borrow("k", start, stop):
            pass
    assert events == ["start", "stop", "start", "stop"]


def test_finish_later_runs_in_the_background_within_a_scope() -> None:
    import threading

    from inferpool.bench.common import finish_later, shared_scope

    done: list[str] = []
    finish_later(lambda: done.append("inline"), "now")
    assert done == ["inline"]

    go = threading.Event()

    def teardown() -> None:
        assert go.wait(60)
        done.append("background")

    with shared_scope():
        finish_later(teardown, "later")  # returns while the teardown waits
        assert done == ["inline"]
        go.set()
    assert done == ["inline", "background"]  # the scope waited for it

    def broken() -> None:
        raise RuntimeError("teardown failed")

    finish_later(broken, "broken")  # logged, not raised: the figures are already measured


def test_bench_ray_is_a_new_local_instance_unless_an_address_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferpool.bench.common import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address() == "10.0.0.1:6379"


def test_cpu_meter_counts_this_process() -> None:
    from inferpool.bench.common import CpuMeter

    with CpuMeter() as cpu:
        start = sum(os.times()[:2])
        while sum(os.times()[:2]) - start < 0.05:  # burn 50 ms of this process's CPU
            pass
    assert cpu.own_s >= 0.04
    assert cpu.others_s >= 0
    assert 0 < cpu.own_share <= cpu.busy_share
    # no more CPU than the cores had in the window every reading falls in, give or take the
    # counters' clock-tick truncation (a loaded machine's sampling time is inside the window)
    assert cpu.own_s + cpu.others_s <= cpu.wall_s * cpu.cores + cpu.resolution_s + 1e-9
    assert 0 < cpu.resolution_s
    assert cpu.wall_s > 0


def test_cpu_meter_keeps_a_reparented_process_ours() -> None:
    from inferpool.bench.common import CpuMeter

    # (ours by pid, others by pid, times before and after reading): pid 2 was ours and is
    # re-parented (an orphan), pid 4 is a new process of ours, pid 5 a new one of someone else's,
    # pid 6 did not run
    start = ({1: 1.0, 2: 5.0}, {3: 2.0, 6: 1.0}, 0.0, 0.1)
    end = ({1: 1.5, 4: 0.3}, {2: 6.0, 3: 2.5, 5: 1.0, 6: 1.0}, 1.0, 1.1)
    own, others, moved = CpuMeter._deltas(start, end)
    assert own == pytest.approx(0.5 + 1.0 + 0.3)
    assert others == pytest.approx(0.5 + 1.0)
    assert moved == 5


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_meter_counts_a_subprocess_as_ours() -> None:
    import subprocess

    from inferpool.bench.common import CpuMeter

    # the child burns 0.2 s of CPU when told to, then waits to be told to exit
    burn = "import os\ninput()\nt = sum(os.times()[:2])\nwhile sum(os.times()[:2]) - t < 0.2: pass\ninput()"
    with subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE) as child:
        assert child.stdin is not None
        with CpuMeter() as cpu:
            mine = sum(os.times()[:2])
            before = _cpu_of(child.pid)
            child.stdin.write(b"go\n")
            child.stdin.flush()
            while _cpu_of(child.pid) - before < 0.2:  # until the kernel has counted the child's burn
                pass
            mine = sum(os.times()[:2]) - mine
        child.communicate(b"\n", timeout=60)
    assert cpu.own_s - mine >= 0.15  # the child's burn is counted as ours (a descendant of this process)


def test_footer_reports_cpu_of_this_run_and_of_other_processes() -> None:
    from inferpool.bench import report

    quiet = [{"name": "a", "goals": [], "cpu_s": {"ours": 50.0, "others": 1.0}, "load_average_end": [3.0]}]
    text = report.footer(quiet, total_s=40.0, load_end=[3.0], cpus=2)
    assert "this run 50.0, other processes 1.0" in text
    assert "WARNING" not in text  # a high load average of our own processes is no warning
    busy = [{"name": "a", "goals": [], "cpu_s": {"ours": 50.0, "others": 30.0}, "load_average_end": [3.0]}]
    assert "WARNING: other processes used 38% of the 2 CPUs" in report.footer(busy, total_s=40.0, cpus=2)


def test_runner_prints_and_writes_a_registered_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from inferpool.bench import common, runner

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
    assert set(payload["results"][0]["cpu_s"]) == {"ours", "others"}
    assert "CPU seconds" in printed


def test_runner_rejects_unknown_names_and_lists(capsys: pytest.CaptureFixture[str]) -> None:
    from inferpool.bench import runner

    assert runner.main(["--only", "no_such_benchmark"]) == 2
    assert runner.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("pool_vs_raw", "router_capacity", "scaling"):
        assert name in listed


def test_a_failing_benchmark_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from inferpool.bench import runner

    broken = types.ModuleType("bench_broken")

    def run(quick: bool) -> dict[str, Any]:
        raise RuntimeError("boom")

    broken.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench_broken", broken)
    monkeypatch.setattr(runner, "BENCHMARKS", {"broken": "bench_broken"})
    monkeypatch.delenv("INFERPOOL_LOG_LEVEL", raising=False)
    assert runner.main([]) == 1
    assert "ERROR RuntimeError: boom" in capsys.readouterr().out


def test_store_turns_tiny_reports_every_history_and_the_flatness(ray_session: None) -> None:
    from inferpool.bench import store_turns

    res = store_turns.run(quick=True, tiny=True)
    figures = res["figures"]
    for where in ("caller", "store"):
        for h in (1, 4):
            assert figures[f"{where}_turns_per_s@{h}history"] > 0
            assert figures[f"{where}_store_cpu_ms_per_turn@{h}history"] >= 0
        flat = figures[f"{where}_turns_per_s@4history"] / figures[f"{where}_turns_per_s@1history"]
        assert figures[f"{where}_flatness"] == pytest.approx(flat)
    assert figures["store_turns_per_s@1shards"] > 0
    assert figures["many_20x2_turns_per_s"] > 0
    assert [g["name"] for g in res["goals"]] == ["turns/s at 4 / at 1 turns of history"]


def test_process_cpu_names_a_subprocess_tree_and_this_process() -> None:
    import subprocess
    import sys
    import time

    import psutil

    from inferpool.bench.process_cpu import ProcessCpu

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        with ProcessCpu(("Nothing",), trees={"Child": child.pid}) as cpu:
            sum(i * i for i in range(300_000))  # some CPU here too
            end = time.monotonic() + 30
            while time.monotonic() < end and sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.3:
                time.sleep(0.01)  # bounded: until the child spent its CPU (it stays alive, sleeping)
    finally:
        child.kill()
        child.wait(30)
    assert cpu.seconds["Driver"] > 0
    assert cpu.seconds["Nothing"] == 0
    assert cpu.seconds["Child"] > 0.15  # counted under its tree's name, not as ours or anyone else's


def test_process_cpu_sees_run_queue_wait_when_more_processes_spin_than_there_are_cores() -> None:
    import os
    import select
    import subprocess
    import sys

    from inferpool.bench.process_cpu import ProcessCpu, is_engine_core, runqueue_wait_s

    if not os.path.exists(f"/proc/{os.getpid()}/schedstat"):
        pytest.skip("the kernel does not report schedstat")
    spin = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
        "print('done', flush=True)\ntime.sleep(60)"
    )
    count = (os.cpu_count() or 1) + 2
    spinners = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        with ProcessCpu((), trees={f"S{i}": p.pid for i, p in enumerate(spinners)}) as cpu:
            for p in spinners:  # each says when it spent its CPU (bounded wait for the line)
                assert p.stdout is not None
                ready, _, _ = select.select([p.stdout], [], [], 60)
                assert ready and p.stdout.readline().strip() == "done"
    finally:
        for p in spinners:
            p.kill()
            p.wait(30)
    # more runnable processes than cores: some of them waited for one
    assert sum(cpu.wait_seconds[f"S{i}"] for i in range(count)) > 0
    # none of them is taken for a vLLM engine core (another test's engine may be one)
    assert not cpu.core_pids & {p.pid for p in spinners}
    assert is_engine_core("VLLM::EngineCore_DP0") and not is_engine_core(f"{sys.executable} -c {spin!r}")
    assert runqueue_wait_s(2**22 + 12345) == 0.0  # no such process: nothing to report
