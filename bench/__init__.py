"""The benchmarks of memories-ingest: one module per section of bench/run.py, and what the sections share.

measure: the CPU, memory and log events of measured processes. rig: the daemon's config, ledgers, videos, the
tree of files and the sink they run against. report: rows, details and units. results: bench/results.md.
"""
