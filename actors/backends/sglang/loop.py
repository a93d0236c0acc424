"""Where the SGLang engine runs: its own event-loop thread, the handle and the factory.

* :class:`EngineLoop`: an event loop in a dedicated daemon thread; the engine lives on it.
* :class:`SGLangEngineHandle`: an ``sgl.Engine`` behind the calls the backend makes, all
  safe on the engine's loop (the tokenizer manager's coroutines, not the synchronous
  ``sgl.Engine`` methods).
* :class:`SGLangEngineFactory`: imports ``sglang`` and builds the handle.

Threading
---------
``sgl.Engine`` binds its tokenizer manager (the coroutine that receives results from the
scheduler process) to the event loop it first runs on, and its synchronous control
methods (``flush_cache``, ``release_memory_occupation``, ``update_weights_from_tensor``,
...) are ``self.loop.run_until_complete(...)`` on that same loop. They cannot be called
while that loop runs, and ``asyncio.to_thread`` does not help: the call would drive the
loop from a second thread while the tokenizer manager's futures belong to the first. So
the backend gives the engine an event loop of its own in a dedicated daemon thread:

* ``sgl.Engine(...)`` is built on that loop, so the minutes-long model load never blocks
  the actor's loop;
* every engine call (``async_generate`` and the control calls) is submitted to it with
  ``asyncio.run_coroutine_threadsafe`` and awaited from the actor's loop (cancelling the
  awaiting task cancels the call on the engine loop);
* the synchronous ``sgl.Engine`` control methods are never called: :class:`SGLangEngineHandle`
  awaits the tokenizer manager's coroutines instead, exactly what those methods wrap.

Blocking work that therefore runs on the engine thread, never on the actor's loop:
``sgl.Engine(...)`` (model load), ``Engine.shutdown()`` (kills the scheduler and
detokenizer processes) and the tensor serialisation of ``update_weights_from_tensor``.
``asyncio.to_thread`` is used only to read the model's Hugging Face config (a fallback in
``start``) and to join the engine thread when it stops.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import multiprocessing
import threading
from collections.abc import Callable, Iterable
from typing import Any

from inferpool.errors import BackendError, ConfigError


def _positional_params(fn: Callable[..., Any]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds)


class SGLangEngineHandle:
    """An ``sgl.Engine`` behind the calls the backend makes, all safe on the engine's loop.

    ``async_generate`` is the Engine's own; the control calls await the tokenizer
    manager's coroutines (the Engine's synchronous methods would ``run_until_complete``
    a loop that is already running). A fake engine for tests implements these same
    methods. ``io`` is ``sglang.srt.managers.io_struct`` (injectable for tests).
    """

    def __init__(self, engine: Any, *, io: Any = None, children: Iterable[Any] = ()) -> None:
        self.engine = engine
        self._io = io
        self._children = list(children)

    @property
    def tokenizer_manager(self) -> Any:
        return self.engine.tokenizer_manager

    @property
    def io(self) -> Any:
        if self._io is None:
            self._io = importlib.import_module("sglang.srt.managers.io_struct")
        return self._io

    async def async_generate(self, **kwargs: Any) -> Any:
        return await self.engine.async_generate(**kwargs)

    def check_health(self) -> None:
        """Raise if a scheduler or detokenizer process the engine started has exited."""
        for proc in self._children:
            if not proc.is_alive():
                raise BackendError(
                    f"SGLang subprocess {getattr(proc, 'name', '?')} (pid {getattr(proc, 'pid', '?')}) "
                    f"exited with code {getattr(proc, 'exitcode', None)}"
                )

    def abort_request(self, rid: str) -> None:
        self.tokenizer_manager.abort_request(rid=rid)

    async def pause_generation(self, mode: str) -> None:
        fn = getattr(self.tokenizer_manager, "pause_generation", None)
        if fn is None:
            raise NotImplementedError("this SGLang version has no pause_generation")
        if _positional_params(fn) == 0:  # SGLang <= 0.5.5: no modes; it aborts everything
            if mode != "abort":
                raise NotImplementedError(f"this SGLang version pauses only by aborting (asked for {mode!r})")
            await fn()
            return
        await fn(self.io.PauseGenerationReqInput(mode=mode))

    async def continue_generation(self) -> None:
        fn = getattr(self.tokenizer_manager, "continue_generation", None)
        if fn is None:
            raise NotImplementedError("this SGLang version has no continue_generation")
        if _positional_params(fn) == 0:
            await fn()
        else:
            await fn(self.io.ContinueGenerationReqInput())

    async def flush_cache(self) -> Any:
        return await self.tokenizer_manager.flush_cache()

    async def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        cls = self.io.ReleaseMemoryOccupationReqInput
        obj = cls() if tags is None else cls(tags=list(tags))
        return await self.tokenizer_manager.release_memory_occupation(obj, None)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        cls = self.io.ResumeMemoryOccupationReqInput
        obj = cls() if tags is None else cls(tags=list(tags))
        return await self.tokenizer_manager.resume_memory_occupation(obj, None)

    def _serialize(self, named_tensors: list[tuple[str, Any]], load_format: str | None) -> list[Any]:
        """One payload per tensor-parallel rank, as ``Engine.update_weights_from_tensor`` builds it."""
        per_rank = getattr(self.engine, "_serialize_tensors_per_rank", None)
        if callable(per_rank):
            return list(per_rank(named_tensors, load_format))
        serializer = importlib.import_module("sglang.srt.utils").MultiprocessingSerializer
        tp_size = int(getattr(getattr(self.engine, "server_args", None), "tp_size", 1) or 1)
        return [serializer.serialize(named_tensors) for _ in range(tp_size)]

    async def update_weights_from_tensor(
        self, named_tensors: list[tuple[str, Any]], load_format: str | None = None, flush_cache: bool = True
    ) -> Any:
        obj = self.io.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=self._serialize(named_tensors, load_format),
            load_format=load_format,
            flush_cache=flush_cache,
        )
        return await self.tokenizer_manager.update_weights_from_tensor(obj, None)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> Any:
        obj = self.io.InitWeightsUpdateGroupReqInput(
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        return await self.tokenizer_manager.init_weights_update_group(obj, None)

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        flush_cache: bool = True,
    ) -> Any:
        obj = self.io.UpdateWeightsFromDistributedReqInput(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=flush_cache
        )
        return await self.tokenizer_manager.update_weights_from_distributed(obj, None)

    def shutdown(self) -> None:
        self.engine.shutdown()


class SGLangEngineFactory:
    """Builds the real engine: imports ``sglang`` (``importer`` is injectable for tests)."""

    def __init__(self, importer: Callable[[str], Any] = importlib.import_module) -> None:
        self.importer = importer

    def __call__(self, **engine_kwargs: Any) -> SGLangEngineHandle:
        try:
            sgl = self.importer("sglang")
        except ImportError as exc:
            if getattr(exc, "name", None) in (None, "sglang"):
                raise ConfigError(
                    "EngineConfig.backend: 'sglang' needs SGLang in the engine's Python environment "
                    f"({exc}); install it with pip install 'inferpool[sglang]' (CUDA GPU only), "
                    "or use backend='sglang_http' against a running SGLang server",
                    field="backend",
                ) from exc
            raise ConfigError(f"EngineConfig.backend: SGLang failed to import: {exc}", field="backend") from exc
        before = set(multiprocessing.active_children())
        try:
            engine = sgl.Engine(**engine_kwargs)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise ConfigError(
                    f"EngineConfig.engine_kwargs: not accepted by sgl.Engine: {exc}", field="engine_kwargs"
                ) from exc
            raise
        children = [p for p in multiprocessing.active_children() if p not in before]
        return SGLangEngineHandle(engine, children=children)


class EngineLoop:
    """An event loop running in its own daemon thread: the SGLang engine lives on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on the engine loop (awaiting it if it returns an awaitable)."""
        if not self.alive:
            raise BackendError("SGLang engine loop is not running")

        async def call() -> Any:
            out = fn(*args, **kwargs)
            if inspect.isawaitable(out):
                out = await out
            return out

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
