"""fingerprint, guard and save/load on unusual modules: correct, or a named gradgate error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradgate as gg


def test_uninitialised_lazy_parameters() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    with pytest.raises(gg.InvalidArgumentError, match=r"'0\.weight'.*uninitialised lazy"):
        gg.fingerprint(model)
    with pytest.raises(gg.CheckpointError, match=r"'0\.weight'.*uninitialised lazy"):
        gg.save_trainable(model, Path("unused.safetensors"))
    frozen_lazy = nn.Sequential(nn.LazyLinear(3))
    frozen_lazy[0].weight = nn.UninitializedParameter(requires_grad=False)
    with pytest.raises(gg.InvalidArgumentError, match=r"'0\.weight'.*lazy"), gg.guard(frozen_lazy):
        pass
    model(torch.randn(2, 5))  # materialised: everything works
    gg.freeze(model, "0")
    with gg.guard(model, check="both"):
        model(torch.randn(2, 5))
    assert len(gg.fingerprint(model)) == 64


def test_lazy_module_in_the_trainable_part_is_fine_for_guard(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(5, 5), nn.LazyLinear(2))
    gg.freeze(model, "0")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gg.guard(model, opt, check="both") as g:
        model(torch.randn(2, 5)).sum().backward()
        opt.step()
    assert g.steps == 1
    path = gg.save_trainable(model, tmp_path / "m.safetensors")
    gg.load_trainable(model, path)


class _Sparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coo = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), [1.0, 2.0], (4,))
        self.table = nn.Parameter(coo)
        self.head = nn.Linear(2, 2)


def test_sparse_parameters(tmp_path: Path) -> None:
    a, b = _Sparse(), _Sparse()
    b.head.load_state_dict(a.head.state_dict())
    assert gg.fingerprint(a) == gg.fingerprint(b)
    with torch.no_grad():
        b.table.copy_(torch.sparse_coo_tensor(torch.tensor([[0, 2]]), [1.0, 2.5], (4,)))
    assert gg.fingerprint(a) != gg.fingerprint(b)  # values, not only the pattern
    gg.freeze(a, "table")
    with pytest.raises(gg.FrozenTensorChangedError, match="'table'"), gg.guard(a, check="exact"):
        a.table.data = torch.sparse_coo_tensor(torch.tensor([[1]]), [9.0], (4,))
    path = gg.save_trainable(a, tmp_path / "s.safetensors")  # a frozen sparse base is fingerprinted
    gg.load_trainable(a, path)
    gg.unfreeze(a)
    gg.freeze(a, "head")
    with pytest.raises(gg.CheckpointError, match=r"'table': a torch\.sparse_coo tensor"):
        gg.save_trainable(a, tmp_path / "t.safetensors")


def test_complex128_parameters(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: complex modules are experimental
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(2, 2, dtype=torch.complex128) for _ in range(2)))
        torch.manual_seed(0)
        target = nn.Sequential(*(nn.Linear(2, 2, dtype=torch.complex128) for _ in range(2)))
    gg.freeze(model, "0")
    gg.freeze(target, "0")
    with torch.no_grad():
        model.get_parameter("1.weight").mul_(1j)
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1)
    with gg.guard(model, opt, check="both") as g:
        model(torch.randn(3, 2, dtype=torch.complex128)).abs().sum().backward()
        opt.step()
    assert g.steps == 1
    path = gg.save_trainable(model, tmp_path / "c.safetensors")
    gg.load_trainable(target, path)
    assert target[1].weight.dtype == torch.complex128
    assert gg.fingerprint(target) == gg.fingerprint(model)


def test_torchscript_module(tmp_path: Path) -> None:
    def build() -> torch.jit.ScriptModule:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        scripted: torch.jit.ScriptModule = torch.jit.script(net)
        gg.freeze(scripted, "0", "1", mode="keep")  # eval modes refuse TorchScript
        return scripted

    model, target = build(), build()
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.1, weight_decay=0.1)
    model.eval()  # sticky eval does not reach TorchScript's C++ side (the freezing issue)
    with gg.guard(model, opt, check="both") as g:
        model(torch.randn(4, 2)).sum().backward()
        opt.step()
    assert g.steps == 1
    path = gg.save_trainable(model, tmp_path / "j.safetensors")
    gg.load_trainable(target, path)
    assert gg.fingerprint(target) == gg.fingerprint(model)
    frozen = dict(target.named_parameters())["0.weight"]
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'0\.weight'"),
        gg.guard(target),
        torch.no_grad(),
    ):
        frozen.add_(1)


def _chain(depth: int) -> nn.Module:
    """``depth`` nested modules around a frozen Linear, with a trainable head on top."""
    torch.manual_seed(0)
    node: nn.Module = nn.Linear(2, 2)
    for _ in range(depth):
        parent = nn.Module()
        parent.inner = node
        node = parent
    node.head = nn.BatchNorm1d(1)
    return node


def test_a_3000_deep_chain(tmp_path: Path) -> None:
    model, target = _chain(3000), _chain(3000)
    gg.freeze(model, "inner")
    gg.freeze(target, "inner")
    assert gg.fingerprint(model) == gg.fingerprint(target)
    deepest = model.get_parameter("inner." * 2999 + "inner.weight")
    # gg.trainable_parameters still recurses (torch's named_parameters): the head trains.
    opt = torch.optim.SGD(model.get_submodule("head").parameters(), lr=0.1)
    with gg.guard(model, opt, check="both"):
        opt.step()
    kept = deepest.detach().clone()
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'(inner\.){3000}weight'"),
        gg.guard(model),
        torch.no_grad(),
    ):
        deepest.add_(1)
    with torch.no_grad():
        deepest.copy_(kept)
        model.get_parameter("head.weight").fill_(3)
    path = gg.save_trainable(model, tmp_path / "deep.safetensors")
    gg.load_trainable(target, path)
    assert gg.fingerprint(target) == gg.fingerprint(model)
