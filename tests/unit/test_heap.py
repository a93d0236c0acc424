"""Garbage collection in the pool's processes (inferpool.heap, PoolConfig.gc_freeze): what a
freeze keeps out of collection, which processes freeze, and that an engine hands its heap
back before it tears its backend down.

Run: pytest tests/unit/test_heap.py
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

import inferpool as ip
from inferpool.heap import freeze_caller_heap, freeze_heap, unfreeze_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """Each test starts with nothing frozen in this process and leaves it so."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_freeze_keeps_survivors_out_of_collection_until_unfrozen() -> None:
    node = _Node()
    ref = weakref.ref(node)
    frozen = freeze_heap("test")
    # only a freeze adds to the count; Ray's threads in this process may free frozen objects meanwhile
    assert 0 < gc.get_freeze_count() <= frozen
    del node  # now garbage, but only reachable through its own cycle, and frozen
    gc.collect()
    assert ref() is not None, "a frozen object was collected"
    unfreeze_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None, "an unfrozen cycle was not collected"


def test_a_freeze_collects_garbage_before_it_freezes() -> None:
    node = _Node()
    ref = weakref.ref(node)
    del node  # garbage already: the freeze's own collection frees it
    freeze_heap("test")
    assert ref() is None


@pytest.mark.parametrize(("setting", "frozen"), [("pool", False), ("off", False), ("all", True)])
def test_the_users_process_freezes_only_when_asked(setting: str, frozen: bool) -> None:
    freeze_caller_heap(setting, "test")
    assert (gc.get_freeze_count() > 0) is frozen


def test_a_bad_setting_is_refused_naming_the_field() -> None:
    with pytest.raises(ip.ConfigError, match=r"PoolConfig\.gc_freeze") as raised:
        ip.PoolConfig(gc_freeze="always")  # type: ignore[arg-type]
    assert raised.value.field == "gc_freeze"


@pytest.mark.parametrize("freeze", [True, False])
async def test_an_engine_actor_freezes_once_started_and_unfreezes_before_shutdown(freeze: bool) -> None:
    from inferpool.actors.engine import EngineActor

    engine = EngineActor(ip.EngineConfig(backend="fake"), "e-heap", gc_freeze=freeze)
    assert gc.get_freeze_count() == 0
    await engine.start()
    frozen = (await engine.stats()).gc_frozen_objects
    assert (frozen > 0) is freeze
    await engine.shutdown()
    assert gc.get_freeze_count() == 0
    assert (await engine.stats()).gc_frozen_objects == 0


def test_the_pools_engines_run_frozen_by_default(fake_pool: ip.Pool) -> None:
    """The default ('pool') reaches the engine actors' own processes."""
    engines = fake_pool.stats()["engines"]
    assert engines and all(e["gc_frozen_objects"] > 0 for e in engines.values()), engines
    assert fake_pool.config.gc_freeze == "pool"


def test_the_pools_router_shards_and_session_stores_run_frozen_by_default(fake_pool: ip.Pool) -> None:
    """Every control process of the pool reports what it froze, in Pool.stats()."""
    stats = fake_pool.stats()
    shards = stats["router"]["shards"]
    assert shards and all(s["gc_frozen_objects"] > 0 for s in shards), shards
    stores = stats["sessions"]
    assert stores and all(s["gc_frozen_objects"] > 0 for s in stores.values()), stores


@pytest.mark.parametrize("setting", ["pool", "off"])
async def test_a_session_store_freezes_once_started_unless_off(setting: str, fake_pool: ip.Pool) -> None:
    from inferpool.actors.session_store import SessionStore

    config = fake_pool.config.model_copy(update={"gc_freeze": setting})
    store = SessionStore(config, fake_pool.routers.routers, 0)
    assert store.counts()["gc_frozen_objects"] == 0
    await store.start()
    try:
        assert (store.counts()["gc_frozen_objects"] > 0) is (setting != "off")
    finally:
        await store.shutdown()
