"""Parameter groups: the one builder behind ``param_groups`` and ``sync``'s new groups."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._index import ModelIndex, gc_paused
from ..errors import InvalidArgumentError
from ..selection import Selector, norms, resolve

__all__ = [
    "DEFAULT_NO_DECAY",
    "LayerDecay",
    "NORM_TYPES",
    "Rules",
    "build_groups",
    "decay_rules",
    "no_decay_names",
    "param_groups",
    "rule_items",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Torch's normalisation types (``gg.norms`` matches these and more, by name)."""

DEFAULT_NO_DECAY: tuple[Selector, ...] = ("**.*bias*", norms)
"""What gets no weight decay by default: every parameter whose name has a segment
containing ``bias`` (the Hugging Face Trainer's rule: ``bias``,
``relative_attention_bias``) and every parameter of a normalisation layer as
``gg.norms`` defines it (torch's norms, ``LlamaRMSNorm``, ``T5LayerNorm``,
``input_layernorm``, ...). ``param_groups`` also keeps every other 0-D and
1-D parameter out of decay unless ``decay_1d=True`` (timm's rule)."""

Rules = Mapping[Any, Mapping[str, Any]] | Sequence[tuple[Selector, Mapping[str, Any]]]
"""``{selector: {option: value}}`` or a list of ``(selector, options)`` pairs; later rules win."""


@dataclass(frozen=True)
class LayerDecay:
    """Layer-wise learning-rate decay over stages ordered front to back.

    Stage ``i`` of ``n`` trains at ``lr * decay ** (n - 1 - i)``: the last
    stage (the head) at ``lr``, earlier ones ever slower (ULMFiT's
    discriminative rates, fastai's ``slice``). Parameters in no stage train
    at ``lr``.

    Example:
        >>> LayerDecay(["front_end", "back_end"], 0.5).factors()
        [0.5, 1.0]
    """

    stages: Sequence[Selector]
    decay: float

    def factors(self) -> list[float]:
        """The learning-rate multiplier of each stage, front to back."""
        n = len(self.stages)
        return [self.decay ** (n - 1 - i) for i in range(n)]


def _is_number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_layer_decay(layer_decay: object) -> None:
    """Refuse a malformed ``layer_decay`` before any group is built."""
    if not isinstance(layer_decay, LayerDecay):
        raise InvalidArgumentError(
            f"param_groups(layer_decay=...) must be (decay, stages) or a LayerDecay; got "
            f"{layer_decay!r}"
        )
    decay, stages = layer_decay.decay, layer_decay.stages
    if not _is_number(decay) or not float(decay) > 0:
        raise InvalidArgumentError(
            f"param_groups(layer_decay=...): decay must be a positive number such as 0.75; "
            f"got {decay!r}"
        )
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise InvalidArgumentError(
            f"param_groups(layer_decay=...): stages must be a list of selectors, front to "
            f"back, e.g. ['encoder.layer.[0-5]', 'encoder.layer.[6-11]']; got {stages!r}"
        )


def rule_items(rules: Rules) -> list[tuple[Selector, Mapping[str, Any]]]:
    """``rules`` as a list of ``(selector, options)`` pairs, in order.

    Example:
        >>> rule_items({"head": {"lr": 0.1}})
        [('head', {'lr': 0.1})]
    """
    if isinstance(rules, Mapping):
        return list(rules.items())
    return [(sel, opts) for sel, opts in rules]


def build_groups(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Parameter]],
    rules: Rules = (),
    defaults: Callable[[str], Mapping[str, Any]] | None = None,
    with_names: bool = True,
    index: ModelIndex | None = None,
) -> list[dict[str, Any]]:
    """Group ``named`` parameters by their options, in parameter order.

    A parameter's options are ``defaults(name)`` overridden by every rule
    whose selector matches it (later rules win); parameters with equal
    options share a group. Options left out are the optimizer's defaults.

    Raises:
        NoMatchError: a rule's selector matches nothing in ``model``.
        InvalidArgumentError: a rule's options are not a mapping.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> groups = build_groups(net, list(net.named_parameters()), {"1": {"lr": 0.5}})
        >>> [(g["param_names"], g.get("lr")) for g in groups]
        [(['0.weight', '0.bias'], None), (['1.weight', '1.bias'], 0.5)]
    """
    if index is None:
        index = ModelIndex(model)
    options: dict[str, dict[str, Any]] = {
        n: dict(defaults(n)) if defaults is not None else {} for n, _ in named
    }
    for sel, opts in rule_items(rules):
        if not isinstance(opts, Mapping):
            raise InvalidArgumentError(
                f"rule for {sel!r} must map option names to values, e.g. {{'lr': 1e-3}}; "
                f"got {opts!r}"
            )
        for pname in resolve(index, [sel]).parameters:
            if pname in options:
                options[pname].update(opts)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, p in named:
        opts = options[name]
        key = tuple(sorted((k, repr(v)) for k, v in opts.items()))
        group = groups.setdefault(
            key, {"params": [], **({"param_names": []} if with_names else {}), **opts}
        )
        group["params"].append(p)
        if with_names:
            group["param_names"].append(name)
    return list(groups.values())


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    rules: Rules = (),
    no_decay: Selector | Sequence[Selector] | None = DEFAULT_NO_DECAY,
    layer_decay: LayerDecay | tuple[float, Sequence[Selector]] | None = None,
    decay_1d: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups of the trainable parameters, for any ``torch.optim`` optimizer.

    Each group carries ``param_names`` (so a resumed run can rebuild it by
    name). Frozen parameters are left out entirely.

    Args:
        model: the model, already frozen as wanted.
        lr: base learning rate.
        weight_decay: weight decay for parameters not matched by ``no_decay``.
        rules: ``{selector: {option: value}}`` (or a list of pairs) applied in
            order, e.g. ``{"back_end.fc2": {"lr": 1e-2}}``; an explicit
            ``lr`` in a rule is not scaled by ``layer_decay``.
        no_decay: selectors whose parameters get ``weight_decay=0`` (default
            ``DEFAULT_NO_DECAY``: names with ``bias`` in a segment, and
            ``gg.norms``); ``None`` decays everything but 1-D tensors.
        decay_1d: decay the 0-D and 1-D parameters ``no_decay`` does not
            name. By default they get no decay, as in timm: such tensors are
            scales and offsets (ConvNeXt's layer-scale ``gamma``, a custom
            norm's weight), which decay would pull towards 0, i.e. off.
        layer_decay: a ``LayerDecay`` (or ``(decay, stages)``) for
            discriminative learning rates.

    Returns:
        A list of group dicts: ``params``, ``param_names``, ``lr``,
        ``weight_decay`` and any rule options.

    Raises:
        InvalidArgumentError: ``lr`` or ``weight_decay`` is not a number (or a
            scalar tensor), ``layer_decay`` is malformed, or nothing trains.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> groups = gg.param_groups(net, lr=0.1, weight_decay=0.01)
        >>> [(g["param_names"], g["weight_decay"]) for g in groups]
        [(['0.weight'], 0.01), (['0.bias', '1.weight', '1.bias'], 0.0)]
        >>> opt = torch.optim.AdamW(groups)
    """
    for arg, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not _is_number(value):
            raise InvalidArgumentError(
                f"param_groups({arg}=...) must be a number (or a scalar tensor); got {value!r}"
            )
    if isinstance(layer_decay, tuple):
        if len(layer_decay) != 2:
            raise InvalidArgumentError(
                f"param_groups(layer_decay=...) must be (decay, stages) or a LayerDecay; got "
                f"{layer_decay!r}"
            )
        layer_decay = LayerDecay(stages=layer_decay[1], decay=layer_decay[0])
    if layer_decay is not None:
        _check_layer_decay(layer_decay)
    with gc_paused():  # a walk of 10^5 tensors: no repeated full collections (see _index)
        index = ModelIndex(model)  # the one read of the model for this call
        named = [(n, p) for n, p in index.params.items() if p.requires_grad]
        if not named:
            raise InvalidArgumentError(
                f"{type(model).__name__} has no trainable parameter; freeze less, or unfreeze first"
            )
        decay_off = no_decay_names(index, named, no_decay, decay_1d)
        factor: dict[str, float] = {}
        if layer_decay is not None:
            for sel, f in zip(layer_decay.stages, layer_decay.factors(), strict=True):
                factor.update(dict.fromkeys(resolve(index, [sel]).parameters, f))

        def defaults(name: str) -> dict[str, Any]:
            return {
                "lr": lr * factor.get(name, 1.0),
                "weight_decay": 0.0 if name in decay_off else weight_decay,
            }

        return build_groups(model, named, rules, defaults, index=index)


def no_decay_names(
    index: ModelIndex,
    named: Sequence[tuple[str, nn.Parameter]],
    no_decay: Selector | Sequence[Selector] | None = DEFAULT_NO_DECAY,
    decay_1d: bool = False,
) -> set[str]:
    """The names in ``named`` that get no weight decay: the one rule of gradgate.

    What ``no_decay`` selects (default ``DEFAULT_NO_DECAY``: biases and norms)
    and, unless ``decay_1d``, every other 0-D and 1-D parameter (timm's rule).
    ``param_groups`` and the trainer callbacks' new groups (``decay_rules``)
    both follow it.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> index = ModelIndex(net)
        >>> sorted(no_decay_names(index, list(index.params.items())))
        ['0.bias', '1.bias', '1.weight']
    """
    off: set[str] = set()
    if no_decay is not None:
        sels = list(no_decay) if isinstance(no_decay, (list, tuple)) else [no_decay]
        for sel in sels:
            with contextlib.suppress(LookupError):  # a model without biases is fine
                off.update(resolve(index, [sel]).parameters)
    if not decay_1d:
        off.update(n for n, p in named if p.dim() <= 1)
    return {n for n, _ in named if n in off}


def decay_rules(model: nn.Module, weight_decay: float) -> list[tuple[Selector, dict[str, float]]]:
    """``gg.sync`` rules that give new groups ``param_groups``' weight decay.

    Every parameter of ``model`` (frozen ones included: they are the ones
    that join later) gets ``weight_decay``, except those ``no_decay_names``
    keeps out of decay (biases, norms, other 1-D tensors), which get 0.
    The trainer callbacks pass these to ``gg.sync`` for every group they add.

    Example:
        >>> import gradgate as gg
        >>> L = torch.nn.Linear
        >>> net = torch.nn.Sequential(L(2, 2), torch.nn.LayerNorm(2), L(2, 1))
        >>> opt = torch.optim.AdamW(gg.param_groups(net, lr=0.1, weight_decay=0.05))
        >>> _ = gg.freeze(net, "0", "1"); _ = gg.sync(opt, net)
        >>> _ = gg.unfreeze(net); _ = gg.sync(opt, net, rules=decay_rules(net, 0.05))
        >>> [(g["param_names"], g["weight_decay"]) for g in opt.param_groups[2:]]
        [(['0.weight'], 0.05), (['0.bias', '1.weight', '1.bias'], 0.0)]
    """
    index = ModelIndex(model)
    named = list(index.params.items())
    off = no_decay_names(index, named)
    decay = [p for n, p in named if n not in off]
    keep = [p for n, p in named if n in off]
    rules: list[tuple[Selector, dict[str, float]]] = []
    if decay:
        rules.append((decay, {"weight_decay": float(weight_decay)}))
    if keep:
        rules.append((keep, {"weight_decay": 0.0}))
    return rules
