from __future__ import annotations

import pytest
import torch
from torch import nn

import gradgate as gg
from cases import Block
from gradgate.tools.agent import FeatureExtractor


def _warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 1)
    model.eval()


class ConvBnCustom(nn.Module):
    """Registration order differs from call order; only tracing finds the pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.conv_a(x)))
        out: torch.Tensor = self.bn_b(self.conv_b(y)) + y
        return out


@pytest.mark.parametrize(
    ("factory", "shape", "expect_folded"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (4, 3, 9, 9), 1),
        (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.3)), (7, 6), 1),
        (ConvBnCustom, (2, 3, 8, 8), 2),
        (Block, (3, 4, 5), 0),
    ],
)
def test_accelerate_matches_original(
    factory: type[nn.Module], shape: tuple[int, ...], expect_folded: int
) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    _warm_bn(model, x)
    gg.freeze(model)
    fast = gg.inference_copy(model, x)
    assert len(fast.folded) == expect_folded
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in fast.modules()) or (
        expect_folded == 0
    )
    assert not any(isinstance(m, nn.Dropout) for m in fast.modules())
    with torch.no_grad():
        want = model(x)
    got = fast(x)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
    assert not got.requires_grad
    fast.train()
    assert not fast.training
    assert torch.equal(got, fast(x))


def test_accelerate_leaves_original_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    gg.freeze(model)
    before = gg.fingerprint(model)
    gg.inference_copy(model, torch.randn(1, 3, 5, 5))
    assert gg.fingerprint(model) == before
    assert isinstance(model[1], nn.BatchNorm2d)


def test_accelerate_refuses_trainable() -> None:
    with pytest.raises(gg.InvalidArgumentError, match=r"still trains 0\.weight") as info:
        gg.inference_copy(nn.Sequential(nn.Linear(2, 2)))
    assert isinstance(info.value, ValueError)


def test_accelerated_output_feeds_training() -> None:
    front = FeatureExtractor()
    gg.freeze(front)
    fast = gg.inference_copy(front, torch.randn(2, 3, 28, 28))
    head = nn.Linear(1568, 2)
    head(fast(torch.randn(2, 3, 28, 28))).sum().backward()
    assert head.weight.grad is not None


def test_accelerate_leaves_the_originals_submodule_modes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    gg.freeze(model, mode="keep")
    model.train()
    model[1].eval()  # a mix the user chose
    modes = [m.training for m in model.modules()]
    gg.inference_copy(model, torch.randn(1, 3, 5, 5))
    assert [m.training for m in model.modules()] == modes
    gg.inference_copy(model)
    assert [m.training for m in model.modules()] == modes


class _SeqLinearBn(nn.Module):
    """Linear over the last dim, then BatchNorm1d over dim 1 of a (N, C, L) input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_linear_batchnorm1d_on_3d_input_is_not_folded_wrongly() -> None:
    torch.manual_seed(0)
    model = _SeqLinearBn()
    x = torch.randn(8, 4, 6)
    _warm_bn(model, x)
    gg.freeze(model)
    with torch.no_grad():
        want = model(x)
    blind = gg.inference_copy(model)  # no example: nothing proves the fold right
    assert blind.folded == []
    assert torch.allclose(blind(x), want, atol=1e-5, rtol=1e-5)
    traced = gg.inference_copy(model, x)  # the example shows a 3-d Linear output: no fold
    assert traced.folded == []
    assert torch.allclose(traced(x), want, atol=1e-5, rtol=1e-5)
    flat = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    _warm_bn(flat, torch.randn(8, 6))
    gg.freeze(flat)
    assert gg.inference_copy(flat).folded == []  # 2-d or 3-d input? only an example tells
    assert gg.inference_copy(flat, torch.randn(8, 6)).folded == [("0", "1")]


def test_accelerate_reports_a_mismatch_with_a_named_error() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) + torch.randn_like(x)  # differs run to run
            return out

    model = Noisy()
    gg.freeze(model)
    with pytest.raises(gg.InferenceCopyError, match="changed the output by up to") as info:
        gg.inference_copy(model, torch.randn(4, 2))
    assert isinstance(info.value, RuntimeError)
