"""Trainer integrations: ``GradgateFinetuning`` callbacks for Lightning and the HF Trainer.

Import the one you need; this package imports neither framework, so
``import gradgate`` stays light::

    from gradgate.integrations.lightning import GradgateFinetuning      # gradgate[lightning]
    from gradgate.integrations.transformers import GradgateFinetuning   # gradgate[transformers]
"""

from __future__ import annotations

__all__: list[str] = []
