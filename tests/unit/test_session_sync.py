"""What a caller sends the store for a turn it ran: weight versions survive the trip exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from inferpool.errors import SessionError
from inferpool.session_sync import adopt, to_wire
from inferpool.session_tree import SessionTree

VERSION = st.one_of(st.none(), st.sampled_from([0, 1, 2, True, "1", "v2"]))
VERSIONS = st.one_of(
    st.lists(VERSION, max_size=12),
    st.tuples(VERSION, st.integers(1, 12)).map(lambda vn: [vn[0]] * vn[1]),  # one version throughout
)


def _sampled_versions(tree: SessionTree, seg: Any) -> list[Any]:
    """Per sampled token: its version as recorded, with its type (1 and "1" and True differ)."""
    labels = tree.labels(range(len(tree._labels)))
    pairs = zip(seg.versions.tolist(), seg.trainable.tolist(), strict=True)
    return [None if i < 0 else labels[i] for i, sampled in pairs if sampled]


def _typed(versions: list[Any]) -> list[tuple[str, Any]]:
    return [(type(v).__name__, v) for v in versions]


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(VERSIONS, min_size=1, max_size=4))
@example(turns=[[1, True, 1], [True, 1]])  # equal as Python values, different versions
def test_versions_are_exact_in_the_tree_and_after_the_trip_to_the_store(turns: list[list[Any]]) -> None:
    mirror, store = SessionTree("s"), SessionTree("s")
    parent = None
    held: set[tuple[str, Any]] = set()  # every version sampled on the sequence so far
    for versions in turns:
        held |= set(_typed([v for v in versions if v is not None]))
        n = len(versions)
        seg = mirror.new_segment(
            parent, [7, 8], "p", list(range(n)), [-0.5] * n, versions, "x", eos_token_id=None, metadata={}
        )
        assert _typed(_sampled_versions(mirror, seg)) == _typed(versions)
        mirror.record([seg])
        (adopted,) = adopt(store, [to_wire(mirror, seg)])
        assert _typed(_sampled_versions(store, adopted)) == _typed(versions)
        for tree, got in ((mirror, seg), (store, adopted)):  # the versions a sequence holds, by label
            assert set(_typed(tree.labels(sorted(got.vset)))) == held
        parent = seg
    mine, theirs = mirror.state().nodes[-1], store.state().nodes[-1]
    assert mine.token_array.tolist() == theirs.token_array.tolist()
    assert [mine.version_labels[i] if i >= 0 else None for i in mine.version_index.tolist()] == [
        theirs.version_labels[i] if i >= 0 else None for i in theirs.version_index.tolist()
    ]


def test_a_wire_naming_a_version_it_does_not_carry_is_refused() -> None:
    mirror, store = SessionTree("s"), SessionTree("s")
    seg = mirror.new_segment(None, [1], "p", [2, 3], [-0.1, -0.2], [5, 5], "x", eos_token_id=None, metadata={})
    wire = to_wire(mirror, seg)
    bad = dataclasses.replace(wire, version_index=np.array([-1, 0, 1], np.int32))  # only label 0 travels
    with pytest.raises(SessionError, match="weight version"):
        adopt(store, [bad])
    assert len(store) == 0
    adopt(store, [wire])
    assert store.state().nodes[0].version_labels == [5]
