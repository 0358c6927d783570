"""Benchmarks: each scenario starts its own broker and measures both sides in one run."""
