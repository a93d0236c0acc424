"""Weight updates from a trainer into a pool's engines.

- :mod:`.push`: ``Pool.update_weights`` (the pool side: object-store chunks or a native
  broadcast, versions recorded with the router).
- :mod:`.trainer`: the trainer side of the native methods (vLLM's four-phase protocol
  driven for a whole pool; Gloo and torch.distributed trainers).
- :mod:`.groups`: process groups and tensor framing shared by both sides.

The engine side is :mod:`inferpool.actors.weights` (what an engine actor does with an
update) and the vLLM worker extension in :mod:`inferpool.actors.backends`.
"""
