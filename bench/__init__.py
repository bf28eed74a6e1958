"""Benchmark scripts (run them as files: ``python bench/NAME.py``); the workloads on
real models are ``gradgate bench autofreeze`` and ``gradgate bench integrations``."""
