"""Benchmarks: one script per question (run from the repository root)."""
