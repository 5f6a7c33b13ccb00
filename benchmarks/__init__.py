"""Benchmarks for hero-kernels: ``python -m benchmarks`` (suite), ``python -m benchmarks.compile_report``,
``pytest benchmarks/bench_ops.py`` (pytest-benchmark), ``benchmarks/gpu_suite.sh`` (one command on a GPU).

Nothing is imported here, so ``import benchmarks`` stays cheap.
"""
