"""Benchmarks and load scripts; each prints a table or a summary line (`python -m benchmarks.X`)."""
