"""Benchmarks for clipjax: run ``python -m benchmarks [--quick]``."""
