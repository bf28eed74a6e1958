"""Benchmark scripts (run them as files: ``python bench/NAME.py``); a package only so that
mypy names ``bench/integrations.py`` apart from ``tests/integrations``."""
