"""Benchmark suite for llm2vec-fast: ``python benchmarks/run.py`` or ``python -m benchmarks.run``.

Modules: ``harness`` (timing, memory, results writer), ``bench_attention``, ``bench_pool``,
``bench_loss`` (cases), ``run`` (CLI), ``test_bench_ops`` (pytest-benchmark entry points) and
``device_check.sh`` (the one script run on the GPU test machine).
"""
