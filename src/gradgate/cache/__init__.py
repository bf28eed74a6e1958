"""FeatureCache: a thin front (``front``) over memory and disk stores (``stores``).

``key`` hashes what determines the features; ``stores`` keeps them.
"""

from __future__ import annotations

from .front import FeatureCache

__all__ = ["FeatureCache"]
