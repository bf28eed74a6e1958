"""inference_copy(): an inference-optimised copy of a frozen part.

Named for what it returns, not ``accelerate``: the users of the trainer
integrations read "accelerate" as Hugging Face Accelerate. ``accelerate`` and
``Accelerated`` stay importable as aliases for one release.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .errors import InferenceCopyError, InvalidArgumentError

__all__ = ["Accelerated", "InferenceCopy", "accelerate", "inference_copy"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class InferenceCopy(nn.Module):
    """A frozen module's optimised copy, run without autograd.

    Attributes:
        inner: the optimised module (BatchNorm folded, Dropout removed).
        folded: ``(producer, batchnorm)`` paths that were folded.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> _ = gg.freeze(net)
        >>> gg.inference_copy(net).folded
        [('0', '1')]
    """

    def __init__(
        self, inner: nn.Module, folded: list[tuple[str, str]], channels_last: bool = False
    ) -> None:
        super().__init__()
        self.inner = inner
        self.folded = folded
        self.channels_last = channels_last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:
            args = tuple(_to_cl(a) for a in args)
        with torch.no_grad():
            out = self.inner(*args, **kwargs)
        if self.channels_last and isinstance(out, torch.Tensor):
            out = out.contiguous()
        return out

    def train(self, mode: bool = True) -> InferenceCopy:
        """Stay in inference mode whatever is asked (it is a frozen copy)."""
        super().train(False)
        return self


def _to_cl(a: Any) -> Any:
    if isinstance(a, torch.Tensor) and a.dim() == 4:
        return a.contiguous(memory_format=torch.channels_last)
    return a


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _trace_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """Find (conv/linear, batchnorm) pairs that fold exactly, by running ``example``.

    The norm must read the producer's output directly, and normalise the
    producer's output channels: a Conv's channels are dim 1, which BatchNorm
    normalises; a Linear's features are the last dim, which BatchNorm1d
    normalises only on 2-d input (on 3-d input it normalises dim 1).
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    keep: list[Any] = []  # keep outputs alive so ids stay unique during the pass

    def after(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            if isinstance(module, nn.Linear) and output.dim() != 2:
                return
            produced[id(output)] = names[id(module)]
            keep.append(output)

    def before(module: nn.Module, inputs: Any) -> None:
        if isinstance(module, _BN) and inputs and id(inputs[0]) in produced:
            pairs.append((produced[id(inputs[0])], names[id(module)]))

    for m in model.modules():
        if isinstance(m, (*_CONV, nn.Linear)):
            handles.append(m.register_forward_hook(after))
        if not list(m.children()):
            handles.append(m.register_forward_pre_hook(before))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv -> BatchNorm neighbours in a Sequential: exact whatever the input's shape.

    Linear -> BatchNorm1d is left out: without an input nothing proves the
    input is 2-d, and on 3-d input the fold would normalise the wrong dim.
    """
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, ma), (b, mb) in itertools.pairwise(kids):
                if isinstance(ma, _CONV) and isinstance(mb, _BN):
                    prefix = name + "." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def inference_copy(
    module: nn.Module,
    example_input: Any = None,
    compile: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    channels_last: bool | None = None,
) -> InferenceCopy:
    """Return an inference-optimised copy of a frozen module.

    Conv/Linear followed by BatchNorm are folded into one layer, Dropout is
    removed, a model with 2-d convolutions runs in ``channels_last`` memory
    format (faster convolutions on CPU; outputs come back contiguous), and the
    copy runs under ``torch.no_grad`` in eval mode (optionally
    ``torch.compile``d). The original is not touched.

    With ``example_input`` the pairs to fold are found by running it (the
    norm must read the producer's output directly) and the copy's output is
    checked against the original's within ``atol``/``rtol`` (float32 folding
    reorders arithmetic, so results agree to about 1e-5 relative, not
    bitwise); a Linear -> BatchNorm1d pair is folded only when the Linear's
    output is 2-d (on 3-d input BatchNorm1d normalises dim 1, not the
    Linear's features). Without it, only Conv -> BatchNorm neighbours in an
    ``nn.Sequential`` are folded (Linear -> BatchNorm1d needs the example).
    The original's parameters, buffers and train/eval modes are left as
    they were.

    Args:
        module: a frozen module (no trainable parameter).
        example_input: an input to find fusable pairs and check the result.
        compile: also ``torch.compile`` the copy.
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.
        channels_last: force the memory format on or off (default: on when
            the module has a ``Conv2d``).

    Returns:
        An ``InferenceCopy`` module.

    Raises:
        InvalidArgumentError: ``module`` is not a module, or still trains.
        InferenceCopyError: the copy's output differs from the original's.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
        ...                           torch.nn.Dropout(0.1))
        >>> _ = gg.freeze(net)
        >>> fast = gg.inference_copy(net, torch.randn(3, 4))
        >>> [type(m).__name__ for m in fast.inner]
        ['Linear', 'Identity', 'Identity']
    """
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(
            f"inference_copy(module=...) needs an nn.Module (the frozen part to speed up); got "
            f"{type(module).__name__} {module!r:.60}"
        )
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise InvalidArgumentError(
            f"inference_copy() makes an inference copy of a frozen part, but "
            f"{type(module).__name__} still trains {', '.join(trainable[:5])}; "
            "call gg.freeze on it first"
        )
    ref = module
    work = copy.deepcopy(module)
    work.eval()
    pairs = _trace_pairs(work, example_input) if example_input is not None else []
    if not pairs:
        pairs = _sequential_pairs(work)
    folded: list[tuple[str, str]] = []
    for prod_name, bn_name in pairs:
        prod, bn = work.get_submodule(prod_name), work.get_submodule(bn_name)
        if not isinstance(bn, _BN) or not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(prod, _CONV):
            fused: nn.Module = fuse_conv_bn_eval(prod, bn)
        elif isinstance(prod, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(prod, bn)
        else:
            continue
        _set(work, prod_name, fused)
        _set(work, bn_name, nn.Identity())
        folded.append((prod_name, bn_name))
    for name, m in list(work.named_modules()):
        if isinstance(m, nn.modules.dropout._DropoutNd):
            _set(work, name, nn.Identity())
    for p in work.parameters():
        p.requires_grad_(False)
    if channels_last is None:
        channels_last = any(isinstance(m, nn.Conv2d) for m in work.modules())
    if channels_last:
        work = work.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    inner: nn.Module = work
    if compile:
        inner = torch.compile(work)  # type: ignore[assignment]
    fast = InferenceCopy(inner, folded, channels_last)
    fast.eval()
    if example_input is not None:
        modes = [(m, m.training) for m in ref.modules()]
        ref.eval()
        try:
            with torch.no_grad():
                want, got = ref(example_input), fast(example_input)
        finally:
            # Each module's own flag, not ref.train(was): that would reset every submodule.
            for m, training in modes:
                m.training = training
        if not torch.allclose(want, got, atol=atol, rtol=rtol):
            diff = float((want - got).abs().max())
            raise InferenceCopyError(
                f"inference_copy({type(module).__name__}) changed the output by up to {diff:.3g} "
                f"(atol={atol}, rtol={rtol}); pass a looser tolerance or report the model"
            )
    return fast


accelerate = inference_copy
"""Old name of ``inference_copy`` (the same function), kept for one release."""

Accelerated = InferenceCopy
"""Old name of ``InferenceCopy`` (the same class), kept for one release."""
