"""A driver process for the multi-node tests: connects to the cluster by address (``RAY_ADDRESS``),
connects to a running pool by name and sends one ``generate_batch``; prints one JSON line.

Usage (from a test): python tests/cluster/driver.py POOL_NAME NAMESPACE FIRST COUNT
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import ray

import inferpool as ip


def main(name: str, namespace: str, first: int, count: int) -> dict[str, object]:
    ray.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, log_to_driver=False)
    try:
        pool = ip.Pool.connect(name, namespace=namespace)
        prompts = [[1 + (first + i) % 200, 7, 9] for i in range(count)]
        results = asyncio.run(pool.generate_batch(prompts, ip.SamplingParams(max_tokens=5, seed=3), chunk_size=16))
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "results": [[r.engine_id, r.choices[0].token_ids] for r in results],
        }
    finally:
        ray.shutdown()


if __name__ == "__main__":
    out = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(out))
