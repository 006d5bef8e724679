"""Benchmarks: quality (``attnlab bench quality``), speed (``attnlab bench speed``) and the report.

Modules are imported on demand (``from attnlab.bench.quality import run_quality``) so that
``import attnlab.bench`` stays light.
"""
