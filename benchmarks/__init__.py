"""Measurements, not library code: the training benchmark (``python -m benchmarks.bench``), the
GPU check, and scripts that measure one thing each (see docs/benchmarks.md). Run them from the
repository root; they import the installed ``mnistdist``."""
