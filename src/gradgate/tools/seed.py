"""Former name of :mod:`gradgate.tools.agent`, kept importable for existing code.

Example:
    >>> from gradgate.tools import agent, seed
    >>> seed.Agent is agent.Agent
    True
"""

from __future__ import annotations

from .agent import Agent, FeatureExtractor, PolicyNetwork

__all__ = ["Agent", "FeatureExtractor", "PolicyNetwork"]
