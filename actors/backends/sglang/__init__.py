"""The in-process SGLang engine: an ``sgl.Engine`` held in the engine actor's process.

Token ids in, sampled token ids, the engine's logprob of each sampled token and the
finish reason out: the same :class:`GenerateResult` as the vLLM backend.

Modules
-------
* :mod:`~inferpool.actors.backends.sglang.backend`: :class:`SGLangBackend`, the adapter
  (start, generation, prompt scoring, pause/resume, sleep/wake, shutdown).
* :mod:`~inferpool.actors.backends.sglang.weights`: the adapter's weight half, SGLang's
  update calls mapped onto the pool's chunked and native (NCCL) weight-update protocols.
* :mod:`~inferpool.actors.backends.sglang.loop`: the event-loop thread the engine lives on,
  :class:`SGLangEngineHandle` (the engine calls that are safe on that loop) and
  :class:`SGLangEngineFactory` (imports ``sglang``, builds the engine).
* :mod:`~inferpool.actors.backends.sglang.wire`: SGLang's request and answer format, also
  read by the remote ``sglang_http`` backend.

Nothing is imported here; ``sglang`` itself is imported only when an engine is built.

SGLang surface relied on
------------------------
* ``sgl.Engine(model_path=, random_seed=, dtype=, skip_tokenizer_init=False,
  mem_fraction_static=, enable_memory_saver=, **EngineConfig.engine_kwargs)``.
* ``await engine.async_generate(input_ids=, sampling_params=, return_logprob=True,
  top_logprobs_num=, logprob_start_len=, rid=)``: the answer format is described in
  :mod:`~inferpool.actors.backends.sglang.wire`. ``meta_info.id`` is the ``rid``; the
  backend sets rids itself: the request id, and ``<request id>_<i>`` for sample ``i`` when
  ``n > 1``, which is also how SGLang expands a string rid for parallel sampling.
* Sampling params: ``max_new_tokens``, ``min_new_tokens``, ``temperature`` (0: greedy),
  ``top_p``, ``top_k`` (-1: whole vocabulary), ``min_p``, ``n``, ``stop``,
  ``stop_token_ids``, ``ignore_eos``, ``repetition_penalty``, ``presence_penalty``,
  ``frequency_penalty`` and the per-request seed ``sampling_seed`` (recent SGLang; it
  belongs to SGLang's deterministic inference, ``enable_deterministic_inference=True`` in
  ``engine_kwargs``, and may have no effect without it: unverified here). A request with
  a seed and ``n > 1`` is sent as ``n`` single-sample requests with seeds
  ``seed + choice_offset + i``, so samples differ and a request split across engines
  draws the same seeds as the unsplit one. ``SGLangBackend(seed_field=None)`` never sends
  seeds (older SGLang rejects unknown sampling params).
* Prompt scoring: ``return_logprob=True, logprob_start_len=0, top_logprobs_num=k,
  max_new_tokens=1`` and ``meta_info.input_top_logprobs`` (null at position 0; some
  versions leave position 0 out).
* Engine facts: ``engine.tokenizer_manager.model_config.vocab_size`` and
  ``tokenizer_manager.context_len`` (else ``model_config.context_len``; else the model's
  Hugging Face ``config.json``), EOS from ``tokenizer_manager.tokenizer.eos_token_id``.
* Tokenizer-manager coroutines behind :class:`SGLangEngineHandle`: ``abort_request(rid=)``,
  ``pause_generation(PauseGenerationReqInput(mode=))`` / ``continue_generation(...)`` (modes
  ``abort``, ``in_place``, ``retract``; SGLang <= 0.5.5 takes no argument and only aborts),
  ``flush_cache()``, ``release_memory_occupation`` / ``resume_memory_occupation``
  (need ``enable_memory_saver=True``), ``update_weights_from_tensor``,
  ``init_weights_update_group``, ``update_weights_from_distributed`` — the request classes
  come from ``sglang.srt.managers.io_struct``.

Colocation
----------
With a fractional GPU (``0 < EngineConfig.num_gpus < 1``: the engine shares the GPU with a
trainer) the defaults are ``mem_fraction_static = 0.85 * num_gpus`` (SGLang's own default
takes most of the GPU for weights and KV cache) and ``enable_memory_saver=True`` (so
``sleep``/``wake`` can release and re-acquire the memory). ``engine_kwargs`` overrides both.
"""
