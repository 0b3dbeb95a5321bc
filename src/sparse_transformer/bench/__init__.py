"""Benchmarks behind ``sparse-transformer bench ...``. They print and write JSON; they never edit BENCHMARKS.md."""
