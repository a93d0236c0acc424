"""Remote backends: inference servers someone else runs, reached over HTTP (aiohttp).

* :mod:`~inferpool.actors.backends.remote.http`: :class:`RemoteBackend`, the shared core
  (session, bearer auth, bounded retries, health, ``n`` fan-out).
* :mod:`~inferpool.actors.backends.remote.openai_api`: ``openai``, any OpenAI-compatible
  chat/completions API (text only).
* :mod:`~inferpool.actors.backends.remote.vllm_http`: ``vllm_http``, vLLM's
  OpenAI-compatible server with token ids in and out.
* :mod:`~inferpool.actors.backends.remote.sglang_http`: ``sglang_http``, SGLang's native
  ``/generate`` (read with the in-process backend's :mod:`inferpool.actors.backends.sglang.wire`).
* :mod:`~inferpool.actors.backends.remote.trl_http`: ``trl_http``, TRL's ``vllm-serve``.

Each needs ``EngineConfig.base_url`` (``BackendEntry.remote`` in :mod:`inferpool.registry`).
"""
