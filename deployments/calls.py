"""Collaborators as coroutines: a deployment awaits `client.method(...)` whether the object behind it is a Ray actor
of the cluster (`ActorCalls`) or a plain object in this process (`LocalCalls`, for Serve's local testing mode)."""
from __future__ import annotations

from typing import Any


class ActorCalls:
    """An actor's methods as coroutines: `await ActorCalls(actor).get(x)` is `await actor.get.remote(x)`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickling probes dunder names before __init__ has run
            raise AttributeError(name)
        method = getattr(self.actor, name)

        async def call(*args: Any) -> Any:
            return await method.remote(*args)
        return call


class LocalCalls:
    """A plain object's methods as coroutines, run in this process: the in-process twin of `ActorCalls`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self.obj, name)

        async def call(*args: Any) -> Any:
            return method(*args)
        return call
