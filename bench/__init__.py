"""Reproducible benchmarks of trio-counter-worker: see docs/BENCHMARKS.md.

Run everything from the repository root with ``.venv/bin/python bench/run_all.py``, or one
benchmark with ``.venv/bin/python -m bench.<name>``.
"""
