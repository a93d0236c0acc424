"""Benchmarks that print ratios measured side by side in one run.

Each benchmark is a module with ``run(quick: bool) -> dict`` (the dict is described in
:mod:`bench.common`); :mod:`bench.runner` holds the registry of names and runs them.

Run from the repository root: ``python -m bench --quick`` (all), ``python -m bench
--only scaling,router_capacity --json bench/results/latest.json`` (some), or one
module alone: ``python -m bench.scaling``. vLLM spawns processes, so every entry point
is guarded by ``if __name__ == "__main__":``.
"""
