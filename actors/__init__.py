"""Actors: the engine actor and its backends (and, later, the session stores)."""

from inferpool.actors.engine import EngineActor, engine_actor_class, engine_actor_options

__all__ = ["EngineActor", "engine_actor_class", "engine_actor_options"]
