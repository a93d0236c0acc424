"""Benchmarks that print ratios measured side by side in one run.

Each benchmark is a module with ``run(quick: bool) -> dict`` (the dict is described in
:mod:`inferpool.bench.common`); :mod:`inferpool.bench.runner` holds the registry of names and runs them.

Installed with the package as ``inferpool.bench``: ``inferpool bench --quick`` (all),
``inferpool bench --only scaling,router_capacity --json results.json`` (some), or one
module alone: ``python -m inferpool.bench.scaling``. vLLM spawns processes, so every entry point
is guarded by ``if __name__ == "__main__":``.
"""
