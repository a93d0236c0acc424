"""The router's ledger of weight updates: version labels and their update index (staleness
bounds, ``sampled_versions``), and the object-store chunks of the last update, which engines
that start or restart later load before they serve.

:class:`WeightLedger` is a base of the router's health checks (an engine that restarts loads
the latest weights) and so of :class:`~inferpool.routing.router.Router`; the primary
shard holds the pool's ledger, the other shards learn each update's index from it.
"""

from __future__ import annotations

from typing import Any


class WeightLedger:
    """Weight version label -> update index, and the last object-store update's chunk refs."""

    _versions: dict[str, int]
    _latest_weights: tuple[list[Any], int | str] | None

    def _init_ledger(self) -> None:
        self._versions = {"0": 0}  # the checkpoint
        self._latest_weights = None

    def record_version(self, version: int | str | None) -> int | str:
        """Register a weight update; returns its label (its index when ``version`` is None)."""
        index = len(self._versions)
        label = index if version is None else version
        self._versions[str(label)] = index
        return label

    def set_latest_weights(self, chunks: list[Any], version: int | str, index: int | None = None) -> None:
        """Keep the last object-store update (its chunk refs) so engines that start or restart
        later load it before they serve (a native update leaves None: those engines join the group
        at the next update). ``index``: the update's place in the primary's ledger (other shards
        learn it here)."""
        self._latest_weights = (list(chunks), version) if chunks else None
        if index is not None:
            self._versions[str(version)] = index

    def latest_weights(self) -> tuple[list[Any], int | str] | None:
        return self._latest_weights

    def version_index(self, version: int | str) -> int | None:
        """The update index of a recorded version label (0: the checkpoint)."""
        return self._versions.get(str(version))

    def versions(self) -> dict[str, int]:
        """Weight version label -> update index, for staleness bounds."""
        return dict(self._versions)
