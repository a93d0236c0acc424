"""The in-process vLLM engine, one concern per module.

* :mod:`~inferpool.actors.backends.vllm.backend`: :class:`VLLMBackend`, vLLM's ``AsyncLLM``
  in the engine actor's process (sampling mapping, sampled-token logprobs, weight calls).
* :mod:`~inferpool.actors.backends.vllm.worker`: the worker extension vLLM mixes into its
  workers (``worker_extension_cls``): weights handed over as raw tensor bytes.
* :mod:`~inferpool.actors.backends.vllm.gloo`: the ``gloo`` weight transfer engine that the
  worker extension registers in vLLM (CPU engines); imports vLLM at module level.

Nothing is imported here, so importing a submodule (as vLLM's worker processes do with the
worker extension) loads only what it needs.
"""
