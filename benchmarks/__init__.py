"""Benchmark suite: ``python -m benchmarks`` runs it; ``python -m benchmarks.<op>`` one op's part."""
