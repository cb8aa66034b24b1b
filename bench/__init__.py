"""Benchmarks: `python -m bench` runs them side by side and rewrites BENCHMARKS.md."""
