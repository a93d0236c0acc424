"""Benchmarks that need a CUDA GPU (and the GPU build of vLLM); each one skips cleanly without.

Run one from the repository root: ``python -m inferpool.bench.gpu.pool_vs_raw_gpu [--quick]``.
"""
