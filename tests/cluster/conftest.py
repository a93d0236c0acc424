"""Multi-node fixtures: a ``ray.cluster_utils.Cluster`` on this machine, one per test module.

The cluster has a head node without GPUs and three workers that each declare one logical
GPU (``num_gpus=1``), a ``gpu_node`` custom resource and the node label
``inferpool-test/role=gpu``. This process connects to it by address, as a trainer
connects to a ``ray up`` cluster; helper drivers (``tests/cluster/driver.py``) connect
the same way from their own processes.

One Ray per process: the tests of this folder run before every other test (see
:func:`pytest_collection_modifyitems`), each module connects to its own cluster and
disconnects after it, so the session-wide local Ray of ``tests/conftest.py``
(``ray_session``) starts afterwards, untouched. The cluster keeps its sockets, logs and
address file under a private ``RAY_TMPDIR``, so a ``ray.init()`` elsewhere on the machine
never finds it.

Run: .venv/bin/python -m pytest -q tests/cluster
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import HEAD_LABELS, SYSTEM_CONFIG, LocalCluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run this folder's tests first: they need this process free of any other Ray."""
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if mine:
        items[:] = mine + [item for item in items if item not in set(mine)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head (no GPU) and three one-GPU workers; this process connected by address."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("tests/cluster must run before anything connects this process to another Ray")
    tmpdir = tempfile.mkdtemp(prefix="ipc", dir="/tmp")  # short: Ray's socket paths must stay short
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmpdir
    head_args = {
        "num_cpus": 4,
        "num_gpus": 0,
        "include_dashboard": False,
        "labels": dict(HEAD_LABELS),
        "_system_config": SYSTEM_CONFIG,
    }
    c = Cluster(initialize_head=True, head_node_args=head_args)
    tc = LocalCluster(c, tmpdir)
    try:
        for _ in range(3):
            tc.add_gpu_worker()
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="inferpool-cluster-tests", log_to_driver=False)
        yield tc
    finally:
        ray.shutdown()
        for node in [*c.worker_nodes, c.head_node]:  # no graceful wait: every actor on them is done with
            if node is not None:
                c.remove_node(node, allow_graceful=False)
        c.shutdown()  # no node left to stop: it resets Ray's address file and caches
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmpdir, ignore_errors=True)
