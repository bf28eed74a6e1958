"""Sticky inference mode: a frozen module held in eval until a parameter under it trains (private).

The mark lives on the module instance (``module.train`` replaced by a
``StickyEval``), so it survives ``copy.deepcopy`` and ``torch.save``; a forward
pre-hook undoes direct writes of ``module.training``. ``freezing`` attaches and
removes marks; the model-state record reads them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch import nn

from ._index import ModelIndex, trainable_flags

__all__ = [
    "FollowParent",
    "StickyEval",
    "attach_follower",
    "any_trains",
    "attach_mark",
    "children",
    "follow_parent",
    "hold_eval",
    "is_sticky",
    "remove_mark",
    "sticky_flags",
]


def children(module: nn.Module) -> list[nn.Module]:
    """The direct submodules of ``module`` (read from its dict: no generator)."""
    return [c for c in module.__dict__["_modules"].values() if c is not None]


def any_trains(module: nn.Module) -> bool:
    """Whether a parameter under ``module`` trains (iterative: no recursion limit)."""
    stack = [module]
    while stack:
        m = stack.pop()
        d = m.__dict__
        for p in d["_parameters"].values():
            if p is not None and p.requires_grad:
                return True
        stack.extend(children(m))
    return False


class StickyEval:
    """The mark of a module held in inference mode by a freeze; replaces its ``train``.

    Stored on the module instance itself (the model is the only registry), so
    it survives ``copy.deepcopy`` and ``torch.save``. ``anchor`` is the module
    whose parameters decide: the module itself, or for a parameter-free module
    the nearest ancestor with parameters (it takes its parent's state). The
    hold lasts while no parameter under the anchor trains: the flags are the
    truth, however they were changed. ``wanted`` is the mode the trainer last
    asked for; the module returns to it when released.
    """

    def __init__(self, module: nn.Module, anchor: nn.Module, wanted: bool) -> None:
        self.module = module
        self.anchor = anchor
        self.wanted = wanted

    def __repr__(self) -> str:
        # Stable across runs and modes: structure digests may render module attributes.
        return "<gradgate sticky eval>"

    def holds(self) -> bool:
        """Whether every parameter under the anchor is still frozen."""
        return not any_trains(self.anchor)

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        module = self.module
        if not self.holds():
            remove_mark(module)
            return module.train(mode)
        # One check covers the whole subtree: every sticky mark anchored
        # inside it holds too, so model.train() stays linear in the model size.
        held = {id(self.anchor), id(module)}
        self.wanted = mode
        module.__dict__["training"] = False
        stack = children(module)
        while stack:
            m = stack.pop()
            mark = m.__dict__.get("train")
            if isinstance(mark, StickyEval) and (mark.anchor is m or id(mark.anchor) in held):
                held.add(id(m))
                mark.wanted = mode
                m.__dict__["training"] = False
                stack.extend(children(m))
            else:
                m.train(mode)
        return module


def hold_eval(module: nn.Module, args: object) -> None:
    """Forward pre-hook of a sticky module: re-assert inference mode, or let go.

    Code that writes ``module.training = True`` directly (Lightning restores
    modes that way after validation) bypasses ``train()``; this runs before
    every forward and undoes such a write while the freeze holds.
    """
    mark = module.__dict__.get("train")
    if not isinstance(mark, StickyEval):
        return
    if mark.holds():
        if module.training:
            mark.wanted = True
            module.__dict__["training"] = False
    else:
        remove_mark(module)
        module.__dict__["training"] = mark.wanted


def is_sticky(module: nn.Module) -> bool:
    """Whether ``module`` is held in inference mode by a freeze.

    A module whose parameters were made trainable by any means is not held
    (it lets go at its next ``train()`` or forward).

    Example:
        >>> import torch, gradgate as gg
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> _ = gg.freeze(bn)
        >>> gg.is_sticky(bn), bn.train().training
        (True, False)
        >>> _ = bn.requires_grad_(True)
        >>> gg.is_sticky(bn), bn.train().training
        (False, True)
    """
    mark = module.__dict__.get("train")
    return isinstance(mark, StickyEval) and mark.holds()


def sticky_flags(
    index: ModelIndex, positions: Iterable[int] | None = None, trains: list[bool] | None = None
) -> dict[int, bool]:
    """For modules at ``positions`` (default all): whether a freeze holds them in eval."""
    out: dict[int, bool] = {}
    position: dict[int, int] | None = None
    mods = index.mods
    for i in range(len(mods)) if positions is None else positions:
        m = mods[i]
        mark = m.__dict__.get("train")
        if not isinstance(mark, StickyEval):
            out[i] = False
            continue
        if trains is None:
            trains = trainable_flags(index)
        if mark.anchor is m:
            out[i] = not trains[i]
            continue
        if position is None:
            position = {id(x): j for j, x in enumerate(mods)}
        j = position.get(id(mark.anchor))
        out[i] = not (trains[j] if j is not None else any_trains(mark.anchor))
    return out


# Torch classes whose forward never reads ``self.training``: a direct write
# cannot change what they compute, so they need no pre-hook (exact types: a
# subclass may read it). Skipping them keeps torch's hook-free fast path.
_INERT = frozenset(
    {
        nn.Linear,
        nn.Bilinear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.Embedding,
        nn.EmbeddingBag,
        nn.Sequential,
        nn.ModuleList,
        nn.ModuleDict,
        nn.Identity,
        nn.Flatten,
        nn.Unflatten,
        nn.ReLU,
        nn.ReLU6,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.LeakyReLU,
        nn.ELU,
        nn.Softmax,
        nn.LogSoftmax,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.RMSNorm,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
    }
)


def attach_mark(module: nn.Module, mark: StickyEval) -> None:
    # Plain dict writes: nn.Module.__setattr__ and register_forward_pre_hook
    # cost more than the whole walk on models with 10^5 modules. Negative
    # keys never meet the non-negative ids torch hands out for hooks.
    d = module.__dict__
    if isinstance(d.get("train"), FollowParent):
        remove_mark(module)  # held again: it follows nothing now
    d["train"] = mark
    d["training"] = False
    if type(module) in _INERT:
        return
    hooks = d["_forward_pre_hooks"]
    key = next(_hook_keys)
    hooks[key] = hold_eval
    hooks.move_to_end(key, last=False)  # before user hooks, which may read .training


_hook_keys = itertools.count(-1, -1)


def remove_mark(module: nn.Module) -> None:
    module.__dict__.pop("train", None)
    hooks = module.__dict__["_forward_pre_hooks"]
    for key in [k for k, h in hooks.items() if h is hold_eval or h is follow_parent]:
        del hooks[key]


class FollowParent:
    """Mark of a module an unfreeze released: it runs in the mode of the loop around it.

    Set as the instance's ``train``. At each forward the module takes the
    ``training`` of ``parent`` (the nearest ancestor the unfreeze did not
    release; every released module of the part has its own mark), so a part
    unfrozen inside a validation loop trains once the loop it runs in trains
    again, although Lightning writes its pre-validation snapshot (eval)
    straight into ``module.training``. The first ``train()``/``eval()`` that
    reaches the module settles it: the mark goes, and the mode asked for holds.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = gg.freeze(net, "1"); _ = net.eval(); _ = gg.unfreeze(net, "1")
        >>> net.training = True; net[1].training = False  # a snapshot written back
        >>> _ = net(torch.ones(3, 2)); net[1].training
        True
    """

    def __init__(self, module: nn.Module, parent: nn.Module) -> None:
        self.module = module
        self.parent = parent

    def __repr__(self) -> str:
        # Stable across runs and modes: structure digests may render module attributes.
        return "<gradgate follows parent mode>"

    def __call__(self, mode: bool = True) -> nn.Module:
        module = self.module
        remove_mark(module)
        return module.train(mode)


def follow_parent(module: nn.Module, args: object) -> None:
    """Forward pre-hook of a released module: run in the mode of the loop around it."""
    mark = module.__dict__.get("train")
    if isinstance(mark, FollowParent):
        module.__dict__["training"] = mark.parent.training


def attach_follower(module: nn.Module, parent: nn.Module) -> None:
    """Make a released module follow ``parent``'s mode (plain dict writes, as ``attach_mark``).

    Inert modules get the mark too: their flag is read by people and code.
    """
    d = module.__dict__
    d["train"] = FollowParent(module, parent)
    hooks = d["_forward_pre_hooks"]
    key = next(_hook_keys)
    hooks[key] = follow_parent
    hooks.move_to_end(key, last=False)
