"""FeatureCache (``feature_cache``): a Dataset over memory and disk stores (``stores``).

``key`` hashes what determines the features; ``stores`` keeps them.
"""

from __future__ import annotations

from .feature_cache import FeatureCache

__all__ = ["FeatureCache"]
