"""Benchmark suite: ``python -m benchmarks`` runs it; ``pytest benchmarks --benchmark-only`` the micro-benchmarks."""
