"""Benchmarks: `bench_kernels` (mpq bench kernels)."""
