"""Freezing semantics that fit real models and trainers: ranges, eval rules, sticky eval."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any, cast

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import TiedLM

# -- numeric ranges in the selector grammar ------------------------------------


class Encoder(nn.Module):
    """A 12-layer encoder named like Hugging Face's (``encoder.layer.N``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))


def _layers(selector: str) -> list[int]:
    return sorted(int(r.rsplit(".", 1)[1]) for r in gg.select(Encoder(), selector).roots)


@pytest.mark.parametrize(
    ("selector", "layers"),
    [
        ("encoder.layer.[6-11]", [6, 7, 8, 9, 10, 11]),
        ("encoder.layer.[0-11]", list(range(12))),
        ("encoder.layer.[0,2,4-6]", [0, 2, 4, 5, 6]),
        ("encoder.layer.[ 10 , 1 ]", [1, 10]),
        ("encoder.layer.[11]", [11]),
        ("encoder.layer.[0-3]", [0, 1, 2, 3]),
        ("**.layer.[9-99]", [9, 10, 11]),
        ("encoder.layer.1[01]", [10, 11]),  # inside a segment: a character class
        ("encoder.layer.[!0-8]", [9]),
    ],
)
def test_numeric_ranges(selector: str, layers: list[int]) -> None:
    assert _layers(selector) == layers


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("encoder.layer.[6-", "no closing"),
        ("encoder.layer.[11-6]", "runs backwards"),
        ("encoder.layer.[]", "empty bracket"),
        ("encoder.layer.[z-a]x", "runs backwards"),
        ("encoder.layer.x[0-11]", "whole dotted segment"),
        ("encoder.layer.[-4:]", "slices"),
    ],
)
def test_malformed_bracket_names_the_selector(selector: str, reason: str) -> None:
    model = Encoder()
    with pytest.raises(gg.InvalidArgumentError, match=reason) as info:
        gg.freeze(model, selector)
    assert repr(selector) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert all(p.requires_grad for p in model.parameters())


def test_range_regex_matches_exactly_the_range() -> None:
    import re

    from gradgate.selection import range_regex

    for lo, hi in [(0, 0), (0, 9), (7, 13), (95, 1203), (100, 100), (19, 20)]:
        rx = re.compile(range_regex(lo, hi))
        hits = [n for n in range(0, 1500) if rx.fullmatch(str(n))]
        assert hits == list(range(lo, hi + 1)), (lo, hi)
        assert not rx.fullmatch("0" + str(lo))  # canonical numbers only


# -- which modules go to eval ----------------------------------------------------


class HFClassifier(nn.Module):
    """Shaped like Hugging Face's *ForSequenceClassification: root dropout beside the head."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Dropout(0.5))
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.dropout(self.bert(x)))
        return out


def test_train_only_head_keeps_root_dropout_on() -> None:
    model = HFClassifier()
    gg.train_only(model, "classifier")
    model.train()
    assert model.dropout.training and not gg.is_sticky(model.dropout)
    assert model.classifier.training
    assert not model.bert.training and not model.bert[2].training  # frozen encoder: inference
    x = torch.ones(64, 4)
    assert not torch.equal(model.dropout(x), model.dropout(x))


def test_bitfit_leaves_every_module_training() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    )
    gg.train_only(model, "**.bias")
    model.train()
    assert [n for n, m in model.named_modules() if not m.training] == []
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("weight"))


def test_mode_norm_freezes_statistics_but_not_dropout() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    gg.freeze(model, mode="norm")
    model.train()
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    model(torch.randn(16, 3) * 4 + 2)
    assert all(torch.equal(v, stats[k]) for k, v in bn.state_dict().items())
    assert not bn.training and gg.is_sticky(bn)
    assert model[2].training and model.training  # Dropout left to the trainer
    assert gg.summary(model).rows[2].mode == "eval (sticky)"


def test_mode_eval_turns_frozen_dropout_off() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    gg.freeze(model)
    model.train()
    assert [m.training for m in model.modules()] == [False] * 4


def test_fastai_train_bn_recipe_with_norms() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), nn.Linear(4, 2)
    )
    conv, bn, head = model[0][0], model[0][1], model[1]  # type: ignore[index]
    gg.freeze(model, "0", exclude=gg.norms)
    model.train()
    assert not conv.weight.requires_grad
    assert bn.weight.requires_grad and bn.training
    assert not conv.training  # the frozen conv is held in eval
    assert head.weight.requires_grad


# stand-ins for the normalisation classes of Hugging Face and timm (no downloads)
class LlamaRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class T5LayerNorm(LlamaRMSNorm):
    pass


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self) -> None:
        super().__init__(4)


class LayerNorm2d(nn.LayerNorm):
    def __init__(self) -> None:
        super().__init__(4)


class FrozenBatchNorm2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(4))


class Normalizer(nn.Module):  # not a norm layer: the name only starts like one
    pass


def test_norms_matches_every_family() -> None:
    norms = [
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.InstanceNorm2d(4, affine=True),
        nn.LayerNorm(4),
        nn.GroupNorm(2, 4),
        nn.LocalResponseNorm(2),
        nn.RMSNorm(4),
        LlamaRMSNorm(),
        T5LayerNorm(),
        BatchNormAct2d(),
        LayerNorm2d(),
        FrozenBatchNorm2d(),
    ]
    others = [nn.Linear(4, 4), nn.Conv2d(4, 4, 1), nn.Dropout(), Normalizer(), nn.Embedding(3, 4)]
    model = nn.ModuleList(norms + others)
    roots = gg.select(model, gg.norms).roots
    assert sorted(roots, key=int) == [str(i) for i in range(len(norms))]
    kept = gg.select(model, exclude=gg.norms).parameters
    assert all(int(n.split(".")[0]) >= len(norms) for n in kept)


class GroupNormAct(nn.Module):
    """timm's ``*NormAct`` shape: a norm whose children (act, drop) own no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.act = nn.SiLU()
        self.drop = nn.Dropout(0.1)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


class PreNorm(nn.Module):
    """lucidrains' wrapper: named like a norm, but it holds a feed-forward too."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.fn = FeedForward()


def test_norms_excludes_only_the_norm_inside_a_norm_named_wrapper() -> None:
    model = nn.Sequential(nn.Sequential(PreNorm(), PreNorm(), GroupNormAct()), nn.Linear(4, 2))
    assert gg.select(model, gg.norms).roots == ["0.0.norm", "0.1.norm", "0.2"]
    gg.freeze(model, "0", exclude=gg.norms)
    trainable = [n for n, _ in gg.named_trainable_parameters(model)]
    assert trainable == [
        "0.0.norm.weight",
        "0.0.norm.bias",
        "0.1.norm.weight",
        "0.1.norm.bias",
        "0.2.weight",
        "1.weight",
        "1.bias",
    ]


class TimmLike(nn.Module):
    """A tiny model with timm's ``group_matcher`` convention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(*[nn.Conv2d(4, 4, 1) for _ in range(3)])
        self.conv_head = nn.Conv2d(4, 4, 1)
        self.classifier = nn.Linear(4, 2)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^conv_stem|bn1",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^conv_head", (99999,))],
        }


def test_stages_follow_group_matcher() -> None:
    model = TimmLike()
    st = gg.stages(model)
    # timm's grouping: stem, each block, conv_head joins the last block, the rest last
    assert st.names == [
        "[conv_stem, bn1]",
        "blocks.0",
        "blocks.1",
        "[blocks.2, conv_head]",
        "classifier",
    ]
    gg.freeze_to(model, st, -1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (lambda m: torch.compile(m, backend="eager"), "_orig_mod."),
        (nn.DataParallel, "module."),
        (lambda m: torch.compile(nn.DataParallel(m), backend="eager"), "_orig_mod.module."),
    ],
    ids=["compile", "DataParallel", "compile-of-DataParallel"],
)
def test_stages_look_through_wrappers(wrap: Any, prefix: str) -> None:
    # a wrapper's one child would be one stage that never freezes
    model = TimmLike()
    wrapped = wrap(model)
    assert gg.stages(wrapped).names == [
        f"[{prefix}conv_stem, {prefix}bn1]",
        f"{prefix}blocks.0",
        f"{prefix}blocks.1",
        f"[{prefix}blocks.2, {prefix}conv_head]",
        f"{prefix}classifier",
    ]
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert gg.stages(wrap(seq)).names == [f"{prefix}0", f"{prefix}1", f"{prefix}2"]
    gg.freeze_to(wrapped, gg.stages(wrapped), -1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]


class Bracketed(nn.Module):
    """Module names with glob characters."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("a[0]", nn.Linear(2, 2))
        self.add_module("a0", nn.Linear(2, 2))


class BracketedTimm(Bracketed):
    """The same, grouped the timm way."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"first": r"^a\[0\]", "second": r"^a0"}


@pytest.mark.parametrize("matcher", [False, True], ids=["children", "group_matcher"])
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_stages_named_with_glob_characters_select_only_themselves(
    matcher: bool, compiled: bool
) -> None:
    # 'a[0]' as a glob also matched 'a0': the stages overlapped (or, wrapped, matched nothing)
    model = BracketedTimm() if matcher else Bracketed()
    assert callable(getattr(model, "group_matcher", None)) is matcher
    top = cast(nn.Module, torch.compile(model, backend="eager")) if compiled else model
    prefix = "_orig_mod." if compiled else ""
    st = gg.stages(top)
    assert [sorted(ps) for ps in st.parameters] == [
        [f"{prefix}a[0].bias", f"{prefix}a[0].weight"],
        [f"{prefix}a0.bias", f"{prefix}a0.weight"],
    ]
    gg.freeze_to(top, st, 1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["a0.weight", "a0.bias"]


def test_freeze_to_everything_warns() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    st = gg.stages(model)
    with pytest.warns(UserWarning, match="freezes all 2 stages"):
        gg.freeze_to(model, st, len(st))
    assert not any(p.requires_grad for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.freeze_to(model, st, 1)  # a partial freeze is quiet


def test_shared_train_that_freezes_nothing_warns() -> None:
    model = TiedLM()
    with pytest.warns(UserWarning, match="froze nothing"):
        gg.freeze(model, "decoder", shared="train")
    assert model.decoder.weight.requires_grad


# -- sticky eval that holds ---------------------------------------------------------


def _bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))


def _running_mean(model: nn.Module) -> torch.Tensor:
    mean = model.get_buffer("1.running_mean")
    return mean.clone()


def test_direct_training_write_does_not_move_frozen_statistics() -> None:
    model = _bn_model()
    gg.freeze(model, "0", "1")
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    for module in model.modules():  # what Lightning does after each validation loop
        module.training = True
    model(torch.randn(16, 3) * 3 + 1)
    assert all(torch.equal(v, stats[k]) for k, v in bn.state_dict().items())
    assert not bn.training and gg.is_sticky(bn)


def test_foreign_requires_grad_releases_sticky_eval() -> None:
    model = _bn_model()
    gg.freeze(model, "0", "1")
    bn = model[1]
    bn.requires_grad_(True)  # a peer library unfreezes without telling gradgate
    assert not gg.is_sticky(bn)
    rows = {r.path: r for r in gg.summary(model).rows}
    assert rows["1"].state == "trainable" and rows["1"].mode != "eval (sticky)"
    model.train()
    assert bn.training
    mean = _running_mean(model)
    model(torch.randn(16, 3) * 3 + 1)
    assert not torch.equal(mean, _running_mean(model))  # statistics update again


def test_foreign_requires_grad_releases_on_forward_too() -> None:
    model = _bn_model()
    model.train()
    gg.freeze(model, "0", "1")
    model[1].requires_grad_(True)
    mean = _running_mean(model)
    model(torch.randn(16, 3) * 3 + 1)  # no train() call in between
    assert model[1].training and not torch.equal(mean, _running_mean(model))


def test_parameter_free_child_follows_its_released_parent() -> None:
    inner = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model = nn.Sequential(inner, nn.Linear(3, 1))
    gg.freeze(model, "0")
    model.train()
    assert not inner[1].training
    inner[0].requires_grad_(True)
    model.train()
    assert inner.training and inner[1].training


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_sticky_eval_survives_copies(how: str) -> None:
    model = _bn_model()
    gg.freeze(model, "0", "1")
    keys = list(model.state_dict())
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert list(clone.state_dict()) == keys
    bn = clone[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    for module in clone.modules():
        module.training = True
    clone(torch.randn(16, 3) * 3 + 1)
    assert all(torch.equal(v, stats[k]) for k, v in bn.state_dict().items())
    clone[1].requires_grad_(True)  # the copy's hold follows the copy's flags
    assert not gg.is_sticky(clone[1]) and gg.is_sticky(model[1])


def test_sticky_eval_under_torch_compile() -> None:
    model = _bn_model()
    gg.freeze(model, "0", "1")
    compiled = torch.compile(model, backend="eager")
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    for module in model.modules():
        module.training = True
    compiled(torch.randn(16, 3) * 3 + 1).sum().backward()
    assert all(torch.equal(v, stats[k]) for k, v in bn.state_dict().items())


def test_undo_releases_hook_and_mark() -> None:
    model = _bn_model()
    with gg.freeze(model, "1"):
        assert len(model[1]._forward_pre_hooks) == 1
    assert len(model[1]._forward_pre_hooks) == 0 and not gg.is_sticky(model[1])
