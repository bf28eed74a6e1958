"""The package version, in the lowest layer so that any module may read it (private)."""

__version__ = "0.1.0"
