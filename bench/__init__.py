"""Benchmarks: each prints a table and writes JSON (bench/results/<name>.json by default)."""
